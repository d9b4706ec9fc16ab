"""One clip on two ranks through Diffusers' context parallelism: the joint forward (video + audio, with in-context
references, keyframes and padded prompts), video alone and audio alone, each gathered on rank 0 and compared with
the single-process forward. Two CPU processes with gloo, in one spawn; the cases run one after another in it.

Test-only patch: Diffusers derives the device index from `torch.accelerator.device_count()`, which is 0 on a CPU-only
machine; the workers report one device while `enable_parallelism` runs.

Ring attention needs an attention backend that returns the log-sum-exp of each row; none of Diffusers' CPU backends
does, so the ring cases swap in a plain-math forward op that does (test-only, `_math_attention_forward_op`).
"""

import socket
import warnings
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import ContextParallelConfig
from diffusers.models import attention_dispatch
from torch.distributed.device_mesh import init_device_mesh

from diffusers_skyreels import SkyReelsV4AudioTransformer, SkyReelsV4RefinerTransformer, SkyReelsV4Transformer

WORLD = 2
TEXT_DIM = 32


def build_pair():
    torch.manual_seed(0)
    video = SkyReelsV4Transformer.from_preset("tiny").eval()
    audio = SkyReelsV4AudioTransformer.from_preset("tiny").eval()
    for model in (video, audio):
        for block in model.blocks:  # the zero-initialised a<->v projections get weights, so coupling is exercised
            torch.nn.init.normal_(block.attn_cross_modal.to_out[0].weight, std=0.2)
    return video, audio


def case_inputs(name):
    """Inputs of one case; every token count divides by 2 unless the case is about one that does not."""
    g = torch.Generator().manual_seed(1)
    text_len = 5 if name in ("odd_text", "ring_odd_text") else 6  # an odd prompt gets padded (and masked) to 6
    x = dict(
        hidden_states=torch.randn(2, 9, 2, 4, 8, generator=g),  # 2 latent frames of 2 x 4 patches
        timestep=torch.tensor([700.0, 300.0]),
        encoder_hidden_states=torch.randn(2, text_len, TEXT_DIM, generator=g),
        reference_latents=torch.randn(2, 4, 2, 4, 8, generator=g),
        audio_hidden_states=torch.randn(2, 9, 20, generator=g),
        audio_reference_latents=torch.randn(2, 4, 6, generator=g),
    )
    if name == "keyframes_mask":
        x["keyframe_hidden_states"] = torch.randn(2, 9, 1, 8, 16, generator=g)
        x["keyframe_indices"] = [1]
        x["encoder_attention_mask"] = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    if name == "odd_video_tokens":
        x["hidden_states"] = torch.randn(2, 9, 1, 2, 6, generator=g)  # 3 tokens
        del x["reference_latents"]
    return x


def run_case(name, video, audio, refiner=None):
    """The forward of one case: a dict of output tensors (or raises)."""
    x = case_inputs(name)
    with torch.no_grad():
        if name == "video_only":
            keep = ("hidden_states", "timestep", "encoder_hidden_states", "reference_latents")
            return {"sample": video(**{k: x[k] for k in keep}).sample}
        if name == "audio_only":
            out = audio(
                x["audio_hidden_states"], x["timestep"], x["encoder_hidden_states"],
                reference_latents=x["audio_reference_latents"], num_video_frames=2,
            )
            return {"audio_sample": out.sample}
        if name == "refiner_vsa":
            return {"sample": refiner(torch.randn(1, 9, 4, 8, 8), 500.0, torch.randn(1, 6, TEXT_DIM)).sample}
        out = video(**x, audio_transformer=audio)
    result = {"sample": out.sample, "audio_sample": out.audio_sample}
    if out.keyframe_sample is not None:
        result["keyframe_sample"] = out.keyframe_sample
    return result


ULYSSES_CASES = ("joint_references", "keyframes_mask", "odd_text", "video_only", "audio_only", "odd_video_tokens",
                 "refiner_vsa")
