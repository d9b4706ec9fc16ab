"""The bouncing world follows its spec: measured from the rendered pixels and samples, not from its own helpers."""

import json
import math

import av
import numpy as np
import pytest

from diffusers_skyreels.demo import (
    BACKGROUND,
    COLOURS,
    PITCHES_HZ,
    PROMPT_TEMPLATES,
    ClipSpec,
    bounce_times,
    object_centre_x,
    parse_prompt,
    render_clip,
    sample_clip_spec,
    write_dataset,
)
from diffusers_skyreels.demo.world import main
from diffusers_skyreels.utils.media_io import load_video

SAMPLE_RATE = 16000
SPECS = [
    ClipSpec("ball", "red", "quickly", start_x=0.3, y=0.2, direction=1),
    ClipSpec("square", "green", "slowly", start_x=0.9, y=0.7, direction=1, prompt_variant=1),
    ClipSpec("ball", "blue", "slowly", start_x=0.15, y=1.0, direction=-1, prompt_variant=2),
    ClipSpec("square", "yellow", "quickly", start_x=0.55, y=0.0, direction=-1, prompt_variant=3),
]


@pytest.fixture(scope="module", params=SPECS, ids=lambda spec: f"{spec.colour}-{spec.shape}-{spec.speed}")
def clip(request):
    return render_clip(request.param)


def coverage(frame: np.ndarray, colour: str) -> np.ndarray:
    """Per-pixel object coverage read from the channel where object and background differ most."""
    difference = np.array(COLOURS[colour], dtype=np.float64) - BACKGROUND
    channel = int(np.argmax(np.abs(difference)))
    return (frame[..., channel].astype(np.float64) - BACKGROUND[channel]) / difference[channel]


def measured_centres_x(frames: np.ndarray, colour: str) -> np.ndarray:
    """Coverage-weighted horizontal centroid of the object in each frame (pixel j spans [j, j + 1))."""
    centres = []
    for frame in frames:
        weights = coverage(frame, colour).sum(axis=0)
        centres.append(float((weights * (np.arange(frame.shape[1]) + 0.5)).sum() / weights.sum()))
    return np.array(centres)


def ping_onsets(audio: np.ndarray, sample_rate: int, threshold: float = 1e-4) -> list[float]:
    """Start times of sounds that follow at least 50 ms of silence."""
    loud = np.flatnonzero(np.abs(audio) > threshold)
    gaps = np.diff(loud) > 0.05 * sample_rate
    return [start / sample_rate for start in loud[np.concatenate([[True], gaps])]] if len(loud) else []


def test_clip_format(clip):
    assert clip.frames.shape == (33, 64, 64, 3) and clip.frames.dtype == np.uint8
    assert clip.fps == 16 and clip.sample_rate == SAMPLE_RATE
    assert clip.audio.dtype == np.float32 and clip.audio.ndim == 1
    assert len(clip.audio) / clip.sample_rate == 33 / 16
    assert np.abs(clip.audio).max() <= 0.5


def test_object_colour_and_size(clip):
    spec = clip.spec
    for frame in clip.frames[::8]:
        cover = coverage(frame, spec.colour)
        interior = cover > 0.999
        assert (frame[interior] == COLOURS[spec.colour]).all()
        assert (frame[cover < 0.001] == BACKGROUND).all()
        size, area = (14, math.pi * 7**2) if spec.shape == "ball" else (12, 12**2)
        assert cover.sum() == pytest.approx(area, abs=1.0)
        # Widest row and tallest column.
        assert cover.sum(axis=1).max() == pytest.approx(size, abs=0.1)
        assert cover.sum(axis=0).max() == pytest.approx(size, abs=0.1)


def test_object_moves_at_the_stated_speed(clip):
    expected_step = {"slowly": 40.0, "quickly": 80.0}[clip.spec.speed] / clip.fps
    centres = measured_centres_x(clip.frames, clip.spec.colour)
    np.testing.assert_allclose(centres, clip.centre_x, atol=0.05)
    times = np.arange(len(centres)) / clip.fps
    no_bounce = [
        index
        for index in range(len(centres) - 1)
        if not any(times[index] <= bounce <= times[index + 1] for bounce in clip.bounce_times)
    ]
    assert len(no_bounce) >= 25
    np.testing.assert_allclose(np.abs(np.diff(centres))[no_bounce], expected_step, atol=0.05)


def test_bounces_happen_when_the_object_touches_a_wall(clip):
    half = {"ball": 7.0, "square": 6.0}[clip.spec.shape]
    assert len(clip.bounce_times) >= 1
    for bounce in clip.bounce_times:
        centre = float(object_centre_x(clip.spec, bounce))
        assert min(abs(centre - half), abs(centre + half - 64)) < 1e-9
        before, after = object_centre_x(clip.spec, [bounce - 0.01, bounce + 0.01])
        # Coming in and going out on the same side: the motion reverses at the wall.
        assert (before - centre) * (after - centre) > 0
    # The rendered object never crosses a wall, and its direction flips at each bounce and nowhere else.
    centres = measured_centres_x(clip.frames, clip.spec.colour)
    assert centres.min() >= half - 0.05 and centres.max() <= 64 - half + 0.05
    times = np.arange(len(centres)) / clip.fps
    for index, step in enumerate(np.diff(centres)):
        bounces_before = [bounce for bounce in clip.bounce_times if bounce <= times[index + 1]]
        if not bounces_before or bounces_before[-1] < times[index]:
            assert np.sign(step) == clip.spec.direction * (-1) ** len(bounces_before)


