"""The task pipelines end to end with tiny components: shapes, conditions reaching the model, serialization,
batching, callbacks, offloading, export and bad inputs."""

import json

import av
import numpy as np
import pytest
import torch
from diffusers import AutoencoderOobleck, DiffusionPipeline
from fixtures_pipeline import TINY_CALL, build_tiny_components

import diffusers_skyreels as ds
from diffusers_skyreels.utils.media_io import export_to_video_with_audio, load_video

SIZE = {k: v for k, v in TINY_CALL.items() if k not in ("num_frames", "height", "width")}
PROMPT = "A red ball bounces quickly between the walls. <sfx>a ping at every bounce</sfx>"


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def make(cls=ds.SkyReelsV4Pipeline, components=None, **overrides):
    pipe = cls(**{**(components or build_tiny_components()), **overrides})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(tiny_components):
    return make(components=tiny_components)


def capture_transformer_inputs(pipe):
    """Record the kwargs of every transformer call."""
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(k), with_kwargs=True)
    return calls, handle


def mask_channel_frames(hidden_states, channels=4):
    """Latent frames whose mask channel is 1 (the last of the 2C + 1 input channels)."""
    mask = hidden_states[0, 2 * channels]
    return [j for j in range(mask.shape[0]) if bool(mask[j].all())]


# -- text to video + audio -------------------------------------------------------------------------------------------


def test_t2va_shapes_and_durations(pipe):
    out = pipe(PROMPT, negative_prompt="blurry", generator=gen(), **TINY_CALL)
    assert out.frames.shape == (1, 9, 32, 32, 3)
    assert 0 <= out.frames.min() and out.frames.max() <= 1
    assert out.audio.shape == (1, 9000) and out.audio.dtype == np.float32
    assert out.audio_sample_rate == 16000 and out.fps == 16.0
    assert np.abs(out.audio).max() <= 1
    # duration_seconds is rounded to 4k + 1 frames and the audio spans exactly num_frames / fps.
    out = pipe(PROMPT, duration_seconds=0.7, height=32, width=48, **SIZE)
    assert out.frames.shape == (1, 13, 32, 48, 3) and out.audio.shape == (1, 13000)


def test_video_only_and_audio_only(pipe):
    video_only = pipe(PROMPT, generate_audio=False, generator=gen(), **TINY_CALL)
    assert video_only.audio is None and video_only.audio_sample_rate is None
    audio_only = pipe(PROMPT, generate_video=False, generator=gen(), **TINY_CALL)
    assert audio_only.frames is None and audio_only.audio.shape == (1, 9000)
    joint = pipe(PROMPT, generator=gen(), **TINY_CALL)
    # The coupled branches see each other: joint output differs from either branch alone.
    assert np.abs(joint.frames - video_only.frames).max() > 1e-4
    assert np.abs(joint.audio - audio_only.audio).max() > 1e-5


def test_pipeline_without_audio_components_makes_video(tiny_components):
    components = {**tiny_components, "audio_transformer": None, "audio_vae": None, "vocoder": None}
    pipe = make(components=components)
    out = pipe(PROMPT, generate_audio=False, **TINY_CALL)
    assert out.frames.shape == (1, 9, 32, 32, 3) and out.audio is None
    with pytest.raises(ValueError, match="audio_transformer"):
        pipe(PROMPT, **TINY_CALL)


def test_waveform_vae_without_vocoder(tiny_components):
    oobleck = AutoencoderOobleck(
        encoder_hidden_size=8, downsampling_ratios=[2, 4, 8], channel_multiples=[1, 2, 2], decoder_channels=8,
        decoder_input_channels=4, audio_channels=1, sampling_rate=16000,
    ).eval()
    pipe = make(components={**tiny_components, "audio_vae": oobleck, "vocoder": None})
    out = pipe(PROMPT, **TINY_CALL)
    assert out.audio.shape == (1, 9000) and out.audio_sample_rate == 16000
    timing = pipe.clip_timing(16.0, num_frames=9)
    assert timing.num_audio_latents == 9000 // 64


