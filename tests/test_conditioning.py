"""The channel-concat conditioning helper: masks per task (architecture.md §5), condition latents, joint stepping."""

import copy
import itertools

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from diffusers_skyreels.pipelines.skyreels_v4 import (
    AudioCodec,
    ChannelCondition,
    VideoCodec,
    audio_condition,
    condition_from_clip_latents,
    video_condition,
    video_condition_from_latents,
)
from diffusers_skyreels.pipelines.skyreels_v4.conditioning import (
    latent_mask_from_pixels,
    latent_mask_from_samples,
    pixel_frames_of_latent,
)
from diffusers_skyreels.schedulers import step_jointly


def reference_latent_mask(given: np.ndarray, t: int = 4, s: int = 8) -> np.ndarray:
    """Loop-based "every covered pixel is given" for a `[F, H, W]` boolean array."""
    frames, height, width = given.shape
    latent_frames = (frames - 1) // t + 1
    out = np.zeros((latent_frames, height // s, width // s))
    for j, i, k in itertools.product(range(latent_frames), range(height // s), range(width // s)):
        covered = [0] if j == 0 else list(range(t * j - t + 1, t * j + 1))
        out[j, i, k] = all(given[f, i * s + a, k * s + b] for f in covered for a in range(s) for b in range(s))
    return out


def test_pixel_frames_of_latent_groups():
    assert list(pixel_frames_of_latent(0)) == [0]
    assert list(pixel_frames_of_latent(1)) == [1, 2, 3, 4]
    assert list(pixel_frames_of_latent(5)) == [17, 18, 19, 20]


@pytest.mark.parametrize("seed", range(4))
def test_latent_mask_is_all_pixels_given(seed):
    rng = np.random.default_rng(seed)
    given = np.ones((13, 16, 24), dtype=bool)
    # Random holes: single pixels, whole frames, blocks.
    for _ in range(5):
        given[rng.integers(13), rng.integers(16), rng.integers(24)] = False
    given[rng.integers(13)] = False
    given[:, 8:16, rng.integers(0, 2) * 8 : rng.integers(0, 2) * 8 + 8] = False
    mask = latent_mask_from_pixels(torch.from_numpy(given)[None, None], 4, 8)[0, 0].numpy()
    np.testing.assert_array_equal(mask, reference_latent_mask(given))


def test_audio_latent_mask_covers_whole_hops():
    given = torch.zeros(1, 1000, dtype=torch.bool)
    given[:, :700] = True
    mask = latent_mask_from_samples(given, num_latents=10, hop_length=100)
    assert mask[0, 0].tolist() == [1.0] * 7 + [0.0] * 3
    given[:, 250] = False
    assert latent_mask_from_samples(given, 10, 100)[0, 0].tolist() == [1, 1, 0, 1, 1, 1, 1, 0, 0, 0]


@pytest.fixture(scope="module")
def codec(tiny_components):
    return VideoCodec(tiny_components["vae"])


@pytest.fixture(scope="module")
def audio_codec(tiny_components):
    return AudioCodec(tiny_components["audio_vae"], tiny_components["vocoder"])


def _frames(n, seed=0, size=32):
    return torch.rand(1, 3, n, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def latent_frames_given(condition: ChannelCondition) -> list[int]:
    """Latent frames whose mask is 1 everywhere (and 0 means the whole frame is 0)."""
    per_frame = condition.mask[0, 0].flatten(1)
    assert ((per_frame == 0) | (per_frame == 1)).all()
    assert (per_frame.all(1) | ~per_frame.bool().any(1)).all(), "a partially given latent frame"
    return [j for j in range(per_frame.shape[0]) if per_frame[j].all()]


def test_task_masks_match_the_table(codec):
    """T2V / I2V / first+last / extension / keyframes (architecture.md §5), on 17 frames = 5 latent frames."""
    with torch.no_grad():
        t2v = video_condition(codec, 1, 17, 32, 32)
        i2v = video_condition(codec, 1, 17, 32, 32, frames=_frames(1), frame_indices=[0])
        first_last = video_condition(
            codec, 1, 17, 32, 32, frames=_frames(5), frame_indices=[0, *pixel_frames_of_latent(4)]
        )
        extension_9 = video_condition(codec, 1, 17, 32, 32, frames=_frames(9), frame_indices=range(9))
        extension_7 = video_condition(codec, 1, 17, 32, 32, frames=_frames(7), frame_indices=range(7))
        keyframes = video_condition(
            codec, 1, 17, 32, 32, frames=_frames(8), frame_indices=[*pixel_frames_of_latent(1), *pixel_frames_of_latent(3)]
        )
        lone_frame = video_condition(codec, 1, 17, 32, 32, frames=_frames(1), frame_indices=[8])
    assert latent_frames_given(t2v) == []
    assert latent_frames_given(i2v) == [0]
    assert latent_frames_given(first_last) == [0, 4]
    assert latent_frames_given(extension_9) == [0, 1, 2]
    assert latent_frames_given(extension_7) == [0, 1]  # frames 5, 6 of group 2 alone do not give latent frame 2
    assert latent_frames_given(keyframes) == [1, 3]
    assert latent_frames_given(lone_frame) == []  # one frame of a group of four is not enough


def test_inpainting_mask_and_condition_latents(codec):
    video = _frames(9, seed=3)
    preserve = torch.ones(1, 1, 9, 32, 32)
    preserve[:, :, 2:6, 4:20, 8:16] = 0  # crosses latent blocks and frame groups
    with torch.no_grad():
        condition = video_condition(codec, 1, 9, 32, 32, frames=video, pixel_mask=preserve)
        # I: the VAE encoding of the source with the regenerated region painted black, black latents elsewhere.
        painted = codec.encode(torch.where(preserve.bool(), video, torch.full_like(video, -1.0)))
        black = codec.encode(torch.full_like(video, -1.0))
    expected_mask = torch.from_numpy(reference_latent_mask(preserve[0, 0].bool().numpy())).float()
    torch.testing.assert_close(condition.mask[0, 0], expected_mask)
    assert 0 < condition.mask.mean() < 1
    torch.testing.assert_close(condition.latents, torch.where(expected_mask.bool(), painted, black))


def test_black_latents_fill_what_is_not_given(codec):
    with torch.no_grad():
        t2v = video_condition(codec, 2, 9, 32, 32)
        black = codec.encode(torch.full((1, 3, 9, 32, 32), -1.0))
    assert t2v.latents.shape == (2, 4, 3, 4, 4) and t2v.mask.shape == (2, 1, 3, 4, 4)
    torch.testing.assert_close(t2v.latents, black.expand(2, -1, -1, -1, -1))
    assert not t2v.mask.any()


def test_condition_from_latents_places_given_frames(codec):
    given = torch.randn(1, 4, 2, 4, 4)
    with torch.no_grad():
        condition = video_condition_from_latents(codec, given, latent_indices=[0, 1], num_latent_frames=4)
        black = codec.black_latents(1, 13, 32, 32)
    assert latent_frames_given(condition) == [0, 1]
    torch.testing.assert_close(condition.latents[:, :, :2], given)
    torch.testing.assert_close(condition.latents[:, :, 2:], black[:, :, 2:])
    guide = torch.randn(1, 4, 4, 4, 4)
    mask = torch.zeros(1, 1, 4, 4, 4)
    mask[:, :, 2] = 1
    full = video_condition_from_latents(None, guide, mask=mask)
    assert torch.equal(full.latents, guide) and latent_frames_given(full) == [2]


def test_clip_latents_path_equals_pixel_path_for_prefixes(codec):
    """The causal video VAE makes the cached-latent condition exact for prefixes (first frame, extension)."""
    clip = _frames(13, seed=5)
    with torch.no_grad():
        clip_latents = codec.encode(clip)
        black = codec.black_latents(1, 13, 32, 32)
        for given_frames in (1, 5, 9):
            pixel = video_condition(codec, 1, 13, 32, 32, frames=clip[:, :, :given_frames])
            given = torch.zeros(1, 1, 13, 32, 32)
            given[:, :, :given_frames] = 1
            mask = latent_mask_from_pixels(given, 4, 8)
            cached = condition_from_clip_latents(clip_latents, mask, black)
            torch.testing.assert_close(cached.mask, pixel.mask)
            torch.testing.assert_close(cached.latents, pixel.latents, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="`given` must have shape"):
        condition_from_clip_latents(clip_latents, mask[:, :, :2], black)


def test_audio_condition_prefix(audio_codec):
    hop = audio_codec.hop_length
    waveform = torch.sin(torch.arange(int(5.5 * hop)) / 7.0)[None] * 0.5
    with torch.no_grad():
        condition = audio_condition(audio_codec, 1, 10, waveform=waveform)
        silence = audio_condition(audio_codec, 1, 10)
        padded = torch.zeros(1, 10 * hop)
        padded[:, : waveform.shape[1]] = waveform
        expected = audio_codec.encode(padded)
    assert condition.mask[0, 0].tolist() == [1.0] * 5 + [0.0] * 5
    assert not silence.mask.any()
    torch.testing.assert_close(condition.latents[..., :5], expected[..., :5])
    torch.testing.assert_close(condition.latents[..., 5:], silence.latents[..., 5:])


def test_model_input_and_noise(codec):
    condition = ChannelCondition(torch.randn(1, 4, 3, 4, 4), torch.ones(1, 1, 3, 4, 4))
    noisy = torch.randn(1, 4, 3, 4, 4, dtype=torch.float64)
    x = condition.model_input(noisy)
    assert x.shape == (1, 9, 3, 4, 4) and x.dtype == torch.float64
    torch.testing.assert_close(x[:, 4:8].float(), condition.latents)
    noised = condition.noised(0.5, torch.Generator().manual_seed(0))
    std = (noised.latents - condition.latents).std().item()
    assert 0.35 < std < 0.65 and torch.equal(noised.mask, condition.mask)
    assert condition.noised(0.0) is condition
    with pytest.raises(ValueError, match="condition_noise"):
        condition.noised(-1.0)


def test_condition_errors(codec, audio_codec):
    cases = [
        (lambda: video_condition(codec, 1, 9, 32, 32, frames=_frames(2), frame_indices=[0]), "2 frames but 1"),
        (lambda: video_condition(codec, 1, 9, 32, 32, frames=_frames(2), frame_indices=[0, 9]), r"\[0, 8\]"),
        (lambda: video_condition(codec, 1, 9, 32, 32, frames=_frames(2), frame_indices=[3, 3]), "distinct"),
        (lambda: video_condition(codec, 1, 9, 32, 32, frames=_frames(1, size=16)), "must have shape"),
        (lambda: video_condition(codec, 1, 9, 32, 32, frames=_frames(2), pixel_mask=torch.ones(1, 1, 5, 32, 32)),
         "pixel_mask"),
        (lambda: video_condition(codec, 1, 9, 32, 32, pixel_mask=torch.ones(1, 1, 9, 32, 32)), "need `frames`"),
        (lambda: video_condition_from_latents(codec, torch.randn(1, 4, 2, 4, 4), latent_indices=[0, 5],
                                              num_latent_frames=3), r"\[0, 2\]"),
        (lambda: video_condition_from_latents(None, torch.randn(1, 4, 2, 4, 4)), "need a mask"),
        (lambda: audio_condition(audio_codec, 2, 4, waveform=torch.zeros(1, 100)), r"\[2, samples\]"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("scheduler_cls", [FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler])
def test_joint_stepping_equals_separate_schedulers(scheduler_cls):
    kwargs = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"} if scheduler_cls is UniPCMultistepScheduler else {}
    joint = scheduler_cls(**kwargs)
    joint.set_timesteps(4)
    video_scheduler, audio_scheduler = copy.deepcopy(joint), copy.deepcopy(joint)
    g = torch.Generator().manual_seed(0)
    video, audio = torch.randn(2, 4, 3, 4, 4, generator=g), torch.randn(2, 4, 35, generator=g)
    video_ref, audio_ref = video.clone(), audio.clone()
    for t in joint.timesteps:
        v_out, a_out = torch.tanh(video) * 0.3 + 0.1, torch.cos(audio) * 0.2
        video, audio = step_jointly(joint, t, [v_out, a_out], [video, audio])
        video_ref = video_scheduler.step(torch.tanh(video_ref) * 0.3 + 0.1, t, video_ref, return_dict=False)[0]
        audio_ref = audio_scheduler.step(torch.cos(audio_ref) * 0.2, t, audio_ref, return_dict=False)[0]
    torch.testing.assert_close(video, video_ref)
    torch.testing.assert_close(audio, audio_ref)
    assert joint.step_index == video_scheduler.step_index == len(joint.timesteps)


def test_joint_stepping_single_modality_and_errors():
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(2)
    sample = torch.randn(1, 3, 5)
    stepped = step_jointly(scheduler, scheduler.timesteps[0], [None, torch.ones_like(sample)], [None, sample])
    assert stepped[0] is None
    sigma, next_sigma = scheduler.sigmas[0], scheduler.sigmas[1]
    torch.testing.assert_close(stepped[1], sample + (next_sigma - sigma))
    with pytest.raises(ValueError, match="does not match"):
        step_jointly(scheduler, scheduler.timesteps[1], [torch.ones(1, 3, 4)], [sample])
