"""Measurements of a bouncing-world clip from its pixels and samples alone (no learned model).

Used by `benchmarks/eval_demo.py` to score generated clips against their prompts: object colour and shape, whether
it moves, the bounces seen in the video, the ping onsets and pitches heard in the audio, and how well the two agree.
Everything is relative to the frame size, so base (64x64, 16 fps) and refined (128x128, 32 fps) clips are measured
alike. On clips rendered by `world.render_clip` every measurement matches the ground truth (tests/test_demo_metrics.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .world import BACKGROUND, COLOURS, PITCHES_HZ

# A pixel belongs to the object when it is this far (RGB, 0-255) from the background.
OBJECT_THRESHOLD = 60.0
# Filled fraction of the bounding box: pi / 4 = 0.785 for a disc, 1 for a square.
SQUARE_FILL = 0.9
ONSET_REFRACTORY_S = 0.2
PITCH_WINDOW_S = 0.064


@dataclass
class ClipMeasurement:
    """What one clip shows and sounds like."""

    colour: str | None
    shape: str | None
    moving: bool
    speed_px_per_s: float | None  # at a 64 px width; None when the object does not move
    video_bounces: list[float] = field(default_factory=list)  # seconds
    onsets: list[float] = field(default_factory=list)  # seconds
    pitches: list[str] = field(default_factory=list)  # nearest colour's pitch, per onset


def object_masks(frames: np.ndarray) -> np.ndarray:
    """`[F, H, W]` boolean object masks of uint8 or [0, 1] float frames `[F, H, W, 3]`."""
    pixels = frames.astype(np.float32) * (255.0 if frames.dtype != np.uint8 and frames.max() <= 1.0 else 1.0)
    distance = np.linalg.norm(pixels - np.asarray(BACKGROUND, dtype=np.float32), axis=-1)
    return distance > OBJECT_THRESHOLD


def _to_uint8(frames: np.ndarray) -> np.ndarray:
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _nearest(value: np.ndarray | float, table: dict[str, object], log: bool = False) -> str:
    keys = list(table)
    reference = np.asarray([table[k] for k in keys], dtype=np.float64)
    target = np.asarray(value, dtype=np.float64)
    if log:
        distances = np.abs(np.log(reference) - np.log(target))
    else:
        distances = np.linalg.norm(reference - target, axis=-1)
    return keys[int(np.argmin(distances))]


def _majority(values: list[str]) -> str | None:
    if not values:
        return None
    names, counts = np.unique(values, return_counts=True)
    return str(names[int(np.argmax(counts))])


def measure_video(frames: np.ndarray, fps: float) -> tuple[str | None, str | None, np.ndarray]:
    """Majority colour and shape over the frames, and the object's centre x per frame (NaN when not found)."""
    frames = _to_uint8(frames)
    masks = object_masks(frames)
    min_area = max(4, int(0.005 * masks.shape[1] * masks.shape[2]))
    colours, shapes, centres = [], [], []
    for frame, mask in zip(frames, masks):
        if mask.sum() < min_area:
            centres.append(np.nan)
            continue
        rows, cols = np.nonzero(mask)
        centres.append(cols.mean() + 0.5)
        # Interior pixels (away from the anti-aliased edge) carry the object's colour.
        eroded = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        interior = frame[1:-1, 1:-1][eroded] if eroded.sum() >= 4 else frame[mask]
        colours.append(_nearest(interior.reshape(-1, 3).mean(axis=0), COLOURS))
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        touches_edge = cols.min() == 0 or cols.max() == mask.shape[1] - 1
        if not touches_edge:
            shapes.append("square" if mask.sum() / (height * width) >= SQUARE_FILL else "ball")
    return _majority(colours), _majority(shapes), np.asarray(centres, dtype=np.float64)


def video_bounces(centres: np.ndarray, fps: float, width: int) -> list[float]:
    """Times (s) where the object turns around near a wall (within a quarter width of it).

    The turn lies between the last frame moving one way and the first frame moving back; a bounce halfway between two
    frames leaves them at the same position, so the turn time is the middle of that (possibly flat) stretch.
    """
    valid = np.flatnonzero(~np.isnan(centres))
    if valid.size < 3:
        return []
    x = np.interp(np.arange(centres.size), valid, centres[valid])
    step = np.diff(x)
    noise = 0.05 * width / fps  # below 5 % of the width per second is standing still
    moves = np.flatnonzero(np.abs(step) >= noise)
    times = []
    for first, second in zip(moves[:-1], moves[1:]):
        if np.sign(step[first]) == np.sign(step[second]):
            continue
        turn = (first + 1 + second) / 2  # frames first + 1 .. second hold the turning point
        position = x[first + 1 : second + 1].mean()
        if (step[first] < 0 and position < width / 4) or (step[first] > 0 and position > 3 * width / 4):
            times.append(turn / fps)
    return times


