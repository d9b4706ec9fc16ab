"""Where in time the audio branch looks in the video: the temporal alignment of the audio<->video coupling.

    python benchmarks/av_alignment.py --num-clips 8

For held-out bouncing-world clips (true video and soundtrack, encoded with the pipeline's own VAEs and text encoder),
the joint model is given the whole video, as in video-to-audio training (noisy latents at `--sigma`, the clean ones as
condition with mask 1), and noisy audio at the same level. Row `j` of the printed matrix is how strongly the audio
prediction over the time span of video latent frame `j` depends on each video latent frame `i` (gradient magnitude,
summed over channels and pixels, rows normalised to 1, averaged over clips). A coupling aligned in time weighs the
diagonal; one that reads the video as a whole (its colour, say) is flat, `1 / T` everywhere. Bounce-ping sync needs
the former, and sharply: a ping must land within one base frame of its bounce.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def audio_span_of_latent_frame(frame: int, timing, temporal_factor: int) -> tuple[int, int]:
    """Audio latents `[lo, hi)` whose start time falls in the pixel frames that video latent frame `frame` covers."""
    from diffusers_skyreels.pipelines.skyreels_v4.conditioning import pixel_frames_of_latent

    frames = pixel_frames_of_latent(frame, temporal_factor)
    seconds_per_latent = timing.num_audio_samples / timing.num_audio_latents / timing.audio_sample_rate
    start, stop = frames.start / timing.fps, frames.stop / timing.fps
    lo = int(np.ceil(start / seconds_per_latent - 1e-9))
    hi = min(timing.num_audio_latents, int(np.ceil(stop / seconds_per_latent - 1e-9)))
    return lo, hi


def alignment_matrix(pipe, specs, sigma: float, seed: int) -> torch.Tensor:
    """`[T, T]`: row j = normalised dependence of the audio in latent frame j's span on each video latent frame."""
    from diffusers_skyreels.demo.world import BASE_CLIP, render_clip
    from diffusers_skyreels.pipelines.skyreels_v4.conditioning import ChannelCondition, audio_condition
    from diffusers_skyreels.pipelines.skyreels_v4.latent_codecs import VideoCodec

    size, fps, num_frames = BASE_CLIP["height"], BASE_CLIP["fps"], BASE_CLIP["num_frames"]
    timing = pipe.clip_timing(fps, num_frames=num_frames)
    codec, audio_codec = VideoCodec(pipe.vae), pipe.audio_codec
    spans = [audio_span_of_latent_frame(j, timing, codec.temporal_factor) for j in range(timing.num_latent_frames)]
    total = torch.zeros(timing.num_latent_frames, timing.num_latent_frames)
    timestep = torch.tensor([sigma * pipe.scheduler.config.num_train_timesteps])
    for index, spec in enumerate(specs):
        clip = render_clip(spec, size, size, fps, num_frames, sample_rate=timing.audio_sample_rate)
        generator = torch.Generator().manual_seed(seed + index)
        with torch.no_grad():
            video = torch.from_numpy(clip.frames).float().div(127.5).sub(1.0).permute(3, 0, 1, 2)[None]
            x0 = codec.encode(video)
            waveform = torch.zeros(1, timing.num_audio_samples)
            samples = min(len(clip.audio), timing.num_audio_samples)
            waveform[0, :samples] = torch.from_numpy(clip.audio[:samples]).float()
            a0 = audio_codec.encode(waveform)[..., : timing.num_audio_latents]
            text = pipe.encode_prompt(spec.prompt)[0]
        video_noise = torch.randn(x0.shape, generator=generator)
        audio_noise = torch.randn(a0.shape, generator=generator)
        noisy_audio = (1 - sigma) * a0 + sigma * audio_noise
        silence = audio_condition(audio_codec, 1, timing.num_audio_latents)
        x0 = x0.clone().requires_grad_(True)
        given = ChannelCondition(x0, torch.ones_like(x0[:, :1]))
        out = pipe.transformer(
            hidden_states=given.model_input((1 - sigma) * x0 + sigma * video_noise),
            timestep=timestep,
            encoder_hidden_states=text,
            audio_transformer=pipe.audio_transformer,
            audio_hidden_states=silence.model_input(noisy_audio),
            audio_timestep=timestep,
        )
        for j, (lo, hi) in enumerate(spans):
            (grad,) = torch.autograd.grad(out.audio_sample[..., lo:hi].pow(2).sum(), x0, retain_graph=True)
            row = grad.abs().sum(dim=(0, 1, 3, 4))
            if row.sum() == 0:
                raise ValueError("The audio prediction does not depend on the video at all: the model's audio<->video "
                                 "coupling is switched off or zero.")
            total[j] += row / row.sum()
    return total / len(specs)


def band_share(matrix: torch.Tensor, width: int) -> float:
    """Mean over rows of the weight within `width` latent frames of the diagonal."""
    t = matrix.shape[0]
    distance = (torch.arange(t)[:, None] - torch.arange(t)[None, :]).abs()
    return float((matrix * (distance <= width)).sum(dim=1).mean())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="joint pipeline folder (default: the shipped demo model)")
    parser.add_argument("--num-clips", type=int, default=8)
    parser.add_argument("--seed", type=int, default=100_000, help="held-out spec seed (training used small seeds)")
    parser.add_argument("--sigma", type=float, default=0.6, help="noise level of both modalities, in (0, 1)")
    parser.add_argument("--output", type=Path, help="write the matrix and shares as JSON here")
    args = parser.parse_args(argv)
    if args.num_clips < 1:
        parser.error(f"--num-clips must be at least 1, got {args.num_clips}")
    if not 0.0 < args.sigma < 1.0:
        parser.error(f"--sigma must lie in (0, 1), got {args.sigma}")

    from diffusers import DiffusionPipeline

    import diffusers_skyreels  # noqa: F401
    from diffusers_skyreels.cli import default_model_path
    from diffusers_skyreels.demo.world import sample_clip_spec

    path = Path(args.model) if args.model else default_model_path()
    if not (path / "model_index.json").is_file():
        parser.error(f"--model {path} is not a pipeline folder (no model_index.json)")
    pipe = DiffusionPipeline.from_pretrained(path)
    if getattr(pipe, "audio_transformer", None) is None:
        parser.error(f"--model {path} has no audio branch: there is no coupling to measure")
    rng = np.random.default_rng(args.seed)
    specs = [sample_clip_spec(rng) for _ in range(args.num_clips)]
    matrix = alignment_matrix(pipe, specs, args.sigma, args.seed)
    t = matrix.shape[0]
    flat_band = band_share(torch.full((t, t), 1.0 / t), 1)
    results = {
        "model": str(path), "clips": args.num_clips, "sigma": args.sigma, "matrix": matrix.tolist(),
        "diagonal_share": band_share(matrix, 0), "flat_diagonal_share": 1.0 / t,
        "within_one_frame_share": band_share(matrix, 1), "flat_within_one_frame_share": flat_band,
    }
    np.set_printoptions(precision=2, suppress=True)
    print(f"rows: audio over video latent frame j's span; columns: video latent frame i ({args.num_clips} clips)")
    print(matrix.numpy())
    print(f"diagonal share {results['diagonal_share']:.3f} (flat {1.0 / t:.3f}); within one latent frame "
          f"{results['within_one_frame_share']:.3f} (flat {flat_band:.3f})")
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
