"""The joint video + audio forward of SkyReels V4 (our two branches) against Diffusers' LTX-2 (and Kandinsky 6).

All models are built at one matched size (see benchmarks/README.md, "What matched means"): the same width, heads,
head dim, depth (`num_dual_stream_layers + num_single_stream_layers` = LTX-2's `num_layers` = Kandinsky 6's
`num_visual_blocks`), MLP width, text-encoder width and token counts (video patch tokens, audio tokens, text tokens).
Random weights: speed and memory do not depend on the values.

    python benchmarks/bench_vs_ltx2.py                                     # CPU float32, the README table
    python benchmarks/bench_vs_ltx2.py --device cuda --dtype bfloat16 --attention-backend flash --heads 24 \
        --head-dim 128 --layers 8 --sizes 21x30x52:218,21x45x80:218

Time: one forward per candidate per round, candidates interleaved, `--repeats` rounds after a warm-up; the ratio
column is the median over rounds of ours/theirs (wall clock; CPU time of the process in brackets, steadier on a
shared machine). FLOPs: matmuls and attention, counted by `torch.utils.flop_counter` on one forward; a time ratio
near the FLOP ratio means equal efficiency per FLOP. Memory: each candidate in a fresh subprocess (see
bench_utils.py): `fwd peak` is the peak above what was resident before the forward (activations and workspace),
`total` adds the weights.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import diffusers
import torch
from bench_utils import DTYPES, MIB, PeakMemory, interleaved_times, median_ratio, median_seconds, run_child
from diffusers import Kandinsky6Transformer3DModel, LTX2VideoTransformer3DModel
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from diffusers_skyreels import SkyReelsV4AudioTransformer, SkyReelsV4Transformer
from diffusers_skyreels.models.branch_skyreels_v4 import default_rope_axes_dim

# Latent channels of the `large` preset: Wan-VAE video latents and MMAudio audio latents.
VIDEO_CHANNELS, AUDIO_CHANNELS = 16, 40
PATCH = (1, 2, 2)
CANDIDATES = ("ours", "ltx2", "kandinsky6")


@dataclass(frozen=True)
class Matched:
    """The shared size of every candidate."""

    heads: int
    head_dim: int
    layers: int
    dual_layers: int
    text_dim: int
    text_tokens: int
    batch: int

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def ffn_dim(self) -> int:
        return 4 * self.dim  # LTX-2's FeedForward default (mult=4); set on ours and Kandinsky 6 explicitly


@dataclass(frozen=True)
class Size:
    """Token counts of one benchmark row: a video patch grid `(T, H, W)` and audio tokens."""

    grid: tuple[int, int, int]
    audio_tokens: int

    @property
    def video_tokens(self) -> int:
        return math.prod(self.grid)

    def __str__(self) -> str:
        return f"{'x'.join(map(str, self.grid))}:{self.audio_tokens}"

    @classmethod
    def parse(cls, text: str) -> Size:
        grid, audio = text.split(":")
        dims = tuple(int(d) for d in grid.lower().split("x"))
        if len(dims) != 3:
            raise argparse.ArgumentTypeError(f"expected TxHxW:A, got {text!r}")
        return cls(dims, int(audio))


def build(name: str, m: Matched) -> tuple[torch.nn.Module, ...]:
    """The model(s) of one candidate at the matched size (seeded, eval mode, on the CPU in float32)."""
    torch.manual_seed(0)
    if name == "ours":
        shared = dict(
            num_attention_heads=m.heads,
            attention_head_dim=m.head_dim,
            num_dual_stream_layers=m.dual_layers,
            num_single_stream_layers=m.layers - m.dual_layers,
            ffn_dim=m.ffn_dim,
            text_embed_dim=m.text_dim,
        )
        video = SkyReelsV4Transformer(
            in_channels=2 * VIDEO_CHANNELS + 1, out_channels=VIDEO_CHANNELS, patch_size=PATCH, **shared
        )
        audio = SkyReelsV4AudioTransformer(in_channels=2 * AUDIO_CHANNELS + 1, out_channels=AUDIO_CHANNELS, **shared)
        return video.eval(), audio.eval()
    if name == "ltx2":
        # Its tokens come patchified: the input/output projections get our patch-embedding sizes.
        ltx2 = LTX2VideoTransformer3DModel(
            in_channels=(2 * VIDEO_CHANNELS + 1) * math.prod(PATCH),
            out_channels=VIDEO_CHANNELS * math.prod(PATCH),
            num_attention_heads=m.heads,
            attention_head_dim=m.head_dim,
            cross_attention_dim=m.dim,
            audio_in_channels=2 * AUDIO_CHANNELS + 1,
            audio_out_channels=AUDIO_CHANNELS,
            audio_num_attention_heads=m.heads,
            audio_attention_head_dim=m.head_dim,
            audio_cross_attention_dim=m.dim,
            num_layers=m.layers,
            caption_channels=m.text_dim,
        )
        return (ltx2.eval(),)
    if name == "kandinsky6":
        kandinsky = Kandinsky6Transformer3DModel(
            in_visual_dim=VIDEO_CHANNELS,
            out_visual_dim=VIDEO_CHANNELS,
            in_text_dim=m.text_dim,
            in_text_dim2=m.text_dim,
            time_dim=m.dim // 4,  # its default ratio (1024 for a 4096 model)
            patch_size=PATCH,
            model_dim=m.dim,
            ff_dim=m.ffn_dim,
            num_text_blocks=m.dual_layers,
            num_visual_blocks=m.layers,
            axes_dims=default_rope_axes_dim(m.head_dim, 3),
            in_audio_dim=AUDIO_CHANNELS,
            out_audio_dim=AUDIO_CHANNELS,
        )
        return (kandinsky.eval(),)
    raise ValueError(f"unknown candidate {name!r}")


def make_call(
    name: str, models: tuple[torch.nn.Module, ...], m: Matched, size: Size, device: torch.device, dtype: torch.dtype
) -> Callable[[], object]:
    """A no-argument joint forward of one candidate on random inputs of `size`."""
    g = torch.Generator().manual_seed(1)
    t, h, w = size.grid
    b, a, L = m.batch, size.audio_tokens, m.text_tokens

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)

    text = randn(b, L, m.text_dim)
    timestep = torch.full((b,), 500.0, device=device)
    if name == "ours":
        video, audio = models
        latents = randn(b, 2 * VIDEO_CHANNELS + 1, t * PATCH[0], h * PATCH[1], w * PATCH[2])
        audio_latents = randn(b, 2 * AUDIO_CHANNELS + 1, a)
        return lambda: video(latents, timestep, text, audio_transformer=audio, audio_hidden_states=audio_latents)
    if name == "ltx2":
        (ltx2,) = models
        tokens = randn(b, size.video_tokens, ltx2.config.in_channels)
        audio_tokens = randn(b, a, ltx2.config.audio_in_channels)
        return lambda: ltx2(
            tokens, audio_tokens, text, text, timestep, num_frames=t, height=h, width=w, audio_num_frames=a
        )
    (kandinsky,) = models
    latents = randn(b, t * PATCH[0], h * PATCH[1], w * PATCH[2], 2 * VIDEO_CHANNELS + 1)
    audio_latents = randn(b, a, AUDIO_CHANNELS)
    pooled = randn(b, m.text_dim)
    return lambda: kandinsky(latents, text, pooled, timestep, audio_hidden_states=audio_latents)


def to_dtype(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """`model` on `device` in `dtype`, except its `_keep_in_fp32_modules` (as `from_pretrained(torch_dtype=...)`)."""
    model.to(device)
    keep = model._keep_in_fp32_modules or []
    for name, module in model.named_modules():
        if not any(part in keep for part in name.split(".")):
            for param in module.parameters(recurse=False):
                param.data = param.data.to(dtype)
    return model


def prepare(
    name: str, m: Matched, size: Size, device: torch.device, dtype: torch.dtype, args: argparse.Namespace
) -> tuple[tuple[torch.nn.Module, ...], Callable[[], object]]:
    with device:  # built where they run: initialising ~1B parameters on the CPU first takes longer than the runs
        built = build(name, m)
    models = tuple(to_dtype(model, device, dtype) for model in built)
    for model in models:
        if args.attention_backend:
            model.set_attention_backend(args.attention_backend)
        if name == "ours" and args.fuse_qkv:  # the other processors never read fused weights
            model.fuse_qkv_projections()
        if name == "ours" and args.forward_chunking:
            model.enable_forward_chunking(args.forward_chunking)
    return models, make_call(name, models, m, size, device, dtype)


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# PyTorch's FLOP counter knows the CUDA attention kernels but not the CPU one.
ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops}


def child(args: argparse.Namespace, m: Matched) -> None:
    """Measure one candidate's memory in this (fresh) process; print it as JSON."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    models, call = prepare(args.child, m, args.sizes[0], device, dtype, args)
    weights = sum(p.numel() * p.element_size() for model in models for p in model.parameters())
    with torch.no_grad():
        # The first call also counts the FLOPs of matmuls and attention; its one-time allocations (thread pools,
        # kernel workspaces) are not the model's.
        with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as flops:
            call()
        with PeakMemory(device) as peak:
            call()
    print(json.dumps({"weights": weights, "forward_peak": peak.increase, "flops": flops.get_total_flops()}))


