"""Frame counts, latent lengths and audio sample counts of a clip, derived in one place.

The video VAE compresses `4k + 1` frames into `k + 1` latent frames (the first frame alone, then groups of the
temporal factor). The audio spans exactly the video's display time, `num_frames / fps` seconds, and the audio VAE
makes one latent per `audio_hop_length` samples. For 5 s at 16 fps: 81 frames -> 21 latent frames, and
81 / 16 s at 44.1 kHz = 223256 samples -> 218 audio latents with MMAudio's 1024-sample hop (the paper's 21 / 218).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_DURATION_SECONDS = 15.0


@dataclass(frozen=True)
class ClipTiming:
    """The sizes of one clip in every domain the pipelines touch."""

    num_frames: int
    fps: float
    num_latent_frames: int
    audio_sample_rate: int
    num_audio_samples: int
    num_audio_latents: int

    @property
    def duration_seconds(self) -> float:
        return self.num_frames / self.fps


def clip_timing(
    fps: float,
    num_frames: int | None = None,
    duration_seconds: float | None = None,
    vae_temporal_factor: int = 4,
    audio_sample_rate: int = 44100,
    audio_hop_length: int = 1024,
    max_duration_seconds: float = MAX_DURATION_SECONDS,
) -> ClipTiming:
    """Derive every count from `num_frames` or `duration_seconds` (exactly one of them).

    A duration is rounded to the nearest valid frame count `4k + 1` (with the VAE's temporal factor `4`).
    """
    if fps <= 0:
        raise ValueError(f"`fps` must be positive, got {fps}.")
    if (num_frames is None) == (duration_seconds is None):
        raise ValueError("Pass exactly one of `num_frames` and `duration_seconds`.")
    factor = vae_temporal_factor
    if num_frames is None:
        if duration_seconds <= 0:
            raise ValueError(f"`duration_seconds` must be positive, got {duration_seconds}.")
        num_frames = factor * max(1, round(duration_seconds * fps / factor)) + 1
    elif num_frames < 1 or (num_frames - 1) % factor:
        raise ValueError(
            f"`num_frames` must have the form {factor}k + 1 (the video VAE's temporal compression), got {num_frames}; "
            f"for example {factor * max(1, round((num_frames - 1) / factor)) + 1}."
        )
    duration = num_frames / fps
    if duration > max_duration_seconds + 1e-9:
        raise ValueError(
            f"{num_frames} frames at {fps} fps last {duration:.2f} s, beyond the model's limit of "
            f"{max_duration_seconds:g} s."
        )
    num_audio_samples = round(duration * audio_sample_rate)
    return ClipTiming(
        num_frames=num_frames,
        fps=fps,
        num_latent_frames=(num_frames - 1) // factor + 1,
        audio_sample_rate=audio_sample_rate,
        num_audio_samples=num_audio_samples,
        num_audio_latents=max(1, num_audio_samples // audio_hop_length),
    )
