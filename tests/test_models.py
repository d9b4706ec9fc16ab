"""The two SkyReels V4 branches: shapes, positions, coupling, serialization and Diffusers model features."""

import json
import subprocess
import sys

import pytest
import torch
from diffusers import AutoModel, MMAudioVAE
from diffusers.models.attention_dispatch import _AttentionBackendRegistry
from fixtures_models import TEXT_DIM, build_pair, inputs, video_only

from diffusers_skyreels import SkyReelsV4AudioTransformer, SkyReelsV4Transformer
from diffusers_skyreels.pipelines.skyreels_v4.timing import clip_timing


@pytest.fixture(scope="module")
def pair():
    return build_pair()


# -- shapes ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extras",
    [(), ("reference_latents",), ("keyframe_hidden_states",), ("reference_latents", "keyframe_hidden_states")],
)
def test_video_shapes_for_every_input_form(pair, extras):
    video, _ = pair
    x = inputs()
    kwargs = {**video_only(x), **{k: x[k] for k in extras}}
    if "keyframe_hidden_states" in extras:
        kwargs["keyframe_indices"] = [0, 2]
    with torch.no_grad():
        out = video(**kwargs)
    assert out.sample.shape == (2, 4, 3, 4, 6)
    assert out.audio_sample is None
    if "keyframe_hidden_states" in extras:
        assert out.keyframe_sample.shape == (2, 4, 2, 8, 12)
    else:
        assert out.keyframe_sample is None


def test_joint_shapes_with_references_and_keyframes(pair):
    video, audio = pair
    x = inputs()
    with torch.no_grad():
        out = video(**x, keyframe_indices=[1, 2], audio_transformer=audio)
    assert out.sample.shape == (2, 4, 3, 4, 6)
    assert out.keyframe_sample.shape == (2, 4, 2, 8, 12)
    assert out.audio_sample.shape == (2, 4, 20)
    assert torch.isfinite(out.sample).all() and torch.isfinite(out.audio_sample).all()
    sample, keyframes, audio_sample = video(**x, keyframe_indices=[1, 2], audio_transformer=audio, return_dict=False)
    torch.testing.assert_close(sample, out.sample)
    torch.testing.assert_close(audio_sample, out.audio_sample)


def test_audio_shapes_standalone(pair):
    _, audio = pair
    x = inputs()
    with torch.no_grad():
        out = audio(x["audio_hidden_states"], 300.0, x["encoder_hidden_states"], num_video_frames=3)
        with_refs = audio(
            x["audio_hidden_states"],
            300.0,
            x["encoder_hidden_states"],
            reference_latents=x["audio_reference_latents"],
            num_video_frames=3,
        )
    assert out.sample.shape == with_refs.sample.shape == (2, 4, 20)
    assert not torch.allclose(out.sample, with_refs.sample)


def test_patch_size_and_odd_sizes():
    torch.manual_seed(0)
    video = SkyReelsV4Transformer.from_preset("tiny", patch_size=(1, 1, 1)).eval()
    with torch.no_grad():
        out = video(torch.randn(1, 9, 2, 3, 5), 10.0, torch.randn(1, 3, TEXT_DIM))
    assert out.sample.shape == (1, 4, 2, 3, 5)


# -- coupling and positions ------------------------------------------------------------------------------------------


def test_standalone_equals_joint_when_coupling_is_zero_and_differs_otherwise():
    x = inputs()
    video, audio = build_pair(couple=False)
    with torch.no_grad():
        alone = video(**video_only(x)).sample
        audio_alone = audio(x["audio_hidden_states"], x["timestep"], x["encoder_hidden_states"], num_video_frames=3)
        joint = video(**video_only(x), audio_transformer=audio, audio_hidden_states=x["audio_hidden_states"])
    torch.testing.assert_close(joint.sample, alone, rtol=0, atol=0)
    torch.testing.assert_close(joint.audio_sample, audio_alone.sample, rtol=0, atol=0)

    video, audio = build_pair(couple=True)
    with torch.no_grad():
        alone = video(**video_only(x)).sample
        audio_alone = audio(x["audio_hidden_states"], x["timestep"], x["encoder_hidden_states"], num_video_frames=3)
        joint = video(**video_only(x), audio_transformer=audio, audio_hidden_states=x["audio_hidden_states"])
    assert (joint.sample - alone).abs().max() > 1e-3
    assert (joint.audio_sample - audio_alone.sample).abs().max() > 1e-3


