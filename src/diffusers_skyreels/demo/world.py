"""The "bouncing world": a procedural audio-visual toy world with exact ground truth.

A single object (a ball or a square in one of four colours) slides horizontally at constant speed in a dark room and
bounces elastically off the left and right edges of the frame; every bounce makes a short sine ping whose pitch is
set by the colour. The project's small demo model is trained on clips of this world, so what it generates can be
checked against the rules: colour, size, speed, bounce times and ping pitch are all known exactly.

Geometry is continuous: pixel `j` covers `[j, j + 1)`, the walls are `x = 0` and `x = width`, and a bounce is the
instant the object's edge touches a wall. Edges are anti-aliased by pixel coverage; interior pixels have the exact
colour. Sizes and speeds are defined at a width of 64 px and scale with the width.

Run `python -m diffusers_skyreels.demo.world --output-dir DIR --num-clips N --seed S` to write a training folder.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffusers_skyreels.utils.media_io import export_to_video_with_audio, num_audio_samples

REFERENCE_WIDTH = 64
# The clip the base model is trained on and generates (the refiner doubles size and frame rate).
BASE_CLIP = dict(height=REFERENCE_WIDTH, width=REFERENCE_WIDTH, num_frames=33, fps=16)
BACKGROUND = (16, 16, 16)
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 230), "yellow": (230, 210, 40)}
PITCHES_HZ = {"red": 440.0, "green": 660.0, "blue": 880.0, "yellow": 1320.0}
# Ball diameter / square side, in pixels at the reference width.
SHAPE_SIZES = {"ball": 14.0, "square": 12.0}
# Horizontal speed in pixels per second at the reference width.
SPEEDS = {"slowly": 40.0, "quickly": 80.0}

PING_DURATION_S = 0.100
PING_DECAY_S = 0.030
PING_AMPLITUDE = 0.5

# Every template names the colour, the shape and the speed word exactly once, so prompts stay parseable.
PROMPT_TEMPLATES = (
    "A {colour} {shape} bounces {speed} between the walls of a dark room. <sfx>a ping at every bounce</sfx>",
    "In a dark room, a {colour} {shape} moves {speed} from wall to wall. <sfx>a short ping each time it hits</sfx>",
    "A {colour} {shape} slides {speed} left and right, bouncing off the walls. <sfx>a clear ping at each bounce</sfx>",
    "Inside a dim room a {colour} {shape} travels {speed} back and forth. <sfx>a ping when it touches a wall</sfx>",
    "Side view of a {colour} {shape} gliding {speed} between two walls in the dark. <sfx>one ping per bounce</sfx>",
)


@dataclass(frozen=True)
class ClipSpec:
    """Everything that defines one clip.

    `start_x` and `y` are fractions of the room the object's centre can reach: `start_x = 0` has the object touching
    the left wall at t = 0 and `1` the right wall; `y = 0` touches the top edge and `1` the bottom edge. They are
    resolution-independent, so one spec renders the same scene at any size. `direction` is +1 (moving right at t = 0)
    or -1; `prompt_variant` indexes `PROMPT_TEMPLATES`.
    """

    shape: str
    colour: str
    speed: str
    start_x: float
    y: float
    direction: int
    prompt_variant: int = 0

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("shape", self.shape, SHAPE_SIZES),
            ("colour", self.colour, COLOURS),
            ("speed", self.speed, SPEEDS),
        ):
            if value not in allowed:
                raise ValueError(f"`{name}` must be one of {sorted(allowed)}, got {value!r}.")
        if not (0.0 <= self.start_x <= 1.0 and 0.0 <= self.y <= 1.0):
            raise ValueError(f"`start_x` and `y` must lie in [0, 1], got {self.start_x} and {self.y}.")
        if self.direction not in (-1, 1):
            raise ValueError(f"`direction` must be +1 or -1, got {self.direction}.")
        if not 0 <= self.prompt_variant < len(PROMPT_TEMPLATES):
            raise ValueError(f"`prompt_variant` must be in [0, {len(PROMPT_TEMPLATES)}), got {self.prompt_variant}.")

    @property
    def prompt(self) -> str:
        """The caption of the clip."""
        return PROMPT_TEMPLATES[self.prompt_variant].format(colour=self.colour, shape=self.shape, speed=self.speed)


@dataclass
class RenderedClip:
    """A rendered clip: uint8 `frames [F, H, W, 3]`, float32 mono `audio [samples]` and its ground truth."""

    spec: ClipSpec
    frames: np.ndarray
    audio: np.ndarray
    fps: int
    sample_rate: int
    bounce_times: list[float]
    centre_x: np.ndarray
    centre_y: float
    prompt: str


def object_size(shape: str, width: int = REFERENCE_WIDTH) -> float:
    """Ball diameter or square side in pixels at the given frame width."""
    return SHAPE_SIZES[shape] * width / REFERENCE_WIDTH


def speed_px_per_s(speed: str, width: int = REFERENCE_WIDTH) -> float:
    """Horizontal speed in pixels per second at the given frame width."""
    return SPEEDS[speed] * width / REFERENCE_WIDTH


def _unfolded_position(spec: ClipSpec, times: np.ndarray, width: int) -> tuple[np.ndarray, float]:
    """Distance travelled from the left-wall position as if there were no walls, and the travel range length."""
    travel = width - object_size(spec.shape, width)
    return spec.start_x * travel + spec.direction * speed_px_per_s(spec.speed, width) * times, travel


def object_centre_x(spec: ClipSpec, times: float | np.ndarray, width: int = REFERENCE_WIDTH) -> np.ndarray:
    """Exact horizontal centre (pixels) of the object at the given times (seconds)."""
    unfolded, travel = _unfolded_position(spec, np.asarray(times, dtype=np.float64), width)
    # Folding the free motion into [0, travel] is a triangle wave: the elastic reflections off both walls.
    folded = travel - np.abs(np.mod(unfolded, 2.0 * travel) - travel)
    return object_size(spec.shape, width) / 2.0 + folded


def object_centre_y(spec: ClipSpec, width: int = REFERENCE_WIDTH, height: int = REFERENCE_WIDTH) -> float:
    """Vertical centre (pixels) of the object, fixed for the whole clip."""
    size = object_size(spec.shape, width)
    return size / 2.0 + spec.y * (height - size)


def frame_centres_x(spec: ClipSpec, width: int = REFERENCE_WIDTH, fps: int = 16, num_frames: int = 33) -> np.ndarray:
    """Horizontal centre of the object in each frame; frame `i` shows time `i / fps`."""
    return object_centre_x(spec, np.arange(num_frames) / fps, width)


def bounce_times(spec: ClipSpec, duration: float, width: int = REFERENCE_WIDTH) -> list[float]:
    """Times in `[0, duration)` (seconds) at which the object touches a wall, in increasing order."""
    start, travel = _unfolded_position(spec, np.zeros(()), width)
    velocity = spec.direction * speed_px_per_s(spec.speed, width)
    low, high = sorted((float(start), float(start + velocity * duration)))
    # The object touches a wall whenever the unfolded position crosses a multiple of the travel range.
    crossings = range(math.ceil(low / travel), math.floor(high / travel) + 1)
    times = [(k * travel - float(start)) / velocity for k in crossings]
    return sorted(t for t in times if 0.0 <= t < duration)


def _coverage(spec: ClipSpec, centre_x: float, centre_y: float, width: int, height: int) -> np.ndarray:
    """Fraction of each pixel covered by the object, `[height, width]` in [0, 1]."""
    half = object_size(spec.shape, width) / 2.0
    if spec.shape == "square":
        xs, ys = np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64)
        cover_x = np.clip(np.minimum(xs + 1, centre_x + half) - np.maximum(xs, centre_x - half), 0.0, 1.0)
        cover_y = np.clip(np.minimum(ys + 1, centre_y + half) - np.maximum(ys, centre_y - half), 0.0, 1.0)
        return np.outer(cover_y, cover_x)
    # Disc: supersample the pixels of its bounding box on a 16 x 16 grid each.
    supersampling = 16
    offsets = (np.arange(supersampling) + 0.5) / supersampling
    left, right = max(0, math.floor(centre_x - half)), min(width, math.ceil(centre_x + half))
    top, bottom = max(0, math.floor(centre_y - half)), min(height, math.ceil(centre_y + half))
    xs = (np.arange(left, right)[:, None] + offsets).ravel() - centre_x
    ys = (np.arange(top, bottom)[:, None] + offsets).ravel() - centre_y
    inside = (ys[:, None] ** 2 + xs[None, :] ** 2 <= half**2).reshape(bottom - top, supersampling, right - left, -1)
    coverage = np.zeros((height, width))
    coverage[top:bottom, left:right] = inside.mean(axis=(1, 3))
    return coverage


def _render_audio(colour: str, times: list[float], num_samples: int, sample_rate: int) -> np.ndarray:
    """Silence with a decaying sine ping starting exactly at each of `times`."""
    audio = np.zeros(num_samples, dtype=np.float64)
    for start in times:
        first = math.ceil(start * sample_rate)
        last = min(num_samples, math.ceil((start + PING_DURATION_S) * sample_rate))
        tau = np.arange(first, last) / sample_rate - start
        audio[first:last] += (
            PING_AMPLITUDE * np.exp(-tau / PING_DECAY_S) * np.sin(2.0 * np.pi * PITCHES_HZ[colour] * tau)
        )
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def render_clip(
    spec: ClipSpec,
    width: int = REFERENCE_WIDTH,
    height: int = REFERENCE_WIDTH,
    fps: int = 16,
    num_frames: int = 33,
    sample_rate: int = 16000,
) -> RenderedClip:
    """Renders the frames and soundtrack of a clip; the audio covers the frames' display time, `num_frames / fps`."""
    size = object_size(spec.shape, width)
    if width <= size or height < size:
        raise ValueError(f"A {width}x{height} frame is too small for a {spec.shape} of {size:g} px.")
    if num_frames < 1 or fps <= 0 or sample_rate <= 0:
        raise ValueError("`num_frames`, `fps` and `sample_rate` must be positive.")

    centres_x = frame_centres_x(spec, width, fps, num_frames)
    centre_y = object_centre_y(spec, width, height)
    background = np.array(BACKGROUND, dtype=np.float64)
    colour = np.array(COLOURS[spec.colour], dtype=np.float64)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for index, centre_x in enumerate(centres_x):
        coverage = _coverage(spec, float(centre_x), centre_y, width, height)[..., None]
        frames[index] = np.round(background + coverage * (colour - background)).astype(np.uint8)

    duration = num_frames / fps
    bounces = bounce_times(spec, duration, width)
    audio = _render_audio(spec.colour, bounces, num_audio_samples(num_frames, fps, sample_rate), sample_rate)
    return RenderedClip(
        spec=spec,
        frames=frames,
        audio=audio,
        fps=fps,
        sample_rate=sample_rate,
        bounce_times=bounces,
        centre_x=centres_x,
        centre_y=centre_y,
        prompt=spec.prompt,
    )


