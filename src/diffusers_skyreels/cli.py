"""`skyreels-v4`: generate, animate, extend, inpaint, edit and refine clips with sound from the command line.

The default model is the small demo model shipped inside the package (trained on a procedural world of bouncing
balls and squares that ping at every bounce; see `diffusers_skyreels/demo`). `--model` takes a local folder or a Hub
id of any saved SkyReels V4 pipeline.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

DEMO_MODEL_DIR = "model"
GENERATION_CONFIG = "generation_config.json"


def default_model_path() -> Path:
    """The demo pipeline folder shipped in the package."""
    return Path(str(resources.files("diffusers_skyreels.demo") / DEMO_MODEL_DIR))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skyreels-v4",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='Example: skyreels-v4 generate "A blue square bounces slowly between the walls of a dark room. '
        '<sfx>a ping at every bounce</sfx>" -o out.mp4',
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("-o", "--output", default="out.mp4", help="where to write the mp4 (default: out.mp4)")
        sub.add_argument("--model", default=None, help="pipeline folder or Hub id (default: the shipped demo model)")
        sub.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
        sub.add_argument("--steps", type=int, help="denoising steps (default: the model's recommendation)")
        sub.add_argument("--guidance-scale", type=float, help="video classifier-free guidance")
        sub.add_argument("--negative-prompt", help="what to steer away from (needs guidance > 1)")
        sub.add_argument("--fps", type=float, help="frame rate of the base clip")
        sub.add_argument("--device", default="cpu", help="torch device (default: cpu)")
        sub.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        sub.add_argument("--wav", action="store_true", help="also write the soundtrack as a .wav next to the mp4")
        return sub

    def add_generation(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--audio-guidance-scale", type=float, help="audio classifier-free guidance")
        sub.add_argument("--height", type=int, help="base height in pixels")
        sub.add_argument("--width", type=int, help="base width in pixels")
        sub.add_argument("--num-frames", type=int, help="base frames, 4k + 1")
        sub.add_argument("--duration", type=float, help="seconds (instead of --num-frames)")
        sub.add_argument("--refine", dest="refine", action="store_true", default=None,
                         help="upscale 2x and double the frame rate with the refiner")
        sub.add_argument("--no-refine", dest="refine", action="store_false", help="keep the base resolution")
        sub.add_argument("--no-audio", action="store_true", help="video only")

    generate = add("generate", "text -> video with synchronized sound")
    generate.add_argument("prompt")
    add_generation(generate)

    i2v = add("i2v", "image (+ optional last image) -> video with sound")
    i2v.add_argument("image", help="first frame (an image file)")
    i2v.add_argument("prompt")
    i2v.add_argument("--last-image", help="last frame (an image file)")
    i2v.add_argument("--resize", choices=["pad", "crop", "stretch"], help="fit images of another size")
    i2v.add_argument("--condition-noise", type=float, default=0.0, help="loosen the first frame (0 = exact)")
    add_generation(i2v)

    extend = add("extend", "continue a clip (and its sound)")
    extend.add_argument("video", help="the clip to continue (mp4)")
    extend.add_argument("prompt")
    extend.add_argument("--seconds", type=float, default=1.0, help="how much to add (default: 1.0)")
    extend.add_argument("--audio-guidance-scale", type=float)

    inpaint = add("inpaint", "regenerate a masked region of a clip")
    inpaint.add_argument("video", help="the clip (mp4)")
    inpaint.add_argument("mask", help="an image, white = regenerate (applied to every frame)")
    inpaint.add_argument("prompt")
    inpaint.add_argument("--reference-image", help="what to put in the region (@image_1)")
    inpaint.add_argument("--keep-audio", action="store_true", help="keep the clip's soundtrack")
    inpaint.add_argument("--audio-guidance-scale", type=float)

    edit = add("edit", "edit a clip by instruction (the clip is @video_1)")
    edit.add_argument("video", help="the clip (mp4)")
    edit.add_argument("prompt")
    edit.add_argument("--keep-audio", action="store_true", help="keep the clip's soundtrack")
    edit.add_argument("--audio-guidance-scale", type=float)

    refine = add("refine", "upscale 2x and double the frame rate of a clip")
    refine.add_argument("video", help="the clip (mp4)")
    refine.add_argument("prompt", nargs="?", default="A video.", help="what the clip shows (default: 'A video.')")

    commands.add_parser(
        "plan", help="token / FLOP / memory arithmetic of a request (no model needed)", add_help=False,
        description="All options go to `python -m diffusers_skyreels.planner` (see its --help).",
    )
    return parser


def _check_output(path: str) -> Path:
    output = Path(path)
    if output.suffix.lower() != ".mp4":
        raise ValueError(f"--output must end in .mp4, got {path!r}.")
    if not output.parent.exists():
        raise ValueError(f"The output folder {str(output.parent)!r} does not exist.")
    if not os.access(output.parent, os.W_OK):
        raise ValueError(f"The output folder {str(output.parent)!r} is not writable.")
    return output


def _check_inputs(args: argparse.Namespace) -> None:
    """Input files exist and decode, before any model is loaded."""
    from PIL import Image, UnidentifiedImageError

    for name in ("image", "last_image", "mask", "reference_image"):
        value = getattr(args, name, None)
        if value is None:
            continue
        if not Path(value).is_file():
            raise ValueError(f"{name.replace('_', '-')} file {value!r} does not exist.")
        try:
            with Image.open(value) as image:
                image.verify()
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"{name.replace('_', '-')} file {value!r} is not a readable image: {error}") from error
    video = getattr(args, "video", None)
    if video is not None and not Path(video).is_file():
        raise ValueError(f"video file {video!r} does not exist.")


def _load_pipeline(model: str | None, device: str, dtype_name: str):
    import torch
    from diffusers import DiffusionPipeline

    import diffusers_skyreels  # noqa: F401  (registers the classes with Diffusers)

    path = model or str(default_model_path())
    if model is None and not (Path(path) / "model_index.json").is_file():
        raise ValueError(f"The shipped demo model is missing from {path}; reinstall the package or pass --model.")
    pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=getattr(torch, dtype_name))
    pipe.to(device)
    defaults = {}
    config_file = Path(path) / GENERATION_CONFIG
    if config_file.is_file():
        defaults = json.loads(config_file.read_text())
    return pipe, defaults


def _task(pipeline_class, pipe):
    """The same components as another task's pipeline (like `from_pipe`, without re-casting every model)."""
    accepted = inspect.signature(pipeline_class.__init__).parameters
    task = pipeline_class(**{name: module for name, module in pipe.components.items() if name in accepted})
    task.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return task


