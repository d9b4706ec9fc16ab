"""Token, attention-FLOP and memory arithmetic of a generation request: direct vs low-res + keyframes + refiner.

`python -m diffusers_skyreels.planner --height 1080 --width 1920 --fps 32 --duration 15 --preset large` prints, per
denoising step, what the transformers see when generating the requested clip directly and with the paper's strategy
(architecture.md §7): the base pass at 1/`spatial_scale` size and 1/`temporal_scale` frame rate with high-res
keyframes, then the refiner at full size with Video Sparse Attention.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from .models.presets import preset_config
from .pipelines.skyreels_v4.timing import clip_timing

VAE_SPATIAL, VAE_TEMPORAL, PATCH = 8, 4, 2


@dataclass(frozen=True)
class PassCost:
    """One transformer pass (per denoising step, one CFG half)."""

    name: str
    video_tokens: int
    audio_tokens: int
    text_tokens: int
    attention_tflops: float
    linear_tflops: float
    activation_gib: float

    @property
    def tflops(self) -> float:
        return self.attention_tflops + self.linear_tflops


def _video_tokens(num_latent_frames: int, height: int, width: int) -> int:
    return num_latent_frames * math.ceil(height / VAE_SPATIAL / PATCH) * math.ceil(width / VAE_SPATIAL / PATCH)


def _branch_pass(
    name: str,
    config: dict,
    tokens: int,
    text_tokens: int,
    partner_tokens: int = 0,
    keep_ratio: float = 1.0,
    text_cross: bool = True,
) -> tuple[float, float, float]:
    """(attention TFLOPs, linear TFLOPs, activation GiB) of one branch for `tokens` x tokens."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    blocks = config["num_dual_stream_layers"] + config["num_single_stream_layers"]
    joint = tokens + text_tokens
    # Joint self-attention (QK^T and AV: 4 * Sq * Sk * dim), sparse on the video grid at `keep_ratio`.
    attention = 4 * dim * (tokens * tokens * keep_ratio + 2 * tokens * text_tokens + text_tokens * text_tokens)
    if text_cross:
        attention += 4 * dim * tokens * text_tokens
    if partner_tokens:
        attention += 4 * dim * tokens * partner_tokens
    projections = 4 * dim * dim * (1 + int(text_cross) + int(partner_tokens > 0))  # q, k, v, out per attention
    linear = 2 * (joint * (4 * dim * dim + 2 * dim * config["ffn_dim"]) + tokens * (projections - 4 * dim * dim))
    activations = tokens * max(config["ffn_dim"], 4 * dim) * 2 * 3  # bf16 peak inside a block, a few live buffers
    return attention * blocks / 1e12, linear * blocks / 1e12, activations / 2**30


def plan(
    height: int,
    width: int,
    fps: float,
    duration_seconds: float,
    preset: str = "large",
    spatial_scale: int = 2,
    temporal_scale: int = 2,
    keyframe_stride: int = 4,
    text_tokens: int = 256,
    audio_latents_per_second: float = 44100 / 1024,
    refiner_keep_ratio: float = 0.125,
) -> list[PassCost]:
    """The passes of direct generation and of the keyframe + refiner strategy, for one denoising step."""
    video_config, audio_config = preset_config(preset, "video"), preset_config(preset, "audio")
    direct = clip_timing(fps, duration_seconds=duration_seconds, max_duration_seconds=float("inf"))
    audio_tokens = max(1, round(direct.duration_seconds * audio_latents_per_second))
    base = clip_timing(fps / temporal_scale, duration_seconds=duration_seconds, max_duration_seconds=float("inf"))
    low_h, low_w = height // spatial_scale, width // spatial_scale
    num_keyframes = len(set(range(0, base.num_latent_frames, keyframe_stride)) | {base.num_latent_frames - 1})
    refined_frames = (base.num_latent_frames - 1) * temporal_scale + 1

    passes = []
    tokens = _video_tokens(direct.num_latent_frames, height, width)
    v = _branch_pass("video", video_config, tokens, text_tokens, audio_tokens)
    a = _branch_pass("audio", audio_config, audio_tokens, text_tokens, tokens, text_cross=False)
    passes.append(PassCost("direct: joint video+audio", tokens, audio_tokens, text_tokens, v[0] + a[0], v[1] + a[1],
                           max(v[2], a[2])))
    base_tokens = _video_tokens(base.num_latent_frames, low_h, low_w) + _video_tokens(num_keyframes, height, width)
    v = _branch_pass("video", video_config, base_tokens, text_tokens, audio_tokens)
    a = _branch_pass("audio", audio_config, audio_tokens, text_tokens, base_tokens, text_cross=False)
    passes.append(PassCost("strategy: base (low-res + keyframes) + audio", base_tokens, audio_tokens, text_tokens,
                           v[0] + a[0], v[1] + a[1], max(v[2], a[2])))
    refiner_tokens = _video_tokens(refined_frames, height, width)
    r = _branch_pass("refiner", video_config, refiner_tokens, text_tokens, keep_ratio=refiner_keep_ratio)
    passes.append(PassCost("strategy: refiner (VSA)", refiner_tokens, 0, text_tokens, r[0], r[1], r[2]))
    return passes


def weight_gib(preset: str) -> float:
    """bf16 weights of the video and audio branches of a preset, without allocating them."""
    import torch

    from .models import SkyReelsV4AudioTransformer, SkyReelsV4Transformer

    with torch.device("meta"):
        count = sum(p.numel() for p in SkyReelsV4Transformer.from_preset(preset).parameters())
        count += sum(p.numel() for p in SkyReelsV4AudioTransformer.from_preset(preset).parameters())
    return count * 2 / 2**30


def format_plan(passes: list[PassCost], weights_gib: float | None = None) -> str:
    header = f"{'pass':48s} {'video tok':>10s} {'audio tok':>9s} {'attn TFLOP':>11s} {'total TFLOP':>11s} {'act GiB':>8s}"
    lines = [header, "-" * len(header)]
    for p in passes:
        lines.append(
            f"{p.name:48s} {p.video_tokens:10d} {p.audio_tokens:9d} {p.attention_tflops:11.1f} {p.tflops:11.1f} "
            f"{p.activation_gib:8.2f}"
        )
    direct = passes[0].tflops
    strategy = sum(p.tflops for p in passes[1:])
    lines.append(f"per step: direct {direct:.1f} TFLOP, strategy {strategy:.1f} TFLOP, ratio {direct / strategy:.2f}x")
    if weights_gib is not None:
        lines.append(f"bf16 weights of both branches: {weights_gib:.1f} GiB (+ the refiner, ~ the video branch)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--fps", type=float, default=32.0, help="output frame rate")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds")
    parser.add_argument("--preset", default="large", choices=["tiny", "demo", "large"])
    parser.add_argument("--spatial-scale", type=int, default=2)
    parser.add_argument("--temporal-scale", type=int, default=2)
    parser.add_argument("--keyframe-stride", type=int, default=4, help="a keyframe every N base latent frames")
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument("--refiner-keep-ratio", type=float, default=0.125, help="VSA: share of key cubes kept")
    args = parser.parse_args(argv)
    passes = plan(
        args.height, args.width, args.fps, args.duration, args.preset, args.spatial_scale, args.temporal_scale,
        args.keyframe_stride, args.text_tokens, refiner_keep_ratio=args.refiner_keep_ratio,
    )
    print(f"{args.width}x{args.height}, {args.fps:g} fps, {args.duration:g} s, preset {args.preset!r}:")
    print(format_plan(passes, weight_gib(args.preset)))


if __name__ == "__main__":
    main()