def test_save_load_through_diffusion_pipeline(tmp_path, pipe):
    expected = pipe(PROMPT, negative_prompt="noise", generator=gen(3), **TINY_CALL)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "SkyReelsV4Pipeline"
    assert index["transformer"] == ["diffusers_skyreels", "SkyReelsV4Transformer"]
    assert index["audio_transformer"] == ["diffusers_skyreels", "SkyReelsV4AudioTransformer"]
    assert not list(tmp_path.rglob("*.bin")) and list(tmp_path.rglob("*.safetensors"))
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, ds.SkyReelsV4Pipeline)
    got = loaded(PROMPT, negative_prompt="noise", generator=gen(3), **TINY_CALL)
    np.testing.assert_array_equal(got.frames, expected.frames)
    np.testing.assert_array_equal(got.audio, expected.audio)


def test_batch_matches_single_calls(pipe):
    prompts = ["A red ball bounces slowly.", "A yellow square bounces quickly between the walls of a dark room."]
    batch = pipe(prompts, negative_prompt="x", generator=[gen(1), gen(2)], **TINY_CALL)
    for i, prompt in enumerate(prompts):
        single = pipe(prompt, negative_prompt="x", generator=gen(i + 1), **TINY_CALL)
        np.testing.assert_allclose(batch.frames[i], single.frames[0], atol=2e-4)
        np.testing.assert_allclose(batch.audio[i], single.audio[0], atol=2e-4)


def test_num_videos_per_prompt_and_output_types(pipe):
    out = pipe(["a", "b"], num_videos_per_prompt=2, output_type="pt", **TINY_CALL)
    assert out.frames.shape == (4, 9, 3, 32, 32) and isinstance(out.audio, torch.Tensor) and out.audio.shape == (4, 9000)
    pil = pipe("a", output_type="pil", **TINY_CALL)
    assert len(pil.frames) == 1 and len(pil.frames[0]) == 9 and pil.frames[0][0].size == (32, 32)
    latent = pipe("a", output_type="latent", **TINY_CALL)
    assert latent.frames.shape == (1, 4, 3, 4, 4) and latent.audio.shape == (1, 4, 35)
    frames, audio, rate, fps = pipe("a", return_dict=False, **TINY_CALL)
    assert frames.shape == (1, 9, 32, 32, 3) and audio.shape == (1, 9000) and rate == 16000 and fps == 16.0


def test_callback_sees_listed_tensors_and_can_zero_latents(pipe):
    seen = []

    def callback(p, step, timestep, tensors):
        seen.append(sorted(tensors))
        if step == p.num_timesteps - 1:
            return {"latents": torch.zeros_like(tensors["latents"]), "audio_latents": torch.zeros_like(tensors["audio_latents"])}
        return {}

    out = pipe(
        PROMPT, output_type="latent", callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "audio_latents"], **TINY_CALL,
    )
    assert seen == [["audio_latents", "latents"]] * 2
    assert not out.frames.any() and not out.audio.any()


def test_encode_prompt_in_isolation(pipe):
    embeds, mask, negative, negative_mask = pipe.encode_prompt(["a ball", "a red square"], negative_prompt="bad")
    assert embeds.shape[0] == 2 and embeds.shape[2] == 32 and mask.shape == embeds.shape[:2]
    assert negative.shape[0] == 2 and negative_mask.shape == negative.shape[:2]
    assert mask[0].sum() < mask[1].sum()


def test_bf16_transformers_give_finite_output(tiny_components):
    components = dict(tiny_components)
    pipe = make(components=components)
    pipe.transformer.to(torch.bfloat16)
    pipe.audio_transformer.to(torch.bfloat16)
    try:
        out = pipe(PROMPT, negative_prompt="bad", **TINY_CALL)
    finally:
        pipe.transformer.to(torch.float32)
        pipe.audio_transformer.to(torch.float32)
    assert np.isfinite(out.frames).all() and np.isfinite(out.audio).all()


