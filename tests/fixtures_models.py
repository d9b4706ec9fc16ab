"""Tiny video + audio branches and their inputs, built in code (shared by the model tests on CPU and CUDA)."""

import torch

from diffusers_skyreels import SkyReelsV4AudioTransformer, SkyReelsV4Transformer

TEXT_DIM = 32


def build_pair(seed: int = 0, couple: bool = True, **overrides):
    """Tiny video + audio branches; with `couple`, the zero-initialised a<->v output projections get random values."""
    torch.manual_seed(seed)
    video = SkyReelsV4Transformer.from_preset("tiny", **overrides).eval()
    audio = SkyReelsV4AudioTransformer.from_preset("tiny", **overrides).eval()
    if couple:
        for model in (video, audio):
            for block in model.blocks:
                torch.nn.init.normal_(block.attn_cross_modal.to_out[0].weight, std=0.2)
    return video, audio


def inputs(batch=2, frames=3, height=4, width=6, audio_len=20, text_len=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 9, frames, height, width, generator=g),
        timestep=torch.full((batch,), 700.0),
        encoder_hidden_states=torch.randn(batch, text_len, TEXT_DIM, generator=g),
        audio_hidden_states=torch.randn(batch, 9, audio_len, generator=g),
        reference_latents=torch.randn(batch, 4, 2, height, width, generator=g),
        keyframe_hidden_states=torch.randn(batch, 9, 2, 2 * height, 2 * width, generator=g),
        audio_reference_latents=torch.randn(batch, 4, 7, generator=g),
    )


def video_only(x):
    return {k: x[k] for k in ("hidden_states", "timestep", "encoder_hidden_states")}
