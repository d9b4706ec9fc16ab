"""Utilities: tiny offline Qwen-VL builders for tests and the demo model."""

from .tiny_qwen_vl import (
    TINY_QWEN_VL_FAMILIES,
    build_tiny_qwen_image_processor,
    build_tiny_qwen_tokenizer,
    build_tiny_qwen_vl,
    build_tiny_qwen_vl_model,
    learn_merges,
)

__all__ = [
    "TINY_QWEN_VL_FAMILIES",
    "build_tiny_qwen_image_processor",
    "build_tiny_qwen_tokenizer",
    "build_tiny_qwen_vl",
    "build_tiny_qwen_vl_model",
    "learn_merges",
]
