"""Evaluate a bouncing-world model on held-out clips, without any learned metric.

    python benchmarks/eval_demo.py --num-clips 48 --seed 100000 --ablation

For each held-out clip spec (seeds the training set never used) the pipeline generates a clip from the spec's prompt,
and `diffusers_skyreels.demo.metrics` measures it: object colour and shape, whether it moves, the bounces seen in the
video, the pings heard in the audio and their pitch. Reported:

- colour / shape accuracy: the measured attribute equals the prompt's;
- moving: the object travels more than 5 % of the width;
- sync video->audio: share of video bounces with a ping onset within one base frame (1/16 s), and audio->video: share
  of onsets with a video bounce within one base frame;
- pitch: share of pings whose pitch is the prompt colour's;
- mismatched sync: the same two shares with each clip's video scored against the next clip's audio, i.e. what the
  number and spacing of bounces and pings give by chance, with no link between picture and sound.

`--ablation` repeats the run with the audio<->video cross-attention switched off in every block (both branches run
on their own), to show what the coupling buys. `--video-to-audio` gives the joint model each spec's true video (the
world's rendering, through the inpaint pipeline with nothing to repaint) and generates only the soundtrack: the
bounce-ping sync of the coupling on its own, whatever the quality of generated video (its colour / shape / moving
columns measure the true video).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
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


def video_to_audio(dubber, spec, call_kwargs: dict, generator: torch.Generator):
    """The spec's true clip (rendered by the world at the base size) with a soundtrack generated for it by `dubber`,
    an inpaint pipeline given nothing to repaint, i.e. the whole video given to the joint model."""
    from diffusers_skyreels.demo.world import render_clip

    height, width, fps, num_frames = (call_kwargs[k] for k in ("height", "width", "fps", "num_frames"))
    frames = render_clip(spec, width, height, fps, num_frames).frames
    out = dubber(
        video=list(frames), mask=np.zeros((height, width), dtype=np.float32), prompt=spec.prompt, fps=fps,
        generator=generator, **{k: call_kwargs[k] for k in ("num_inference_steps", "guidance_scale",
                                                           "audio_guidance_scale") if k in call_kwargs},
    )
    return frames, fps, out.audio[0], out.audio_sample_rate


def measure_specs(
    pipe, specs, indices: list[int], call_kwargs: dict, seed: int, ablation: bool, dub: bool
) -> tuple[list[dict], list[float]]:
    """Generate and measure the clips `indices` of `specs` (clip i is generated with seed `seed + i`, so any split of
    the indices over processes gives the same clips); returns per-clip records and seconds per clip.
    `ablation`: with the audio<->video cross-attention off; `dub`: only the soundtrack, for the true video."""
    from diffusers_skyreels import SkyReelsV4InpaintPipeline
    from diffusers_skyreels.demo.metrics import measure_clip

    dubber = None
    if dub:
        dubber = SkyReelsV4InpaintPipeline.from_pipe(pipe)
        dubber.set_progress_bar_config(disable=True)
    records, seconds = [], []
    with coupling_disabled(pipe) if ablation else contextlib.nullcontext():
        for index in indices:
            spec = specs[index]
            start = time.perf_counter()
            generator = torch.Generator().manual_seed(seed + index)
            if dub:
                clip = video_to_audio(dubber, spec, call_kwargs, generator)
            else:
                out = pipe(spec.prompt, generator=generator, **call_kwargs)
                clip = (out.frames[0], out.fps, out.audio[0], out.audio_sample_rate)
            seconds.append(time.perf_counter() - start)
            got = measure_clip(*clip)
            records.append({
                "index": index, "prompt": spec.prompt, "true_colour": spec.colour, "true_shape": spec.shape,
                "colour": got.colour, "shape": got.shape, "moving": got.moving,
                "video_bounces": got.video_bounces, "onsets": got.onsets, "pitches": got.pitches,
            })
    return records, seconds


def summarise(records: list[dict], seconds: list[float]) -> dict:
    """The figures of a run from its per-clip records."""
    from diffusers_skyreels.demo.metrics import sync_shares

    clips = len(records)
    bounces = [r["video_bounces"] for r in records]
    onsets = [r["onsets"] for r in records]
    sync = sync_shares(bounces, onsets, 1.0 / BASE_FPS)
    mismatched = sync_shares(bounces, onsets[1:] + onsets[:1], 1.0 / BASE_FPS)  # each video vs the next clip's audio
    pitches = [p == r["true_colour"] for r in records for p in r["pitches"]]
    return {
        "clips": clips,
        "colour_accuracy": sum(r["colour"] == r["true_colour"] for r in records) / clips,
        "shape_accuracy": sum(r["shape"] == r["true_shape"] for r in records) / clips,
        "moving": sum(r["moving"] for r in records) / clips,
        "sync_video_to_audio": sync[0],
        "sync_audio_to_video": sync[1],
        "sync_video_to_audio_mismatched": mismatched[0],
        "sync_audio_to_video_mismatched": mismatched[1],
        "pitch_accuracy": sum(pitches) / len(pitches) if pitches else None,
        "video_bounces": sum(map(len, bounces)),
        "ping_onsets": sum(map(len, onsets)),
        "seconds_per_clip_median": float(np.median(seconds)),
    }


_WORKER: dict = {}


def _pipeline(path: Path, device: str = "cpu"):
    """This process's pipeline, loaded once."""
    if "pipe" not in _WORKER:
        from diffusers import DiffusionPipeline

        import diffusers_skyreels  # noqa: F401

        _WORKER["pipe"] = DiffusionPipeline.from_pretrained(path).to(device)
        _WORKER["pipe"].set_progress_bar_config(disable=True)
    return _WORKER["pipe"]


