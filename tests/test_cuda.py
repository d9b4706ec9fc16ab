"""The package on a CUDA GPU, checked against the same code on the CPU or in float32.

CI has no GPU, so these are skipped there; on a GPU machine run `python -m pytest tests/test_cuda.py`. They cover
what only a GPU can show: the shipped pipeline gives the CPU's clip on the device, bfloat16 stays close to float32,
model CPU offload takes weights off the GPU without changing the clip, the GPU attention kernels behind Diffusers'
dispatch agree with the native path, Video Sparse Attention's compiled flex_attention path equals its torch path,
Inductor-compiled blocks equal eager ones, and a bf16-autocast training step gives float32's gradients.
"""

import gc

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.models.attention_dispatch import attention_backend
from fixtures_models import build_pair, inputs

from diffusers_skyreels.cli import default_model_path
from diffusers_skyreels.models.video_sparse_attention import SparseLayout, video_sparse_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
PROMPT = "A yellow square bounces slowly between the walls of a dark room. <sfx>a ping at every bounce</sfx>"
DEMO_CALL = dict(height=64, width=64, num_frames=33, fps=16, num_inference_steps=4, refine=False)


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 off, so that float32 on the GPU can be compared with the CPU to float32 rounding."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def demo_pipe():
    pipe = DiffusionPipeline.from_pretrained(default_model_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed=0, **overrides):
    return pipe(PROMPT, **{**DEMO_CALL, **overrides}, generator=torch.Generator().manual_seed(seed))


# -- the shipped pipeline on the device ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_clip():
    return generate(demo_pipe())


def test_demo_pipeline_on_cuda_gives_the_cpu_clip(cpu_clip):
    got = generate(demo_pipe().to(CUDA))
    assert got.frames.shape == cpu_clip.frames.shape == (1, 33, 64, 64, 3)
    np.testing.assert_allclose(got.frames, cpu_clip.frames, atol=2e-3)
    np.testing.assert_allclose(got.audio, cpu_clip.audio, atol=2e-3)


def test_demo_pipeline_in_bfloat16_stays_close_to_float32(cpu_clip):
    pipe = demo_pipe().to(CUDA, torch.bfloat16)
    assert pipe.transformer.dtype == pipe.audio_transformer.dtype == torch.bfloat16
    got = generate(pipe)
    assert got.frames.dtype == np.float32 and np.isfinite(got.frames).all() and np.isfinite(got.audio).all()
    # Mostly dark background: the mean difference is small unless the clip went elsewhere.
    assert np.abs(got.frames - cpu_clip.frames).mean() < 0.03
    assert np.abs(got.audio - cpu_clip.audio).mean() < 0.1 * np.abs(cpu_clip.audio).mean() + 1e-3


def test_model_cpu_offload_on_cuda_gives_the_same_clip_and_leaves_no_weights_on_the_gpu():
    def gpu_bytes() -> int:
        gc.collect()  # pipelines of earlier tests may sit in reference cycles
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    start = gpu_bytes()
    plain = demo_pipe().to(CUDA)
    expected = generate(plain, seed=3)
    plain_resident = gpu_bytes() - start
    branch_bytes = sum(p.numel() * p.element_size() for m in (plain.transformer, plain.audio_transformer)
                       for p in m.parameters())
    del plain
    start = gpu_bytes()
    offloaded = demo_pipe()
    offloaded.enable_model_cpu_offload(device=CUDA)
    got = generate(offloaded, seed=3)
    offload_resident = gpu_bytes() - start
    np.testing.assert_allclose(got.frames, expected.frames, atol=1e-5)
    np.testing.assert_allclose(got.audio, expected.audio, atol=1e-5)
    assert offloaded.transformer.device.type == offloaded.audio_transformer.device.type == "cpu"
    assert offload_resident < plain_resident - branch_bytes


# -- kernels ---------------------------------------------------------------------------------------------------------


def tiny_pair(seed=0):
    return tuple(model.to(CUDA) for model in build_pair(seed))


def pair_inputs():
    """The joint call's inputs on the GPU (no keyframes or audio references)."""
    return {k: v.to(CUDA) for k, v in inputs().items() if k not in ("keyframe_hidden_states", "audio_reference_latents")}


def joint_forward(video, audio, x, dtype=torch.float32):
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        out = video(**x, audio_transformer=audio)
    return out.sample.float(), out.audio_sample.float()


@pytest.mark.parametrize("backend", ["_native_flash", "_native_efficient", "_native_cudnn"])
def test_gpu_attention_kernels_match_the_native_path(backend):
    video, audio = tiny_pair()
    video, audio = video.to(torch.bfloat16).eval(), audio.to(torch.bfloat16).eval()
    x = {k: v.to(torch.bfloat16) if v.is_floating_point() and k != "timestep" else v
         for k, v in pair_inputs().items()}
    with torch.no_grad():
        native = joint_forward(video, audio, x)
        # The context manager, not `set_attention_backend`: that one also sets Diffusers' process-wide default.
        with attention_backend(backend):
            kernel = joint_forward(video, audio, x)
    for got, expected in zip(kernel, native, strict=True):
        torch.testing.assert_close(got, expected, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_video_sparse_attention_compiled_flex_equals_the_torch_path(dtype):
    g = torch.Generator().manual_seed(0)
    layout = SparseLayout(grid_offset=7, grid_size=(8, 12, 16), top_k=5)  # 2 x 3 x 4 cubes, plus 7 + 11 dense tokens
    seq = 7 + 8 * 12 * 16 + 11
    query, key, value = (torch.randn(2, seq, 4, 64, generator=g).to(CUDA, dtype) for _ in range(3))
    torch_path = video_sparse_attention(query, key, value, layout, backend="torch")
    flex_path = video_sparse_attention(query, key, value, layout, backend="flex", compile_flex=True)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(flex_path, torch_path, atol=tolerance, rtol=tolerance)


def test_inductor_compiled_repeated_blocks_equal_eager():
    video, audio = tiny_pair(seed=5)
    x = pair_inputs()
    with torch.no_grad():
        expected = joint_forward(video, audio, x)
        torch._dynamo.reset()
        for model in (video, audio):
            model.compile_repeated_blocks(fullgraph=True)
        got = joint_forward(video, audio, x)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_bf16_autocast_training_step_gives_float32_gradients():
    x = pair_inputs()
    grads = []
    for dtype in (torch.float32, torch.bfloat16):
        video, audio = tiny_pair(seed=3)
        video.train()
        audio.train()
        sample, audio_sample = joint_forward(video, audio, x, dtype)
        (sample.square().mean() + audio_sample.square().mean()).backward()
        grads.append(torch.cat([p.grad.flatten().float() for m in (video, audio) for p in m.parameters()
                                if p.grad is not None]))
    assert torch.isfinite(grads[1]).all() and grads[1].numel() == grads[0].numel()
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.99
