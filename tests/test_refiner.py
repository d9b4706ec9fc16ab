"""The low-res + keyframes + refiner strategy: the guide, the refiner model, the chained and standalone pipelines."""

import math

import numpy as np
import pytest
import torch
from fixtures_pipeline import TINY_CALL

import diffusers_skyreels as ds
from diffusers_skyreels.models.video_sparse_attention import SkyReelsV4SparseAttnProcessor
from diffusers_skyreels.pipelines.skyreels_v4 import ChannelCondition, refiner_condition

PROMPT = "A blue square bounces slowly between the walls. <sfx>a ping at every bounce</sfx>"


def expected_guide(low: np.ndarray, ss: int, ts: int) -> np.ndarray:
    """Loop-based reference: linear in time at frame instants, bilinear (pixel-area centres) in space."""
    channels, frames, height, width = low.shape
    out_t, out_h, out_w = (frames - 1) * ts + 1, height * ss, width * ss
    out = np.zeros((channels, out_t, out_h, out_w))

    def axis_weights(i, scale, size):
        src = max((i + 0.5) / scale - 0.5, 0.0)
        lo = min(int(math.floor(src)), size - 1)
        hi = min(lo + 1, size - 1)
        return lo, hi, src - lo

    for t in range(out_t):
        pos = t / ts
        t0, t1 = int(math.floor(pos)), min(int(math.floor(pos)) + 1, frames - 1)
        wt = pos - t0
        frame = (1 - wt) * low[:, t0] + wt * low[:, t1]
        for y in range(out_h):
            y0, y1, wy = axis_weights(y, ss, height)
            for x in range(out_w):
                x0, x1, wx = axis_weights(x, ss, width)
                out[:, t, y, x] = (
                    (1 - wy) * ((1 - wx) * frame[:, y0, x0] + wx * frame[:, y0, x1])
                    + wy * ((1 - wx) * frame[:, y1, x0] + wx * frame[:, y1, x1])
                )
    return out


@pytest.mark.parametrize("ss,ts", [(2, 2), (3, 1), (1, 3)])
def test_guide_is_the_upsampled_low_res_latents_with_exact_keyframes(ss, ts):
    g = torch.Generator().manual_seed(0)
    low = torch.randn(2, 3, 4, 3, 5, generator=g)
    keyframes = torch.randn(2, 3, 2, 3 * ss, 5 * ss, generator=g)
    guide = refiner_condition(low, ss, ts, keyframes, [0, 3])
    assert guide.latents.shape == (2, 3, 3 * ts + 1, 3 * ss, 5 * ss)
    expected = torch.from_numpy(expected_guide(low[1].numpy(), ss, ts)).float()
    keep = [t for t in range(guide.latents.shape[2]) if t not in (0, 3 * ts)]
    torch.testing.assert_close(guide.latents[1][:, keep], expected[:, keep], atol=1e-5, rtol=1e-5)
    assert torch.equal(guide.latents[:, :, 0], keyframes[:, :, 0])
    assert torch.equal(guide.latents[:, :, 3 * ts], keyframes[:, :, 1])
    per_frame = guide.mask[0, 0].flatten(1)
    assert per_frame[[0, 3 * ts]].eq(1).all() and per_frame[keep].eq(0).all()


def test_preserved_source_wins_in_its_region():
    low = torch.randn(1, 2, 3, 2, 2)
    source = ChannelCondition(torch.full((1, 2, 5, 4, 4), 7.0), torch.zeros(1, 1, 5, 4, 4))
    source.mask[..., :2, :] = 1
    guide = refiner_condition(low, 2, 2, preserved=source)
    assert guide.latents[..., :2, :].eq(7).all() and not guide.latents[..., 2:, :].eq(7).any()
    assert torch.equal(guide.mask, source.mask)


