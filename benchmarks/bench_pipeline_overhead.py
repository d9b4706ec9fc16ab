"""Where a joint text-to-video+audio pipeline call spends its time, and what its denoising loop does besides the
transformer: host<->device synchronisations and host tensors made per step.

    python benchmarks/bench_pipeline_overhead.py                     # tiny and demo presets, CPU float32

Components are built in code with random weights (bench_utils.pipeline_components): `tiny` is the test suite's
pipeline at 32x32, 9 frames; `demo` the shipped demo's sizes at 64x64, 33 frames, with untrained demo VAEs.

Times: sections of one call (median over `--repeats` calls after a warm-up call): prompt encoding, the denoising loop
split into the transformer calls (the audio branch runs inside the video branch's call) and the rest of the loop
(conditions, guidance, scheduler step, callbacks), and decoding. Inside the transformer, `outside blocks` is what
each call spends before and after its block stack (patch embedding, positions, RoPE tables, text projection,
timestep embedding, output head): the part that is constant across steps or cheap.

Synchronisations are counted on the CPU by tracing every ATen call of the loop (a TorchDispatchMode): ops that need
a tensor's value on the host (`.item()`, `bool()`, `nonzero`, `unique`, `equal`, ...), which block on a GPU, and
tensors made from Python data (`torch.tensor(list)`), which become host-to-device copies on a GPU.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
import traceback
from collections.abc import Callable

import torch
from bench_utils import pipeline_components
from torch.utils._python_dispatch import TorchDispatchMode

import diffusers_skyreels as ds

CALLS = {
    "tiny": dict(height=32, width=32, num_frames=9, fps=16.0),
    "demo": dict(height=64, width=64, num_frames=33, fps=16.0),
}
PROMPT = "A red ball bounces quickly between the walls. <sfx>a ping at every bounce</sfx>"
SYNC_OPS = {
    "_local_scalar_dense", "nonzero", "nonzero_static", "_unique2", "unique_dim", "unique_consecutive",
    "masked_select", "equal", "allclose", "is_nonzero",
}
HOST_TENSOR_OPS = {"lift_fresh"}


class OpCounter(TorchDispatchMode):
    """Counts sync ops and host tensors, split by whether a transformer call is running."""

    def __init__(self) -> None:
        super().__init__()
        self.inside_transformer = False
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        kind = "sync" if name in SYNC_OPS else "host tensor" if name in HOST_TENSOR_OPS else None
        if kind:
            where = "transformer" if self.inside_transformer else "loop"
            self.counts[(where, kind, name, _caller())] += 1
        return func(*args, **(kwargs or {}))


def _caller() -> str:
    """`file:line` of the innermost frame in Diffusers or this package (where the op was asked for)."""
    for frame in reversed(traceback.extract_stack()):
        if ("diffusers" in frame.filename) and "bench_pipeline_overhead" not in frame.filename:
            return f"{frame.filename.split('site-packages/')[-1].split('src/')[-1]}:{frame.lineno}"
    return "?"


class Sections:
    """Wall-clock time of the sections of pipeline calls, by wrapping methods and hooking modules."""

    def __init__(self, pipe: ds.SkyReelsV4Pipeline) -> None:
        self.time: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()
        self.counter: OpCounter | None = None
        for name in ("encode_prompt", "denoise"):
            self._wrap_method(pipe, name)
        for name in ("vae", "audio_vae"):
            self._wrap_method(getattr(pipe, name), "decode", section=f"{name}.decode")
        if pipe.vocoder is not None:
            self._hook(pipe.vocoder, "audio_vae.decode")
        self._hook(pipe.transformer, "transformer", on_enter=self._enter_transformer, on_exit=self._exit_transformer)
        self._hook(pipe.text_encoder, "text_encoder")
        for model in (pipe.transformer, pipe.audio_transformer):
            for block in model.blocks:
                self._hook(block, "blocks")

    def _wrap_method(self, owner: object, name: str, section: str | None = None) -> None:
        original = getattr(owner, name)
        section = section or name

        def timed(*args, **kwargs):
            start = time.perf_counter()
            counting = section == "denoise" and self.counter is not None
            if counting:
                self.counter.__enter__()
            try:
                return original(*args, **kwargs)
            finally:
                if counting:
                    self.counter.__exit__(None, None, None)
                self.time[section] += time.perf_counter() - start
                self.calls[section] += 1

        setattr(owner, name, timed)

    def _hook(
        self, module: torch.nn.Module, section: str, on_enter: Callable | None = None, on_exit: Callable | None = None
    ) -> None:
        starts = []

        def pre(*_):
            starts.append(time.perf_counter())
            if on_enter:
                on_enter()

        def post(*_):
            self.time[section] += time.perf_counter() - starts.pop()
            self.calls[section] += 1
            if on_exit:
                on_exit()

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def _enter_transformer(self) -> None:
        if self.counter is not None:
            self.counter.inside_transformer = True

    def _exit_transformer(self) -> None:
        if self.counter is not None:
            self.counter.inside_transformer = False


def measure(preset: str, steps: int, repeats: int) -> tuple[dict[str, float], dict, int]:
    pipe = ds.SkyReelsV4Pipeline(**pipeline_components(preset))
    pipe.set_progress_bar_config(disable=True)
    sections = Sections(pipe)
    call = dict(num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **CALLS[preset])
    pipe(PROMPT, **call)  # warm-up
    samples = collections.defaultdict(list)
    for _ in range(repeats):
        sections.time.clear()
        sections.calls.clear()
        start = time.perf_counter()
        pipe(PROMPT, **call)
        total = time.perf_counter() - start
        t = sections.time
        samples["total"].append(total)
        for key in ("encode_prompt", "denoise", "transformer", "blocks", "vae.decode", "audio_vae.decode"):
            samples[key].append(t[key])
        samples["loop outside transformer"].append(t["denoise"] - t["transformer"])
        samples["transformer outside blocks"].append(t["transformer"] - t["blocks"])
        samples["other"].append(total - t["encode_prompt"] - t["denoise"] - t["vae.decode"] - t["audio_vae.decode"])
    text_encoder_calls = sections.calls["text_encoder"]
    sections.counter = OpCounter()
    pipe(PROMPT, **call)
    return {k: statistics.median(v) for k, v in samples.items()}, dict(sections.counter.counts), text_encoder_calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,demo")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU float32, threads={torch.get_num_threads()}, {args.steps} steps, classifier-free guidance (batch 2), "
          f"median of {args.repeats} calls")
    for preset in args.presets.split(","):
        times, counts, text_encoder_calls = measure(preset, args.steps, args.repeats)
        total = times["total"]
        print(f"\n{preset}: {CALLS[preset]} -> {total * 1e3:.0f} ms per call")
        rows = [
            ("prompt encoding", times["encode_prompt"]),
            ("denoising loop", times["denoise"]),
            ("  transformer calls", times["transformer"]),
            ("    blocks", times["blocks"]),
            ("    outside blocks (embeddings, RoPE, head)", times["transformer outside blocks"]),
            ("  loop outside the transformer", times["loop outside transformer"]),
            ("video decode", times["vae.decode"]),
            ("audio decode (+ vocoder)", times["audio_vae.decode"]),
            ("other (checks, noise, postprocessing)", times["other"]),
        ]
        for label, seconds in rows:
            print(f"  {label:46s} {seconds * 1e3:9.1f} ms {100 * seconds / total:6.1f} %")
        per_step = times["loop outside transformer"] / args.steps
        print(f"  loop overhead per step: {per_step * 1e3:.2f} ms "
              f"({100 * times['loop outside transformer'] / times['denoise']:.2f} % of the loop)")
        print(f"  text encoder forward calls per pipeline call: {text_encoder_calls}")
        for (where, kind, op, caller), n in sorted(counts.items()):
            print(f"  {kind} in the {where}: {op} at {caller}, {n} in {args.steps} steps")
        if not counts:
            print("  no sync ops and no host tensors in the loop")


if __name__ == "__main__":
    main()