def audio_onsets(audio: np.ndarray, sample_rate: int) -> list[float]:
    """Ping onsets (s): where the 2 ms RMS envelope first rises above a quarter of the clip's peak envelope."""
    hop = max(1, int(0.002 * sample_rate))
    usable = audio[: audio.size // hop * hop].astype(np.float64)
    if usable.size == 0:
        return []
    envelope = np.sqrt((usable.reshape(-1, hop) ** 2).mean(axis=1))
    threshold = max(0.02, 0.25 * envelope.max())
    onsets, last = [], -np.inf
    for i in np.flatnonzero(envelope > threshold):
        time = i * hop / sample_rate
        if time - last > ONSET_REFRACTORY_S:
            onsets.append(time)
        last = time
    return onsets


def ping_pitch(audio: np.ndarray, sample_rate: int, onset: float) -> str:
    """The colour whose ping pitch is nearest (in log frequency) to the spectral peak after `onset`."""
    start = int(onset * sample_rate)
    window = audio[start : start + int(PITCH_WINDOW_S * sample_rate)].astype(np.float64)
    window = window * np.hanning(window.size)
    spectrum = np.abs(np.fft.rfft(window, n=8 * window.size))
    frequencies = np.fft.rfftfreq(8 * window.size, 1.0 / sample_rate)
    band = (frequencies > 200) & (frequencies < 3000)
    peak = frequencies[band][int(np.argmax(spectrum[band]))]
    return _nearest(peak, PITCHES_HZ, log=True)


def measure_clip(frames: np.ndarray, fps: float, audio: np.ndarray | None, sample_rate: int | None) -> ClipMeasurement:
    """Measure a clip: `frames` `[F, H, W, 3]` (uint8 or [0, 1]), mono `audio` at `sample_rate`."""
    colour, shape, centres = measure_video(frames, fps)
    width = frames.shape[2]
    valid = centres[~np.isnan(centres)]
    moving = valid.size >= 2 and np.ptp(valid) > 0.05 * width
    speed = None
    if moving:
        steps = np.abs(np.diff(np.interp(np.arange(centres.size), np.flatnonzero(~np.isnan(centres)), valid)))
        steps = steps[steps >= 0.05 * width / fps]  # the frames that moved (not a turn between two frames)
        speed = float(steps.mean() * fps * 64.0 / width)
    measurement = ClipMeasurement(colour, shape, bool(moving), speed, video_bounces(centres, fps, width))
    if audio is not None and sample_rate is not None:
        measurement.onsets = audio_onsets(audio, sample_rate)
        measurement.pitches = [ping_pitch(audio, sample_rate, t) for t in measurement.onsets]
    return measurement


def matched(events: list[float], references: list[float], tolerance: float) -> int:
    """How many `events` have a reference within `tolerance` seconds."""
    return sum(any(abs(e - r) <= tolerance for r in references) for e in events)


def sync_shares(
    video_bounces: list[list[float]], onsets: list[list[float]], tolerance: float
) -> tuple[float | None, float | None]:
    """Bounce-ping sync over clips (per-clip event times in seconds, clip i's bounces against `onsets[i]`).

    Returns the share of bounces with an onset within `tolerance` and the share of onsets with a bounce (`None`
    without any). With each clip's onsets replaced by another clip's, it gives the agreement that the number and
    spacing of bounces and pings alone produce: the baseline that a model's own sync must beat.
    """
    bounce_count = sum(len(b) for b in video_bounces)
    onset_count = sum(len(o) for o in onsets)
    video_matched = sum(matched(b, o, tolerance) for b, o in zip(video_bounces, onsets))
    onsets_matched = sum(matched(o, b, tolerance) for b, o in zip(video_bounces, onsets))
    return (video_matched / bounce_count if bounce_count else None,
            onsets_matched / onset_count if onset_count else None)