def test_guide_errors():
    low = torch.randn(1, 2, 3, 2, 2)
    cases = [
        (lambda: refiner_condition(low, 1.5, 2), "spatial_scale"),
        (lambda: refiner_condition(low, 2, 0), "temporal_scale"),
        (lambda: refiner_condition(low, 2, 2, torch.randn(1, 2, 1, 4, 4), [3]), r"\[0, 2\]"),
        (lambda: refiner_condition(low, 2, 2, torch.randn(1, 2, 2, 4, 4), [1, 1]), "distinct"),
        (lambda: refiner_condition(low, 2, 2, torch.randn(1, 2, 1, 2, 2), [1]), "one high-resolution latent"),
        (lambda: refiner_condition(low, 2, 2, torch.randn(1, 2, 1, 4, 4), None), "go together"),
        (lambda: refiner_condition(low, 2, 2, preserved=ChannelCondition(torch.zeros(1, 2, 3, 4, 4),
                                                                         torch.zeros(1, 1, 3, 4, 4))),
         "does not match the refined latent grid"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_refiner_from_video_branch_shares_its_weights():
    torch.manual_seed(0)
    video = ds.SkyReelsV4Transformer.from_preset("tiny")
    refiner = ds.SkyReelsV4RefinerTransformer.from_video_branch(video, temporal_scale=3)
    assert refiner.config.temporal_scale == 3 and refiner.blocks[0].attn_cross_modal is None
    video_state = video.state_dict()
    for name, tensor in refiner.state_dict().items():
        if "to_gate_compress" in name:  # the VSA coarse gates start at zero
            assert not tensor.any(), name
        else:
            assert torch.equal(tensor, video_state[name]), name
    assert isinstance(refiner.blocks[0].attn.processor, SkyReelsV4SparseAttnProcessor)
    x, text = torch.randn(1, 9, 3, 4, 4), torch.randn(1, 3, 32)
    with torch.no_grad():
        # Without an audio partner the video branch never uses its a<->v layers, and VSA with all cubes and zero
        # gates is dense attention: the refiner starts equal to the video branch.
        torch.testing.assert_close(refiner(x, 300.0, text).sample, video(x, 300.0, text).sample)
    with pytest.raises(ValueError, match="integer >= 1"):
        ds.SkyReelsV4RefinerTransformer.from_preset("tiny", spatial_scale=0)


def test_refiner_sparse_attention_against_dense():
    """Full top-K VSA equals dense attention; a small top-K changes the output; dense stays selectable."""
    torch.manual_seed(0)
    x, text = torch.randn(1, 9, 9, 16, 16), torch.randn(1, 3, 32)  # 9 x 8 x 8 patches = 3 x 2 x 2 cubes
    refs = torch.randn(1, 4, 1, 16, 16)
    full = ds.SkyReelsV4RefinerTransformer.from_preset("tiny", sparse_attention_top_k=12)
    sparse = ds.SkyReelsV4RefinerTransformer.from_preset("tiny", sparse_attention_top_k=2)
    sparse.load_state_dict(full.state_dict())
    with torch.no_grad():
        vsa_full = full(x, 100.0, text, reference_latents=refs).sample
        vsa_sparse = sparse(x, 100.0, text, reference_latents=refs).sample
        full.set_sparse_attention(False)
        dense = full(x, 100.0, text, reference_latents=refs).sample
    torch.testing.assert_close(vsa_full, dense, atol=1e-5, rtol=1e-5)
    assert (vsa_sparse - dense).abs().max() > 1e-3
    assert type(full.blocks[0].attn.processor).__name__ == "SkyReelsV4AttnProcessor"
    with pytest.raises(ValueError, match="without `sparse_attention`"):
        ds.SkyReelsV4Transformer.from_preset("tiny").set_sparse_attention(True)


def test_chained_refinement_doubles_size_and_frame_rate(tiny_components):
    pipe = ds.SkyReelsV4Pipeline(**tiny_components)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    handle = pipe.refiner.register_forward_pre_hook(lambda m, a, k: calls.append(k), with_kwargs=True)
    out = pipe(PROMPT, refine=True, **TINY_CALL)
    handle.remove()
    base = pipe.clip_timing(16.0, num_frames=9)
    assert out.frames.shape == (1, 17, 64, 64, 3) and out.fps == 32.0
    # The soundtrack lasts exactly as long as the refined clip.
    assert out.audio.shape == (1, round(17 / 32 * 16000))
    assert len(calls) == TINY_CALL["num_inference_steps"]
    guide_mask = calls[0]["hidden_states"][0, 8]
    # "auto" keyframes of 3 latent frames: 0 and 2 -> refined latent frames 0 and 4 are given.
    assert [t for t in range(5) if guide_mask[t].all()] == [0, 4]
    assert base.num_latent_frames == 3


def test_i2v_first_keyframe_is_the_image_at_high_resolution(tiny_components):
    pipe = ds.SkyReelsV4ImageToVideoPipeline(**tiny_components)
    pipe.set_progress_bar_config(disable=True)
    image = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(k), with_kwargs=True)
    pipe(image, PROMPT, keyframe_indices=[0, 2], output_type="latent", **TINY_CALL)
    handle.remove()
    keyframes = calls[0]["keyframe_hidden_states"]
    assert keyframes.shape == (2, 9, 2, 8, 8) and calls[0]["keyframe_indices"] == [0, 2]
    assert keyframes[:, 8, 0].eq(1).all() and keyframes[:, 8, 1].eq(0).all()


def test_refiner_pipeline_from_base_latents_and_from_a_video(tiny_components):
    base = ds.SkyReelsV4Pipeline(**tiny_components)
    base.set_progress_bar_config(disable=True)
    latent = base(PROMPT, keyframe_indices="auto", output_type="latent", **TINY_CALL)
    assert latent.keyframe_latents.shape == (1, 4, 2, 8, 8) and latent.keyframe_indices == [0, 2]
    refine = ds.SkyReelsV4RefinerPipeline.from_pipe(base)
    refine.set_progress_bar_config(disable=True)
    soundtrack = np.random.default_rng(1).random(9000).astype(np.float32) - 0.5
    out = refine(
        PROMPT, latents=latent.frames, keyframe_latents=latent.keyframe_latents,
        keyframe_indices=latent.keyframe_indices, audio=soundtrack, audio_sample_rate=16000, num_inference_steps=2,
    )
    assert out.frames.shape == (1, 17, 64, 64, 3) and out.fps == 32.0
    np.testing.assert_array_equal(out.audio[0], soundtrack[:8500])
    clip = np.random.default_rng(2).random((9, 16, 32, 3)).astype(np.float32)
    upscaled = refine(PROMPT, video=clip, num_inference_steps=2, output_type="pt")
    assert upscaled.frames.shape == (1, 17, 3, 32, 64)
    source = np.random.default_rng(3).random((17, 32, 64, 3)).astype(np.float32)
    keep = np.zeros((32, 64), np.float32)
    keep[:, :32] = 1
    calls = []
    handle = refine.refiner.register_forward_pre_hook(lambda m, a, k: calls.append(k), with_kwargs=True)
    refine(PROMPT, video=clip, source_video=source, preserve_mask=keep, num_inference_steps=1, output_type="latent")
    handle.remove()
    mask = calls[0]["hidden_states"][0, 8]
    assert mask[..., :4].eq(1).all() and mask[..., 4:].eq(0).all()  # 32 of 64 pixels = 4 of 8 latent columns
    with pytest.raises(ValueError, match="exactly one of `latents` and `video`"):
        refine(PROMPT, num_inference_steps=1)
    with pytest.raises(ValueError, match="refined frame count"):
        refine(PROMPT, video=clip, source_video=source[:9], preserve_mask=keep, num_inference_steps=1)
    with pytest.raises(ValueError, match="need the `refiner`"):
        ds.SkyReelsV4Pipeline(**{**tiny_components, "refiner": None})(PROMPT, refine=True, **TINY_CALL)
