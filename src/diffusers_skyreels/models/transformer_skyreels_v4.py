"""`SkyReelsV4Transformer`: the video branch of SkyReels V4 (architecture.md §3-§7)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.utils import apply_lora_scale

from .branch_skyreels_v4 import (
    SkyReelsV4BranchModel,
    SkyReelsV4TransformerOutput,
    check_channel_concat,
    check_joint_pair,
    default_rope_axes_dim,
    run_lockstep,
)
from .positions_skyreels_v4 import patchify, unpatchify, video_positions


class SkyReelsV4Transformer(SkyReelsV4BranchModel):
    r"""The video branch: an MMDiT over 3D patch tokens with channel-concat conditioning.

    The input is the channel concatenation `[noisy latents ; condition latents ; mask]` (`in_channels = 2C + 1`).
    In-context reference latents are prepended with negative time positions and high-resolution keyframe latents are
    appended at their frame's time with spatial positions scaled onto the low-resolution grid; both are dropped from
    `sample`. Passing `audio_transformer` runs the audio branch jointly, block by block.

    Args:
        in_channels: `2 * out_channels + 1`.
        out_channels: latent channels of the video VAE.
        patch_size: `(t, h, w)` patch of the latent grid.
        num_attention_heads, attention_head_dim: attention layout; the width is their product.
        num_dual_stream_layers: `M`, blocks with separate text weights.
        num_single_stream_layers: `N`, blocks with shared weights, after the dual-stream ones.
        ffn_dim: hidden width of the MLPs.
        text_embed_dim: hidden size of the prompt encoder (Qwen-VL).
        freq_dim: size of the sinusoidal timestep features.
        text_cross_attention: add `x += Attn(q=x, kv=text)` after the joint attention of every block.
        cross_modal_attention: build the audio<->video cross-attention layers (needed for joint generation).
        rope_theta: RoPE base.
        rope_axes_dim: head-dim split over (time, row, column); default as in Wan.
        eps: epsilon of the norms.
        sparse_attention: run the joint self-attention over the video grid as Video Sparse Attention (adds the
            zero-initialised coarse-stage gates); `set_sparse_attention(False)` switches back to dense.
        sparse_attention_cube_size: VSA cube `(t, h, w)` in patch tokens.
        sparse_attention_top_k: key cubes each query cube attends to (capped at the number of cubes).
        cross_modal_rope_scale: multiplies the time positions (in video latent frames) that rotate the audio<->video
            cross-attention, so that its fastest RoPE pair turns this many radians per latent frame: above 1 the
            coupling can tell neighbouring latent frames apart more sharply. Both branches must use the same value.
    """

    _preset_branch = "video"

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
        cross_modal_attention: bool = True,
        rope_theta: float = 10000.0,
        rope_axes_dim: tuple[int, int, int] | None = None,
        eps: float = 1e-6,
        sparse_attention: bool = False,
        sparse_attention_cube_size: tuple[int, int, int] = (4, 4, 4),
        sparse_attention_top_k: int = 32,
        cross_modal_rope_scale: float = 1.0,
    ) -> None:
        check_channel_concat(in_channels, out_channels, patch_size, 3)
        super().__init__(
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
            cross_modal_attention,
            rope_theta,
            tuple(rope_axes_dim) if rope_axes_dim is not None else default_rope_axes_dim(attention_head_dim, 3),
            eps,
            sparse_attention,
            cross_modal_rope_scale,
        )

    def _keyframe_inputs(
        self,
        keyframe_hidden_states: torch.Tensor,
        keyframe_indices: Sequence[int] | torch.Tensor | None,
        batch: int,
        num_frames: int,
        grid_hw: tuple[int, int],
    ) -> tuple[torch.Tensor, float]:
        """Validate keyframes; return their latent-frame positions and the spatial step onto the low-res grid.

        The indices are checked on the host and the positions filled on the device: the denoising loop passes the
        same list every step, and neither a device sync nor a host-to-device copy should happen there.
        """
        self._check_latents("keyframe_hidden_states", keyframe_hidden_states, self.config.in_channels, batch)
        if self._patch[0] != 1:
            raise ValueError("High-resolution keyframes need a temporal patch size of 1.")
        if keyframe_indices is None:
            raise ValueError("`keyframe_indices` (latent frame of each keyframe) is required with keyframes.")
        if isinstance(keyframe_indices, torch.Tensor):
            keyframe_indices = keyframe_indices.reshape(-1).tolist()
        indices = [int(i) for i in keyframe_indices]
        count = keyframe_hidden_states.shape[2]
        if len(indices) != count:
            raise ValueError(f"Got {count} keyframe latents but {len(indices)} `keyframe_indices`.")
        if any(not 0 <= i < num_frames for i in indices):
            raise ValueError(f"`keyframe_indices` must lie in [0, {num_frames - 1}], got {indices}.")
        if len(set(indices)) != count:
            raise ValueError(f"`keyframe_indices` must not repeat, got {indices}.")
        high_h = keyframe_hidden_states.shape[3] // self._patch[1]
        high_w = keyframe_hidden_states.shape[4] // self._patch[2]
        low_h, low_w = grid_hw
        if high_h * low_w != high_w * low_h or high_h < low_h:
            raise ValueError(
                f"Keyframe latents {tuple(keyframe_hidden_states.shape[3:])} must be the main latent size "
                f"{(low_h * self._patch[1], low_w * self._patch[2])} scaled up by one factor >= 1."
            )
        device = keyframe_hidden_states.device
        return torch.cat([torch.full((1,), float(i), device=device) for i in indices]), low_h / high_h

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        reference_latents: torch.Tensor | None = None,
        keyframe_hidden_states: torch.Tensor | None = None,
        keyframe_indices: Sequence[int] | torch.Tensor | None = None,
        audio_transformer: SkyReelsV4BranchModel | None = None,
        audio_hidden_states: torch.Tensor | None = None,
        audio_reference_latents: torch.Tensor | None = None,
        audio_timestep: torch.Tensor | float | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        audio_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> SkyReelsV4TransformerOutput | tuple[torch.Tensor, ...]:
        r"""Predict the flow-matching velocity (`noise - data`) of the video latents (and of the audio latents).

        Args:
            hidden_states: `[B, 2C + 1, T, H, W]`, the noisy latents, the condition latents and the mask.
            timestep: `[B]` or a scalar, in the scheduler's units (`sigma * 1000`).
            encoder_hidden_states: `[B, L, text_embed_dim]` prompt embeddings.
            encoder_attention_mask: `[B, L]`, 1 for real tokens, 0 for padding; `None` when there is no padding.
            reference_latents: `[B, C, N, H, W]` clean latents of in-context references (images, video frames).
            keyframe_hidden_states: `[B, 2C + 1, K, sH, sW]` high-resolution keyframe latents, noisy + condition + mask.
            keyframe_indices: the latent frame of each keyframe (`K` distinct values in `[0, T)`).
            audio_transformer: the audio branch; when given, both branches run in lockstep.
            audio_hidden_states: `[B, 2C_a + 1, T_a]` input of the audio branch.
            audio_reference_latents: `[B, C_a, T_ref]` reference audio latents.
            audio_timestep: the audio branch's own timestep (training with separate noise levels per modality);
                default: `timestep`, shared as in the paper.
            attention_kwargs: `{"scale": s}` scales this branch's LoRA layers.
            audio_attention_kwargs: the same for the audio branch.
            return_dict: return a `SkyReelsV4TransformerOutput` instead of a tuple
                `(sample, keyframe_sample, audio_sample)`.
        """
        batch = hidden_states.shape[0]
        self._check_latents("hidden_states", hidden_states, self.config.in_channels)
        self._check_text(encoder_hidden_states, encoder_attention_mask, batch)
        if (audio_transformer is None) != (audio_hidden_states is None):
            raise ValueError("Joint generation needs both `audio_transformer` and `audio_hidden_states`.")
        if audio_timestep is not None and audio_transformer is None:
            raise ValueError("`audio_timestep` needs the audio branch (`audio_transformer`).")
        if audio_transformer is not None:
            check_joint_pair(self, audio_transformer)

        pt, ph, pw = self._patch
        num_frames, height, width = hidden_states.shape[2:]
        grid = (num_frames // pt, height // ph, width // pw)
        device = hidden_states.device
        token_groups, position_groups = [], []

        num_references = 0
        if reference_latents is not None:
            self._check_latents("reference_latents", reference_latents, self.config.out_channels, batch)
            if reference_latents.shape[3:] != hidden_states.shape[3:]:
                raise ValueError(
                    f"`reference_latents` must be padded to the latent size {tuple(hidden_states.shape[3:])}, got "
                    f"{tuple(reference_latents.shape[3:])}."
                )
            mask = torch.ones_like(reference_latents[:, :1])
            references = torch.cat([reference_latents, reference_latents, mask], dim=1).to(hidden_states.dtype)
            ref_frames = reference_latents.shape[2]
            token_groups.append(patchify(references, self._patch))
            ref_times = torch.arange(-ref_frames, 0, pt, device=device)
            position_groups.append(video_positions(ref_times, grid[1], grid[2]))
            num_references = token_groups[-1].shape[1]

        token_groups.append(patchify(hidden_states, self._patch))
        position_groups.append(video_positions(torch.arange(0, num_frames, pt, device=device), grid[1], grid[2]))
        num_main = token_groups[-1].shape[1]

        keyframe_shape = None
        if keyframe_hidden_states is not None:
            key_times, step = self._keyframe_inputs(
                keyframe_hidden_states, keyframe_indices, batch, num_frames, grid[1:]
            )
            keyframe_shape = keyframe_hidden_states.shape[2:]
            token_groups.append(patchify(keyframe_hidden_states.to(hidden_states.dtype), self._patch))
            position_groups.append(
                video_positions(key_times, keyframe_shape[1] // ph, keyframe_shape[2] // pw, spatial_step=step)
            )
        elif keyframe_indices is not None:
            raise ValueError("`keyframe_indices` was given without `keyframe_hidden_states`.")

        tokens = self._make_tokens(
            torch.cat(token_groups, dim=1),
            torch.cat(position_groups, dim=0),
            timestep,
            encoder_hidden_states,
            encoder_attention_mask,
        )
        tokens.sparse_layout = self._sparse_layout(num_references, grid)

        audio_sample = None
        if audio_transformer is None:
            self.run_blocks(tokens)
        else:
            audio_sample = audio_transformer(
                audio_hidden_states,
                timestep if audio_timestep is None else audio_timestep,
                encoder_hidden_states,
                encoder_attention_mask,
                reference_latents=audio_reference_latents,
                num_video_frames=num_frames,
                block_runner=lambda audio_tokens: run_lockstep(audio_transformer, audio_tokens, self, tokens),
                attention_kwargs=audio_attention_kwargs,
                return_dict=False,
            )[0]

        out = self._project_out(tokens)
        sample = unpatchify(out[:, num_references : num_references + num_main], grid, self._patch)
        keyframe_sample = None
        if keyframe_shape is not None:
            key_grid = (keyframe_shape[0], keyframe_shape[1] // ph, keyframe_shape[2] // pw)
            keyframe_sample = unpatchify(out[:, num_references + num_main :], key_grid, self._patch)

        if not return_dict:
            return sample, keyframe_sample, audio_sample
        return SkyReelsV4TransformerOutput(sample=sample, keyframe_sample=keyframe_sample, audio_sample=audio_sample)