def main() -> None:
    diffusers.utils.logging.set_verbosity_error()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--attention-backend", default=None, help="Diffusers attention backend for every model")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument(
        "--dual-layers", type=int, default=None, help="our dual-stream blocks (default: a quarter, as in `large`)"
    )
    parser.add_argument("--text-dim", type=int, default=512, help="hidden size of the prompt encoder")
    parser.add_argument("--text-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--sizes",
        type=lambda s: [Size.parse(x) for x in s.split(",")],
        default=[Size((4, 8, 8), 44), Size((4, 16, 16), 44), Size((8, 16, 16), 88), Size((8, 24, 24), 88)],
        help="comma-separated TxHxW:A, video patch grid and audio tokens (default 256 to 4608 video tokens)",
    )
    parser.add_argument("--candidates", default="ours,ltx2,kandinsky6", help=f"comma-separated, from {CANDIDATES}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fuse-qkv", action="store_true", help="fuse_qkv_projections() on our branches")
    parser.add_argument(
        "--forward-chunking", type=int, default=None, help="enable_forward_chunking(N) on our branches (MLP memory)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess memory measurements")
    parser.add_argument("--child", choices=CANDIDATES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dual = args.dual_layers if args.dual_layers is not None else args.layers // 4
    m = Matched(args.heads, args.head_dim, args.layers, dual, args.text_dim, args.text_tokens, args.batch)
    if args.child:
        child(args, m)
        return

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    candidates = [c for c in args.candidates.split(",") if c]
    others = [c for c in candidates if c != "ours"]
    print(
        f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} backend={args.attention_backend} "
        f"fuse_qkv={args.fuse_qkv} forward_chunking={args.forward_chunking} repeats={args.repeats}\nmatched: {asdict(m)} dim={m.dim} ffn={m.ffn_dim}"
    )
    header = f"{'video':>6} {'audio':>5} {'text':>4} | {'ours ms':>8}"
    for other in others:
        header += (
            f" | {other + ' ms':>13} {'time ratio (cpu)':>17} {'FLOP ratio':>10} {'fwd-peak ratio':>14} "
            f"{'total ratio':>11}"
        )
    print(header + f" | {'ours fwd-peak MiB':>17} {'ours weights MiB':>16}")

    for size in args.sizes:
        calls = {}
        for name in candidates:
            calls[name] = prepare(name, m, size, device, dtype, args)[1]
        with torch.no_grad():
            times = interleaved_times(calls, args.repeats, device)
        memory = {}
        if not args.no_memory:
            passthrough = [
                "--device", args.device, "--dtype", args.dtype, "--heads", str(m.heads), "--head-dim",
                str(m.head_dim), "--layers", str(m.layers), "--dual-layers", str(m.dual_layers), "--text-dim",
                str(m.text_dim), "--text-tokens", str(m.text_tokens), "--batch", str(m.batch), "--sizes", str(size),
            ]
            passthrough += ["--attention-backend", args.attention_backend] if args.attention_backend else []
            passthrough += ["--threads", str(args.threads)] if args.threads else []
            passthrough += ["--fuse-qkv"] if args.fuse_qkv else []
            passthrough += ["--forward-chunking", str(args.forward_chunking)] if args.forward_chunking else []
            for name in candidates:
                memory[name] = run_child(__file__, [*passthrough, "--child", name])
        row = f"{size.video_tokens:>6} {size.audio_tokens:>5} {m.text_tokens:>4} | {median_seconds(times['ours'])[0] * 1e3:>8.0f}"
        for other in others:
            wall, cpu = median_ratio(times, "ours", other)
            row += f" | {median_seconds(times[other])[0] * 1e3:>13.0f} {wall:>8.2f}x ({cpu:.2f}x)"
            if memory:
                ours, theirs = memory["ours"], memory[other]
                fwd = ours["forward_peak"] / theirs["forward_peak"]
                total = (ours["weights"] + ours["forward_peak"]) / (theirs["weights"] + theirs["forward_peak"])
                row += f" {ours['flops'] / theirs['flops']:>9.2f}x {fwd:>13.2f}x {total:>10.2f}x"
            else:
                row += f" {'-':>10} {'-':>14} {'-':>11}"
        if memory:
            row += f" | {memory['ours']['forward_peak'] / MIB:>17.1f} {memory['ours']['weights'] / MIB:>16.1f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
