"""`SkyReelsV4AudioTransformer`: the audio branch of SkyReels V4 (architecture.md §3-§6)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils import apply_lora_scale

from .branch_skyreels_v4 import BranchTokens, SkyReelsV4BranchModel, check_channel_concat
from .positions_skyreels_v4 import audio_positions, patchify, unpatchify


class SkyReelsV4AudioTransformer(SkyReelsV4BranchModel):
    r"""The audio branch: an MMDiT over 1D audio-latent tokens, the same block design and width as the video branch.

    The input is `[noisy latents ; condition latents ; mask]` along channels (`in_channels = 2C + 1`), which gives
    audio continuation and "keep the soundtrack" the same way the video branch does inpainting. Token `k` sits at time
    `k * num_video_frames / T_audio` in video-latent-frame units, so that audio and video positions agree for any
    duration. Reference audio latents are prepended at negative times and dropped from the output.

    Args:
        in_channels: `2 * out_channels + 1`.
        out_channels: latent channels of the audio VAE (40 for MMAudio).
        patch_size: audio latents per token.
        num_attention_heads, attention_head_dim, num_dual_stream_layers, num_single_stream_layers, ffn_dim,
        text_embed_dim, freq_dim, rope_theta, eps, cross_modal_rope_scale: as in `SkyReelsV4Transformer`.
        text_cross_attention: text cross-attention after the joint attention; off for audio by default.
        cross_modal_attention: build the audio<->video cross-attention layers.
    """

    _preset_branch = "audio"

    @register_to_config
    def __init__(
        self,
        in_channels: int = 81,
        out_channels: int = 40,
        patch_size: int = 1,
        num_attention_heads: int = 24,
        attention_head_dim: int = 128,
        num_dual_stream_layers: int = 8,
        num_single_stream_layers: int = 24,
        ffn_dim: int = 12288,
        text_embed_dim: int = 3584,
        freq_dim: int = 256,
        text_cross_attention: bool = False,
        cross_modal_attention: bool = True,
        rope_theta: float = 10000.0,
        eps: float = 1e-6,
        cross_modal_rope_scale: float = 1.0,
    ) -> None:
        check_channel_concat(in_channels, out_channels, (patch_size,), 1)
        super().__init__(
            in_channels,
            out_channels,
            (patch_size,),
            num_attention_heads,
            attention_head_dim,
            num_dual_stream_layers,
            num_single_stream_layers,
            ffn_dim,
            text_embed_dim,
            freq_dim,
            text_cross_attention,
            cross_modal_attention,
            rope_theta,
            (attention_head_dim,),
            eps,
            cross_modal_rope_scale=cross_modal_rope_scale,
        )

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        reference_latents: torch.Tensor | None = None,
        num_video_frames: int | None = None,
        block_runner: Callable[[BranchTokens], None] | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        r"""Predict the flow-matching velocity (`noise - data`) of the audio latents.

        Args:
            hidden_states: `[B, 2C + 1, T]`, the noisy latents, the condition latents and the mask.
            timestep: `[B]` or a scalar, in the scheduler's units (`sigma * 1000`), shared with the video branch.
            encoder_hidden_states, encoder_attention_mask: prompt embeddings `[B, L, D]` and padding mask `[B, L]`.
            reference_latents: `[B, C, T_ref]` clean latents of reference audio.
            num_video_frames: video latent frames spanning the same time as `hidden_states`; sets the RoPE scale
                `num_video_frames / T` (architecture.md §4). Pipelines derive it from the duration.
            block_runner: runs the blocks instead of this branch alone; the video branch passes its lockstep loop.
            attention_kwargs: `{"scale": s}` scales the LoRA layers.
            return_dict: return a `Transformer2DModelOutput` instead of a tuple.
        """
        batch = hidden_states.shape[0]
        self._check_latents("hidden_states", hidden_states, self.config.in_channels)
        self._check_text(encoder_hidden_states, encoder_attention_mask, batch)
        if num_video_frames is None or num_video_frames <= 0:
            raise ValueError(
                "`num_video_frames` (the number of video latent frames spanning the same duration as the audio "
                f"latents) is required: it aligns audio positions with video frames. Got {num_video_frames}."
            )

        patch = self._patch[0]
        num_latents = hidden_states.shape[2]
        step = patch * num_video_frames / num_latents
        device = hidden_states.device
        token_groups, position_groups = [], []
        num_references = 0
        if reference_latents is not None:
            self._check_latents("reference_latents", reference_latents, self.config.out_channels, batch)
            mask = torch.ones_like(reference_latents[:, :1])
            references = torch.cat([reference_latents, reference_latents, mask], dim=1).to(hidden_states.dtype)
            token_groups.append(patchify(references, self._patch))
            num_references = token_groups[-1].shape[1]
            position_groups.append(audio_positions(num_references, step, offset=-num_references, device=device))
        token_groups.append(patchify(hidden_states, self._patch))
        position_groups.append(audio_positions(num_latents // patch, step, device=device))

        tokens = self._make_tokens(
            torch.cat(token_groups, dim=1),
            torch.cat(position_groups, dim=0),
            timestep,
            encoder_hidden_states,
            encoder_attention_mask,
        )
        (block_runner or self.run_blocks)(tokens)
        out = self._project_out(tokens)[:, num_references:]
        sample = unpatchify(out, (num_latents // patch,), self._patch)

        if not return_dict:
            return (sample,)
        return Transformer2DModelOutput(sample=sample)
