"""Reading and writing video with a synchronised audio track (mp4: H.264 + AAC) and 16-bit wav files.

Writing goes through Diffusers' `encode_video` (PyAV). It keeps audio and video in sync despite the AAC encoder's
priming samples: it gives the first audio frame pts 0, FFmpeg's AAC encoder then emits its 1024 priming samples as a
packet at pts -1024, and the mp4 muxer turns that negative start into an edit list (`elst` media_time 1024) that
tells players to drop the priming; FFmpeg-based decoders (PyAV included) honour it. `tests/test_media_io.py`
checks this by decoding clicks back from the file.

Convention shared by the writer and the reader: audio sample 0 is the start of video frame 0, and the audio lasts
exactly as long as the frames are displayed, `num_frames / fps` seconds.
"""

from __future__ import annotations

import os
import wave
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
import PIL.Image
import torch
from av.audio.resampler import AudioResampler
from diffusers.utils.export_utils import encode_video

FramesLike = list[PIL.Image.Image] | np.ndarray | torch.Tensor
AudioLike = np.ndarray | torch.Tensor

# Sampling frequencies that AAC (MPEG-4 Audio) can signal; FFmpeg's encoder refuses any other.
AAC_SAMPLE_RATES = (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)


@dataclass
class VideoClip:
    """A decoded video: uint8 `frames [F, H, W, 3]` and float32 mono `audio [samples]` aligned to frame 0, or None."""

    frames: np.ndarray
    fps: float
    audio: np.ndarray | None = None
    audio_sample_rate: int | None = None


def num_audio_samples(num_frames: int, fps: float | Fraction, sample_rate: int) -> int:
    """Number of audio samples that cover `num_frames` video frames displayed at `fps`."""
    return round(Fraction(num_frames) * sample_rate / Fraction(fps))


def _frames_to_uint8(frames: FramesLike) -> np.ndarray:
    """Converts frames to a contiguous uint8 `[F, H, W, 3]` array; floats must lie in [0, 1]."""
    if isinstance(frames, (list, tuple)):
        if len(frames) == 0 or not all(isinstance(frame, PIL.Image.Image) for frame in frames):
            raise ValueError("`frames` given as a list must be a non-empty list of PIL images.")
        array = np.stack([np.asarray(frame.convert("RGB")) for frame in frames])
    elif isinstance(frames, torch.Tensor):
        array = frames.detach().cpu().numpy()
    elif isinstance(frames, np.ndarray):
        array = frames
    else:
        raise TypeError(f"`frames` must be a list of PIL images, a numpy array or a torch tensor, got {type(frames)}.")

    if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] == 0:
        raise ValueError(f"`frames` must have shape [frames, height, width, 3], got {tuple(array.shape)}.")
    if array.shape[1] % 2 or array.shape[2] % 2:
        raise ValueError(f"H.264 (yuv420p) needs an even height and width, got {array.shape[1]}x{array.shape[2]}.")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"`frames` must be uint8 or float in [0, 1], got dtype {array.dtype}.")
    if array.min() < 0.0 or array.max() > 1.0:
        raise ValueError(f"Float `frames` must lie in [0, 1], got [{array.min():.3f}, {array.max():.3f}].")
    return (array * 255.0).round().astype(np.uint8)


def _audio_to_float32(audio: AudioLike) -> np.ndarray:
    """Converts a mono `[samples]` or `[channels, samples]` float waveform to float32 `[channels, samples]`."""
    array = audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"`audio` must be a float waveform in [-1, 1], got dtype {array.dtype}.")
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[0] not in (1, 2):
        raise ValueError(f"`audio` must have shape [samples] or [channels (1 or 2), samples], got {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError("`audio` contains NaN or infinite values.")
    return np.clip(array, -1.0, 1.0).astype(np.float32)


def _fit_length(audio: np.ndarray, num_samples: int) -> np.ndarray:
    """Trims the end of `[channels, samples]` audio, or pads it with trailing silence, to `num_samples`."""
    if audio.shape[-1] >= num_samples:
        return audio[..., :num_samples]
    return np.pad(audio, [(0, 0)] * (audio.ndim - 1) + [(0, num_samples - audio.shape[-1])])


def export_to_video_with_audio(
    frames: FramesLike,
    output_path: str | os.PathLike,
    fps: int,
    audio: AudioLike | None = None,
    audio_sample_rate: int | None = None,
) -> str:
    """Writes an mp4 with an H.264 video track and, if `audio` is given, an AAC track starting with frame 0.

    The audio is made exactly `len(frames) / fps` seconds long: trimmed at the end if longer, padded with trailing
    silence if shorter. Mono audio is stored as two identical channels (what `encode_video` writes).
    `fps` must be a whole number because `encode_video` sets the stream rate to `int(fps)`.
    """
    if float(fps) <= 0 or float(fps) != int(fps):
        raise ValueError(f"`fps` must be a positive whole number, got {fps}.")
    video = _frames_to_uint8(frames)
    output_path = os.fspath(output_path)

    waveform = None
    if audio is not None:
        if audio_sample_rate not in AAC_SAMPLE_RATES:
            raise ValueError(
                f"`audio_sample_rate` must be one of the AAC rates {AAC_SAMPLE_RATES}, got {audio_sample_rate}."
            )
        samples = _audio_to_float32(audio)
        samples = _fit_length(samples, num_audio_samples(len(video), int(fps), audio_sample_rate))
        waveform = torch.from_numpy(samples)

    encode_video(
        torch.from_numpy(video),
        fps=int(fps),
        output_path=output_path,
        audio=waveform,
        audio_sample_rate=audio_sample_rate,
    )
    return output_path


def export_to_wav(audio: AudioLike, output_path: str | os.PathLike, sample_rate: int) -> str:
    """Writes a `[samples]` or `[channels, samples]` float waveform in [-1, 1] as a 16-bit PCM wav file."""
    if sample_rate <= 0:
        raise ValueError(f"`sample_rate` must be positive, got {sample_rate}.")
    samples = _audio_to_float32(audio)
    pcm = np.round(samples.T * 32767.0).astype("<i2")
    output_path = os.fspath(output_path)
    with wave.open(output_path, "wb") as wav_file:
        wav_file.setnchannels(samples.shape[0])
        wav_file.setsampwidth(2)
        wav_file.setframerate(sample_rate)
        wav_file.writeframes(pcm.tobytes())
    return output_path


def load_video(
    path: str | os.PathLike,
    audio_sample_rate: int | None = None,
    max_frames: int | None = None,
    resolution: tuple[int, int] | None = None,
) -> VideoClip:
    """Decodes a video file and its first audio stream (downmixed to mono) with PyAV.

    Args:
        path: the video file.
        audio_sample_rate: resample the audio to this rate; None keeps the file's rate.
        max_frames: decode at most this many frames (from the start).
        resolution: `(height, width)` to resize the frames to (area interpolation); None keeps the file's size.

    The returned audio starts at the first frame's timestamp and lasts `len(frames) / fps` seconds (trailing silence
    if the stream is shorter, trimmed otherwise — this also removes the AAC encoder's end padding).
    """
    path = os.fspath(path)
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"`max_frames` must be at least 1, got {max_frames}.")
    if audio_sample_rate is not None and audio_sample_rate <= 0:
        raise ValueError(f"`audio_sample_rate` must be positive, got {audio_sample_rate}.")
    if resolution is not None and (len(resolution) != 2 or min(resolution) < 1):
        raise ValueError(f"`resolution` must be (height, width) with positive sizes, got {resolution}.")
    if not os.path.isfile(path):
        raise ValueError(f"Video file {path!r} does not exist.")

    try:
        container = av.open(path)
    except av.FFmpegError as error:
        raise ValueError(f"{path!r} is not a decodable media file: {error}") from error

    with container:
        if not container.streams.video:
            raise ValueError(f"{path!r} has no video stream.")
        video_stream = container.streams.video[0]
        rate = video_stream.average_rate or video_stream.guessed_rate
        if not rate:
            raise ValueError(f"{path!r} does not declare a frame rate.")
        fps = Fraction(rate)
        audio_stream = container.streams.audio[0] if container.streams.audio else None
        streams = [video_stream] + ([audio_stream] if audio_stream is not None else [])

        reformat = {"format": "rgb24"}
        if resolution is not None:
            reformat.update(height=resolution[0], width=resolution[1], interpolation="AREA")

        frames: list[np.ndarray] = []
        first_frame_time: float | None = None
        audio_chunks: list[np.ndarray] = []
        audio_start_time: float | None = None
        audio_end_time = float("-inf")
        resampler: AudioResampler | None = None
        target_rate = audio_sample_rate

        try:
            for packet in container.demux(streams):
                for frame in packet.decode():
                    if packet.stream.type == "video":
                        if max_frames is None or len(frames) < max_frames:
                            if first_frame_time is None:
                                first_frame_time = frame.time or 0.0
                            frames.append(frame.to_ndarray(**reformat))
                        continue
                    if resampler is None:
                        target_rate = audio_sample_rate or frame.sample_rate
                        resampler = AudioResampler(format="fltp", layout=frame.layout.name, rate=target_rate)
                        audio_start_time = frame.time or 0.0
                    audio_end_time = (frame.time or 0.0) + frame.samples / frame.sample_rate
                    audio_chunks.extend(chunk.to_ndarray() for chunk in resampler.resample(frame))
                if max_frames is not None and len(frames) >= max_frames:
                    needed_end = first_frame_time + max_frames / fps
                    if audio_stream is None or audio_end_time >= needed_end:
                        break
        except av.FFmpegError as error:
            raise ValueError(f"Failed to decode {path!r}: {error}") from error

    if not frames:
        raise ValueError(f"No video frames could be decoded from {path!r}.")
    clip = VideoClip(frames=np.stack(frames), fps=float(fps))
    if resampler is None:
        return clip

    audio_chunks.extend(chunk.to_ndarray() for chunk in resampler.resample(None))
    audio = np.concatenate(audio_chunks, axis=1).mean(axis=0, dtype=np.float32)
    # Shift so that sample 0 is the start of the first video frame.
    offset = round((audio_start_time - first_frame_time) * target_rate)
    audio = np.pad(audio, (offset, 0)) if offset > 0 else audio[-offset:]
    clip.audio = _fit_length(audio[None], num_audio_samples(len(frames), fps, target_rate))[0]
    clip.audio_sample_rate = target_rate
    return clip