def sample_clip_spec(rng: np.random.Generator) -> ClipSpec:
    """Draws a clip uniformly: attributes, start position, height, direction and prompt wording."""
    return ClipSpec(
        shape=str(rng.choice(list(SHAPE_SIZES))),
        colour=str(rng.choice(list(COLOURS))),
        speed=str(rng.choice(list(SPEEDS))),
        start_x=float(rng.uniform()),
        y=float(rng.uniform()),
        direction=int(rng.choice([-1, 1])),
        prompt_variant=int(rng.integers(len(PROMPT_TEMPLATES))),
    )


def all_prompts() -> list[str]:
    """Every prompt the world can produce (each wording x colour x shape x speed)."""
    return [
        template.format(colour=colour, shape=shape, speed=speed)
        for template in PROMPT_TEMPLATES
        for colour in COLOURS
        for shape in SHAPE_SIZES
        for speed in SPEEDS
    ]


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """Reads `(shape, colour, speed)` back from a prompt; raises `ValueError` unless each is named exactly once."""
    words = re.findall(r"[a-z]+", prompt.lower())
    attributes = []
    for name, vocabulary in (("shape", SHAPE_SIZES), ("colour", COLOURS), ("speed", SPEEDS)):
        found = [word for word in words if word in vocabulary]
        if len(found) != 1:
            raise ValueError(f"Expected exactly one {name} word in {prompt!r}, found {found}.")
        attributes.append(found[0])
    return attributes[0], attributes[1], attributes[2]


