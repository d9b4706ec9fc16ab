"""Time dense SDPA against Video Sparse Attention (torch path, and flex path where available) per sequence length.

Sparsity: VSA keeps `top_k` of the key cubes per query cube. VSA uses 64-token (4x4x4) cubes and its reference
usage (FastVideo's `video_sparse_attn(..., topk=32)`) keeps 32 of them: at a 16k-token sequence (256 cubes) that
is 87.5% sparsity, 1/8 of the key cubes; FastVideo's Wan inference recipes set
`VSA_sparsity` to 0.7-0.8. The default here is 87.5% at every size (`--sparsity 0.875`), so the fine stage does
about 1/8 of dense attention's work, plus the coarse stage and the gathers.

    python benchmarks/bench_video_sparse_attention.py --device cpu --dtype float32 --repeats 2

Times are the best of `--repeats` interleaved runs after one warm-up run each (which also compiles flex_attention):
wall-clock milliseconds and ratios, plus the ratio of process CPU times, steadier on a shared machine.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from diffusers_skyreels.models.video_sparse_attention import (
    SparseLayout,
    flex_attention_available,
    video_sparse_attention,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _grid(text: str) -> tuple[int, int, int]:
    dims = tuple(int(d) for d in text.lower().split("x"))
    if len(dims) != 3:
        raise argparse.ArgumentTypeError(f"expected TxHxW, got {text!r}")
    return dims


def _best_times(
    fns: dict[str, Callable[[], torch.Tensor]], repeats: int, device: torch.device
) -> dict[str, tuple[float, float]]:
    """Best wall-clock and best process CPU time of each function over `repeats` interleaved rounds, after one
    warm-up call each.

    Interleaving keeps a slow phase of a shared machine from landing on one method only; CPU time (all threads)
    does not count time spent descheduled by other tenants, so its ratio is the steadier one on a busy machine.
    """

    def run(fn: Callable[[], torch.Tensor]) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - wall, time.process_time() - cpu

    for fn in fns.values():
        run(fn)
    best = dict.fromkeys(fns, (float("inf"), float("inf")))
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = run(fn)
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def _dense(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))


@torch.no_grad()
def _bench_size(layout: SparseLayout, qkv: list[torch.Tensor], repeats: int, use_flex: bool) -> str:
    """One table row: dense and VSA times for one grid."""
    fns = {
        "dense": partial(_dense, *qkv),
        "vsa": partial(video_sparse_attention, *qkv, layout, backend="torch"),
    }
    if use_flex:
        fns["flex"] = partial(video_sparse_attention, *qkv, layout, backend="flex", compile_flex=True)
    best = _best_times(fns, repeats, qkv[0].device)
    (dense, dense_cpu), (vsa, vsa_cpu) = best["dense"], best["vsa"]
    row = (
        f"{qkv[0].shape[1]:>7} {'x'.join(map(str, layout.grid_size)):>10} {layout.num_cubes:>6} {layout.top_k:>6} "
        f"{dense * 1e3:>10.1f} {vsa * 1e3:>10.1f} {dense / vsa:>9.2f}x {dense_cpu / vsa_cpu:>9.2f}x"
    )
    if use_flex:
        flex, flex_cpu = best["flex"]
        diff = (fns["flex"]() - fns["vsa"]()).abs().max().item()
        row += f" {flex * 1e3:>10.1f} {dense / flex:>9.2f}x {dense_cpu / flex_cpu:>9.2f}x {diff:>14.2e}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument(
        "--sizes",
        type=lambda s: [_grid(g) for g in s.split(",")],
        default=[(4, 32, 32), (8, 32, 32), (16, 32, 32), (32, 32, 32)],
        help="comma-separated TxHxW patch grids (default: 4k, 8k, 16k and 32k tokens)",
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cube", type=_grid, default=(4, 4, 4))
    parser.add_argument("--sparsity", type=float, default=0.875, help="fraction of key cubes skipped")
    parser.add_argument("--extra-tokens", type=int, default=0, help="dense tokens (text) appended after the grid")
    parser.add_argument(
        "--flex",
        choices=["auto", "on", "off"],
        default="auto",
        help="time the compiled flex_attention path: auto = on CUDA only (on CPU it was not faster)",
    )
    args = parser.parse_args()

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    use_flex = flex_attention_available() and (args.flex == "on" or (args.flex == "auto" and device.type == "cuda"))
    print(
        f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} batch={args.batch} heads={args.heads} "
        f"head_dim={args.head_dim} cube={args.cube} sparsity={args.sparsity} extra_tokens={args.extra_tokens}"
    )
    header = (
        f"{'tokens':>7} {'grid':>10} {'cubes':>6} {'top_k':>6} {'dense ms':>10} {'vsa ms':>10} {'dense/vsa':>10} "
        f"{'(cpu time)':>10}"
    )
    if use_flex:
        header += f" {'flex ms':>10} {'dense/flex':>10} {'(cpu time)':>10} {'max|vsa-flex|':>14}"
    print(header)

    generator = torch.Generator(device=device).manual_seed(0)
    for grid in args.sizes:
        layout = SparseLayout.from_sparsity(0, grid, args.sparsity, args.cube)
        shape = (args.batch, layout.num_grid_tokens + args.extra_tokens, args.heads, args.head_dim)
        qkv = [torch.randn(shape, generator=generator, device=device, dtype=dtype) for _ in range(3)]
        print(_bench_size(layout, qkv, args.repeats, use_flex), flush=True)


if __name__ == "__main__":
    main()
