"""`SkyReelsV4PromptEncoder` on tiny random Qwen2.5-VL and Qwen3-VL models (fixtures in `fixtures_qwen.py`)."""

import logging

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import Qwen2Tokenizer, Qwen2VLImageProcessorPil

from diffusers_skyreels.pipelines.skyreels_v4 import ENHANCER_SYSTEM_PROMPT, SkyReelsV4PromptEncoder
from diffusers_skyreels.pipelines.skyreels_v4.prompt_encoder import CHAT_TEMPLATE_SUFFIX
from diffusers_skyreels.utils import build_tiny_qwen_image_processor, build_tiny_qwen_vl, build_tiny_qwen_vl_model


def _image(seed: int, height: int = 24, width: int = 32) -> PIL.Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids


def _num_suffix_tokens(tokenizer) -> int:
    return len(tokenizer(CHAT_TEMPLATE_SUFFIX, add_special_tokens=False).input_ids)


def _num_image_tokens(image_processor, image) -> int:
    grid = image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
    return int(grid.prod()) // image_processor.merge_size**2


def _encode(encoder, prompt, **kwargs):
    embeds, mask, _, _ = encoder.encode_prompt(prompt, do_classifier_free_guidance=False, **kwargs)
    return embeds, mask


@pytest.fixture
def encoder(tiny_qwen_vl):
    return SkyReelsV4PromptEncoder(*tiny_qwen_vl)


def test_image_reference_changes_embeddings_after_it_and_mask_counts_content(encoder):
    tokenizer, image_processor = encoder.tokenizer, encoder.image_processor
    image_a, image_b = _image(0), _image(1)
    embeds_a, mask_a = _encode(encoder, "A cat @image_1 meows", images=[image_a])
    embeds_b, mask_b = _encode(encoder, "A cat @image_1 meows", images=[image_b])

    num_text_before = len(_ids(tokenizer, "A cat @image_1"))
    expected = (
        num_text_before
        + _num_image_tokens(image_processor, image_a)
        + 2  # <|vision_start|>, <|vision_end|>
        + len(_ids(tokenizer, " meows"))
        + _num_suffix_tokens(tokenizer)
    )
    assert mask_a.dtype == torch.long
    assert mask_a.tolist() == [[1] * expected] and torch.equal(mask_a, mask_b)
    assert embeds_a.shape == (1, expected, encoder.text_encoder.config.text_config.hidden_size)
    # Causal model: the text and <|vision_start|> before the image cannot see it; every position after does.
    first_image_token = num_text_before + 1
    torch.testing.assert_close(embeds_a[:, :first_image_token], embeds_b[:, :first_image_token], rtol=0, atol=0)
    assert (embeds_a[0, first_image_token:] - embeds_b[0, first_image_token:]).abs().amax(-1).min() > 1e-6


def test_dropped_prefix_is_the_tokenized_template(encoder):
    tokenizer = encoder.tokenizer
    prefix = encoder.template_prefix()
    assert prefix.startswith("<|im_start|>system\n" + encoder.system_prompt) and prefix.endswith("<|im_start|>user\n")
    assert encoder.num_prefix_tokens() == len(tokenizer(prefix, add_special_tokens=False).input_ids)
    assert encoder.num_prefix_tokens("Be brief.") == len(
        tokenizer(encoder.template_prefix("Be brief."), add_special_tokens=False).input_ids
    )
    assert encoder.num_prefix_tokens("Be brief.") < encoder.num_prefix_tokens()

    prompt = "A dog runs on the beach."
    inputs = encoder.prepare_inputs(prompt)
    count = inputs.num_prefix_tokens
    assert count == encoder.num_prefix_tokens()
    assert tokenizer.decode(inputs.input_ids[0, :count]) == prefix
    assert tokenizer.decode(inputs.input_ids[0, count:]) == prompt + CHAT_TEMPLATE_SUFFIX

    # The returned embeddings are the model's own post-norm states from that position on.
    with torch.no_grad():
        output = encoder.text_encoder(**inputs.to_model_kwargs(torch.device("cpu")), output_hidden_states=True)
    embeds, _ = _encode(encoder, prompt)
    torch.testing.assert_close(embeds, output.hidden_states[-1][:, count:], rtol=0, atol=0)