def test_model_cpu_offload_matches_and_releases_the_audio_branch():
    pipe = make()
    expected = pipe(PROMPT, generator=gen(5), **TINY_CALL)
    pipe.enable_model_cpu_offload(device="cpu")
    audio_hooks = [h for h in pipe._all_hooks if h.model is pipe.audio_transformer]
    assert len(audio_hooks) == 1 and audio_hooks[0].hook.prev_module_hook is None  # not chained after the video branch
    offloads = []
    original = audio_hooks[0].offload
    audio_hooks[0].offload = lambda: (offloads.append(1), original())
    got = pipe(PROMPT, generator=gen(5), **TINY_CALL)
    assert offloads, "the audio branch was not released after denoising"
    np.testing.assert_allclose(got.frames, expected.frames, atol=1e-6)
    np.testing.assert_allclose(got.audio, expected.audio, atol=1e-6)


def test_group_offload_matches():
    pipe = make()
    expected = pipe(PROMPT, generator=gen(6), **TINY_CALL)
    pipe.enable_group_offload(
        onload_device=torch.device("cpu"), offload_device=torch.device("cpu"), offload_type="block_level",
        num_blocks_per_group=1,
    )
    got = pipe(PROMPT, generator=gen(6), **TINY_CALL)
    np.testing.assert_allclose(got.frames, expected.frames, atol=1e-6)
    np.testing.assert_allclose(got.audio, expected.audio, atol=1e-6)


