"""The paper's strategy (low-res base pass + high-res keyframes + refiner) against generating the same
output size directly, with the same model widths and the same number of steps. Goal stated in the issue: >= 4x less
time.

    cd benchmarks && OMP_NUM_THREADS=1 python bench_refine_strategy.py          # CPU float32, the defaults (< 8 min)
    python benchmarks/bench_refine_strategy.py --device cuda --dtype bfloat16 --heads 24 --head-dim 128 \
        --dual-layers 2 --single-layers 2 --ffn-dim 8192 --sizes 21x60x104,41x60x104 --repeats 5

What runs (transformer forwards only; random weights, `torch.no_grad`; VAEs, text encoder and scheduler left out):

- direct: `--steps` forwards of the video branch (`SkyReelsV4Transformer`, dense attention) on the target latent
  grid `T x H x W`;
- strategy: `--steps` forwards of the video branch (dense) on the base grid `((T - 1) / ts + 1) x H / ss x W / ss`
  plus the high-resolution keyframes of `auto_keyframe_indices(base frames, --keyframe-stride)` appended as tokens,
  then `--refiner-steps` (default: `--steps`, "same steps") forwards of the refiner (`SkyReelsV4RefinerTransformer`
  built by `from_video_branch`, so with its default Video Sparse Attention: 4x4x4 cubes, top_k 32) on the target grid.

All three models have the same widths, heads and depth (`--heads`, `--head-dim`, `--dual-layers`,
`--single-layers`, `--ffn-dim`) and the `large` preset's latent channels (Wan-VAE, 16). The audio branch is left
out of both arms: in the paper it runs jointly with the video branch in the direct pass and in the base pass (not in
the refiner); its own self-attention and MLPs cost the same in both, and its audio<->video cross-attention scales
with each arm's video tokens, so leaving it out measures the video transformers only. The "at scale" section at the
end is the planner's table (with the audio branch) followed by the same arithmetic for the video branch only.

Timing: one forward of each of the three passes per round, interleaved (order flipped every round, see
bench_utils.py), `--repeats` rounds after one warm-up each. Per round, each pass's time is multiplied by its step
count: `ratio = steps * t_direct / (steps * t_base + refiner_steps * t_refiner)`; the table shows the median over
rounds (wall clock, and process CPU time in brackets, steadier on a shared machine). Absolute times on a shared
machine are noise; only the side-by-side ratios are meant to be read.

Predicted: the planner's arithmetic (`diffusers_skyreels.planner`, the same token counts and the same per-pass FLOP
formula as `python -m diffusers_skyreels.planner`; every row checks that `planner.plan` counts the same tokens),
evaluated at this benchmark's widths, video only, with the VSA
keep ratio of the refiner's actual layout (`top_k / cubes`). It leaves out VSA's coarse stage and gathers, the
norms, RoPE and modulation; a measured ratio below it means those overheads, or lower efficiency per FLOP of the
smaller passes, cost the strategy more than the FLOP count says.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from bench_utils import DTYPES, interleaved_times, median_seconds

from diffusers_skyreels import SkyReelsV4RefinerTransformer, SkyReelsV4Transformer
from diffusers_skyreels.models.presets import preset_config
from diffusers_skyreels.pipelines.skyreels_v4.conditioning import auto_keyframe_indices, refiner_num_latent_frames
from diffusers_skyreels.planner import VAE_SPATIAL, VAE_TEMPORAL, _branch_pass, format_plan, plan

PATCH = (1, 2, 2)
PASSES = ("direct", "base", "refiner")


def _grid(text: str) -> tuple[int, int, int]:
    dims = tuple(int(d) for d in text.lower().split("x"))
    if len(dims) != 3:
        raise argparse.ArgumentTypeError(f"expected TxHxW, got {text!r}")
    return dims


def _model_config(args: argparse.Namespace) -> dict:
    """The `large` preset's video config (channels, freq dim) at this benchmark's widths."""
    config = preset_config("large", "video")
    config.update(
        patch_size=PATCH,
        num_attention_heads=args.heads,
        attention_head_dim=args.head_dim,
        num_dual_stream_layers=args.dual_layers,
        num_single_stream_layers=args.single_layers,
        ffn_dim=args.ffn_dim,
        text_embed_dim=args.heads * args.head_dim,
    )
    return config


def _tokens(frames: int, height: int, width: int) -> int:
    return frames * (height // PATCH[1]) * (width // PATCH[2])


def _planner_flops(config: dict, direct: int, base: int, refiner: int, text: int, keep: float) -> list[float]:
    """TFLOPs of one forward of each pass by the planner's per-pass formula, video branch only (no audio partner)."""
    return [
        sum(_branch_pass(n, config, t, text, keep_ratio=k)[:2])
        for n, t, k in (("direct", direct, 1.0), ("base", base, 1.0), ("refiner", refiner, keep))
    ]


