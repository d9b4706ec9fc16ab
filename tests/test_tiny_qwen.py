"""In-memory BPE merges for the tiny Qwen-VL tokenizer (the demo's domain vocabulary)."""

from transformers import Qwen2Tokenizer

from diffusers_skyreels.demo.world import all_prompts
from diffusers_skyreels.utils import build_tiny_qwen_tokenizer, learn_merges


def test_learned_merges_shorten_prompts_and_round_trip(tmp_path):
    corpus = all_prompts()
    assert len(corpus) == 5 * 4 * 2 * 2
    merges = learn_merges(corpus, 600)
    assert merges == learn_merges(corpus, 600)
    plain, learned = build_tiny_qwen_tokenizer(), build_tiny_qwen_tokenizer(merges)
    prompt = corpus[7]
    short = learned(prompt).input_ids
    assert len(short) * 3 < len(plain(prompt).input_ids)
    assert learned.decode(short) == prompt
    unseen = "A purple cube spins. <sfx>boom</sfx>"
    assert learned.decode(learned(unseen).input_ids) == unseen  # any text still encodes, byte by byte
    learned.save_pretrained(tmp_path)
    assert Qwen2Tokenizer.from_pretrained(tmp_path)(prompt).input_ids == short
    for token in ("<|im_start|>", "<|image_pad|>"):
        assert len(learned(token).input_ids) == 1