RING_CASES = ("joint_references", "video_only", "audio_only", "ring_odd_text", "keyframes_mask")
# Uneven shards: the prompt is not padded. Uneven x tokens would need an all-gather of uneven shapes at the output,
# which gloo refuses (NCCL does it): not run here.
ANYTHING_CASES = ("odd_text", "keyframes_mask")
MODES = {
    "ulysses": (dict(ulysses_degree=WORLD), ULYSSES_CASES),
    "ring": (dict(ring_degree=WORLD), RING_CASES),
    "ulysses_anything": (dict(ulysses_degree=WORLD, ulysses_anything=True), ANYTHING_CASES),
}


def _math_attention_forward_op(
    ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
    return_lse=False, _save_ctx=True, _parallel_config=None,
):
    """Attention in plain math, `[B, S, H, D]` in and out, with the row log-sum-exp `[B, S, H]` ring attention needs."""
    query, key, value = (t.transpose(1, 2) for t in (query, key, value))
    scores = query @ key.transpose(-1, -2) * (query.shape[-1] ** -0.5 if scale is None else scale)
    lse = scores.logsumexp(dim=-1)
    out = ((scores - lse[..., None]).exp() @ value).transpose(1, 2)
    return (out, lse.transpose(1, 2)) if return_lse else out


def _worker(rank, port, results_path):
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    results = {}
    try:
        for mode, (degrees, cases) in MODES.items():
            video, audio = build_pair()
            refiner = SkyReelsV4RefinerTransformer.from_preset("tiny").eval()
            shape = (degrees.get("ring_degree", 1), degrees.get("ulysses_degree", 1))
            mesh = init_device_mesh("cpu", shape, mesh_dim_names=("ring", "ulysses"))  # one mesh for the 3 models
            with mock.patch.object(torch.accelerator, "device_count", return_value=1):
                for model in (video, audio, refiner):
                    model.enable_parallelism(config=ContextParallelConfig(**degrees, mesh=mesh))
            op = _math_attention_forward_op if mode == "ring" else attention_dispatch._native_attention_forward_op
            with mock.patch.object(attention_dispatch, "_native_attention_forward_op", op):
                for name in cases:
                    try:
                        results[f"{mode}/{name}"] = run_case(name, video, audio, refiner)
                    except ValueError as error:  # raised on every rank alike, before any collective
                        results[f"{mode}/{name}"] = str(error)
        if rank == 0:
            torch.save(results, results_path)
        dist.barrier()  # no rank tears the groups down while the other still uses them
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def parallel_results(tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path_factory.mktemp("context_parallel") / "results.pt"
    mp.spawn(_worker, args=(port, str(path)), nprocs=WORLD, join=True)
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def single_process():
    video, audio = build_pair()
    names = ("joint_references", "keyframes_mask", "odd_text", "video_only", "audio_only")
    return {name: run_case(name, video, audio) for name in names}


@pytest.mark.parametrize(
    "case",
    [f"ulysses/{name}" for name in ("joint_references", "keyframes_mask", "odd_text", "video_only", "audio_only")]
    + [f"ring/{name}" for name in ("joint_references", "video_only", "audio_only")]
    + [f"ulysses_anything/{name}" for name in ANYTHING_CASES],
)
def test_parallel_forward_matches_one_process(parallel_results, single_process, case):
    got, expected = parallel_results[case], single_process[case.split("/")[1]]
    assert isinstance(got, dict), got
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-5)


def test_unsupported_splits_raise_clear_errors(parallel_results):
    assert "must be a multiple of 2" in parallel_results["ulysses/odd_video_tokens"]
    assert "set_sparse_attention(False)" in parallel_results["ulysses/refiner_vsa"]
    for name in ("ring_odd_text", "keyframes_mask"):  # both need a text mask, which ring attention cannot apply
        assert "Ring attention cannot apply a text padding mask" in parallel_results[f"ring/{name}"]