def test_references_change_the_output_not_its_shape(pipe):
    image = np.random.default_rng(0).random((20, 40, 3)).astype(np.float32)
    base = pipe("a ball bounces", generator=gen(), **TINY_CALL)
    calls, handle = capture_transformer_inputs(pipe)
    with_refs = pipe(
        "a ball bounces", reference_images=[image], reference_audio=[np.sin(np.arange(3000) / 5.0) * 0.3],
        generator=gen(), **TINY_CALL,
    )
    handle.remove()
    # [uncond ; cond] halves of classifier-free guidance, each with the shared references.
    assert calls[0]["reference_latents"].shape == (2, 4, 1, 4, 4)
    assert calls[0]["audio_reference_latents"].shape == (2, 4, 3000 // 256)
    assert with_refs.frames.shape == base.frames.shape and with_refs.audio.shape == base.audio.shape
    assert np.abs(with_refs.frames - base.frames).max() > 1e-4


# -- task pipelines ----------------------------------------------------------------------------------------------


def test_image_to_video_conditions(pipe):
    i2v = ds.SkyReelsV4ImageToVideoPipeline.from_pipe(pipe)
    assert i2v.transformer is pipe.transformer
    image = np.random.default_rng(1).random((32, 32, 3)).astype(np.float32)
    calls, handle = capture_transformer_inputs(i2v)
    out = i2v(image, PROMPT, **TINY_CALL)
    first_only = mask_channel_frames(calls[-1]["hidden_states"])
    i2v(image, PROMPT, last_image=image[::-1].copy(), **TINY_CALL)
    first_last = mask_channel_frames(calls[-1]["hidden_states"])
    i2v(image, PROMPT, keyframe_images=[image], keyframe_times=[0.25], num_frames=17, **SIZE, height=32, width=32)
    keyframe = mask_channel_frames(calls[-1]["hidden_states"])
    handle.remove()
    assert out.frames.shape == (1, 9, 32, 32, 3) and out.audio.shape == (1, 9000)
    assert first_only == [0] and first_last == [0, 2] and keyframe == [0, 1]


def test_condition_noise_loosens_the_condition(pipe):
    i2v = ds.SkyReelsV4ImageToVideoPipeline.from_pipe(pipe)
    image = np.random.default_rng(1).random((32, 32, 3)).astype(np.float32)
    calls, handle = capture_transformer_inputs(i2v)
    i2v(image, PROMPT, generator=gen(), **TINY_CALL)
    i2v(image, PROMPT, condition_noise=0.5, generator=gen(), **TINY_CALL)
    handle.remove()
    exact, noisy = calls[0]["hidden_states"][:, 4:8], calls[-1]["hidden_states"][:, 4:8]
    assert 0.3 < (noisy - exact).std() < 0.7


def test_video_extension_from_frames_and_latents(pipe):
    extend = ds.SkyReelsV4VideoExtensionPipeline.from_pipe(pipe)
    clip = np.random.default_rng(2).random((5, 32, 32, 3)).astype(np.float32)
    calls, handle = capture_transformer_inputs(extend)
    audio_calls = []
    audio_handle = extend.audio_transformer.register_forward_pre_hook(
        lambda m, a, k: audio_calls.append(a[0] if a else k["hidden_states"]), with_kwargs=True
    )
    out = extend(clip, PROMPT, audio=np.ones(5000, np.float32) * 0.1, extension_seconds=0.5, **SIZE)
    given_frames = mask_channel_frames(calls[-1]["hidden_states"])
    audio_mask = audio_calls[-1][0, 8]
    latents = pipe(PROMPT, output_type="latent", generate_audio=False, **TINY_CALL).frames
    from_latents = extend(video_latents=latents, prompt=PROMPT, extension_seconds=0.5, **SIZE)
    latent_given = mask_channel_frames(calls[-1]["hidden_states"])
    handle.remove()
    audio_handle.remove()
    # 5 given frames + 8 new -> 13 frames (4 latent frames); frames 0..4 give latent frames 0 and 1.
    assert out.frames.shape == (1, 13, 32, 32, 3) and out.audio.shape == (1, 13000)
    assert given_frames == [0, 1]
    assert audio_mask.tolist() == [1.0] * (5000 // 256) + [0.0] * (13000 // 256 - 5000 // 256)
    assert from_latents.frames.shape == (1, 17, 32, 32, 3) and latent_given == [0, 1, 2]


def test_video_edit_uses_the_source_as_reference_and_keeps_audio(pipe):
    edit = ds.SkyReelsV4VideoEditPipeline.from_pipe(pipe)
    clip = np.random.default_rng(3).random((9, 32, 32, 3)).astype(np.float32)
    soundtrack = np.sin(np.arange(9000) / 9.0).astype(np.float32) * 0.4
    calls, handle = capture_transformer_inputs(edit)
    kept = edit(clip, "Make @video_1 darker", audio=soundtrack, keep_audio=True, **SIZE)
    preserve = np.zeros((32, 32), np.float32)
    preserve[:16] = 1
    edit(clip, "Make @video_1 darker", preserve_mask=preserve, **SIZE)
    handle.remove()
    assert calls[0]["reference_latents"].shape == (2, 4, 3, 4, 4)  # the 3 latent frames of the source, x CFG
    np.testing.assert_array_equal(kept.audio[0], soundtrack)
    mask = calls[-1]["hidden_states"][0, 8]
    assert mask[:, :2].eq(1).all() and mask[:, 2:].eq(0).all()


def test_inpaint_mask_and_reference(pipe):
    inpaint = ds.SkyReelsV4InpaintPipeline.from_pipe(pipe)
    clip = np.random.default_rng(4).random((9, 32, 32, 3)).astype(np.float32)
    region = np.zeros((32, 32), np.float32)
    region[8:24, 8:24] = 1
    calls, handle = capture_transformer_inputs(inpaint)
    out = inpaint(clip, region, "@image_1 in the middle", reference_image=clip[0], **SIZE)
    handle.remove()
    mask = calls[0]["hidden_states"][0, 8]
    expected = torch.ones(3, 4, 4)
    expected[:, 1:3, 1:3] = 0  # latent blocks touched by the region are regenerated
    assert torch.equal(mask, expected)
    assert calls[0]["reference_latents"].shape == (2, 4, 1, 4, 4)
    assert out.frames.shape == (1, 9, 32, 32, 3) and out.audio.shape == (1, 9000)


def test_exported_clip_has_one_video_and_one_audio_stream(tmp_path, pipe):
    out = pipe(PROMPT, num_frames=17, height=32, width=32, **SIZE)
    path = export_to_video_with_audio(
        out.frames[0], tmp_path / "clip.mp4", fps=out.fps, audio=out.audio[0], audio_sample_rate=out.audio_sample_rate
    )
    with av.open(str(path)) as container:
        assert len(container.streams.video) == 1 and len(container.streams.audio) == 1
        duration = float(container.streams.audio[0].duration * container.streams.audio[0].time_base)
    clip = load_video(path)
    assert clip.frames.shape == (17, 32, 32, 3) and clip.fps == 16
    assert clip.audio.shape == (17000,) and clip.audio_sample_rate == 16000
    assert abs(duration - 17 / 16) < 0.005


# -- bad input -------------------------------------------------------------------------------------------------------


def test_bad_inputs_fail_before_any_model_runs(pipe):
    i2v = ds.SkyReelsV4ImageToVideoPipeline.from_pipe(pipe)
    extend = ds.SkyReelsV4VideoExtensionPipeline.from_pipe(pipe)
    inpaint = ds.SkyReelsV4InpaintPipeline.from_pipe(pipe)
    image = np.zeros((32, 32, 3), np.float32)
    clip = np.zeros((9, 32, 32, 3), np.float32)
    runs = []
    handles = [m.register_forward_pre_hook(lambda *a: runs.append(1)) for m in (pipe.transformer, pipe.text_encoder)]
    cases = [
        (lambda: pipe(PROMPT, height=40, width=32, num_frames=9), "multiples of 16"),
        (lambda: pipe(PROMPT, height=32, width=32, num_frames=10), "4k \\+ 1"),
        (lambda: pipe(PROMPT, height=32, width=32, duration_seconds=16.0), "15 s"),
        (lambda: pipe(PROMPT, guidance_scale=0.5, **TINY_CALL), "guidance_scale"),
        (lambda: pipe(PROMPT, guidance_scale=1, audio_guidance_scale=1, negative_prompt="x", **TINY_CALL),
         "negative prompt"),
        (lambda: pipe(PROMPT, output_type="mp4", **TINY_CALL), "output_type"),
        (lambda: pipe(PROMPT, callback_on_step_end_tensor_inputs=["noise"], **TINY_CALL), "noise"),
        (lambda: pipe(PROMPT, generate_video=False, generate_audio=False, **TINY_CALL), "Nothing to generate"),
        (lambda: pipe(PROMPT, latents=torch.zeros(1, 4, 3, 4, 5), **TINY_CALL), "`latents` must have shape"),
        (lambda: pipe(PROMPT, audio_latents=torch.full((1, 4, 35), float("nan")), **TINY_CALL), "NaN"),
        (lambda: pipe(None, **TINY_CALL), "prompt"),
        (lambda: pipe(PROMPT, reference_audio=[np.zeros(10)], **TINY_CALL), "shorter than one audio latent"),
        (lambda: i2v(np.zeros((16, 16, 3)), PROMPT, **TINY_CALL), "resize_mode"),
        (lambda: i2v(image, PROMPT, keyframe_images=[image], keyframe_times=[0.9], **TINY_CALL), "outside the clip"),
        (lambda: i2v(image, PROMPT, keyframe_images=[image], keyframe_times=[0.0], **TINY_CALL), "already"),
        (lambda: i2v(image, PROMPT, keyframe_images=[image], **TINY_CALL), "go together"),
        (lambda: extend([], PROMPT, **SIZE), "empty"),
        (lambda: extend(clip, PROMPT, extension_seconds=0, **SIZE), "extension_seconds"),
        (lambda: inpaint(clip, np.zeros((16, 16)), PROMPT, **SIZE), "must match the video"),
        (lambda: inpaint(clip[:8], np.zeros((32, 32)), PROMPT, **SIZE), "4k \\+ 1"),
        (lambda: inpaint(clip, np.zeros((32, 32)), PROMPT, keep_audio=True, **SIZE), "needs the clip's `audio`"),
        (lambda: inpaint(clip, np.zeros((32, 32)), PROMPT, audio=np.zeros(9000), **SIZE), "reference_audio"),
    ]
    try:
        for call, message in cases:
            with pytest.raises(ValueError, match=message):
                call()
    finally:
        for handle in handles:
            handle.remove()
    assert not runs