# Recommended settings that describe the generated clip's size: a user's clip keeps its own.
SIZE_SETTINGS = ("height", "width", "num_frames", "duration_seconds")


def _call(pipeline, defaults: dict[str, Any], *args: Any, own_clip: bool = False, **overrides: Any):
    """Call `pipeline` with the model's recommended settings, overridden by what the command line set (not None)."""
    accepted = inspect.signature(pipeline.__call__).parameters
    kwargs = {k: v for k, v in defaults.items() if k in accepted and not (own_clip and k in SIZE_SETTINGS)}
    given = {k: v for k, v in overrides.items() if v is not None}
    if "duration_seconds" in given:
        kwargs.pop("num_frames", None)
    return pipeline(*args, **{**kwargs, **given})


def _write(output: Path, result, write_wav: bool) -> list[Path]:
    """Write the mp4 (and wav) atomically: a failure leaves nothing half-written."""
    from .utils.media_io import export_to_video_with_audio, export_to_wav

    written = []
    audio = None if result.audio is None else result.audio[0]
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        staged = Path(tmp) / output.name
        export_to_video_with_audio(
            result.frames[0], staged, fps=int(result.fps), audio=audio, audio_sample_rate=result.audio_sample_rate
        )
        staged_wav = None
        if write_wav and audio is not None:
            staged_wav = Path(tmp) / output.with_suffix(".wav").name
            export_to_wav(audio, staged_wav, result.audio_sample_rate)
        os.replace(staged, output)
        written.append(output)
        if staged_wav is not None:
            os.replace(staged_wav, output.with_suffix(".wav"))
            written.append(output.with_suffix(".wav"))
    return written