def _worker_init(path: Path, device: str) -> None:
    torch.set_num_threads(1)
    _pipeline(path, device)


def _worker_run(path: Path, device: str, *args):
    return measure_specs(_pipeline(path, device), *args)


def evaluate(
    path: Path, specs, call_kwargs: dict, seed: int, ablation: bool, jobs: int, dub: bool = False,
    device: str = "cpu",
) -> tuple[dict, list]:
    """Measure every spec, in `jobs` single-threaded worker processes when `jobs > 1` (the same clips either way;
    the noise is drawn on the CPU whatever the `device`)."""
    args = (specs, call_kwargs, seed, ablation, dub)
    if jobs <= 1:
        records, seconds = measure_specs(_pipeline(path, device), specs, list(range(len(specs))), *args[1:])
        return summarise(records, seconds), records
    shards = [list(range(len(specs)))[i::jobs] for i in range(jobs)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init, initargs=(path, device)) as pool:
        parts = list(pool.map(_worker_run, [path] * jobs, [device] * jobs, [specs] * jobs, shards,
                              *[[x] * jobs for x in args[1:]]))
    records = sorted((r for part in parts for r in part[0]), key=lambda r: r["index"])
    seconds = [s for part in parts for s in part[1]]
    return summarise(records, seconds), records


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="pipeline folder (default: the shipped demo model); one without "
                        "generation_config.json is run at the world's base clip, 64x64, 33 frames, 16 fps")
    parser.add_argument("--num-clips", type=int, default=48)
    parser.add_argument("--seed", type=int, default=100_000, help="held-out spec seed (training used small seeds)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's recommendation)")
    parser.add_argument("--guidance-scale", type=float, help="video CFG (default: the model's recommendation)")
    parser.add_argument("--audio-guidance-scale", type=float, help="audio CFG (default: the model's recommendation)")
    parser.add_argument("--no-refine", action="store_true", help="evaluate the base 64x64 16 fps output")
    parser.add_argument("--ablation", action="store_true", help="also run with the a<->v cross-attention off")
    parser.add_argument("--video-to-audio", action="store_true",
                        help="also generate only the soundtrack for each clip's true video (the coupling on its own)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="worker processes, one thread each (the clips and figures do not depend on it)")
    parser.add_argument("--device", default="cpu", help="where the pipeline runs, e.g. cuda (default: cpu)")
    parser.add_argument("--output", type=Path, help="write the results (and every clip's measurements) as JSON here")
    args = parser.parse_args(argv)

    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.num_clips < 1:
        parser.error(f"--num-clips must be at least 1, got {args.num_clips}")

    import diffusers_skyreels  # noqa: F401
    from diffusers_skyreels.cli import GENERATION_CONFIG, default_model_path
    from diffusers_skyreels.demo.world import BASE_CLIP, sample_clip_spec

    path = Path(args.model) if args.model else default_model_path()
    if not (path / "model_index.json").is_file():
        parser.error(f"--model {path} is not a pipeline folder (no model_index.json)")
    defaults = json.loads((path / GENERATION_CONFIG).read_text()) if (path / GENERATION_CONFIG).is_file() else {}
    # A training run's output has no generation_config.json: ask it for the world's clip, not for the pipeline's
    # defaults, which are sized for real checkpoints.
    defaults = {**BASE_CLIP, **defaults}
    call_kwargs = {k: v for k, v in defaults.items() if k != "refine"}
    has_refiner = json.loads((path / "model_index.json").read_text()).get("refiner", [None, None])[1] is not None
    call_kwargs["refine"] = bool(defaults.get("refine", False)) and not args.no_refine and has_refiner
    for name in ("steps", "guidance_scale", "audio_guidance_scale"):
        if getattr(args, name) is not None:
            call_kwargs["num_inference_steps" if name == "steps" else name] = getattr(args, name)
    rng = np.random.default_rng(args.seed)
    specs = [sample_clip_spec(rng) for _ in range(args.num_clips)]

    results = {"settings": {**call_kwargs, "model": str(path), "seed": args.seed}}
    clips = {}
    runs = [("coupled", False, False)]
    if args.ablation:
        runs.append(("ablation_no_cross_attention", True, False))
    if args.video_to_audio:
        runs.append(("video_to_audio", False, True))
        if args.ablation:
            runs.append(("video_to_audio_ablation", True, True))
    for name, ablation, dub in runs:
        results[name], clips[name] = evaluate(path, specs, call_kwargs, args.seed, ablation, args.jobs, dub,
                                              args.device)

    header = ["run", "colour", "shape", "moving", "sync v->a", "sync a->v", "mismatched v->a", "mismatched a->v",
              "pitch", "s/clip"]
    print(" | ".join(header))
    for name, _, _ in runs:
        r = results[name]

        def pct(value):
            return "n/a" if value is None else f"{100 * value:.0f}%"

        print(" | ".join([name, pct(r["colour_accuracy"]), pct(r["shape_accuracy"]), pct(r["moving"]),
                          pct(r["sync_video_to_audio"]), pct(r["sync_audio_to_video"]),
                          pct(r["sync_video_to_audio_mismatched"]), pct(r["sync_audio_to_video_mismatched"]),
                          pct(r["pitch_accuracy"]),
                          f"{r['seconds_per_clip_median']:.1f}"]))
    if args.output:
        args.output.write_text(json.dumps({**results, "per_clip": clips}, indent=2))
    return results


if __name__ == "__main__":
    main()
