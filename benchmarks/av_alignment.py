"""Where in time the audio branch looks in the video: the temporal alignment of the audio<->video coupling.

    python benchmarks/av_alignment.py --num-clips 8

For held-out bouncing-world clips (true video and soundtrack, encoded with the pipeline's own VAEs and text encoder),
the joint model is given the whole video, as in video-to-audio training (noisy latents at `--sigma`, the clean ones as
condition with mask 1), and noisy audio at the same level. Row `j` of the printed matrix is how strongly the audio
prediction over the time span of video latent frame `j` depends on each video latent frame `i` (gradient magnitude,
summed over channels and pixels, rows normalised to 1, averaged over clips). A coupling aligned in time weighs the
diagonal; one that reads the video as a whole (its colour, say) is flat, `1 / T` everywhere. Bounce-ping sync needs
the former, and sharply: a ping must land within one base frame of its bounce.

It then measures whether the audio *uses* the video's timing: the audio flow-matching loss at several noise levels
with each clip's own video given, and with the video of the same object moving from another start position (same
prompt, colour, shape, speed and height; only the bounce times differ). A soundtrack generated from the video's
bounces has a clearly lower loss with its own video; equal losses mean the audio reads only what both videos share.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def encode_clip(pipe, spec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The world's true clip for `spec` at the base size: video latents, audio latents and prompt embeddings."""
    from diffusers_skyreels.demo.world import BASE_CLIP, render_clip
    from diffusers_skyreels.pipelines.skyreels_v4.latent_codecs import VideoCodec

    size, fps, num_frames = BASE_CLIP["height"], BASE_CLIP["fps"], BASE_CLIP["num_frames"]
    timing = pipe.clip_timing(fps, num_frames=num_frames)
    clip = render_clip(spec, size, size, fps, num_frames, sample_rate=timing.audio_sample_rate)
    with torch.no_grad():
        video = torch.from_numpy(clip.frames).float().div(127.5).sub(1.0).permute(3, 0, 1, 2)[None]
        x0 = VideoCodec(pipe.vae).encode(video)
        waveform = torch.zeros(1, timing.num_audio_samples)
        samples = min(len(clip.audio), timing.num_audio_samples)
        waveform[0, :samples] = torch.from_numpy(clip.audio[:samples]).float()
        a0 = pipe.audio_codec.encode(waveform)[..., : timing.num_audio_latents]
        text = pipe.encode_prompt(spec.prompt)[0]
    return x0, a0, text


def predict_audio(pipe, x0, noisy_video, noisy_audio, text, sigma: float):
    """The joint model's audio velocity with the whole video `x0` given (mask 1) and both modalities at `sigma`."""
    from diffusers_skyreels.pipelines.skyreels_v4.conditioning import ChannelCondition, audio_condition

    timestep = torch.tensor([sigma * pipe.scheduler.config.num_train_timesteps])
    silence = audio_condition(pipe.audio_codec, 1, noisy_audio.shape[-1])
    given = ChannelCondition(x0, torch.ones_like(x0[:, :1]))
    return pipe.transformer(
        hidden_states=given.model_input(noisy_video),
        timestep=timestep,
        encoder_hidden_states=text,
        audio_transformer=pipe.audio_transformer,
        audio_hidden_states=silence.model_input(noisy_audio),
        audio_timestep=timestep,
    ).audio_sample