def test_audio_attends_to_video_and_video_to_audio(pair):
    video, audio = pair
    x = inputs()
    other_audio = x["audio_hidden_states"] + torch.randn_like(x["audio_hidden_states"])
    other_video = x["hidden_states"] + torch.randn_like(x["hidden_states"])
    with torch.no_grad():
        base = video(**video_only(x), audio_transformer=audio, audio_hidden_states=x["audio_hidden_states"])
        audio_changed = video(**video_only(x), audio_transformer=audio, audio_hidden_states=other_audio)
        video_changed = video(
            other_video, x["timestep"], x["encoder_hidden_states"], audio_transformer=audio,
            audio_hidden_states=x["audio_hidden_states"],
        )
    assert (audio_changed.sample - base.sample).abs().max() > 1e-4
    assert (video_changed.audio_sample - base.audio_sample).abs().max() > 1e-4


def _capture_positions(module):
    captured = []
    handle = module.register_forward_hook(lambda m, args, out: captured.append(args[0].clone()))
    return captured, handle


@pytest.mark.parametrize("duration", [1.0, 2.0, 5.0, 12.5])
def test_audio_rope_scale_is_the_length_ratio(pair, duration):
    video, audio = pair
    timing = clip_timing(16, duration_seconds=duration)
    captured, handle = _capture_positions(audio.rope)
    text = torch.randn(1, 3, TEXT_DIM)
    with torch.no_grad():
        audio(torch.randn(1, 9, timing.num_audio_latents), 1.0, text, num_video_frames=timing.num_latent_frames)
    handle.remove()
    positions = captured[0][:, 0]
    expected_step = timing.num_latent_frames / timing.num_audio_latents
    torch.testing.assert_close(positions, torch.arange(timing.num_audio_latents) * expected_step)
    # The last audio latent sits just before the end of the video's latent-frame span.
    assert positions[-1] < timing.num_latent_frames


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_cross_modal_rope_scale_multiplies_the_coupling_time_positions(scale):
    video, audio = build_pair(cross_modal_rope_scale=scale)
    x = inputs()
    seen = {}

    def record(key):
        def hook(module, args, output):
            seen.setdefault(key, args[0].clone())  # the positions of the first (joint) call

        return hook

    hooks = [
        module.register_forward_hook(record((name, kind)))
        for name, branch in (("video", video), ("audio", audio))
        for kind, module in (("rope", branch.rope), ("temporal", branch.temporal_rope))
    ]
    with torch.no_grad():
        joint = video(**video_only(x), audio_transformer=audio, audio_hidden_states=x["audio_hidden_states"])
        alone = video(**video_only(x))
    for hook in hooks:
        hook.remove()
    for name in ("video", "audio"):
        torch.testing.assert_close(seen[(name, "temporal")], seen[(name, "rope")][:, :1] * scale)
    plain_video, plain_audio = build_pair()
    with torch.no_grad():
        plain = plain_video(**video_only(x), audio_transformer=plain_audio, audio_hidden_states=x["audio_hidden_states"])
        plain_alone = plain_video(**video_only(x))
    torch.testing.assert_close(alone.sample, plain_alone.sample)  # only the coupling reads the scale
    assert torch.equal(joint.sample, plain.sample) == (scale == 1.0)
    assert torch.equal(joint.audio_sample, plain.audio_sample) == (scale == 1.0)


