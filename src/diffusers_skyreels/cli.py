"""`skyreels-v4`: generate, animate, extend, inpaint, edit and refine clips with sound from the command line.

The default model is the small demo model shipped inside the package (trained on a procedural world of bouncing
balls and squares that ping at every bounce; see `diffusers_skyreels/demo`). `--model` takes a local folder or a Hub
id of any saved SkyReels V4 pipeline.
"""

from __future__ import annotations

import argparse
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
    refine.add_argument("prompt", nargs="?", default="", help="what the clip shows (optional)")

    plan = commands.add_parser("plan", help="token / FLOP / memory arithmetic of a request (no model needed)")
    plan.add_argument("planner_args", nargs=argparse.REMAINDER, help="see `skyreels-v4 plan --help`")
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


def _pick(args: argparse.Namespace, defaults: dict[str, Any], **names: str) -> dict[str, Any]:
    """Pipeline kwargs from the command line, falling back to the model's recommended settings."""
    kwargs = {}
    for kwarg, attribute in names.items():
        value = getattr(args, attribute, None)
        if value is None:
            value = defaults.get(kwarg)
        if value is not None:
            kwargs[kwarg] = value
    return kwargs


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
    generator = torch.Generator().manual_seed(args.seed)
    common = dict(generator=generator, output_type="np")
    common.update(_pick(args, defaults, num_inference_steps="steps", guidance_scale="guidance_scale", fps="fps"))
    if args.negative_prompt is not None:
        common["negative_prompt"] = args.negative_prompt
    sample_rate = pipe.audio_sample_rate

    def clip(path: str):
        video = load_video(path, audio_sample_rate=sample_rate)
        if args.fps is None:
            common["fps"] = video.fps  # the clip's own rate, not the model's default
        return list(video.frames.astype(np.float32) / 255.0), video.audio

    if args.command in ("generate", "i2v"):
        kwargs = _pick(
            args, defaults, audio_guidance_scale="audio_guidance_scale", height="height", width="width",
            num_frames="num_frames", duration_seconds="duration", refine="refine",
        )
        if "duration_seconds" in kwargs and args.num_frames is None:
            kwargs.pop("num_frames", None)
        kwargs["generate_audio"] = not args.no_audio
        if args.command == "generate":
            result = pipe(args.prompt, **kwargs, **common)
        else:
            i2v = SkyReelsV4ImageToVideoPipeline.from_pipe(pipe)
            last = Image.open(args.last_image).convert("RGB") if args.last_image else None
            result = i2v(
                Image.open(args.image).convert("RGB"), args.prompt, last_image=last, resize_mode=args.resize,
                condition_noise=args.condition_noise, **kwargs, **common,
            )
    elif args.command == "extend":
        frames, audio = clip(args.video)
        extend = SkyReelsV4VideoExtensionPipeline.from_pipe(pipe)
        kwargs = _pick(args, defaults, audio_guidance_scale="audio_guidance_scale")
        result = extend(frames, args.prompt, audio=audio, extension_seconds=args.seconds, **kwargs, **common)
    elif args.command in ("inpaint", "edit"):
        frames, audio = clip(args.video)
        kwargs = _pick(args, defaults, audio_guidance_scale="audio_guidance_scale")
        keep = dict(audio=audio, keep_audio=True) if args.keep_audio else {}
        if args.command == "inpaint":
            mask = Image.open(args.mask).convert("L")
            reference = Image.open(args.reference_image).convert("RGB") if args.reference_image else None
            result = SkyReelsV4InpaintPipeline.from_pipe(pipe)(
                frames, mask, args.prompt, reference_image=reference, **keep, **kwargs, **common
            )
        else:
            result = SkyReelsV4VideoEditPipeline.from_pipe(pipe)(frames, args.prompt, **keep, **kwargs, **common)
    elif args.command == "refine":
        frames, audio = clip(args.video)
        refiner = SkyReelsV4RefinerPipeline.from_pipe(pipe)
        result = refiner(
            args.prompt, video=frames, audio=audio, audio_sample_rate=sample_rate if audio is not None else None,
            **common,
        )
    else:  # pragma: no cover - argparse restricts the commands
        raise ValueError(f"Unknown command {args.command!r}.")
    return _write(output, result, args.wav)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "plan":
        from .planner import main as plan_main

        plan_main(args.planner_args)
        return 0
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
