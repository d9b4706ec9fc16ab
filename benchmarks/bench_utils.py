"""Timing and peak-memory helpers shared by the benchmarks.

Timing: candidates run interleaved (A, B, A, B, ... with the order flipped every round), so a slow phase of a shared
machine hits both; each benchmark reports the median over rounds of the per-round ratio. Wall-clock time and process
CPU time are both recorded: CPU time (all threads of this process) leaves out time spent descheduled by other
tenants, so its ratio is the steadier one on a busy machine.

Peak memory: each candidate runs in a fresh subprocess, so that neither allocator state nor the other candidate's
weights leak into its numbers. On CUDA it is `torch.cuda.max_memory_allocated`; on CPU it is the resident-set
high-water mark (`VmHWM` of `/proc/self/status`, reset through `/proc/self/clear_refs` right before the measured
call, after `malloc_trim` has returned freed heap pages), which counts every page the process touched: tensors,
allocator slack and library buffers alike.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIB = 2**20


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(
    fns: dict[str, Callable[[], object]], repeats: int, device: torch.device, warmup: int = 1
) -> dict[str, list[tuple[float, float]]]:
    """`(wall, cpu)` seconds of each function for `repeats` interleaved rounds, after `warmup` calls each."""

    def run(fn: Callable[[], object]) -> tuple[float, float]:
        synchronize(device)
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        return time.perf_counter() - wall, time.process_time() - cpu

    for fn in fns.values():
        for _ in range(warmup):
            run(fn)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    names = list(fns)
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else names[::-1]:
            times[name].append(run(fns[name]))
    return times


def median_ratio(times: dict[str, list[tuple[float, float]]], numerator: str, denominator: str) -> tuple[float, float]:
    """Median over rounds of `numerator / denominator`, for wall-clock and for CPU time."""
    pairs = list(zip(times[numerator], times[denominator], strict=True))
    return (
        statistics.median(a[0] / b[0] for a, b in pairs),
        statistics.median(a[1] / b[1] for a, b in pairs),
    )


def median_seconds(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc `malloc_trim`), so that RSS is live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


class PeakMemory:
    """Peak memory of a code block above what was resident when it started, in bytes (see the module docstring).

    `baseline` is what was resident at the start (weights, inputs, the interpreter), `peak` the high-water mark.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = self.peak = 0

    def __enter__(self) -> PeakMemory:
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            release_freed_memory()
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.baseline = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = _status_kib("VmHWM") * 1024

    @property
    def increase(self) -> int:
        return self.peak - self.baseline


def run_child(script: str, args: list[str]) -> dict:
    """Run `python script *args` and return the JSON object it prints on its last line.

    glibc raises its mmap threshold as large blocks are freed and then keeps freed heap pages mapped, so the resident
    set drifts above live memory; a fixed threshold (`MALLOC_MMAP_THRESHOLD_`) gives every block of 128 KiB or more
    its own mapping, returned on free, and the RSS high-water mark then follows the tensors.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    result = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def parameter_bytes(*models: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for m in models for p in m.parameters())


def pipeline_components(preset: str, seed: int = 0) -> dict:
    """Randomly initialised pipeline components at a preset, built in code (nothing is downloaded).

    `tiny`: the components of the test suite (tests/fixtures_pipeline.py). `demo`: the shipped demo's sizes (demo
    branches, the demo's Wan video VAE and Oobleck waveform VAE architectures, a 64-wide tiny Qwen2.5-VL), untrained.
    """
    from diffusers import AutoencoderKLWan, AutoencoderOobleck, FlowMatchEulerDiscreteScheduler

    from diffusers_skyreels import SkyReelsV4AudioTransformer, SkyReelsV4RefinerTransformer, SkyReelsV4Transformer
    from diffusers_skyreels.utils import build_tiny_qwen_vl

    if preset == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from fixtures_pipeline import build_tiny_components

        return build_tiny_components(seed)
    if preset != "demo":
        raise ValueError(f"unknown preset {preset!r}")
    torch.manual_seed(seed)
    text_encoder, tokenizer, image_processor = build_tiny_qwen_vl("qwen2_5_vl", hidden_size=64, seed=seed)
    video = SkyReelsV4Transformer.from_preset("demo")
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=8, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 8, latents_std=[1.0] * 8,
    )
    audio_vae = AutoencoderOobleck(
        encoder_hidden_size=16, downsampling_ratios=[16, 16], channel_multiples=[2, 4], decoder_channels=16,
        decoder_input_channels=8, audio_channels=1, sampling_rate=16000,
    )
    return dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        image_processor=image_processor,
        transformer=video.eval(),
        audio_transformer=SkyReelsV4AudioTransformer.from_preset("demo").eval(),
        vae=vae.eval(),
        audio_vae=audio_vae.eval(),
        vocoder=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=2.0),
        refiner=SkyReelsV4RefinerTransformer.from_video_branch(video).eval(),
    )