def test_paper_ratio_for_five_seconds_from_the_audio_vae():
    """5 s at 16 fps: 21 latent frames, and the MMAudio VAE yields 218 latents for the matching audio."""
    timing = clip_timing(16, duration_seconds=5.0)
    vae = MMAudioVAE(hidden_channels=8, channel_multipliers=(1, 1), layers_per_block=1).eval()
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, timing.num_audio_samples)).latent_dist.mode()
    assert timing.num_latent_frames == 21
    assert latents.shape[-1] == timing.num_audio_latents == 218
    assert vae.latent_hop_length == 1024


def test_video_positions_of_references_and_keyframes(pair):
    video, _ = pair
    x = inputs()
    captured, handle = _capture_positions(video.rope)
    with torch.no_grad():
        video(**video_only(x), reference_latents=x["reference_latents"],
              keyframe_hidden_states=x["keyframe_hidden_states"], keyframe_indices=[2, 0])
    handle.remove()
    positions = captured[0]
    grid = 2 * 3  # (4 / 2) x (6 / 2) patches per frame
    refs, main, keys = positions[: 2 * grid], positions[2 * grid : 5 * grid], positions[5 * grid :]
    assert refs[:grid, 0].eq(-2).all() and refs[grid:, 0].eq(-1).all()
    assert main[:, 0].tolist() == [f for f in range(3) for _ in range(grid)]
    # Keyframes: their frame's time, high-res patch indices divided by the scale factor 2.
    assert keys[: 4 * grid, 0].eq(2).all() and keys[4 * grid :, 0].eq(0).all()
    assert sorted(set(keys[:, 1].tolist())) == [0.0, 0.5, 1.0, 1.5]
    assert sorted(set(keys[:, 2].tolist())) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]


def test_references_and_keyframes_change_the_output_but_not_its_shape(pair):
    video, _ = pair
    x = inputs()
    with torch.no_grad():
        base = video(**video_only(x)).sample
        refs = video(**video_only(x), reference_latents=x["reference_latents"]).sample
        other_refs = video(**video_only(x), reference_latents=x["reference_latents"].flip(0)).sample
        keys = video(**video_only(x), keyframe_hidden_states=x["keyframe_hidden_states"], keyframe_indices=[0, 1])
    for out in (refs, other_refs, keys.sample):
        assert out.shape == base.shape
        assert (out - base).abs().max() > 1e-4
    assert (refs - other_refs).abs().max() > 1e-4


def test_text_padding_mask_ignores_padded_tokens(pair):
    video, _ = pair
    x = inputs(batch=1)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    garbage = x["encoder_hidden_states"].clone()
    garbage[:, 3:] = 100.0
    with torch.no_grad():
        masked = video(x["hidden_states"], 5.0, x["encoder_hidden_states"], encoder_attention_mask=mask).sample
        masked_garbage = video(x["hidden_states"], 5.0, garbage, encoder_attention_mask=mask).sample
        trimmed = video(x["hidden_states"], 5.0, x["encoder_hidden_states"][:, :3]).sample
    torch.testing.assert_close(masked, masked_garbage)
    torch.testing.assert_close(masked, trimmed)


def test_timestep_changes_the_output(pair):
    video, _ = pair
    x = inputs()
    with torch.no_grad():
        a = video(x["hidden_states"], 100.0, x["encoder_hidden_states"]).sample
        b = video(x["hidden_states"], 900.0, x["encoder_hidden_states"]).sample
    assert (a - b).abs().max() > 1e-4


# -- serialization and determinism -------------------------------------------------------------------------------


def test_determinism(pair):
    video, audio = pair
    x = inputs()
    with torch.no_grad():
        a = video(**x, keyframe_indices=[0, 1], audio_transformer=audio)
        b = video(**x, keyframe_indices=[0, 1], audio_transformer=audio)
    assert torch.equal(a.sample, b.sample) and torch.equal(a.audio_sample, b.audio_sample)


