"""Diffusers' memory and speed features on the joint pipeline and both branches, each against the plain run.

What tests/test_pipelines.py and tests/test_models.py already cover is not repeated here: model CPU offload and
block-level group offload of a text-to-video+audio call, model-level group offload and FirstBlockCache, and
`compile_repeated_blocks` of a model forward. Here: the refiner pass under both offloadings, leaf-level group offload
of the joint call, fp8 layerwise casting of both branches, regional compilation inside a pipeline call, and the
caching hooks (FirstBlockCache, TaylorSeer) through the joint denoising loop.
"""

import numpy as np
import pytest
import torch
from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig
from fixtures_pipeline import TINY_CALL, build_tiny_components

import diffusers_skyreels as ds
from diffusers_skyreels.models.attention_skyreels_v4 import SkyReelsV4AttnProcessor

PROMPT = "A red ball bounces quickly between the walls. <sfx>a ping at every bounce</sfx>"
CPU = torch.device("cpu")


def make_pipe():
    pipe = ds.SkyReelsV4Pipeline(**build_tiny_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def assert_same_clip(got, expected, atol=1e-6):
    np.testing.assert_allclose(got.frames, expected.frames, atol=atol)
    if expected.audio is not None:
        np.testing.assert_allclose(got.audio, expected.audio, atol=atol)


# -- offloading ------------------------------------------------------------------------------------------------------


def test_model_cpu_offload_with_the_refiner_pass():
    pipe = make_pipe()
    call = dict(refine=True, generator=gen(1), **TINY_CALL)
    expected = pipe(PROMPT, **call)
    pipe.enable_model_cpu_offload(device="cpu")
    refiner_runs = []
    pipe.refiner.register_forward_pre_hook(lambda *args: refiner_runs.append(1))
    got = pipe(PROMPT, **{**call, "generator": gen(1)})
    assert refiner_runs
    assert got.frames.shape == expected.frames.shape == (1, 17, 64, 64, 3)
    assert_same_clip(got, expected)


@pytest.mark.parametrize("offload_type", ["leaf_level", "block_level"])
def test_group_offload_of_the_joint_call_and_the_refiner(offload_type):
    pipe = make_pipe()
    call = dict(refine=offload_type == "block_level", generator=gen(2), **TINY_CALL)
    expected = pipe(PROMPT, **call)
    pipe.enable_group_offload(
        onload_device=CPU, offload_device=CPU, offload_type=offload_type,
        num_blocks_per_group=1 if offload_type == "block_level" else None,
    )
    got = pipe(PROMPT, **{**call, "generator": gen(2)})
    assert_same_clip(got, expected)


# -- layerwise casting -----------------------------------------------------------------------------------------------


def test_fp8_layerwise_casting_of_both_branches():
    pipe = make_pipe()
    video, audio = pipe.transformer, pipe.audio_transformer
    g = torch.Generator().manual_seed(3)
    inputs = dict(
        hidden_states=torch.randn(2, 9, 3, 4, 6, generator=g),
        timestep=torch.full((2,), 600.0),
        encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
        audio_hidden_states=torch.randn(2, 9, 20, generator=g),
        audio_transformer=audio,
    )
    with torch.no_grad():
        expected = video(**inputs)
    for model in (video, audio):
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    with torch.no_grad():
        got = video(**inputs)
    for model in (video, audio):
        assert model.blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
        assert model.blocks[-1].ff.net[2].weight.dtype == torch.float8_e4m3fn
        # `_skip_layerwise_casting_patterns`: embeddings and norms keep their precision.
        assert model.patch_embed.weight.dtype == model.blocks[0].attn.norm_q.weight.dtype == torch.float32
    assert got.sample.dtype == got.audio_sample.dtype == torch.float32
    for name in ("sample", "audio_sample"):
        a, b = getattr(got, name), getattr(expected, name)
        assert torch.isfinite(a).all()
        assert (a - b).norm() / b.norm() < 0.1  # fp8 (e4m3) weights; measured: 3.1 % (video), 3.5 % (audio)


# -- regional compilation --------------------------------------------------------------------------------------------


def test_compile_repeated_blocks_in_a_pipeline_call():
    pipe = make_pipe()
    expected = pipe(PROMPT, generator=gen(4), **TINY_CALL)
    torch._dynamo.reset()
    for model in (pipe.transformer, pipe.audio_transformer):
        model.compile_repeated_blocks(fullgraph=True, backend="eager")
    got = pipe(PROMPT, generator=gen(4), **TINY_CALL)
    assert_same_clip(got, expected, atol=1e-5)


# -- caching hooks ---------------------------------------------------------------------------------------------------


class CountingProcessor(SkyReelsV4AttnProcessor):
    """The default processor, counting the attentions it actually computes."""

    def __init__(self, counts: dict, key: str) -> None:
        self.counts, self.key = counts, key

    def __call__(self, *args, **kwargs):
        self.counts[self.key] = self.counts.get(self.key, 0) + 1
        return super().__call__(*args, **kwargs)


def count_attentions(pipe) -> dict:
    """Count, per branch, the joint attentions of the first block and of the later blocks."""
    counts = {}
    for branch, model in (("video", pipe.transformer), ("audio", pipe.audio_transformer)):
        for i, block in enumerate(model.blocks):
            block.attn.set_processor(CountingProcessor(counts, f"{branch}/{'first' if i == 0 else 'tail'}"))
    return counts


CACHE_CALL = dict(height=32, width=32, num_frames=9, fps=16.0, num_inference_steps=6)


@pytest.mark.parametrize(
    "config",
    [
        FirstBlockCacheConfig(threshold=0.5),
        TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=2, taylor_factors_dtype=torch.float32),
    ],
    ids=["first_block_cache", "taylorseer"],
)
def test_caching_hooks_skip_work_in_the_joint_loop_and_stay_close(config):
    pipe = make_pipe()
    counts = count_attentions(pipe)
    expected = pipe(PROMPT, generator=gen(5), **CACHE_CALL)
    full = dict(counts)
    assert full == {"video/first": 6, "video/tail": 6, "audio/first": 6, "audio/tail": 6}
    counts.clear()
    for model in (pipe.transformer, pipe.audio_transformer):
        model.enable_cache(config)
    got = pipe(PROMPT, generator=gen(5), **CACHE_CALL)
    for branch in ("video", "audio"):
        assert counts[f"{branch}/tail"] < full[f"{branch}/tail"], counts  # later blocks were skipped on some steps
    if isinstance(config, FirstBlockCacheConfig):
        assert counts["video/first"] == counts["audio/first"] == 6  # the first block always runs
    for name in ("frames", "audio"):
        a, b = getattr(got, name), getattr(expected, name)
        assert np.isfinite(a).all()
        assert np.abs(a - b).mean() < 0.05 * np.abs(b).mean(), name  # measured: 0.02 to 0.9 per cent
