"""Training clips: a folder of video files with sound plus `metadata.jsonl` captions, decoded with PyAV.

Format (fill it from your own clips)::

    my_dataset/
      metadata.jsonl      one JSON object per line: {"file_name": "clips/0001.mp4", "text": "A caption ..."}
      clips/0001.mp4      any container/codec FFmpeg reads, with an audio stream for audio or joint training

`file_name` is relative to the folder (other keys are ignored). Each clip is read from its start: frames are picked
at the training frame rate (nearest source frame), scaled to cover the training size and centre-cropped; the audio is
resampled to the audio VAE's rate, mixed to mono and cut to exactly the duration of the frames (`clip_timing`).

Paired data (`PairedScales`, for the base model's high-resolution keyframes and for the refiner): each clip is
decoded once at the refiner's scale, `spatial`x the training size with `(num_frames - 1) * temporal + 1` frames at
`temporal`x the frame rate, and the training clip is derived from it by area downsampling (the mean of each
`spatial x spatial` block) and keeping every `temporal`-th frame, so that both describe exactly the same content.
Frame `i` of the training clip is frame `i * temporal` of the high-resolution one. The audio is the training clip's.

Bad input: a caption naming a missing file is an error listing every missing file (before anything trains). A file
that cannot be decoded, is shorter than the training clip, or (in audio / joint mode) has no audio stream is skipped;
with paired data, so is a file whose frame rate or size is below the high-resolution clip's (its frames would be
repeated or upscaled: no target for frame interpolation or super-resolution). The skips are logged with their count
and file names, and `strict=True` turns them into an error.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from torch.utils.data import Dataset

from ..utils.media_io import load_video
from .randomness import SampleOrder

logger = logging.getLogger(__name__)

# How many names a log line or error message lists before summarising the rest.
MAX_LISTED = 20


@dataclass(frozen=True)
class ClipRecord:
    """One line of the metadata: the clip's path (as written and resolved) and its caption."""

    file_name: str
    path: Path
    text: str


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def read_metadata(
    dataset_dir: str | Path,
    metadata_file: str | Path | None = None,
    video_column: str = "file_name",
    caption_column: str = "text",
) -> list[ClipRecord]:
    """Read `metadata.jsonl` (or `metadata_file`) and check that every named file exists."""
    dataset_dir = Path(dataset_dir)
    metadata_path = Path(metadata_file) if metadata_file is not None else dataset_dir / "metadata.jsonl"
    if not metadata_path.is_file():
        raise ValueError(f"No caption file at {metadata_path}: expected JSON lines with {video_column!r} and "
                         f"{caption_column!r}.")
    records, missing = [], []
    with open(metadata_path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{metadata_path}, line {number}: not valid JSON ({error}).") from error
            if not isinstance(entry, dict) or not isinstance(entry.get(video_column), str):
                raise ValueError(f"{metadata_path}, line {number}: needs a string {video_column!r}.")
            text = entry.get(caption_column)
            if not isinstance(text, str):
                raise ValueError(f"{metadata_path}, line {number}: needs a string {caption_column!r} (the caption).")
            path = dataset_dir / entry[video_column]
            if not path.is_file():
                missing.append(entry[video_column])
            records.append(ClipRecord(entry[video_column], path, text))
    if missing:
        raise ValueError(
            f"{metadata_path} names {len(missing)} video file(s) missing under {dataset_dir}: {_listing(missing)}."
        )
    if not records:
        raise ValueError(f"{metadata_path} lists no clips.")
    return records


@dataclass(frozen=True)
class PairedScales:
    """The high-resolution twin of every training clip: `spatial`x its size, `temporal`x its frame rate (the
    refiner's `spatial_scale` and `temporal_scale`)."""

    spatial: int
    temporal: int

    def __post_init__(self) -> None:
        for name in ("spatial", "temporal"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ValueError(f"The {name} scale of paired data must be an integer >= 1, got {value}.")

    def high_res(self, height: int, width: int, num_frames: int, fps: float) -> tuple[int, int, int, float]:
        """`(height, width, num_frames, fps)` of the high-resolution clip of a training clip."""
        return height * self.spatial, width * self.spatial, (num_frames - 1) * self.temporal + 1, fps * self.temporal

    def downsample(self, video: torch.Tensor) -> torch.Tensor:
        """`[..., 3, F, H, W]` high-resolution frames -> the training clip: every `temporal`-th frame, each
        `spatial x spatial` block averaged."""
        frames = video[..., :: self.temporal, :, :]
        pooled = torch.nn.functional.avg_pool2d(frames.flatten(0, -3)[:, None], self.spatial)
        return pooled[:, 0].unflatten(0, frames.shape[:-2])

    def settings(self) -> dict[str, int]:
        return {"spatial_scale": self.spatial, "temporal_scale": self.temporal}


def clip_requirements(
    height: int, width: int, num_frames: int, fps: float, paired: PairedScales | None = None
) -> dict[str, Any]:
    """What `probe_clip` checks a source clip against (keyword arguments): its duration, and with paired data the
    frame rate and size of the high-resolution clip, which it must reach without repeating or upscaling frames.

    The duration is the time of the last training frame, `(num_frames - 1) / fps`: a clip of 65 frames at 32 fps
    holds the 33 frames of 2 s at 16 fps."""
    if paired is None:
        return {"min_duration": (num_frames - 1) / fps}
    high_height, high_width, high_frames, high_fps = paired.high_res(height, width, num_frames, fps)
    return {"min_duration": (high_frames - 1) / high_fps, "min_fps": high_fps, "min_size": (high_height, high_width)}


@dataclass
class ScanReport:
    """The usable clips (`ClipRecord`s, or the cache's entries) and, per reason, the skipped ones as
    `(file_name, detail)`."""

    usable: list
    skipped: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def skip(self, reason: str, record: ClipRecord, detail: str) -> None:
        self.skipped.setdefault(reason, []).append((record.file_name, detail))

    @property
    def num_skipped(self) -> int:
        return sum(len(entries) for entries in self.skipped.values())

    def summary(self) -> str:
        parts = [f"{len(self.usable)} usable clip(s)"]
        for reason, entries in sorted(self.skipped.items()):
            parts.append(f"{len(entries)} skipped ({reason}): {_listing([name for name, _ in entries])}")
        return "; ".join(parts)

    def enforce(self, strict: bool) -> None:
        """Log the skips; with `strict`, raise on any; raise anyway when nothing is left."""
        if self.num_skipped:
            details = [f"{name}: {detail}" for entries in self.skipped.values() for name, detail in entries]
            if strict:
                raise ValueError(f"Unusable clips (strict mode): {_listing(details)}.")
            logger.warning("Dataset: %s.", self.summary())
        if not self.usable:
            raise ValueError(f"No usable training clips: {self.summary()}.")


def probe_clip(
    path: Path,
    min_duration: float,
    needs_audio: bool,
    min_fps: float | None = None,
    min_size: tuple[int, int] | None = None,
) -> tuple[str, str] | None:
    """Cheap check before training: `None` if the clip looks usable, else `(reason, detail)`.

    `min_fps`, `min_size` (`(height, width)`): the frame rate and size it must have (paired data).

    Opens the container, decodes the first video frame and reads the declared duration; it cannot see damage later in
    the file (`decode_clip` reports that when it happens).
    """
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return "undecodable", "no video stream"
            stream = container.streams.video[0]
            if needs_audio and not container.streams.audio:
                return "no audio", "no audio stream"
            next(container.decode(stream))
            duration = None
            if container.duration:
                duration = container.duration / av.time_base
            elif stream.duration and stream.time_base:
                duration = float(stream.duration * stream.time_base)
            rate = stream.average_rate or stream.guessed_rate
            size = (stream.codec_context.height, stream.codec_context.width)
    except (av.FFmpegError, StopIteration, OSError) as error:
        return "undecodable", f"{type(error).__name__}: {error}"
    # The last frame starts one frame period before the end; half a period of slack for rounded durations.
    if duration is not None and rate and duration - 0.5 / float(rate) < min_duration:
        return "too short", f"{duration:.3f} s < {min_duration:.3f} s"
    if min_fps is not None and (not rate or float(rate) < min_fps - 1e-3):
        return "frame rate too low", f"{float(rate or 0):g} fps < {min_fps:g} fps"
    if min_size is not None and any(need > have for need, have in zip(min_size, size, strict=True)):
        return "resolution too low", f"{size[1]}x{size[0]} cannot cover {min_size[1]}x{min_size[0]}"
    return None


def scan_clips(records: list[ClipRecord], min_duration: float, needs_audio: bool, **requirements: Any) -> ScanReport:
    """Probe every clip (see `probe_clip`, which takes `requirements`)."""
    report = ScanReport(usable=[])
    for record in records:
        problem = probe_clip(record.path, min_duration, needs_audio, **requirements)
        if problem is None:
            report.usable.append(record)
        else:
            report.skip(problem[0], record, problem[1])
    return report


def resize_and_crop(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 `[F, H, W, 3]` -> float `[3, F, height, width]` in `[-1, 1]`: scale to cover, then centre-crop."""
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    source_h, source_w = video.shape[2:]
    scale = max(height / source_h, width / source_w)
    size = (max(height, math.ceil(source_h * scale - 1e-6)), max(width, math.ceil(source_w * scale - 1e-6)))
    if size != (source_h, source_w):
        video = torch.nn.functional.interpolate(video, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    video = video[:, :, top : top + height, left : left + width]
    return (video / 127.5 - 1.0).clamp(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()


@dataclass
class ClipMedia:
    """A decoded training clip: `video [3, F, H, W]` in `[-1, 1]`, mono `audio [samples]` (or `None`) and, with
    paired data, the high-resolution clip `video_high [3, F', sH, sW]` that `video` is derived from."""

    video: torch.Tensor
    audio: torch.Tensor | None
    video_high: torch.Tensor | None = None


def decode_clip(
    path: Path,
    height: int,
    width: int,
    num_frames: int,
    fps: float,
    audio_sample_rate: int | None,
    num_audio_samples: int,
    paired: PairedScales | None = None,
) -> ClipMedia:
    """Decode the first `num_frames / fps` seconds of a clip at the training size and rate (see module doc).

    `audio_sample_rate=None` skips the audio; a clip without an audio stream gives `audio=None`; `num_audio_samples`
    are returned (zero-padded where the file's audio ends first). With `paired`, the clip is decoded at high
    resolution and `video` derived from it. Raises `ValueError` naming the file if it cannot be decoded or is too
    short.
    """
    if paired is not None:
        high_res = paired.high_res(height, width, num_frames, fps)
        high = decode_clip(path, *high_res, audio_sample_rate, num_audio_samples)
        return ClipMedia(video=paired.downsample(high.video), audio=high.audio, video_high=high.video)
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            source_fps = float(stream.average_rate or stream.guessed_rate)
    except (av.FFmpegError, IndexError, TypeError) as error:
        raise ValueError(f"Cannot read the frame rate of {path}: {error}") from error
    needed = round((num_frames - 1) * source_fps / fps) + 1
    clip = load_video(path, audio_sample_rate=audio_sample_rate or None, max_frames=needed)
    if len(clip.frames) < needed:
        raise ValueError(
            f"{path} has {len(clip.frames)} frames at {source_fps:g} fps; training needs {needed} "
            f"({num_frames} at {fps:g} fps)."
        )
    picks = np.minimum(np.round(np.arange(num_frames) * source_fps / fps).astype(int), len(clip.frames) - 1)
    video = resize_and_crop(clip.frames[picks], height, width)
    audio = None
    if audio_sample_rate and clip.audio is not None:
        audio = torch.from_numpy(clip.audio[:num_audio_samples].copy())
        audio = torch.nn.functional.pad(audio, (0, num_audio_samples - audio.shape[0]))
    return ClipMedia(video=video, audio=audio)


class ClipDataset(Dataset):
    """Decoded clips indexed by *global sample number* (`SampleOrder` picks the clip; see `randomness.py`).

    `audio_sample_rate=None` skips the audio (video-only training); `paired` adds the high-resolution clip.

    Items: `{"sample_number", "index", "text", "video" [3, F, H, W], "audio" [samples] or None, "video_high"
    [3, F', sH, sW] or None}`.
    """

    def __init__(
        self,
        records: list[ClipRecord],
        seed: int,
        height: int,
        width: int,
        num_frames: int,
        fps: float,
        audio_sample_rate: int | None,
        num_audio_samples: int,
        paired: PairedScales | None = None,
    ) -> None:
        self.records = records
        self.order = SampleOrder(len(records), seed)
        self.height, self.width, self.num_frames, self.fps = height, width, num_frames, fps
        self.audio_sample_rate, self.num_audio_samples = audio_sample_rate, num_audio_samples
        self.paired = paired

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, sample_number: int) -> dict:
        index = self.order(sample_number)
        record = self.records[index]
        media = decode_clip(
            record.path, self.height, self.width, self.num_frames, self.fps, self.audio_sample_rate,
            self.num_audio_samples, self.paired,
        )
        if self.audio_sample_rate and media.audio is None:
            raise ValueError(f"{record.path} has no audio stream; audio and joint training need one.")
        return {"sample_number": sample_number, "index": index, "text": record.text, "video": media.video,
                "audio": media.audio, "video_high": media.video_high}


def collate(items: list[dict]) -> dict:
    """Stack tensors, list everything else; `None` stays `None` (a modality not loaded)."""
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if values[0] is None:
            batch[key] = None
        elif isinstance(values[0], torch.Tensor) and all(v.shape == values[0].shape for v in values):
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch
