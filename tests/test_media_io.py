"""Video + audio writing and reading: stream layout, audio/video sync through AAC, frame fidelity, errors."""

import wave

import av
import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_skyreels.utils.media_io import (
    VideoClip,
    export_to_video_with_audio,
    export_to_wav,
    load_video,
)

FPS = 16
NUM_FRAMES = 33
SAMPLE_RATE = 16000
CLICK_TIMES = (0.25, 0.8, 1.37)
SYNC_TOLERANCE_S = 0.005


def smooth_frames(num_frames: int = NUM_FRAMES, height: int = 64, width: int = 64) -> np.ndarray:
    """Float frames in [0, 1]: colour gradients drifting slowly, the kind of content H.264 codes well."""
    ys, xs = np.mgrid[0:height, 0:width] / max(height, width)
    frames = []
    for index in range(num_frames):
        phase = index / num_frames
        frames.append(np.stack([0.2 + 0.6 * xs, 0.2 + 0.6 * ys, 0.5 + 0.3 * np.sin(2 * np.pi * (xs + phase))], -1))
    return np.stack(frames).astype(np.float32)


def click_track(num_samples: int, times=CLICK_TIMES) -> np.ndarray:
    """Silence with a single-sample click at each time."""
    audio = np.zeros(num_samples, dtype=np.float32)
    for time in times:
        audio[round(time * SAMPLE_RATE)] = 0.9
    return audio


def click_onset(audio: np.ndarray, sample_rate: int, expected: float, window: float = 0.05) -> float:
    """Time of the first sample reaching half the peak magnitude within `window` s of `expected`."""
    start = max(0, round((expected - window) * sample_rate))
    segment = np.abs(audio[start : round((expected + window) * sample_rate)])
    return (start + int(np.argmax(segment >= 0.5 * segment.max()))) / sample_rate


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("media") / "clicks.mp4"
    # One extra second of audio: the exporter must trim it to the video's length.
    audio = click_track(NUM_FRAMES * SAMPLE_RATE // FPS + SAMPLE_RATE)
    assert export_to_video_with_audio(smooth_frames(), path, FPS, audio, SAMPLE_RATE) == str(path)
    return path


def test_mp4_has_one_video_and_one_audio_stream_of_the_same_duration(clip_file):
    duration = NUM_FRAMES / FPS
    with av.open(str(clip_file)) as container:
        assert len(container.streams.video) == 1 and len(container.streams.audio) == 1
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert video.codec_context.name == "h264" and audio.codec_context.name == "aac"
        assert video.frames == NUM_FRAMES
        assert float(video.duration * video.time_base) == pytest.approx(duration, abs=1 / FPS)
        assert float(audio.duration * audio.time_base) == pytest.approx(duration, abs=0.003)

    clip = load_video(clip_file)
    assert isinstance(clip, VideoClip)
    assert clip.frames.shape == (NUM_FRAMES, 64, 64, 3) and clip.frames.dtype == np.uint8
    assert clip.fps == FPS
    assert clip.audio.dtype == np.float32 and clip.audio_sample_rate == SAMPLE_RATE
    assert clip.audio.shape == (NUM_FRAMES * SAMPLE_RATE // FPS,)


@pytest.mark.parametrize("click_time", CLICK_TIMES)
def test_click_decodes_at_its_time_despite_aac_priming(clip_file, click_time):
    # Decode the file directly, placing samples by the decoder's own timestamps, so the file itself is checked.
    with av.open(str(clip_file)) as container:
        first_packet = next(container.demux(audio=0))
    with av.open(str(clip_file)) as container:
        decoded = list(container.decode(audio=0))
    # The encoder's priming samples are stored before time 0, and decoders drop them.
    assert first_packet.pts < 0
    assert decoded[0].time == 0.0
    raw = np.concatenate([frame.to_ndarray()[0] for frame in decoded])
    assert abs(click_onset(raw, SAMPLE_RATE, click_time) - click_time) <= SYNC_TOLERANCE_S

    loaded = load_video(clip_file)
    assert abs(click_onset(loaded.audio, SAMPLE_RATE, click_time) - click_time) <= SYNC_TOLERANCE_S


def test_frames_round_trip_with_small_error(clip_file):
    expected = np.round(smooth_frames() * 255)
    error = np.abs(load_video(clip_file).frames.astype(np.float64) - expected)
    assert error.mean() < 4.0


def test_load_options_resample_truncate_and_resize(clip_file):
    clip = load_video(clip_file, audio_sample_rate=48000, max_frames=24, resolution=(32, 48))
    assert clip.frames.shape == (24, 32, 48, 3)
    assert clip.audio_sample_rate == 48000 and clip.audio.shape == (24 * 48000 // FPS,)
    for click_time in CLICK_TIMES[:2]:
        assert abs(click_onset(clip.audio, 48000, click_time) - click_time) <= SYNC_TOLERANCE_S


def test_input_types_short_audio_is_padded_and_stereo_is_downmixed(tmp_path):
    frames = [PIL.Image.fromarray(frame) for frame in np.round(smooth_frames(8) * 255).astype(np.uint8)]
    time = np.arange(SAMPLE_RATE // 4) / SAMPLE_RATE
    tone = 0.4 * np.sin(2 * np.pi * 500 * time)
    stereo = torch.tensor(np.stack([tone, np.zeros_like(tone)]), dtype=torch.float32)
    path = export_to_video_with_audio(frames, tmp_path / "stereo.mp4", FPS, stereo, SAMPLE_RATE)

    clip = load_video(path)
    assert clip.frames.shape == (8, 64, 64, 3)
    assert clip.audio.shape == (8 * SAMPLE_RATE // FPS,)
    # The tone lasts 0.25 s at amplitude 0.4 in one of two channels, then silence pads the clip to 0.5 s.
    middle = clip.audio[SAMPLE_RATE // 16 : SAMPLE_RATE // 8]
    assert np.abs(middle).max() == pytest.approx(0.2, abs=0.03)
    assert np.abs(clip.audio[-SAMPLE_RATE // 8 :]).max() < 0.01

    tensor_path = export_to_video_with_audio(torch.from_numpy(smooth_frames(4)), tmp_path / "t.mp4", FPS)
    assert load_video(tensor_path).frames.shape == (4, 64, 64, 3)


def test_video_without_audio_loads_with_audio_none(tmp_path):
    path = export_to_video_with_audio(np.round(smooth_frames(4) * 255).astype(np.uint8), tmp_path / "mute.mp4", FPS)
    with av.open(path) as container:
        assert len(container.streams.audio) == 0
    clip = load_video(path)
    assert clip.audio is None and clip.audio_sample_rate is None
    assert clip.frames.shape == (4, 64, 64, 3)


def test_wav_round_trip(tmp_path):
    time = np.arange(1000) / SAMPLE_RATE
    mono = 0.5 * np.sin(2 * np.pi * 300 * time).astype(np.float32)
    path = export_to_wav(mono, tmp_path / "mono.wav", SAMPLE_RATE)
    with wave.open(path) as wav_file:
        assert (wav_file.getnchannels(), wav_file.getsampwidth(), wav_file.getframerate()) == (1, 2, SAMPLE_RATE)
        decoded = np.frombuffer(wav_file.readframes(wav_file.getnframes()), dtype="<i2") / 32767.0
    np.testing.assert_allclose(decoded, mono, atol=1 / 32767)

    stereo = torch.tensor([[2.0, -0.25], [0.5, -3.0]])
    path = export_to_wav(stereo, tmp_path / "stereo.wav", 8000)
    with wave.open(path) as wav_file:
        assert wav_file.getnchannels() == 2
        interleaved = np.frombuffer(wav_file.readframes(2), dtype="<i2")
    np.testing.assert_array_equal(interleaved, [32767, 16384, -8192, -32767])


def test_bad_inputs_raise_clear_errors(tmp_path):
    frames = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    audio = np.zeros(100, dtype=np.float32)
    output = tmp_path / "out.mp4"
    with pytest.raises(ValueError, match="even"):
        export_to_video_with_audio(np.zeros((2, 15, 16, 3), np.uint8), output, FPS)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        export_to_video_with_audio(frames.astype(np.float32) - 1.0, output, FPS)
    with pytest.raises(ValueError, match="shape"):
        export_to_video_with_audio(np.zeros((2, 3, 16, 16), np.uint8), output, FPS)
    with pytest.raises(ValueError, match="PIL"):
        export_to_video_with_audio([], output, FPS)
    with pytest.raises(ValueError, match="whole number"):
        export_to_video_with_audio(frames, output, 23.976)
    with pytest.raises(ValueError, match="audio_sample_rate"):
        export_to_video_with_audio(frames, output, FPS, audio)
    with pytest.raises(ValueError, match="audio_sample_rate"):
        export_to_video_with_audio(frames, output, FPS, audio, 12345)
    with pytest.raises(ValueError, match="channels"):
        export_to_video_with_audio(frames, output, FPS, np.zeros((3, 100), np.float32), SAMPLE_RATE)
    with pytest.raises(ValueError, match="float"):
        export_to_wav(np.zeros(10, dtype=np.int16), tmp_path / "a.wav", SAMPLE_RATE)
    with pytest.raises(ValueError, match="sample_rate"):
        export_to_wav(audio, tmp_path / "a.wav", 0)
    assert not output.exists()

    missing = tmp_path / "missing.mp4"
    with pytest.raises(ValueError, match="missing.mp4"):
        load_video(missing)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"definitely not a video" * 100)
    with pytest.raises(ValueError, match="garbage.mp4"):
        load_video(garbage)
    sound_only = export_to_wav(audio, tmp_path / "sound_only.wav", SAMPLE_RATE)
    with pytest.raises(ValueError, match="no video stream"):
        load_video(sound_only)
    with pytest.raises(ValueError, match="max_frames"):
        load_video(sound_only, max_frames=0)
