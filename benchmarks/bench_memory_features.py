"""Memory (and time) of Diffusers' memory and speed features on a joint text-to-video+audio pipeline call.

    python benchmarks/bench_memory_features.py                              # demo preset, CPU float32
    python benchmarks/bench_memory_features.py --device cuda --dtype bfloat16

Components: the demo preset built in code (bench_utils.pipeline_components), 64x64, 33 frames, 16 fps, with
classifier-free guidance. Features, each on its own pipeline:

- `baseline`: nothing enabled.
- `model_cpu_offload`: `enable_model_cpu_offload(device=...)`.
- `group_offload_block` / `group_offload_leaf`: `enable_group_offload(onload=device, offload=cpu, ...)` on the
  three transformers.
- `fp8_layerwise`: `enable_layerwise_casting(storage_dtype=float8_e4m3fn, compute_dtype=--dtype)` on both branches.
- `forward_chunking`: `enable_forward_chunking(256)` on both branches (the MLPs run over 256 tokens at a time).
- `first_block_cache`, `taylorseer`: `enable_cache(...)` on both branches (see CACHES).

Memory: each feature in a fresh subprocess (bench_utils.PeakMemory). `peak` is the high-water mark of the whole
process during the second call (weights, activations, allocator slack; on CPU the resident set, on CUDA the allocated
CUDA memory), `call peak` the part above what was resident before the call (at this size the video VAE's decoder
sets it), `loop peak` the same for the denoising loop alone (third call), `weights` the parameter bytes of the two
branches. On a CPU, offloading to the CPU cannot lower anything: the "offloaded" weights stay in the same RAM, so
those rows show the cost of the hooks only; they are meant for `--device cuda`.

Time: all pipelines in this process, one call each per round, interleaved; the ratio is the median over rounds of
feature / baseline (wall clock).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from bench_utils import DTYPES, MIB, PeakMemory, interleaved_times, parameter_bytes, pipeline_components, run_child
from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

import diffusers_skyreels as ds

FEATURES = (
    "baseline", "model_cpu_offload", "group_offload_block", "group_offload_leaf", "fp8_layerwise",
    "forward_chunking", "first_block_cache", "taylorseer",
)
CALL = dict(height=64, width=64, num_frames=33, fps=16.0)
PROMPT = "A red ball bounces quickly between the walls. <sfx>a ping at every bounce</sfx>"


def caches() -> dict:
    return {
        "first_block_cache": FirstBlockCacheConfig(threshold=0.2),
        "taylorseer": TaylorSeerCacheConfig(
            cache_interval=2, disable_cache_before_step=2, taylor_factors_dtype=torch.float32
        ),
    }


def build(feature: str, device: torch.device, dtype: torch.dtype) -> ds.SkyReelsV4Pipeline:
    """The demo pipeline in `dtype` with `feature` enabled (every row runs in the same dtype)."""
    pipe = ds.SkyReelsV4Pipeline(**pipeline_components("demo")).to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    branches = (pipe.transformer, pipe.audio_transformer)
    if feature == "model_cpu_offload":
        pipe.enable_model_cpu_offload(device=device)
        return pipe
    if feature.startswith("group_offload"):
        # On the three transformers (the demo's Oobleck audio VAE does not support group offloading).
        pipe.text_encoder.to(device)
        pipe.vae.to(device)
        pipe.audio_vae.to(device)
        leaf = feature.endswith("leaf")
        for model in (*branches, pipe.refiner):
            model.enable_group_offload(
                onload_device=device, offload_device=torch.device("cpu"),
                offload_type="leaf_level" if leaf else "block_level", num_blocks_per_group=None if leaf else 1,
            )
        return pipe
    pipe.to(device)
    if feature == "forward_chunking":
        for model in branches:
            model.enable_forward_chunking(256)
    elif feature == "fp8_layerwise":
        for model in branches:
            model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    elif feature in caches():
        for model in branches:
            model.enable_cache(caches()[feature])
    elif feature != "baseline":
        raise ValueError(f"unknown feature {feature!r}")
    return pipe


def child(args: argparse.Namespace) -> None:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    pipe = build(args.child, device, dtype)
    call = dict(num_inference_steps=args.steps, **CALL)
    pipe(PROMPT, **call)  # one-time allocations are not the feature's
    with PeakMemory(device) as peak:
        pipe(PROMPT, **call)
    denoise = pipe.denoise
    loop_peaks = []

    def measured_denoise(**kwargs):
        with PeakMemory(device) as loop_peak:
            result = denoise(**kwargs)
        loop_peaks.append(loop_peak.increase)
        return result

    pipe.denoise = measured_denoise
    pipe(PROMPT, **call)
    weights = parameter_bytes(pipe.transformer, pipe.audio_transformer)
    print(json.dumps({"peak": peak.peak, "call_peak": peak.increase, "loop_peak": loop_peaks[0], "weights": weights}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="of the whole pipeline; fp8 layerwise casting stores in float8 and computes in it")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--features", default=",".join(FEATURES))
    parser.add_argument("--child", choices=FEATURES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args)
        return

    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    features = args.features.split(",")
    if features[0] != "baseline":
        features.insert(0, "baseline")
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} demo preset {CALL} "
          f"steps={args.steps} repeats={args.repeats}", flush=True)
    pipes = {feature: build(feature, device, dtype) for feature in features}
    call = dict(num_inference_steps=args.steps, **CALL)
    fns = {feature: (lambda pipe=pipe: pipe(PROMPT, **call)) for feature, pipe in pipes.items()}
    times = interleaved_times(fns, args.repeats, device)
    base_time = [t[0] for t in times["baseline"]]
    del pipes, fns

    passthrough = ["--device", args.device, "--dtype", args.dtype, "--steps", str(args.steps)]
    passthrough += ["--threads", str(args.threads)] if args.threads else []
    print(f"{'feature':>20} | {'peak MiB':>9} {'ratio':>6} | {'call peak MiB':>13} {'ratio':>6} | "
          f"{'loop peak MiB':>13} {'ratio':>6} | {'weights MiB':>11} | {'s/call':>7} {'time ratio':>10}", flush=True)
    base = None
    for feature in features:  # a row as soon as its process has measured it (each one starts torch afresh)
        m = run_child(__file__, [*passthrough, "--child", feature])
        base = base or m
        wall = statistics.median(t[0] for t in times[feature])
        ratio = statistics.median(t[0] / b for t, b in zip(times[feature], base_time))
        print(
            f"{feature:>20} | {m['peak'] / MIB:>9.1f} {m['peak'] / base['peak']:>5.2f}x | "
            f"{m['call_peak'] / MIB:>13.1f} {m['call_peak'] / base['call_peak']:>5.2f}x | "
            f"{m['loop_peak'] / MIB:>13.1f} {m['loop_peak'] / base['loop_peak']:>5.2f}x | {m['weights'] / MIB:>11.2f} | "
            f"{wall:>7.2f} {ratio:>9.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
