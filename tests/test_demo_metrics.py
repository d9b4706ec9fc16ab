"""The demo's evaluation measurements recover the ground truth of rendered bouncing-world clips."""

import numpy as np
import pytest

from diffusers_skyreels.demo.metrics import matched, measure_clip, sync_shares
from diffusers_skyreels.demo.world import render_clip, sample_clip_spec, speed_px_per_s


@pytest.mark.parametrize("size,fps,num_frames", [(64, 16, 33), (128, 32, 65)])
def test_measurements_match_the_ground_truth(size, fps, num_frames):
    rng = np.random.default_rng(123)
    for _ in range(16):
        spec = sample_clip_spec(rng)
        clip = render_clip(spec, width=size, height=size, fps=fps, num_frames=num_frames)
        got = measure_clip(clip.frames, fps, clip.audio, clip.sample_rate)
        duration = num_frames / fps
        # A bounce within a frame or two of either end may have no frame on its other side to show the turn.
        clearly_visible = [t for t in clip.bounce_times if 1.5 / fps < t < duration - 2.5 / fps]
        audible = [t for t in clip.bounce_times if t < duration - 0.01]
        assert got.colour == spec.colour and got.shape == spec.shape and got.moving
        assert got.speed_px_per_s == pytest.approx(speed_px_per_s(spec.speed), rel=0.1)
        assert matched(got.video_bounces, clip.bounce_times, 1.0 / fps) == len(got.video_bounces)
        assert matched(clearly_visible, got.video_bounces, 1.0 / fps) == len(clearly_visible)
        assert len(got.onsets) == len(audible)
        assert matched(audible, got.onsets, 0.005) == len(audible)
        assert got.pitches == [spec.colour] * len(audible)


def test_frozen_and_silent_clips():
    clip = render_clip(sample_clip_spec(np.random.default_rng(0)))
    frozen = np.repeat(clip.frames[:1], len(clip.frames), axis=0)
    got = measure_clip(frozen, 16, np.zeros_like(clip.audio), clip.sample_rate)
    assert not got.moving and got.video_bounces == [] and got.onsets == []
    empty = np.full_like(clip.frames, 16)
    got = measure_clip(empty, 16, None, None)
    assert got.colour is None and got.shape is None and not got.moving and got.speed_px_per_s is None


def test_float_frames_measure_like_uint8():
    clip = render_clip(sample_clip_spec(np.random.default_rng(5)))
    a = measure_clip(clip.frames, 16, clip.audio, clip.sample_rate)
    b = measure_clip(clip.frames.astype(np.float32) / 255.0, 16, clip.audio, clip.sample_rate)
    assert (a.colour, a.shape, a.video_bounces, a.onsets) == (b.colour, b.shape, b.video_bounces, b.onsets)


def test_sync_shares_own_and_mismatched_audio():
    tolerance = 1.0 / 16

    def mismatched_sync(bounces, onsets, tolerance):  # each clip's video against the next clip's audio
        return sync_shares(bounces, onsets[1:] + onsets[:1], tolerance)

    bounces = [[0.5, 1.5], [1.0], [0.25]]
    onsets = [[0.5, 1.5], [1.02, 1.9], [1.55]]
    # Own audio: both bounces of clip 0 are matched; of all 4 bounces, 3 (0.5, 1.5, 1.0); of 5 onsets, 3.
    assert matched(bounces[0], onsets[0], tolerance) == 2
    assert sync_shares(bounces, onsets, tolerance) == (3 / 4, 3 / 5)
    # Clip 0's bounces vs clip 1's onsets: none within 1/16 s; clip 1's bounce (1.0) vs clip 2's onset (1.55): none;
    # clip 2's bounce (0.25) vs clip 0's onsets (0.5, 1.5): none.
    assert mismatched_sync(bounces, onsets, tolerance) == (0.0, 0.0)
    # Bounces that each agree with the next clip's pings.
    bounces = [[1.0], [1.5], [0.5]]
    v2a, a2v = mismatched_sync(bounces, onsets, tolerance)
    assert v2a == 3 / 3  # 1.0 ~ 1.02 (clip 1), 1.5 ~ 1.55 (clip 2), 0.5 ~ 0.5 (clip 0)
    assert a2v == 3 / 5  # of the 5 onsets, 1.02, 1.55 and 0.5 have a partner bounce
    assert mismatched_sync([[], []], [[], []], tolerance) == (None, None)
