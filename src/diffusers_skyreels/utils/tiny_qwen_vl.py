"""Tiny, randomly initialised Qwen-VL text encoders, built offline in code.

Tests and the shipped demo recipe need a real `transformers` Qwen-VL model (same classes, same chat tokens, same
vision-token bookkeeping as `Qwen/Qwen2.5-VL-7B-Instruct`) but cannot download one. These builders make a
tens-of-thousands-parameter Qwen2.5-VL or Qwen3-VL, an in-memory byte-level BPE tokenizer with the Qwen chat and
vision special tokens, and the PIL-backed image processor (no torchvision needed). All three save and load with the
standard `save_pretrained` / `from_pretrained` of their `transformers` classes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

QwenVLFamily = Literal["qwen2_5_vl", "qwen3_vl"]
TINY_QWEN_VL_FAMILIES: tuple[str, ...] = ("qwen2_5_vl", "qwen3_vl")

# The special tokens of the Qwen chat format and of its vision input, as in the real Qwen2.5-VL / Qwen3-VL vocabulary.
PAD_TOKEN = "<|endoftext|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# A few merges so that the tokenizer exercises real BPE merging; everything else is tokenized byte by byte.
_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ġ", "s")]

# Vision geometry of the tiny models: 4-pixel patches merged 2x2, so one vision token covers 8x8 pixels.
_PATCH_SIZE = 4
_MERGE_SIZE = 2
_TEMPORAL_PATCH_SIZE = 2
_MIN_PIXELS = 16 * 16
_MAX_PIXELS = 32 * 32

_HEAD_DIM = 8
_MROPE_SECTION = [2, 1, 1]  # sums to _HEAD_DIM // 2 (temporal, height, width rotary frequencies)


def learn_merges(corpus: Iterable[str], vocab_size: int) -> list[tuple[str, str]]:
    """BPE merges learned in memory from `corpus` (byte-level, up to `vocab_size` symbols), deterministic.

    A tokenizer with merges for its domain turns a prompt into a few tokens instead of one per character.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=ByteLevel.alphabet(), show_progress=False, special_tokens=[]
    )
    tokenizer.train_from_iterator(list(corpus), trainer)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def build_tiny_qwen_tokenizer(merges: Sequence[tuple[str, str]] | None = None) -> Qwen2Tokenizer:
    """A byte-level BPE `Qwen2Tokenizer` over the 256 byte symbols, `merges` (default: a few) and the Qwen special
    tokens.

    Like the real Qwen-VL tokenizers, `<|im_end|>` is the end-of-sequence token and `<|endoftext|>` pads.
    """
    merges = list(_MERGES if merges is None else merges)
    vocab = {symbol: index for index, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for token in (PAD_TOKEN, *CHAT_TOKENS, *VISION_TOKENS):
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token=PAD_TOKEN,
        extra_special_tokens=[*CHAT_TOKENS, *VISION_TOKENS],
    )


def build_tiny_qwen_image_processor() -> Qwen2VLImageProcessorPil:
    """The PIL-backed Qwen-VL image processor, sized for the tiny vision towers (images become 4 to 16 tokens)."""
    return Qwen2VLImageProcessorPil(
        patch_size=_PATCH_SIZE,
        merge_size=_MERGE_SIZE,
        temporal_patch_size=_TEMPORAL_PATCH_SIZE,
        size={"shortest_edge": _MIN_PIXELS, "longest_edge": _MAX_PIXELS},
    )


def _tiny_config(family: str, tokenizer: Qwen2Tokenizer, hidden_size: int) -> Qwen2_5_VLConfig | Qwen3VLConfig:
    token_ids = {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }
    num_heads = hidden_size // _HEAD_DIM
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": 2,
        "num_attention_heads": num_heads,
        "num_key_value_heads": max(1, num_heads // 2),
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(_MROPE_SECTION)},
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    vision_config = {
        "depth": 2,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_heads": 2,
        "patch_size": _PATCH_SIZE,
        "spatial_merge_size": _MERGE_SIZE,
        "temporal_patch_size": _TEMPORAL_PATCH_SIZE,
        "out_hidden_size": hidden_size,
    }
    if family == "qwen2_5_vl":
        text_config["bos_token_id"] = tokenizer.convert_tokens_to_ids(PAD_TOKEN)  # as in the real Qwen2.5-VL
        vision_config.update(window_size=2 * _PATCH_SIZE * _MERGE_SIZE, fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, **token_ids)
    text_config["head_dim"] = _HEAD_DIM
    vision_config.update(num_position_embeddings=64, deepstack_visual_indexes=[0])
    return Qwen3VLConfig(text_config=text_config, vision_config=vision_config, **token_ids)


def build_tiny_qwen_vl_model(
    family: QwenVLFamily = "qwen2_5_vl",
    tokenizer: Qwen2Tokenizer | None = None,
    hidden_size: int = 32,
    seed: int = 0,
) -> PreTrainedModel:
    """A random `Qwen2_5_VLForConditionalGeneration` or `Qwen3VLForConditionalGeneration` in eval mode.

    The vocabulary and the vision token ids follow `tokenizer` (default: `build_tiny_qwen_tokenizer()`). The weights
    depend only on `seed`; the global torch RNG is left untouched.
    """
    if family not in TINY_QWEN_VL_FAMILIES:
        raise ValueError(f"Unknown Qwen-VL family {family!r}; expected one of {TINY_QWEN_VL_FAMILIES}.")
    if hidden_size < 2 * _HEAD_DIM or hidden_size % (2 * _HEAD_DIM) != 0:
        raise ValueError(f"`hidden_size` must be a positive multiple of {2 * _HEAD_DIM}, got {hidden_size}.")
    tokenizer = tokenizer if tokenizer is not None else build_tiny_qwen_tokenizer()
    config = _tiny_config(family, tokenizer, hidden_size)
    model_class = Qwen2_5_VLForConditionalGeneration if family == "qwen2_5_vl" else Qwen3VLForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def build_tiny_qwen_vl(
    family: QwenVLFamily = "qwen2_5_vl",
    hidden_size: int = 32,
    seed: int = 0,
    merges: Sequence[tuple[str, str]] | None = None,
) -> tuple[PreTrainedModel, Qwen2Tokenizer, Qwen2VLImageProcessorPil]:
    """`(text_encoder, tokenizer, image_processor)`: a matching tiny Qwen-VL triple for tests and the demo model.

    `merges` (e.g. from `learn_merges`) give the tokenizer a domain vocabulary; the default has only a few.
    """
    tokenizer = build_tiny_qwen_tokenizer(merges)
    model = build_tiny_qwen_vl_model(family, tokenizer, hidden_size=hidden_size, seed=seed)
    return model, tokenizer, build_tiny_qwen_image_processor()