def test_save_load_round_trip_fp32_and_bf16(tmp_path, pair):
    video, audio = pair
    x = inputs()
    with torch.no_grad():
        expected = video(**x, keyframe_indices=[0, 1], audio_transformer=audio)
    video.save_pretrained(tmp_path / "video")
    audio.save_pretrained(tmp_path / "audio")
    assert (tmp_path / "video" / "diffusion_pytorch_model.safetensors").exists()
    video2 = SkyReelsV4Transformer.from_pretrained(tmp_path / "video").eval()
    audio2 = SkyReelsV4AudioTransformer.from_pretrained(tmp_path / "audio").eval()
    with torch.no_grad():
        got = video2(**x, keyframe_indices=[0, 1], audio_transformer=audio2)
    assert torch.equal(got.sample, expected.sample) and torch.equal(got.audio_sample, expected.audio_sample)

    video_bf16 = SkyReelsV4Transformer.from_pretrained(tmp_path / "video", torch_dtype=torch.bfloat16).eval()
    audio_bf16 = SkyReelsV4AudioTransformer.from_pretrained(tmp_path / "audio", torch_dtype=torch.bfloat16).eval()
    assert video_bf16.blocks[0].attn.to_q.weight.dtype == torch.bfloat16
    assert video_bf16.time_embedder.linear_1.weight.dtype == torch.float32  # kept in fp32
    video_bf16.save_pretrained(tmp_path / "video_bf16")
    reloaded = SkyReelsV4Transformer.from_pretrained(tmp_path / "video_bf16", torch_dtype=torch.bfloat16).eval()
    bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in x.items()}
    with torch.no_grad():
        out = video_bf16(**bf16, keyframe_indices=[0, 1], audio_transformer=audio_bf16)
        out_reloaded = reloaded(**bf16, keyframe_indices=[0, 1], audio_transformer=audio_bf16)
    assert out.sample.dtype == torch.bfloat16 and torch.isfinite(out.sample.float()).all()
    assert torch.equal(out.sample, out_reloaded.sample)
    torch.testing.assert_close(out.sample.float(), expected.sample, atol=0.1, rtol=0.1)
    torch.testing.assert_close(out.audio_sample.float(), expected.audio_sample, atol=0.1, rtol=0.1)


def test_automodel_loads_from_config_and_from_model_index(tmp_path, pair):
    video, audio = pair
    video.save_pretrained(tmp_path / "transformer")
    audio.save_pretrained(tmp_path / "audio_transformer")
    loaded = AutoModel.from_pretrained(str(tmp_path / "transformer"))
    assert isinstance(loaded, SkyReelsV4Transformer)
    (tmp_path / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "SkyReelsV4Pipeline",
                "_diffusers_version": "0.42.1",
                "transformer": ["diffusers_skyreels", "SkyReelsV4Transformer"],
                "audio_transformer": ["diffusers_skyreels", "SkyReelsV4AudioTransformer"],
            }
        )
    )
    loaded = AutoModel.from_pretrained(str(tmp_path), subfolder="audio_transformer")
    assert isinstance(loaded, SkyReelsV4AudioTransformer)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), audio.state_dict().values()))