def write_dataset(
    output_dir: str | Path,
    num_clips: int,
    seed: int = 0,
    width: int = REFERENCE_WIDTH,
    height: int = REFERENCE_WIDTH,
    fps: int = 16,
    num_frames: int = 33,
    sample_rate: int = 16000,
) -> Path:
    """Writes `clips/NNNNNN.mp4` (video + AAC audio) and `metadata.jsonl` under `output_dir`; returns the JSONL path.

    Each JSONL line has the training fields `file_name` (relative to `output_dir`) and `text`, plus ground truth for
    evaluation: `shape`, `colour`, `speed`, `bounce_times` (seconds) and the spec's `start_x`, `y`, `direction`.
    The same seed gives the same clips.
    """
    if num_clips < 1:
        raise ValueError(f"`num_clips` must be at least 1, got {num_clips}.")
    output_dir = Path(output_dir)
    (output_dir / "clips").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    metadata_path = output_dir / "metadata.jsonl"
    with open(metadata_path, "w", encoding="utf-8") as metadata:
        for index in range(num_clips):
            spec = sample_clip_spec(rng)
            clip = render_clip(spec, width, height, fps, num_frames, sample_rate)
            file_name = f"clips/{index:06d}.mp4"
            export_to_video_with_audio(clip.frames, output_dir / file_name, fps, clip.audio, sample_rate)
            record = {
                "file_name": file_name,
                "text": clip.prompt,
                "shape": spec.shape,
                "colour": spec.colour,
                "speed": spec.speed,
                "bounce_times": clip.bounce_times,
                "start_x": spec.start_x,
                "y": spec.y,
                "direction": spec.direction,
            }
            metadata.write(json.dumps(record) + "\n")
    return metadata_path


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: writes a bouncing-world dataset folder."""
    parser = argparse.ArgumentParser(
        prog="python -m diffusers_skyreels.demo.world",
        description="Write a folder of bouncing-world clips (mp4 with audio) and their captions (metadata.jsonl).",
    )
    parser.add_argument("--output-dir", required=True, type=Path, help="folder to write clips/ and metadata.jsonl to")
    parser.add_argument("--num-clips", required=True, type=int, help="number of clips")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--width", type=int, default=REFERENCE_WIDTH, help="frame width in pixels (default: 64)")
    parser.add_argument("--height", type=int, default=REFERENCE_WIDTH, help="frame height in pixels (default: 64)")
    parser.add_argument("--fps", type=int, default=16, help="frames per second (default: 16)")
    parser.add_argument("--num-frames", type=int, default=33, help="frames per clip (default: 33)")
    parser.add_argument("--sample-rate", type=int, default=16000, help="audio sample rate in Hz (default: 16000)")
    args = parser.parse_args(argv)
    path = write_dataset(
        args.output_dir, args.num_clips, args.seed, width=args.width, height=args.height, fps=args.fps,
        num_frames=args.num_frames, sample_rate=args.sample_rate,
    )
    print(f"Wrote {args.num_clips} clips and {path}")


if __name__ == "__main__":
    main()
