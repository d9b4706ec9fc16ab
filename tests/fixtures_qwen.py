"""Session-wide tiny Qwen-VL text encoders (random weights, built offline in code), one per supported family."""

import pytest

from diffusers_skyreels.utils import TINY_QWEN_VL_FAMILIES, build_tiny_qwen_vl


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl():
    """`(Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLImageProcessorPil)`, hidden size 32."""
    return build_tiny_qwen_vl("qwen2_5_vl", hidden_size=32, seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3_vl():
    """`(Qwen3VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLImageProcessorPil)`, hidden size 32."""
    return build_tiny_qwen_vl("qwen3_vl", hidden_size=32, seed=0)


@pytest.fixture(scope="session", params=TINY_QWEN_VL_FAMILIES)
def tiny_qwen_vl(request):
    """Each tiny Qwen-VL family in turn, as `(text_encoder, tokenizer, image_processor)`."""
    return request.getfixturevalue(f"tiny_{request.param}")