def test_loading_without_importing_the_package_says_what_to_import(tmp_path, pair):
    video, _ = pair
    video.save_pretrained(tmp_path / "transformer")
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "X", "transformer": ["diffusers_skyreels", "SkyReelsV4Transformer"]})
    )
    code = (
        "import sys\nfrom diffusers import AutoModel\n"
        f"try:\n    AutoModel.from_pretrained({str(tmp_path)!r}, subfolder='transformer')\n"
        "except ValueError as e:\n    print(e)\n"
        "assert 'diffusers_skyreels' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "import diffusers_skyreels" in result.stdout


def _expected_parameters(dim, ffn, text_dim, freq, in_ch, out_ch, patch, dual, single, text_cross, head_dim):
    """Parameter count of a branch, computed from the architecture by hand."""
    attention = 4 * dim * dim + 4 * dim + 2 * head_dim  # q, k, v, out (+ biases) and the two per-head RMS norms
    mlp = 2 * dim * ffn + ffn + dim
    block = attention + mlp + 6 * dim  # joint attention, MLP, modulation table
    block += attention + 2 * dim  # audio<->video cross-attention and its LayerNorm
    if text_cross:
        block += attention + 2 * dim
    dual_extra = attention + mlp + 6 * dim  # text-stream weights of a dual-stream block
    embeddings = (in_ch * patch + 1) * dim  # patch embedding
    embeddings += freq * dim + dim + dim * dim + dim  # timestep MLP
    embeddings += dim * 12 * dim + 12 * dim  # adaLN-single projection
    embeddings += text_dim * dim + dim + dim * dim + dim  # text projection
    head = 2 * dim + dim * out_ch * patch + out_ch * patch
    return (dual + single) * block + dual * dual_extra + embeddings + head


def test_large_preset_parameter_count_on_meta_device():
    with torch.device("meta"):
        video = SkyReelsV4Transformer.from_preset("large")
        audio = SkyReelsV4AudioTransformer.from_preset("large")
    assert video.inner_dim == audio.inner_dim == 5120 and len(video.blocks) == len(audio.blocks) == 40
    assert next(video.parameters()).device.type == "meta"
    shared = dict(dim=5120, ffn=13824, text_dim=3584, freq=256, dual=10, single=30, head_dim=128)
    video_expected = _expected_parameters(in_ch=33, out_ch=16, patch=4, text_cross=True, **shared)
    audio_expected = _expected_parameters(in_ch=81, out_ch=40, patch=1, text_cross=False, **shared)
    assert sum(p.numel() for p in video.parameters()) == video_expected
    assert sum(p.numel() for p in audio.parameters()) == audio_expected


def test_demo_preset_rope_tells_far_positions_from_near_ones():
    """Over the demo grid (9 latent frames of 4 x 4 tokens), a position 3 or more steps away never looks more like the
    origin (mean cosine of the rotary phase differences) than one 2 steps away, on every axis the branches rotate."""
    video = SkyReelsV4Transformer.from_preset("demo")
    audio = SkyReelsV4AudioTransformer.from_preset("demo")

    def similarity(rope, positions: torch.Tensor) -> torch.Tensor:
        cos, _ = rope(positions)  # phases relative to position 0, whose phases are all 0
        return cos.mean(dim=-1)

    steps = torch.arange(9, dtype=torch.float32)
    axes = {
        "frame": (video.rope, torch.stack([steps, 0 * steps, 0 * steps], dim=-1), 9),
        "row": (video.rope, torch.stack([0 * steps, steps, 0 * steps], dim=-1), 4),
        "column": (video.rope, torch.stack([0 * steps, 0 * steps, steps], dim=-1), 4),
        "video a<->v time": (video.temporal_rope, steps[:, None], 9),
        "audio a<->v time": (audio.temporal_rope, steps[:, None], 9),
    }
    for name, (rope, positions, length) in axes.items():
        sim = similarity(rope, positions[:length])
        assert sim[3:].max() < sim[2], f"{name}: {sim.tolist()}"
    # Theta 10000 fails the first check on the frame axis: frame 6 looks like frame 0 (6 rad ~ 2 pi).
    usual = SkyReelsV4Transformer.from_preset("demo", rope_theta=10000.0)
    sim = similarity(usual.rope, axes["frame"][1])
    assert sim[6] > sim[2]


# -- Diffusers model features ----------------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_gradients():
    x = inputs()
    grads = []
    for checkpointing in (False, True):
        video, audio = build_pair(seed=3)
        video.train()
        audio.train()
        if checkpointing:
            video.enable_gradient_checkpointing()
            audio.enable_gradient_checkpointing()
        out = video(**video_only(x), audio_transformer=audio, audio_hidden_states=x["audio_hidden_states"])
        (out.sample.square().mean() + out.audio_sample.square().mean()).backward()
        grads.append(
            {n: p.grad.clone() for m in (video, audio) for n, p in m.named_parameters() if p.grad is not None}
        )
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_attention_backend_matches_native(pair):
    video, audio = pair
    x = inputs()
    with torch.no_grad():
        native = video(**x, keyframe_indices=[0, 1], audio_transformer=audio)
    # `set_attention_backend` also makes the backend Diffusers' process-wide default, which reset does not undo.
    default_backend = _AttentionBackendRegistry._active_backend
    for model in (video, audio):
        model.set_attention_backend("_native_math")
    try:
        with torch.no_grad():
            math_out = video(**x, keyframe_indices=[0, 1], audio_transformer=audio)
    finally:
        for model in (video, audio):
            model.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(default_backend)
    torch.testing.assert_close(math_out.sample, native.sample, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(math_out.audio_sample, native.audio_sample, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_joint_generation_is_exact(offload_type):
    x = inputs()
    video, audio = build_pair(seed=4)
    with torch.no_grad():
        expected = video(**x, keyframe_indices=[0, 1], audio_transformer=audio)
    for model in (video, audio):
        model.enable_group_offload(
            onload_device=torch.device("cpu"), offload_device=torch.device("cpu"), offload_type=offload_type,
            num_blocks_per_group=1 if offload_type == "block_level" else None,
        )
    with torch.no_grad():
        got = video(**x, keyframe_indices=[0, 1], audio_transformer=audio)
    assert torch.equal(got.sample, expected.sample) and torch.equal(got.audio_sample, expected.audio_sample)


def test_compile_repeated_blocks_fullgraph():
    video, audio = build_pair(seed=5)
    x = inputs()
    with torch.no_grad():
        expected = video(**x, keyframe_indices=[0, 1], audio_transformer=audio)
    torch._dynamo.reset()
    for model in (video, audio):
        model.compile_repeated_blocks(fullgraph=True, backend="eager")
    assert all(block._compiled_call_impl is not None for model in (video, audio) for block in model.blocks)
    with torch.no_grad():
        got = video(**x, keyframe_indices=[0, 1], audio_transformer=audio)
    torch.testing.assert_close(got.sample, expected.sample)
    torch.testing.assert_close(got.audio_sample, expected.audio_sample)


def test_lora_adapter_changes_each_branch_and_zero_weight_restores_it():
    from peft import LoraConfig

    video, audio = build_pair(seed=6)
    x = inputs()
    run = lambda: video(**x, keyframe_indices=[0, 1], audio_transformer=audio)  # noqa: E731
    with torch.no_grad():
        base = run()
    for model, rank in ((video, 4), (audio, 2)):
        model.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                       init_lora_weights=False),
            adapter_name="style",
        )
    with torch.no_grad():
        adapted = run()
        scaled = video(**x, keyframe_indices=[0, 1], audio_transformer=audio, attention_kwargs={"scale": 0.0},
                       audio_attention_kwargs={"scale": 0.0})
        video_scaled = video(**x, keyframe_indices=[0, 1], audio_transformer=audio, attention_kwargs={"scale": 0.0})
    assert (adapted.sample - base.sample).abs().max() > 1e-3
    assert (adapted.audio_sample - base.audio_sample).abs().max() > 1e-3
    torch.testing.assert_close(scaled.sample, base.sample, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(scaled.audio_sample, base.audio_sample, atol=1e-6, rtol=1e-6)
    # Each branch has its own scale: scaling only the video LoRA leaves the audio LoRA active.
    assert (video_scaled.audio_sample - base.audio_sample).abs().max() > 1e-3
    for model in (video, audio):
        model.set_adapters("style", weights=0.0)
    with torch.no_grad():
        restored = run()
    torch.testing.assert_close(restored.sample, base.sample, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(restored.audio_sample, base.audio_sample, atol=1e-6, rtol=1e-6)


def test_first_block_cache_skips_blocks_on_similar_steps():
    from diffusers import FirstBlockCacheConfig

    video, audio = build_pair(seed=7)
    x = inputs()
    with torch.no_grad():
        expected = video(**x, keyframe_indices=[0, 1], audio_transformer=audio)
    video.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    calls = []
    handle = video.blocks[1].attn.register_forward_pre_hook(lambda *a: calls.append(1))
    with torch.no_grad(), video.cache_context("cond"):
        first = video(**x, keyframe_indices=[0, 1], audio_transformer=audio)
        second = video(**x, keyframe_indices=[0, 1], audio_transformer=audio)
    handle.remove()
    video.disable_cache()
    torch.testing.assert_close(first.sample, expected.sample)
    assert len(calls) == 1  # the tail block ran on the first step only
    torch.testing.assert_close(second.sample, expected.sample, atol=1e-5, rtol=1e-5)


# -- bad input ---------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(pair):
    video, audio = pair
    x = inputs()
    text = x["encoder_hidden_states"]
    cases = [
        (lambda: video(torch.randn(2, 8, 3, 4, 6), 1.0, text), "9 channels"),
        (lambda: video(torch.randn(2, 9, 3, 5, 6), 1.0, text), "not divisible by the patch size"),
        (lambda: video(x["hidden_states"], 1.0, text[:1]), "Batch sizes differ"),
        (lambda: video(x["hidden_states"], 1.0, torch.randn(2, 5, 7)), "text_embed_dim"),
        (lambda: video(x["hidden_states"], 1.0, text, encoder_attention_mask=torch.ones(2, 4)), "encoder_attention_mask"),
        (lambda: video(**video_only(x), reference_latents=torch.randn(2, 4, 1, 2, 2)), "padded to the latent size"),
        (lambda: video(**video_only(x), reference_latents=torch.randn(1, 4, 1, 4, 6)), "Batch sizes differ"),
        (lambda: video(**video_only(x), keyframe_hidden_states=x["keyframe_hidden_states"]), "keyframe_indices"),
        (lambda: video(**video_only(x), keyframe_hidden_states=x["keyframe_hidden_states"], keyframe_indices=[0, 3]),
         r"\[0, 2\]"),
        (lambda: video(**video_only(x), keyframe_hidden_states=x["keyframe_hidden_states"], keyframe_indices=[1, 1]),
         "must not repeat"),
        (lambda: video(**video_only(x), keyframe_hidden_states=torch.randn(2, 9, 2, 8, 6), keyframe_indices=[0, 1]),
         "scaled up by one factor"),
        (lambda: video(**video_only(x), keyframe_indices=[0]), "without `keyframe_hidden_states`"),
        (lambda: video(**video_only(x), audio_transformer=audio), "both `audio_transformer`"),
        (lambda: video(**video_only(x), audio_hidden_states=x["audio_hidden_states"]), "both `audio_transformer`"),
        (lambda: audio(x["audio_hidden_states"], 1.0, text), "num_video_frames"),
        (lambda: audio(torch.randn(2, 9, 4, 4), 1.0, text, num_video_frames=2), "3 dimensions"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_mismatched_branches_cannot_run_jointly():
    torch.manual_seed(0)
    video = SkyReelsV4Transformer.from_preset("tiny")
    deeper_audio = SkyReelsV4AudioTransformer.from_preset("tiny", num_single_stream_layers=2)
    uncoupled_audio = SkyReelsV4AudioTransformer.from_preset("tiny", cross_modal_attention=False)
    x = inputs()
    rescaled_audio = SkyReelsV4AudioTransformer.from_preset("tiny", cross_modal_rope_scale=4.0)
    for audio, message in ((deeper_audio, "number of blocks"), (uncoupled_audio, "cross_modal_attention=False"),
                           (rescaled_audio, "cross_modal_rope_scale: video 1.0 vs audio 4.0")):
        with pytest.raises(ValueError, match=message):
            video(**video_only(x), audio_transformer=audio, audio_hidden_states=x["audio_hidden_states"])


def test_config_errors():
    with pytest.raises(ValueError, match="2 \\* out_channels \\+ 1"):
        SkyReelsV4Transformer.from_preset("tiny", in_channels=8)
    with pytest.raises(ValueError, match="rope_axes_dim"):
        SkyReelsV4Transformer.from_preset("tiny", rope_axes_dim=(8, 4, 2))
    with pytest.raises(ValueError, match="`cross_modal_rope_scale` must be positive, got 0"):
        SkyReelsV4AudioTransformer.from_preset("tiny", cross_modal_rope_scale=0)
    with pytest.raises(ValueError, match="Unknown preset"):
        SkyReelsV4Transformer.from_preset("huge")
