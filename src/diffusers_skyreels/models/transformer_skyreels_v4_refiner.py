"""`SkyReelsV4RefinerTransformer`: the super-resolution + frame-interpolation DiT (architecture.md §7)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import register_to_config

from .branch_skyreels_v4 import (
    SkyReelsV4BranchModel,
    SkyReelsV4TransformerOutput,
    check_channel_concat,
    default_rope_axes_dim,
)
from .transformer_skyreels_v4 import SkyReelsV4Transformer


class SkyReelsV4RefinerTransformer(SkyReelsV4Transformer):
    r"""The refiner: a video DiT of the video branch's blocks, without the audio branch.

    It reads `[high-res noisy latents ; guide ; mask]`, where the guide is the base model's low-resolution latents
    interpolated to `spatial_scale`x the size and `temporal_scale`x the frame rate, with the high-resolution keyframes
    (mask 1) put back, built by the same conditioning helper as every other condition. It sees the prompt and the
    high-resolution references like the video branch. Its joint self-attention can run as Video Sparse Attention.

    Args:
        spatial_scale: output size / input size (integer).
        temporal_scale: output frame rate / input frame rate (integer; 2 takes 16 fps to 32 fps).
        sparse_attention, sparse_attention_cube_size, sparse_attention_top_k: Video Sparse Attention, on by default
            (4x4x4 cubes, 32 key cubes per query cube); `set_sparse_attention(False)` gives dense attention.
        Other arguments: as in [`SkyReelsV4Transformer`] (no `cross_modal_attention`: there is no audio branch).
    """

    _preset_branch = "refiner"

    @register_to_config
    def __init__(
        self,
        in_channels: int = 33,
        out_channels: int = 16,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        num_attention_heads: int = 24,
        attention_head_dim: int = 128,
        num_dual_stream_layers: int = 8,
        num_single_stream_layers: int = 24,
        ffn_dim: int = 12288,
        text_embed_dim: int = 3584,
        freq_dim: int = 256,
        text_cross_attention: bool = True,
        rope_theta: float = 10000.0,
        rope_axes_dim: tuple[int, int, int] | None = None,
        eps: float = 1e-6,
        spatial_scale: int = 2,
        temporal_scale: int = 2,
        sparse_attention: bool = True,
        sparse_attention_cube_size: tuple[int, int, int] = (4, 4, 4),
        sparse_attention_top_k: int = 32,
    ) -> None:
        check_channel_concat(in_channels, out_channels, patch_size, 3)
        for name, scale in (("spatial_scale", spatial_scale), ("temporal_scale", temporal_scale)):
            if int(scale) != scale or scale < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {scale}.")
        SkyReelsV4BranchModel.__init__(
            self,
            in_channels,
            out_channels,
            tuple(patch_size),
            num_attention_heads,
            attention_head_dim,
            num_dual_stream_layers,
            num_single_stream_layers,
            ffn_dim,
            text_embed_dim,
            freq_dim,
            text_cross_attention,
            False,
            rope_theta,
            tuple(rope_axes_dim) if rope_axes_dim is not None else default_rope_axes_dim(attention_head_dim, 3),
            eps,
            sparse_attention,
        )

    @classmethod
    def from_video_branch(cls, transformer: SkyReelsV4Transformer, **overrides: Any) -> SkyReelsV4RefinerTransformer:
        """A refiner initialised from a video branch's weights, as in the paper (the a<->v layers are dropped)."""
        # The refiner's own defaults decide the attention (VSA on) unless `overrides` say otherwise; it has no a<->v
        # layers, so their settings are dropped.
        skip = ("cross_modal_attention", "cross_modal_rope_scale", "sparse_attention", "sparse_attention_cube_size",
                "sparse_attention_top_k")
        config = {k: v for k, v in transformer.config.items() if not k.startswith("_") and k not in skip}
        refiner = cls(**{**config, **overrides})
        missing, unexpected = refiner.load_state_dict(transformer.state_dict(), strict=False)
        missing = [key for key in missing if "to_gate_compress" not in key]  # VSA gates start at zero
        if missing or any("cross_modal" not in key for key in unexpected):
            raise ValueError(f"The video branch does not match the refiner: missing {missing}, unexpected {unexpected}.")
        if (refiner.device, refiner.dtype) != (transformer.device, transformer.dtype):
            refiner = refiner.to(transformer.device, transformer.dtype)
        return refiner

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        reference_latents: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> SkyReelsV4TransformerOutput | tuple[torch.Tensor, ...]:
        r"""Predict the flow-matching velocity of the high-resolution latents.

        Args:
            hidden_states: `[B, 2C + 1, T, H, W]`: noisy high-res latents, the guide and its mask.
            timestep, encoder_hidden_states, encoder_attention_mask, reference_latents, attention_kwargs,
            return_dict: as in [`SkyReelsV4Transformer.forward`].
        """
        return super().forward(
            hidden_states,
            timestep,
            encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            reference_latents=reference_latents,
            attention_kwargs=attention_kwargs,
            return_dict=return_dict,
        )