def _strategy_ratio(direct: float, base: float, refiner: float, steps: int, refiner_steps: int) -> float:
    """Direct / strategy over all steps, from per-forward costs (seconds or FLOPs)."""
    return steps * direct / (steps * base + refiner_steps * refiner)


def _check_planner_tokens(grid: tuple[int, int, int], args: argparse.Namespace, direct: int, base: int, refiner: int):
    """The planner's token counts for the same clip (pixel size and frame count of this latent grid) must agree."""
    frames, height, width = grid
    fps = 16.0  # any rate: the planner works from fps and duration, the frame count is what matters
    duration = ((frames - 1) * VAE_TEMPORAL + 1) / fps
    passes = plan(
        height * VAE_SPATIAL,
        width * VAE_SPATIAL,
        fps,
        duration,
        "tiny",
        args.spatial_scale,
        args.temporal_scale,
        args.keyframe_stride,
        args.text_tokens,
    )
    theirs = tuple(p.video_tokens for p in passes)
    if theirs != (direct, base, refiner):
        raise RuntimeError(f"planner tokens {theirs} != benchmark tokens {(direct, base, refiner)} for grid {grid}")


@torch.no_grad()
def _bench_size(grid, video, refiner, config, args, device, dtype) -> str:
    frames, height, width = grid
    ss, ts = args.spatial_scale, args.temporal_scale
    if (frames - 1) % ts or height % (ss * PATCH[1]) or width % (ss * PATCH[2]):
        raise ValueError(f"grid {grid}: need (T - 1) % {ts} == 0 and H, W multiples of {ss * PATCH[1]}")
    base_frames = (frames - 1) // ts + 1
    assert refiner_num_latent_frames(base_frames, ts) == frames
    keyframes = auto_keyframe_indices(base_frames, args.keyframe_stride)

    generator = torch.Generator(device=device).manual_seed(0)
    channels = config["in_channels"]

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    text = randn(1, args.text_tokens, config["text_embed_dim"])
    timestep = torch.full((1,), 500.0, device=device)
    high = randn(1, channels, frames, height, width)
    low = randn(1, channels, base_frames, height // ss, width // ss)
    keys = randn(1, channels, len(keyframes), height, width)
    fns = {
        "direct": lambda: video(high, timestep, text, return_dict=False),
        "base": lambda: video(
            low, timestep, text, keyframe_hidden_states=keys, keyframe_indices=keyframes, return_dict=False
        ),
        "refiner": lambda: refiner(high, timestep, text, return_dict=False),
    }
    times = interleaved_times(fns, args.repeats, device)

    n_direct = _tokens(frames, height, width)
    n_base = _tokens(base_frames, height // ss, width // ss) + _tokens(len(keyframes), height, width)
    n_refiner = n_direct
    _check_planner_tokens(grid, args, n_direct, n_base, n_refiner)
    layout = refiner._sparse_layout(0, (frames // PATCH[0], height // PATCH[1], width // PATCH[2]))
    keep = layout.top_k / layout.num_cubes
    flops = _planner_flops(config, n_direct, n_base, n_refiner, args.text_tokens, keep)
    predicted = _strategy_ratio(*flops, args.steps, args.refiner_steps)
    rounds = list(zip(*(times[name] for name in PASSES), strict=True))  # per round: (direct, base, refiner)
    wall = statistics.median(_strategy_ratio(*(t[0] for t in r), args.steps, args.refiner_steps) for r in rounds)
    cpu = statistics.median(_strategy_ratio(*(t[1] for t in r), args.steps, args.refiner_steps) for r in rounds)
    clock = 1 if device.type == "cpu" else 0  # process CPU time on CPU, wall clock on an accelerator
    d_over_b = statistics.median(r[0][clock] / r[1][clock] for r in rounds)
    d_over_r = statistics.median(r[0][clock] / r[2][clock] for r in rounds)
    (t_direct, _), (t_base, _), (t_refiner, _) = (median_seconds(times[name]) for name in PASSES)
    measured = f"{wall:.2f}x ({cpu:.2f}x)"
    return (
        f"{'x'.join(map(str, grid)):>9} {n_direct:>7} {n_base:>7} {len(keyframes):>3} {n_refiner:>7} "
        f"{f'{layout.top_k}/{layout.num_cubes}':>7} {t_direct:>7.2f} {t_base:>7.2f} {t_refiner:>7.2f} "
        f"{d_over_b:>5.2f}/{flops[0] / flops[1]:<5.2f} {d_over_r:>5.2f}/{flops[0] / flops[2]:<5.2f} "
        f"{measured:>15} {predicted:>9.2f}x"
    )


def _at_scale(args: argparse.Namespace, cube: tuple[int, int, int], top_k: int) -> None:
    """The planner's figures for the paper's target, arithmetic only."""
    height, width, fps, seconds = 1080, 1920, 32.0, 15.0
    print()
    print(
        f"At scale (ARITHMETIC from diffusers_skyreels.planner, NOT measured): {width}x{height}, {fps:g} fps, "
        f"{seconds:g} s, preset 'large', joint video+audio, refiner keep ratio 0.125 (the planner's default):"
    )
    passes = plan(
        height,
        width,
        fps,
        seconds,
        "large",
        args.spatial_scale,
        args.temporal_scale,
        args.keyframe_stride,
        args.text_tokens,
    )
    print(format_plan(passes))
    config = preset_config("large", "video")
    direct, base, refiner = (p.video_tokens for p in passes)
    rows, cols = math.ceil(height / VAE_SPATIAL / PATCH[1]), math.ceil(width / VAE_SPATIAL / PATCH[2])
    grid = (refiner // (rows * cols), rows, cols)
    cubes = math.prod(math.ceil(g / c) for g, c in zip(grid, cube, strict=True))
    for label, keep in (("0.125", 0.125), (f"top_k {top_k} of {cubes} cubes", min(top_k, cubes) / cubes)):
        flops = _planner_flops(config, direct, base, refiner, args.text_tokens, keep)
        ratio = _strategy_ratio(*flops, args.steps, args.refiner_steps)
        print(f"video branch only (as measured above), same steps, refiner keep {label}: {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument(
        "--sizes",
        type=lambda s: [_grid(g) for g in s.split(",")],
        default=[(9, 32, 32), (17, 32, 32), (17, 48, 48), (33, 48, 48)],
        help="comma-separated target LATENT grids TxHxW (frames, height, width); patch (1, 2, 2)",
    )
    parser.add_argument("--steps", type=int, default=30, help="denoising steps of the direct and base passes")
    parser.add_argument("--refiner-steps", type=int, default=None, help="default: --steps (same steps)")
    parser.add_argument("--spatial-scale", type=int, default=2)
    parser.add_argument("--temporal-scale", type=int, default=2)
    parser.add_argument("--keyframe-stride", type=int, default=4, help="a keyframe every N base latent frames")
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dual-layers", type=int, default=2)
    parser.add_argument("--single-layers", type=int, default=2)
    parser.add_argument("--ffn-dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.refiner_steps is None:
        args.refiner_steps = args.steps

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = _model_config(args)
    torch.manual_seed(0)
    video = SkyReelsV4Transformer(**config, cross_modal_attention=False).to(device).eval()
    if dtype != torch.float32:
        video.to(dtype)  # (Diffusers warns that the time embedder prefers float32; fine for timing)
    refiner = SkyReelsV4RefinerTransformer.from_video_branch(
        video, spatial_scale=args.spatial_scale, temporal_scale=args.temporal_scale
    ).eval()
    rc = refiner.config
    print(
        f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} width={args.heads}x{args.head_dim} "
        f"blocks={args.dual_layers}+{args.single_layers} ffn={args.ffn_dim} text_tokens={args.text_tokens} "
        f"steps={args.steps} refiner_steps={args.refiner_steps} spatial_scale={args.spatial_scale} "
        f"temporal_scale={args.temporal_scale} keyframe_stride={args.keyframe_stride} "
        f"refiner VSA cube={tuple(rc.sparse_attention_cube_size)} top_k={rc.sparse_attention_top_k} "
        f"repeats={args.repeats}"
    )
    header = (
        f"{'target':>9} {'direct':>7} {'base':>7} {'kf':>3} {'refiner':>7} {'vsa k/c':>7} {'s/fwd D':>7} "
        f"{'s/fwd B':>7} {'s/fwd R':>7} {'D/B t/flop':>11} {'D/R t/flop':>11} {'direct/strategy':>15} "
        f"{'predicted':>10}"
    )
    print("target: latent grid TxHxW; direct, base, refiner: video tokens per forward (base = low-res grid + keyframe")
    print("  tokens); kf: keyframes; vsa k/c: refiner key cubes kept per query cube / cubes; s/fwd D, B, R: median")
    print("  seconds per forward of each pass (noise); D/B, D/R t/flop: one forward of direct over one of base /")
    print("  refiner, measured (CPU time on CPU, median over rounds) / planner FLOPs; direct/strategy: MEASURED time")
    print("  ratio over all steps, median over rounds, wall (cpu); predicted: the planner's FLOP ratio at these")
    print("  widths, video only")
    print(header)
    print("-" * len(header))
    for grid in args.sizes:
        print(_bench_size(grid, video, refiner, config, args, device, dtype), flush=True)
    _at_scale(args, tuple(rc.sparse_attention_cube_size), rc.sparse_attention_top_k)


if __name__ == "__main__":
    main()