def test_hidden_state_choice(tiny_qwen_vl):
    model, tokenizer, image_processor = tiny_qwen_vl
    prompt, images = "A red car @image_1 drives by.", [_image(3)]
    encoded = {
        choice: _encode(
            SkyReelsV4PromptEncoder(model, tokenizer, image_processor, hidden_state=choice), prompt, images=images
        )[0]
        for choice in ("last", "last_pre_norm", -1, 0, 1)
    }
    default, _ = _encode(SkyReelsV4PromptEncoder(model, tokenizer, image_processor), prompt, images=images)
    torch.testing.assert_close(default, encoded["last"], rtol=0, atol=0)

    post, pre = encoded["last"], encoded["last_pre_norm"]
    final_norm = getattr(model, "model", model).language_model.norm
    with torch.no_grad():
        torch.testing.assert_close(post, final_norm(pre), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(post, pre, atol=1e-3)
    torch.testing.assert_close(encoded[-1], pre, rtol=0, atol=0)

    # Int indices follow transformers' `hidden_states` numbering (0 = embeddings, k = output of layer k).
    inputs = SkyReelsV4PromptEncoder(model, tokenizer, image_processor).prepare_inputs(prompt, images=images)
    with torch.no_grad():
        output = model(**inputs.to_model_kwargs(torch.device("cpu")), output_hidden_states=True)
    for index in (0, 1):
        expected = output.hidden_states[index][:, inputs.num_prefix_tokens :]
        torch.testing.assert_close(encoded[index], expected, rtol=0, atol=0)
    assert not torch.allclose(encoded[0], encoded[1], atol=1e-3)


@pytest.mark.parametrize("hidden_state", ["first", 3, -4, True])
def test_invalid_hidden_state(tiny_qwen2_5_vl, hidden_state):
    with pytest.raises(ValueError, match="hidden_state"):
        SkyReelsV4PromptEncoder(*tiny_qwen2_5_vl, hidden_state=hidden_state)


def test_batch_equals_single_calls(encoder):
    prompts = ["Rain.", "A woman @image_1 sings <singing>la la</singing> on a stage."]
    images = [[], [_image(5)]]  # one image list per prompt
    embeds, mask, negative_embeds, negative_mask = encoder.encode_prompt(
        prompts, negative_prompt="blurry", images=images
    )
    assert embeds.shape[0] == mask.shape[0] == 2
    for row, (prompt, row_images) in enumerate(zip(prompts, images, strict=True)):
        single, single_mask, single_negative, single_negative_mask = encoder.encode_prompt(
            prompt, negative_prompt="blurry", images=row_images
        )
        length = single.shape[1]
        assert mask[row].sum() == length and mask[row, :length].all()
        torch.testing.assert_close(embeds[row, :length], single[0], rtol=1e-5, atol=1e-5)
        assert (embeds[row, length:] == 0).all()
        negative_length = single_negative.shape[1]
        torch.testing.assert_close(negative_embeds[row, :negative_length], single_negative[0], rtol=1e-5, atol=1e-5)
        assert negative_mask[row].sum() == negative_length


def test_guidance_repeats_and_precomputed_embeds(tiny_qwen2_5_vl):
    encoder = SkyReelsV4PromptEncoder(*tiny_qwen2_5_vl)
    embeds, mask, negative, negative_mask = encoder.encode_prompt(
        ["a", "b c"], num_videos_per_prompt=2, dtype=torch.bfloat16, device="cpu"
    )
    assert embeds.shape[0] == negative.shape[0] == 4 and embeds.dtype == negative.dtype == torch.bfloat16
    assert mask.dtype == negative_mask.dtype == torch.long
    torch.testing.assert_close(embeds[0], embeds[1], rtol=0, atol=0)  # repeat_interleave: a, a, b c, b c
    assert not torch.equal(embeds[1], embeds[2])
    default_negative = encoder.encode_prompt("x", negative_prompt="")[2]
    torch.testing.assert_close(negative[0:1].float(), default_negative, rtol=1e-2, atol=1e-2)  # default negative is ""

    assert encoder.encode_prompt("a", do_classifier_free_guidance=False)[2:] == (None, None)

    given = torch.randn(2, 5, 32)
    given_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out, out_mask, out_negative, out_negative_mask = encoder.encode_prompt(
        None,
        prompt_embeds=given,
        prompt_attention_mask=given_mask,
        negative_prompt_embeds=-given,
        negative_prompt_attention_mask=given_mask,
        num_videos_per_prompt=3,
    )
    torch.testing.assert_close(out, given.repeat_interleave(3, dim=0), rtol=0, atol=0)
    torch.testing.assert_close(out_negative, -given.repeat_interleave(3, dim=0), rtol=0, atol=0)
    assert torch.equal(out_mask, given_mask.repeat_interleave(3, dim=0)) and torch.equal(out_negative_mask, out_mask)

    # Precomputed positive embeddings with a text negative prompt: the negative batch follows the embeddings.
    _, _, text_negative, _ = encoder.encode_prompt(None, prompt_embeds=given, prompt_attention_mask=given_mask)
    assert text_negative.shape[0] == 2


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_save_load_round_trip(tmp_path, family, request):
    model, tokenizer, image_processor = request.getfixturevalue(f"tiny_{family}")
    model.save_pretrained(tmp_path / "text_encoder")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    image_processor.save_pretrained(tmp_path / "image_processor")
    assert (tmp_path / "text_encoder" / "model.safetensors").is_file()

    reloaded = SkyReelsV4PromptEncoder(
        type(model).from_pretrained(tmp_path / "text_encoder").eval(),
        Qwen2Tokenizer.from_pretrained(tmp_path / "tokenizer"),
        Qwen2VLImageProcessorPil.from_pretrained(tmp_path / "image_processor"),
    )
    encoder = SkyReelsV4PromptEncoder(model, tokenizer, image_processor)
    prompt, images = "@Actor-0 waves <dialogue>Actor-0: hi</dialogue>", [_image(7)]
    for expected, actual in zip(
        encoder.encode_prompt(prompt, images=images), reloaded.encode_prompt(prompt, images=images), strict=True
    ):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_structured_tags_pass_through(tiny_qwen2_5_vl):
    encoder = SkyReelsV4PromptEncoder(*tiny_qwen2_5_vl)
    tokenizer = encoder.tokenizer
    prompt = (
        "A chef cooks @Audio-0 <dialogue>Chef: Dinner is ready!</dialogue> <sfx>sizzling pan</sfx> "
        "<bgm>soft jazz</bgm> <singing>la la</singing> <text>OPEN</text> @audio_1 and <|im_end|>"
    )
    inputs = encoder.prepare_inputs(prompt)
    content = inputs.input_ids[0, inputs.num_prefix_tokens :].tolist()
    content = content[: len(content) - _num_suffix_tokens(tokenizer)]
    assert tokenizer.decode(content) == prompt
    special_ids = set(tokenizer.all_special_ids)
    assert not special_ids.intersection(content)  # tags, audio references and even "<|im_end|>" stay plain text
    assert inputs.pixel_values is None


def test_truncation_warns_and_keeps_vision_blocks_whole(tiny_qwen2_5_vl, caplog):
    encoder = SkyReelsV4PromptEncoder(*tiny_qwen2_5_vl)
    tokenizer, image_processor = encoder.tokenizer, encoder.image_processor
    image = _image(9)
    num_suffix = _num_suffix_tokens(tokenizer)
    text = "A long prompt about a quiet forest"
    num_image = _num_image_tokens(image_processor, image) + 2

    with caplog.at_level(logging.WARNING):
        embeds, mask = _encode(encoder, text, max_sequence_length=num_suffix + 10)
    assert "truncated" in caplog.text and "max_sequence_length" in caplog.text
    assert embeds.shape[1] == mask.shape[1] == num_suffix + 10

    caplog.clear()
    # The budget ends inside the image block: the block is dropped whole, no orphan pad tokens remain.
    budget = len(_ids(tokenizer, "Go @image_1")) + num_image - 1
    inputs = encoder.prepare_inputs("Go @image_1 now", images=[image], max_sequence_length=budget + num_suffix)
    assert "dropped 1 image/frame block" in caplog.text
    assert inputs.pixel_values is None and not (inputs.input_ids == encoder.text_encoder.config.image_token_id).any()
    caplog.clear()
    # A budget that fits the block keeps it and cuts the text after it.
    inputs = encoder.prepare_inputs("Go @image_1 now", images=[image], max_sequence_length=budget + 1 + num_suffix)
    assert inputs.image_grid_thw.shape == (1, 3) and "truncated" in caplog.text

    caplog.clear()
    _encode(encoder, text)
    assert "truncated" not in caplog.text


def test_reference_mapping_videos_and_input_types(tiny_qwen2_5_vl):
    encoder = SkyReelsV4PromptEncoder(*tiny_qwen2_5_vl, max_video_frames=4)
    tokenizer = encoder.tokenizer
    start = tokenizer.convert_tokens_to_ids("<|vision_start|>")

    def blocks(inputs):
        return int((inputs.input_ids == start).sum())

    face, room = _image(1), _image(2, 16, 16)
    # @Actor-0 and @image_1 are the same picture: inserted once, at its first tag.
    inputs = encoder.prepare_inputs("@Actor-0 enters; @image_1 smiles in @image_2.", images=[face, room])
    assert blocks(inputs) == 2
    decoded = tokenizer.decode(inputs.input_ids[0, inputs.num_prefix_tokens :])
    assert decoded.startswith("@Actor-0<|vision_start|>") and "@image_1 smiles in @image_2<|vision_start|>" in decoded

    # Unreferenced visuals go in front of the text.
    decoded = tokenizer.decode(encoder.prepare_inputs("A room.", images=[room]).input_ids[0])
    assert "user\n<|vision_start|>" in decoded and decoded.count("<|vision_start|>") == 1

    # A dict maps tags to images by name.
    by_name = encoder.prepare_inputs("@Actor-1 meets @Actor-0", images={"@Actor-0": face, "Actor-1": room})
    by_list = encoder.prepare_inputs("@Actor-1 meets @Actor-0", images=[face, room])
    assert torch.equal(by_name.input_ids, by_list.input_ids) and torch.equal(
        by_name.pixel_values, by_list.pixel_values
    )

    # A video is inserted as up to `max_video_frames` uniformly sampled frames.
    video = np.random.RandomState(0).rand(12, 16, 16, 3)
    inputs = encoder.prepare_inputs("Watch @video_1", videos=[video])
    assert blocks(inputs) == 4 and inputs.image_grid_thw.shape == (4, 3)
    frames = [PIL.Image.fromarray((frame * 255).round().astype(np.uint8)) for frame in video[[0, 4, 7, 11]]]
    as_frames = encoder.prepare_inputs("Watch @video_1", videos=[frames])
    assert torch.equal(as_frames.pixel_values, inputs.pixel_values)

    # PIL, uint8 HWC arrays and float CHW tensors in [0, 1] of the same picture encode identically.
    array = np.array(face)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    reference = _encode(encoder, "@image_1", images=[face])[0]
    for same in (array, tensor):
        torch.testing.assert_close(_encode(encoder, "@image_1", images=[same])[0], reference, rtol=0, atol=0)


def test_enhance_prompt_is_seeded_and_uses_the_instruction(tiny_qwen2_5_vl, monkeypatch):
    encoder = SkyReelsV4PromptEncoder(*tiny_qwen2_5_vl)
    seen = []
    generate = encoder.text_encoder.generate

    def spy(**kwargs):
        seen.append(encoder.tokenizer.decode(kwargs["input_ids"][0]))
        return generate(**kwargs)

    monkeypatch.setattr(encoder.text_encoder, "generate", spy)
    state = torch.get_rng_state()
    first = encoder.enhance_prompt("a cat on a roof @image_1", images=[_image(4)], seed=3, max_new_tokens=12)
    again = encoder.enhance_prompt("a cat on a roof @image_1", images=[_image(4)], seed=3, max_new_tokens=12)
    other = encoder.enhance_prompt("a cat on a roof @image_1", images=[_image(4)], seed=4, max_new_tokens=12)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert isinstance(first, str) and first and first == again and first != other
    assert ENHANCER_SYSTEM_PROMPT in seen[0] and "a cat on a roof @image_1<|vision_start|>" in seen[0]
    assert isinstance(encoder.enhance_prompt(["a", "b"], max_new_tokens=2), list)


def _bad_input_cases(tmp_path):
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    embeds, mask = torch.zeros(1, 3, 32), torch.ones(1, 3, dtype=torch.long)
    return [
        ({"prompt": "@image_3 waves", "images": [_image(0), _image(1)]}, r"references @image_3, but 2 image"),
        ({"prompt": "@Actor-2 waves", "images": [_image(0), _image(1)]}, r"references @Actor-2"),
        ({"prompt": "@image_1 waves"}, r"references @image_1, but 0 image"),
        ({"prompt": "see @video_1"}, r"references @video_1, but 0 video"),
        ({"prompt": "@Actor-0 waves", "images": {"@image_1": _image(0)}}, r"not a key of the images dict"),
        ({"prompt": "@image_1", "images": [str(not_an_image)]}, r"Cannot decode @image_1 of prompt 0 .*notes\.txt"),
        ({"prompt": "@image_1", "images": [b"not an image"]}, r"Cannot decode @image_1 of prompt 0 \(bytes\)"),
        ({"prompt": "@image_1", "images": [np.zeros((8, 8, 7), np.uint8)]}, r"image array must be \[H, W, C\]"),
        ({"prompt": "@image_1", "images": [torch.zeros(5, 8, 8)]}, r"image tensor must be \[C, H, W\]"),
        ({"prompt": "@image_1", "images": [np.full((8, 8, 3), 2.0)]}, r"float images must be in \[0, 1\]"),
        ({"prompt": "@video_1", "videos": [[_image(0), "missing.png"]]}, r"frame 1 of @video_1 of prompt 0"),
        ({"prompt": ""}, r"`prompt`\[0\] is empty"),
        ({"prompt": ["ok", "   "]}, r"`prompt`\[1\] is empty"),
        ({"prompt": []}, r"non-empty list"),
        ({"prompt": ["a", "b"], "negative_prompt": ["x", "y", "z"]}, r"`negative_prompt` has 3 entries"),
        ({"prompt": ["a", "b"], "images": [[_image(0)], [], []]}, r"3 per-prompt lists, but there are 2 prompts"),
        ({"prompt": "a", "prompt_embeds": embeds, "prompt_attention_mask": mask}, r"exactly one of `prompt`"),
        ({"prompt": None}, r"exactly one of `prompt`"),
        ({"prompt": None, "prompt_embeds": embeds}, r"needs `prompt_attention_mask`"),
        (
            {"prompt": "a", "negative_prompt_embeds": embeds},
            r"`negative_prompt_embeds` needs `negative_prompt_attention_mask`",
        ),
        ({"prompt": None, "prompt_embeds": embeds, "prompt_attention_mask": mask[:, :2]}, r"must have shape"),
        ({"prompt": None, "prompt_embeds": torch.zeros(1, 3, 8), "prompt_attention_mask": mask}, r"hidden size 8"),
        ({"prompt": "a", "num_videos_per_prompt": 0}, r"`num_videos_per_prompt` must be at least 1"),
        ({"prompt": "a", "max_sequence_length": 3}, r"`max_sequence_length` must exceed"),
    ]


def test_bad_inputs_raise_before_the_model_runs(tiny_qwen2_5_vl, tmp_path):
    encoder = SkyReelsV4PromptEncoder(*tiny_qwen2_5_vl)
    calls = []
    handle = encoder.text_encoder.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        for kwargs, message in _bad_input_cases(tmp_path):
            with pytest.raises(ValueError, match=message):
                encoder.encode_prompt(**kwargs)
    finally:
        handle.remove()
    assert calls == []


def test_mismatched_components_are_rejected(tiny_qwen2_5_vl):
    model, tokenizer, _ = tiny_qwen2_5_vl
    with pytest.raises(ValueError, match="patch_size"):
        SkyReelsV4PromptEncoder(model, tokenizer, Qwen2VLImageProcessorPil(patch_size=14))
    no_text_encoder = SkyReelsV4PromptEncoder(None, tokenizer, None)
    with pytest.raises(ValueError, match="No text encoder"):
        no_text_encoder.encode_prompt("a")
    with pytest.raises(ValueError, match="generation head"):
        SkyReelsV4PromptEncoder(model.model, tokenizer, None).enhance_prompt("a")


def test_tiny_builders_are_seeded_and_sized():
    state = torch.get_rng_state()
    first, second, other = (build_tiny_qwen_vl_model("qwen3_vl", seed=seed) for seed in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), state)
    first_state, second_state, other_state = first.state_dict(), second.state_dict(), other.state_dict()
    assert all(torch.equal(first_state[key], second_state[key]) for key in first_state)
    assert not all(torch.equal(first_state[key], other_state[key]) for key in first_state)
    assert sum(parameter.numel() for parameter in first.parameters()) < 100_000

    model, tokenizer, image_processor = build_tiny_qwen_vl("qwen2_5_vl", hidden_size=64)
    assert model.config.text_config.hidden_size == 64
    embeds, _ = _encode(SkyReelsV4PromptEncoder(model, tokenizer, image_processor), "@image_1", images=[_image(0)])
    assert embeds.shape[-1] == 64
    assert image_processor.to_dict() == build_tiny_qwen_image_processor().to_dict()
    with pytest.raises(ValueError, match="family"):
        build_tiny_qwen_vl_model("llava")