def assert_onsets_match(onsets: list[float], bounces: list[float], duration: float, tolerance: float) -> None:
    """Every onset is at a bounce, and every bounce has an onset unless it is too close to the end to be heard."""
    for onset in onsets:
        assert min(abs(onset - bounce) for bounce in bounces) <= tolerance
    for bounce in bounces:
        if bounce < duration - tolerance:
            assert min(abs(onset - bounce) for onset in onsets) <= tolerance


def test_ping_onsets_match_bounce_times(clip):
    onsets = ping_onsets(clip.audio, clip.sample_rate)
    assert_onsets_match(onsets, clip.bounce_times, len(clip.audio) / clip.sample_rate, tolerance=0.001)
    # Silence outside the 100 ms pings.
    quiet = np.ones(len(clip.audio), dtype=bool)
    for bounce in clip.bounce_times:
        quiet[math.floor(bounce * SAMPLE_RATE) : math.ceil((bounce + 0.1) * SAMPLE_RATE)] = False
    assert (clip.audio[quiet] == 0).all()


def test_ping_pitch_matches_colour(clip):
    start = math.ceil(clip.bounce_times[0] * SAMPLE_RATE)
    ping = clip.audio[start : start + SAMPLE_RATE // 10]
    spectrum = np.abs(np.fft.rfft(ping, n=SAMPLE_RATE))
    assert np.argmax(spectrum) == pytest.approx(PITCHES_HZ[clip.spec.colour], abs=5)
    envelope_ratio = np.abs(ping[:480]).max() / np.abs(ping[480:960]).max()
    # 30 ms of an exp(-t / 30 ms) decay divides the amplitude by e.
    assert envelope_ratio == pytest.approx(math.e, rel=0.1)


def test_prompts_name_the_attributes():
    assert len(PROMPT_TEMPLATES) >= 4
    for variant in range(len(PROMPT_TEMPLATES)):
        spec = ClipSpec("square", "yellow", "slowly", 0.5, 0.5, 1, prompt_variant=variant)
        assert parse_prompt(spec.prompt) == ("square", "yellow", "slowly")
        assert "<sfx>" in spec.prompt and spec.prompt.endswith("</sfx>")
    with pytest.raises(ValueError, match="colour"):
        parse_prompt("A ball bounces quickly.")


def test_sampling_and_rendering_are_deterministic():
    specs = [sample_clip_spec(np.random.default_rng(7)) for _ in range(2)]
    assert specs[0] == specs[1]
    first, second = render_clip(specs[0]), render_clip(specs[1])
    np.testing.assert_array_equal(first.frames, second.frames)
    np.testing.assert_array_equal(first.audio, second.audio)
    rng = np.random.default_rng(0)
    drawn = {(spec.shape, spec.colour, spec.speed) for spec in (sample_clip_spec(rng) for _ in range(200))}
    assert len(drawn) == 16


def test_sizes_and_speeds_scale_with_width():
    spec = ClipSpec("ball", "green", "slowly", 0.5, 0.5, 1)
    clip = render_clip(spec, width=128, height=96)
    assert clip.frames.shape == (33, 96, 128, 3)
    assert coverage(clip.frames[0], "green").sum() == pytest.approx(math.pi * 14**2, abs=2.0)
    assert abs(clip.centre_x[1] - clip.centre_x[0]) == pytest.approx(80 / 16)
    assert bounce_times(spec, 33 / 16, width=128) == clip.bounce_times


def test_invalid_specs_are_rejected():
    with pytest.raises(ValueError, match="colour"):
        ClipSpec("ball", "purple", "slowly", 0.5, 0.5, 1)
    with pytest.raises(ValueError, match="direction"):
        ClipSpec("ball", "red", "slowly", 0.5, 0.5, 0)
    with pytest.raises(ValueError, match="start_x"):
        ClipSpec("ball", "red", "slowly", 1.5, 0.5, 1)
    with pytest.raises(ValueError, match="too small"):
        render_clip(SPECS[0], width=64, height=10)


def test_write_dataset_is_a_deterministic_training_folder(tmp_path):
    first = write_dataset(tmp_path / "a", num_clips=3, seed=11)
    second = write_dataset(tmp_path / "b", num_clips=3, seed=11)
    assert first.read_text() == second.read_text()
    records = [json.loads(line) for line in first.read_text().splitlines()]
    assert [record["file_name"] for record in records] == [f"clips/{index:06d}.mp4" for index in range(3)]
    for record in records:
        assert parse_prompt(record["text"]) == (record["shape"], record["colour"], record["speed"])
        path = tmp_path / "a" / record["file_name"]
        with av.open(str(path)) as container:
            assert len(container.streams.video) == 1 and len(container.streams.audio) == 1
        clip = load_video(path)
        np.testing.assert_array_equal(clip.frames, load_video(tmp_path / "b" / record["file_name"]).frames)
        assert clip.frames.shape == (33, 64, 64, 3) and clip.audio.shape == (33000,)
        # After AAC coding the pings still start at the bounce times.
        onsets = ping_onsets(clip.audio, SAMPLE_RATE, threshold=0.05)
        assert_onsets_match(onsets, record["bounce_times"], 33 / 16, tolerance=0.005)


def test_cli_writes_a_dataset(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--num-clips" in capsys.readouterr().out
    main(["--output-dir", str(tmp_path), "--num-clips", "1", "--seed", "3"])
    assert (tmp_path / "clips" / "000000.mp4").is_file()
    assert len((tmp_path / "metadata.jsonl").read_text().splitlines()) == 1