def alignment_matrix(pipe, specs, sigma: float, seed: int) -> torch.Tensor:
    """`[T, T]`: row j = normalised dependence of the audio in latent frame j's span on each video latent frame."""
    from diffusers_skyreels.demo.world import BASE_CLIP
    from diffusers_skyreels.pipelines.skyreels_v4.latent_codecs import VideoCodec
    from diffusers_skyreels.training.flow_matching import noisy_latents

    level = torch.tensor([sigma])
    timing = pipe.clip_timing(BASE_CLIP["fps"], num_frames=BASE_CLIP["num_frames"])
    factor = VideoCodec(pipe.vae).temporal_factor
    spans = [audio_span_of_latent_frame(j, timing, factor) for j in range(timing.num_latent_frames)]
    total = torch.zeros(timing.num_latent_frames, timing.num_latent_frames)
    for index, spec in enumerate(specs):
        x0, a0, text = encode_clip(pipe, spec)
        generator = torch.Generator().manual_seed(seed + index)
        video_noise = torch.randn(x0.shape, generator=generator)
        audio_noise = torch.randn(a0.shape, generator=generator)
        x0 = x0.clone().requires_grad_(True)
        audio = predict_audio(pipe, x0, noisy_latents(x0, video_noise, level), noisy_latents(a0, audio_noise, level),
                              text, sigma)
        for j, (lo, hi) in enumerate(spans):
            (grad,) = torch.autograd.grad(audio[..., lo:hi].pow(2).sum(), x0, retain_graph=True)
            row = grad.abs().sum(dim=(0, 1, 3, 4))
            if row.sum() == 0:
                raise ValueError("The audio prediction does not depend on the video at all: the model's audio<->video "
                                 "coupling is switched off or zero.")
            total[j] += row / row.sum()
    return total / len(specs)


def shifted_in_time(spec):
    """The same object, prompt and height starting half the room away: only the bounce times differ."""
    return dataclasses.replace(spec, start_x=(spec.start_x + 0.5) % 1.0)


def timing_use(pipe, specs, sigmas: list[float], seed: int) -> dict[float, tuple[float, float, float]]:
    """Per sigma: mean audio loss with the clip's own video, with `shifted_in_time`'s video, and the share of clips
    whose own video gives the lower loss. Both calls see the same noise and the clip's own audio and prompt."""
    from diffusers_skyreels.training.flow_matching import noisy_latents, velocity_target

    clips = [(*encode_clip(pipe, spec), encode_clip(pipe, shifted_in_time(spec))[0]) for spec in specs]
    results = {}
    for sigma in sigmas:
        level = torch.tensor([sigma])
        own, shifted = [], []
        for index, (x0, a0, text, other) in enumerate(clips):
            generator = torch.Generator().manual_seed(seed + index)
            video_noise = torch.randn(x0.shape, generator=generator)
            audio_noise = torch.randn(a0.shape, generator=generator)
            noisy_audio = noisy_latents(a0, audio_noise, level)
            with torch.no_grad():
                for video, losses in ((x0, own), (other, shifted)):
                    audio = predict_audio(pipe, video, noisy_latents(video, video_noise, level), noisy_audio, text,
                                          sigma)
                    losses.append(float((audio - velocity_target(a0, audio_noise)).pow(2).mean()))
        own_t, shifted_t = torch.tensor(own), torch.tensor(shifted)
        results[sigma] = (float(own_t.mean()), float(shifted_t.mean()), float((own_t < shifted_t).float().mean()))
    return results


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
    parser.add_argument("--loss-sigmas", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9],
                        help="noise levels of the own-vs-shifted-video audio loss, each in (0, 1)")
    parser.add_argument("--output", type=Path, help="write the matrix and shares as JSON here")
    args = parser.parse_args(argv)
    if args.num_clips < 1:
        parser.error(f"--num-clips must be at least 1, got {args.num_clips}")
    if not 0.0 < args.sigma < 1.0:
        parser.error(f"--sigma must lie in (0, 1), got {args.sigma}")
    if not all(0.0 < sigma < 1.0 for sigma in args.loss_sigmas):
        parser.error(f"--loss-sigmas must each lie in (0, 1), got {args.loss_sigmas}")

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
    use = timing_use(pipe, specs, args.loss_sigmas, args.seed)
    results["audio_loss_own_vs_shifted_video"] = {str(sigma): list(values) for sigma, values in use.items()}
    print("audio loss with the clip's own video vs the same object's video shifted in time:")
    for sigma, (own, shifted, share) in use.items():
        print(f"  sigma {sigma:g}: own {own:.4f}, shifted {shifted:.4f} (ratio {own / shifted:.3f}); own lower for "
              f"{100 * share:.0f} % of clips")
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
