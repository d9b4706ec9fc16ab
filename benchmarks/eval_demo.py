"""Evaluate a bouncing-world model on held-out clips, without any learned metric.

    python benchmarks/eval_demo.py --num-clips 48 --seed 100000 --ablation

For each held-out clip spec (seeds the training set never used) the pipeline generates a clip from the spec's prompt,
and `diffusers_skyreels.demo.metrics` measures it: object colour and shape, whether it moves, the bounces seen in the
video, the pings heard in the audio and their pitch. Reported:

- colour / shape accuracy: the measured attribute equals the prompt's;
- moving: the object travels more than 5 % of the width;
- sync video->audio: share of video bounces with a ping onset within one base frame (1/16 s), and audio->video: share
  of onsets with a video bounce within one base frame;
- pitch: share of pings whose pitch is the prompt colour's.

`--ablation` repeats the run with the audio<->video cross-attention switched off in every block (both branches run
on their own), to show what the coupling buys.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import numpy as np
import torch

BASE_FPS = 16.0


@contextlib.contextmanager
def coupling_disabled(pipe):
    """Skip the audio<->video cross-attention of every block (restored afterwards)."""
    saved = []
    for model in (pipe.transformer, pipe.audio_transformer):
        for block in model.blocks:
            saved.append((block, block.attn_cross_modal))
            block.attn_cross_modal = None
    try:
        yield
    finally:
        for block, attention in saved:
            block.attn_cross_modal = attention


def evaluate(pipe, specs, call_kwargs: dict, seed: int) -> dict:
    from diffusers_skyreels.demo.metrics import matched, measure_clip

    totals = dict(colour=0, shape=0, moving=0, video_bounces=0, video_matched=0, onsets=0, onsets_matched=0,
                  pitched=0, pitch_correct=0)
    seconds = []
    for index, spec in enumerate(specs):
        start = time.perf_counter()
        out = pipe(spec.prompt, generator=torch.Generator().manual_seed(seed + index), **call_kwargs)
        seconds.append(time.perf_counter() - start)
        got = measure_clip(out.frames[0], out.fps, out.audio[0], out.audio_sample_rate)
        tolerance = 1.0 / BASE_FPS
        totals["colour"] += got.colour == spec.colour
        totals["shape"] += got.shape == spec.shape
        totals["moving"] += got.moving
        totals["video_bounces"] += len(got.video_bounces)
        totals["video_matched"] += matched(got.video_bounces, got.onsets, tolerance)
        totals["onsets"] += len(got.onsets)
        totals["onsets_matched"] += matched(got.onsets, got.video_bounces, tolerance)
        totals["pitched"] += len(got.pitches)
        totals["pitch_correct"] += sum(p == spec.colour for p in got.pitches)
    n = len(specs)

    def share(a: str, b: str) -> float | None:
        return None if totals[b] == 0 else totals[a] / totals[b]

    return {
        "clips": n,
        "colour_accuracy": totals["colour"] / n,
        "shape_accuracy": totals["shape"] / n,
        "moving": totals["moving"] / n,
        "sync_video_to_audio": share("video_matched", "video_bounces"),
        "sync_audio_to_video": share("onsets_matched", "onsets"),
        "pitch_accuracy": share("pitch_correct", "pitched"),
        "video_bounces": totals["video_bounces"],
        "ping_onsets": totals["onsets"],
        "seconds_per_clip_median": float(np.median(seconds)),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="pipeline folder (default: the shipped demo model)")
    parser.add_argument("--num-clips", type=int, default=48)
    parser.add_argument("--seed", type=int, default=100_000, help="held-out spec seed (training used small seeds)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's recommendation)")
    parser.add_argument("--guidance-scale", type=float, help="video CFG (default: the model's recommendation)")
    parser.add_argument("--audio-guidance-scale", type=float, help="audio CFG (default: the model's recommendation)")
    parser.add_argument("--no-refine", action="store_true", help="evaluate the base 64x64 16 fps output")
    parser.add_argument("--ablation", action="store_true", help="also run with the a<->v cross-attention off")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    from diffusers import DiffusionPipeline

    import diffusers_skyreels  # noqa: F401
    from diffusers_skyreels.cli import GENERATION_CONFIG, default_model_path
    from diffusers_skyreels.demo.world import sample_clip_spec

    path = Path(args.model) if args.model else default_model_path()
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    defaults = json.loads((path / GENERATION_CONFIG).read_text()) if (path / GENERATION_CONFIG).is_file() else {}
    call_kwargs = {k: v for k, v in defaults.items() if k != "refine"}
    call_kwargs["refine"] = bool(defaults.get("refine", False)) and not args.no_refine and pipe.refiner is not None
    for name in ("steps", "guidance_scale", "audio_guidance_scale"):
        if getattr(args, name) is not None:
            call_kwargs["num_inference_steps" if name == "steps" else name] = getattr(args, name)
    rng = np.random.default_rng(args.seed)
    specs = [sample_clip_spec(rng) for _ in range(args.num_clips)]

    results = {"settings": {**call_kwargs, "model": str(path), "seed": args.seed}}
    results["coupled"] = evaluate(pipe, specs, call_kwargs, args.seed)
    if args.ablation:
        with coupling_disabled(pipe):
            results["ablation_no_cross_attention"] = evaluate(pipe, specs, call_kwargs, args.seed)

    header = ["run", "colour", "shape", "moving", "sync v->a", "sync a->v", "pitch", "s/clip"]
    print(" | ".join(header))
    for name in ("coupled", "ablation_no_cross_attention"):
        if name not in results:
            continue
        r = results[name]

        def pct(value):
            return "n/a" if value is None else f"{100 * value:.0f}%"

        print(" | ".join([name, pct(r["colour_accuracy"]), pct(r["shape_accuracy"]), pct(r["moving"]),
                          pct(r["sync_video_to_audio"]), pct(r["sync_audio_to_video"]), pct(r["pitch_accuracy"]),
                          f"{r['seconds_per_clip_median']:.1f}"]))
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