def run(args: argparse.Namespace) -> list[Path]:
    import numpy as np
    import torch
    from PIL import Image

    from .pipelines import (
        SkyReelsV4ImageToVideoPipeline,
        SkyReelsV4InpaintPipeline,
        SkyReelsV4RefinerPipeline,
        SkyReelsV4VideoEditPipeline,
        SkyReelsV4VideoExtensionPipeline,
    )
    from .utils.media_io import load_video

    output = _check_output(args.output)
    _check_inputs(args)
    pipe, defaults = _load_pipeline(args.model, args.device, args.dtype)
    sample_rate = pipe.audio_sample_rate
    common = dict(
        generator=torch.Generator().manual_seed(args.seed),
        output_type="np",
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt,
        fps=args.fps,
    )
    audio_guidance = dict(audio_guidance_scale=getattr(args, "audio_guidance_scale", None))

    def clip(path: str):
        video = load_video(path, audio_sample_rate=sample_rate)
        if args.fps is None:
            common["fps"] = video.fps  # the clip's own rate, not the model's default
        return list(video.frames.astype(np.float32) / 255.0), video.audio

    if args.command in ("generate", "i2v"):
        generation = dict(
            height=args.height, width=args.width, num_frames=args.num_frames, duration_seconds=args.duration,
            refine=args.refine, generate_audio=False if args.no_audio else None, **audio_guidance, **common,
        )
        if args.command == "generate":
            result = _call(pipe, defaults, args.prompt, **generation)
        else:
            last = Image.open(args.last_image).convert("RGB") if args.last_image else None
            result = _call(
                _task(SkyReelsV4ImageToVideoPipeline, pipe), defaults, Image.open(args.image).convert("RGB"),
                args.prompt, last_image=last, resize_mode=args.resize, condition_noise=args.condition_noise,
                **generation,
            )
    elif args.command == "extend":
        frames, audio = clip(args.video)
        result = _call(
            _task(SkyReelsV4VideoExtensionPipeline, pipe), defaults, frames, args.prompt, audio=audio,
            extension_seconds=args.seconds, own_clip=True, **audio_guidance, **common,
        )
    elif args.command in ("inpaint", "edit"):
        frames, audio = clip(args.video)
        keep = dict(audio=audio, keep_audio=True) if args.keep_audio else {}
        if args.command == "inpaint":
            mask = Image.open(args.mask).convert("L")
            reference = Image.open(args.reference_image).convert("RGB") if args.reference_image else None
            result = _call(
                _task(SkyReelsV4InpaintPipeline, pipe), defaults, frames, mask, args.prompt,
                reference_image=reference, own_clip=True, **keep, **audio_guidance, **common,
            )
        else:
            result = _call(
                _task(SkyReelsV4VideoEditPipeline, pipe), defaults, frames, args.prompt, own_clip=True, **keep,
                **audio_guidance, **common,
            )
    elif args.command == "refine":
        frames, audio = clip(args.video)
        result = _call(
            _task(SkyReelsV4RefinerPipeline, pipe), defaults, args.prompt, video=frames, audio=audio,
            audio_sample_rate=sample_rate if audio is not None else None, own_clip=True, **common,
        )
    else:  # pragma: no cover - argparse restricts the commands
        raise ValueError(f"Unknown command {args.command!r}.")
    return _write(output, result, args.wav)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "plan":
        from .planner import main as plan_main

        plan_main(extra)
        return 0
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        written = run(args)
    except ValueError as error:
        print(f"skyreels-v4: error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
