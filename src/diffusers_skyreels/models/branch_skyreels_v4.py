"""What the video branch, the audio branch and the refiner share: embeddings, the block stack, the output head, and
the lockstep loop that runs an audio and a video branch together (architecture.md §3)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.hooks.context_parallel import EquipartitionSharder, PartitionAnythingSharder
from diffusers.loaders import PeftAdapterMixin
from diffusers.models._modeling_parallel import ContextParallelConfig, ContextParallelInput, ContextParallelOutput
from diffusers.models.attention import AttentionMixin
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.embeddings import PixArtAlphaTextProjection, TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.transformers.transformer_flux import FluxPosEmbed
from diffusers.utils import BaseOutput
from torch import nn

from .attention_skyreels_v4 import RotaryEmbedding, SkyReelsV4AttnProcessor
from .block_skyreels_v4 import NUM_MODULATIONS, SkyReelsV4TransformerBlock
from .presets import preset_config
from .video_sparse_attention import SkyReelsV4SparseAttnProcessor, SparseLayout, add_coarse_gate


@dataclass
class SkyReelsV4TransformerOutput(BaseOutput):
    """Output of a SkyReels V4 branch.

    Args:
        sample: the prediction for the main latents (velocity, Diffusers' flow-matching sign: `noise - data`).
        keyframe_sample: the prediction for the high-resolution keyframe latents, when keyframes were given.
        audio_sample: the audio branch's prediction, when the video branch ran jointly with it.
    """

    sample: torch.Tensor
    keyframe_sample: torch.Tensor | None = None
    audio_sample: torch.Tensor | None = None


@dataclass
class BranchTokens:
    """A branch's token streams and its per-call constants while its blocks run."""

    hidden_states: torch.Tensor  # [B, S, dim]: references, main tokens, keyframes
    encoder_hidden_states: torch.Tensor  # [B, L, dim]: the text stream
    text_embeds: torch.Tensor  # [B, L, dim]: projected prompt, keys/values of the text cross-attention
    temb: torch.Tensor  # [B, dim]: embedded timestep, for the output head
    modulation: torch.Tensor  # [B, 2 * 6, dim]: adaLN-single projection for the blocks
    rotary_emb: RotaryEmbedding  # all position axes, x tokens
    temporal_rotary_emb: RotaryEmbedding | None  # time axis only, for the cross-modal attention
    attention_mask: torch.Tensor | None  # [B, 1, 1, S + L] or None
    text_attention_mask: torch.Tensor | None  # [B, 1, 1, L] or None
    sparse_layout: SparseLayout | None = None  # where the video grid sits, with Video Sparse Attention on


def check_channel_concat(in_channels: int, out_channels: int, patch_size: tuple[int, ...], num_dims: int) -> None:
    """Raise unless the input is the channel concatenation `[noisy ; condition ; mask]` with an N-D patch."""
    if in_channels != 2 * out_channels + 1:
        raise ValueError(
            f"`in_channels` must be 2 * out_channels + 1 = {2 * out_channels + 1} ([noisy latents ; condition "
            f"latents ; mask]), got {in_channels}."
        )
    if len(patch_size) != num_dims:
        raise ValueError(f"`patch_size` must have {num_dims} entries, got {tuple(patch_size)}.")


def default_rope_axes_dim(head_dim: int, num_axes: int) -> tuple[int, ...]:
    """Split an even `head_dim` over `num_axes` position axes, giving time the remainder (as Wan does)."""
    if num_axes == 1:
        return (head_dim,)
    per_axis = 2 * (head_dim // (2 * num_axes))
    return (head_dim - per_axis * (num_axes - 1),) + (per_axis,) * (num_axes - 1)


class SkyReelsV4BranchModel(ModelMixin, ConfigMixin, AttentionMixin, PeftAdapterMixin, CacheMixin):
    """Base of the SkyReels V4 branch models: `M` dual-stream then `N` single-stream blocks over patch tokens.

    Subclasses turn their inputs into tokens and positions (`BranchTokens`) and the output tokens back into latents.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["SkyReelsV4TransformerBlock"]
    _repeated_blocks = ["SkyReelsV4TransformerBlock"]
    _keep_in_fp32_modules = ["time_embedder"]
    _skip_layerwise_casting_patterns = ["patch_embed", "time_embedder", "text_proj", "norm"]
    # Context parallelism shards every token stream right where it is made (so that, in joint generation, each branch
    # hands the other its shard), runs every attention through the parallel config, and gathers before the head.
    # `_make_tokens` checks the token counts, pads the prompt to a multiple of the degree and shards the text mask to
    # match (see `_prepare_context_parallel`).
    _cp_plan = {
        "patch_embed": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
        "text_proj": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
        "rope": {
            0: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
            1: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
        },
        "temporal_rope": {
            0: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
            1: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
        },
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        patch_size: tuple[int, ...],
        num_attention_heads: int,
        attention_head_dim: int,
        num_dual_stream_layers: int,
        num_single_stream_layers: int,
        ffn_dim: int,
        text_embed_dim: int,
        freq_dim: int,
        text_cross_attention: bool,
        cross_modal_attention: bool,
        rope_theta: float,
        rope_axes_dim: tuple[int, ...],
        eps: float,
        sparse_attention: bool = False,
        cross_modal_rope_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not cross_modal_rope_scale > 0:
            raise ValueError(f"`cross_modal_rope_scale` must be positive, got {cross_modal_rope_scale}.")
        if sum(rope_axes_dim) != attention_head_dim or any(d % 2 for d in rope_axes_dim):
            raise ValueError(
                f"`rope_axes_dim` {tuple(rope_axes_dim)} must be even sizes summing to `attention_head_dim` "
                f"({attention_head_dim})."
            )
        dim = num_attention_heads * attention_head_dim
        self._patch = tuple(patch_size)
        self._cross_modal = cross_modal_attention
        self._cross_modal_rope_scale = float(cross_modal_rope_scale)

        self.patch_embed = nn.Linear(in_channels * math.prod(patch_size), dim)
        self.time_proj_sinusoidal = Timesteps(freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedder = TimestepEmbedding(freq_dim, dim)
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * NUM_MODULATIONS * dim))
        self.text_proj = PixArtAlphaTextProjection(text_embed_dim, dim, act_fn="gelu_tanh")
        self.rope = FluxPosEmbed(rope_theta, list(rope_axes_dim))
        self.temporal_rope = FluxPosEmbed(rope_theta, [attention_head_dim])

        self.blocks = nn.ModuleList(
            [
                SkyReelsV4TransformerBlock(
                    dim,
                    num_attention_heads,
                    attention_head_dim,
                    ffn_dim,
                    dual_stream=i < num_dual_stream_layers,
                    text_cross_attention=text_cross_attention,
                    cross_modal_attention=cross_modal_attention,
                    eps=eps,
                )
                for i in range(num_dual_stream_layers + num_single_stream_layers)
            ]
        )

        self.norm_out = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.proj_out = nn.Linear(dim, out_channels * math.prod(patch_size))
        self.gradient_checkpointing = False

        self._sparse_attention = False
        if sparse_attention:
            for block in self.blocks:
                add_coarse_gate(block.attn)  # zero-initialised: VSA starts as its fine stage alone
            self.set_sparse_attention(True)

    def set_sparse_attention(self, enabled: bool) -> None:
        """Run the joint self-attention of every block as Video Sparse Attention, or dense (`False`).

        Needs a model built with `sparse_attention=True` (which adds the coarse-stage gates to the weights).
        """
        if enabled and not getattr(self.config, "sparse_attention", False):
            raise ValueError("This model was built without `sparse_attention`; it has no Video Sparse Attention gates.")
        for block in self.blocks:
            block.attn.set_processor(SkyReelsV4SparseAttnProcessor() if enabled else SkyReelsV4AttnProcessor())
        self._sparse_attention = enabled

    def _sparse_layout(self, grid_offset: int, grid: tuple[int, int, int]) -> SparseLayout | None:
        """The VSA layout of a patch grid starting at token `grid_offset` (the references come before it)."""
        if not self._sparse_attention:
            return None
        cube = tuple(self.config.sparse_attention_cube_size)
        num_cubes = math.prod(math.ceil(g / c) for g, c in zip(grid, cube))
        return SparseLayout(grid_offset, grid, min(self.config.sparse_attention_top_k, num_cubes), cube)

    def enable_forward_chunking(self, chunk_size: int = 4096) -> None:
        """Run the MLP of every block over `chunk_size` tokens at a time.

        Same output; lower peak memory at inference, where the MLP's hidden layer (`ffn_dim` wide, with its
        activation) is the largest tensor of a block. Leave it off with leaf-level group offloading, which would move
        the MLP weights once per chunk.
        """
        if chunk_size < 1:
            raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}.")
        for block in self.blocks:
            block.ff_chunk_size = chunk_size

    def disable_forward_chunking(self) -> None:
        for block in self.blocks:
            block.ff_chunk_size = None

    # Which entry of `presets.preset_config` a subclass is built from.
    _preset_branch: str = ""

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "SkyReelsV4BranchModel":
        """Build a randomly initialised model of a named size (`tiny`, `demo`, `large`); `overrides` win."""
        return cls(**{**preset_config(name, cls._preset_branch), **overrides})

    @property
    def inner_dim(self) -> int:
        return self.config.num_attention_heads * self.config.attention_head_dim

    # -- inputs -> tokens ------------------------------------------------------------------------------------------

    def _check_text(self, encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor | None, batch: int):
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != self.config.text_embed_dim:
            raise ValueError(
                f"`encoder_hidden_states` must have shape [batch, tokens, {self.config.text_embed_dim}] "
                f"(text_embed_dim), got {tuple(encoder_hidden_states.shape)}."
            )
        if encoder_hidden_states.shape[0] != batch:
            raise ValueError(
                f"Batch sizes differ: the latents have {batch} samples, `encoder_hidden_states` has "
                f"{encoder_hidden_states.shape[0]}."
            )
        if encoder_attention_mask is not None and encoder_attention_mask.shape != encoder_hidden_states.shape[:2]:
            raise ValueError(
                f"`encoder_attention_mask` must have shape {tuple(encoder_hidden_states.shape[:2])}, "
                f"got {tuple(encoder_attention_mask.shape)}."
            )

    def _check_latents(self, name: str, latents: torch.Tensor, channels: int, batch: int | None = None):
        patch = self._patch
        if latents.ndim != 2 + len(patch):
            raise ValueError(f"`{name}` must have {2 + len(patch)} dimensions, got shape {tuple(latents.shape)}.")
        if latents.shape[1] != channels:
            raise ValueError(f"`{name}` must have {channels} channels, got {latents.shape[1]}.")
        if batch is not None and latents.shape[0] != batch:
            raise ValueError(f"Batch sizes differ: `{name}` has {latents.shape[0]} samples, expected {batch}.")
        bad = [size for size, p in zip(latents.shape[2:], patch) if size % p]
        if bad:
            raise ValueError(
                f"`{name}` size {tuple(latents.shape[2:])} is not divisible by the patch size {patch}."
            )

    def _context_parallel_config(self) -> ContextParallelConfig | None:
        return None if self._parallel_config is None else self._parallel_config.context_parallel_config

    def _prepare_context_parallel(
        self,
        cp: ContextParallelConfig,
        num_tokens: int,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Check what context parallelism needs; pad the prompt to a multiple of the degree (padding masked out).

        Equal shards (the default) need the x tokens (references, latents, keyframes) to divide by the degree; the
        prompt is padded instead, since its length varies. A text mask then reaches the attentions: Ulysses
        all-gathers each rank's shard of it, ring attention has no way to apply one, hence the error.
        """
        degree = cp._flattened_mesh.size()
        if self._sparse_attention:
            raise ValueError(
                "Video Sparse Attention does not support context parallelism; call `set_sparse_attention(False)` to "
                "run dense attention across ranks."
            )
        if cp.ulysses_anything or cp.ring_anything:
            return encoder_hidden_states, encoder_attention_mask
        if num_tokens % degree:
            raise ValueError(
                f"Context parallelism over {degree} ranks splits the {num_tokens} tokens of {type(self).__name__} "
                f"(in-context references, latents and keyframes) into equal shards, so their number must be a "
                f"multiple of {degree}. Change the size, duration or number of references / keyframes, or use "
                "`ContextParallelConfig(ulysses_anything=True)`."
            )
        extra = -encoder_hidden_states.shape[1] % degree
        if extra:
            batch, length = encoder_hidden_states.shape[:2]
            if encoder_attention_mask is None:
                encoder_attention_mask = encoder_hidden_states.new_ones(batch, length, dtype=torch.bool)
            encoder_hidden_states = torch.nn.functional.pad(encoder_hidden_states, (0, 0, 0, extra))
            encoder_attention_mask = torch.nn.functional.pad(encoder_attention_mask.to(torch.bool), (0, extra))
        if encoder_attention_mask is not None and cp.ring_degree > 1:
            raise ValueError(
                "Ring attention cannot apply a text padding mask (each rank's mask would meet other ranks' keys); "
                f"pass prompts without padding whose length is a multiple of {degree}, or use Ulysses "
                "(`ContextParallelConfig(ulysses_degree=...)`)."
            )
        return encoder_hidden_states, encoder_attention_mask

    def _make_tokens(
        self,
        latent_tokens: torch.Tensor,
        positions: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
    ) -> BranchTokens:
        """Embed patch tokens `[B, S, in_channels * prod(patch)]`, the timestep and the prompt.

        Under context parallelism the `_cp_plan` hooks shard the outputs of `patch_embed`, `text_proj` and the RoPE
        modules; the text mask is sharded here the same way, so that it describes this rank's text tokens.
        """
        batch, dtype, device = latent_tokens.shape[0], latent_tokens.dtype, latent_tokens.device
        cp = self._context_parallel_config()
        if cp is not None:
            encoder_hidden_states, encoder_attention_mask = self._prepare_context_parallel(
                cp, latent_tokens.shape[1], encoder_hidden_states, encoder_attention_mask
            )
        hidden_states = self.patch_embed(latent_tokens)

        timestep = torch.as_tensor(timestep, device=device).reshape(-1).expand(batch)
        temb = self.time_embedder(self.time_proj_sinusoidal(timestep).to(self.time_embedder.linear_1.weight.dtype))
        temb = temb.to(hidden_states.dtype)
        modulation = self.time_proj(temb).unflatten(1, (2 * NUM_MODULATIONS, -1))

        text = self.text_proj(encoder_hidden_states.to(dtype))
        attention_mask = text_attention_mask = None
        if encoder_attention_mask is not None:
            keep = encoder_attention_mask.to(device=device, dtype=torch.bool)
            if cp is not None:
                keep = _shard_like_cp_plan(keep, cp)
            text_attention_mask = keep[:, None, None, :]
            attention_mask = torch.cat([keep.new_ones(batch, hidden_states.shape[1]), keep], dim=1)[:, None, None, :]

        temporal = None
        if self._cross_modal:
            temporal = self.temporal_rope(positions[:, :1] * self._cross_modal_rope_scale)
        return BranchTokens(
            hidden_states=hidden_states,
            encoder_hidden_states=text,
            text_embeds=text,
            temb=temb,
            modulation=modulation,
            rotary_emb=self.rope(positions),
            temporal_rotary_emb=temporal,
            attention_mask=attention_mask,
            text_attention_mask=text_attention_mask,
        )

    # -- blocks ----------------------------------------------------------------------------------------------------

    def _call_block(self, block: nn.Module, tokens: BranchTokens, partner: BranchTokens | None = None) -> None:
        """Run one block on `tokens` in place; `partner` is the other modality's tokens in joint generation."""
        args = (
            tokens.hidden_states,
            tokens.encoder_hidden_states,
            tokens.modulation,
            tokens.rotary_emb,
            tokens.attention_mask,
            tokens.text_embeds,
            tokens.text_attention_mask,
            None if partner is None else partner.hidden_states,
            None if partner is None else tokens.temporal_rotary_emb,
            None if partner is None else partner.temporal_rotary_emb,
            tokens.sparse_layout,
        )
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            tokens.hidden_states, tokens.encoder_hidden_states = self._gradient_checkpointing_func(block, *args)
        else:
            tokens.hidden_states, tokens.encoder_hidden_states = block(*args)

    def run_blocks(self, tokens: BranchTokens) -> None:
        """Run this branch alone: every block, no cross-modal attention."""
        for block in self.blocks:
            self._call_block(block, tokens)

    def _project_out(self, tokens: BranchTokens) -> torch.Tensor:
        shift, scale = (self.scale_shift_table + tokens.temb[:, None]).unbind(1)
        hidden_states = torch.addcmul(shift[:, None], self.norm_out(tokens.hidden_states), 1 + scale[:, None])
        return self.proj_out(hidden_states)


def _shard_like_cp_plan(tensor: torch.Tensor, cp: ContextParallelConfig) -> torch.Tensor:
    """This rank's shard of `tensor` along dim 1, cut as the `_cp_plan` hooks cut the token streams."""
    if cp.ulysses_anything or cp.ring_anything:
        return PartitionAnythingSharder.shard_anything(tensor, 1, cp._flattened_mesh)
    return EquipartitionSharder.shard(tensor, 1, cp._flattened_mesh)


def check_joint_pair(video: SkyReelsV4BranchModel, audio: SkyReelsV4BranchModel) -> None:
    """Raise if two branches cannot run in lockstep (same width, heads and depth, coupling layers present)."""
    problems = []
    for key in ("num_attention_heads", "attention_head_dim", "cross_modal_rope_scale"):
        if video.config[key] != audio.config[key]:
            problems.append(f"{key}: video {video.config[key]} vs audio {audio.config[key]}")
    if len(video.blocks) != len(audio.blocks):
        problems.append(f"number of blocks: video {len(video.blocks)} vs audio {len(audio.blocks)}")
    for name, branch in (("video", video), ("audio", audio)):
        if not branch._cross_modal:
            problems.append(f"the {name} branch was built with cross_modal_attention=False")
    if problems:
        raise ValueError("The video and audio branches cannot run jointly: " + "; ".join(problems) + ".")


def run_lockstep(
    audio: SkyReelsV4BranchModel, audio_tokens: BranchTokens, video: SkyReelsV4BranchModel, video_tokens: BranchTokens
) -> None:
    """Run both branches block by block (architecture.md §3, [ours] lockstep order).

    Audio block `i` runs first and attends to the video tokens entering video block `i`; video block `i` then
    attends to the audio tokens that audio block `i` produced.
    """
    for audio_block, video_block in zip(audio.blocks, video.blocks, strict=True):
        audio._call_block(audio_block, audio_tokens, partner=video_tokens)
        video._call_block(video_block, video_tokens, partner=audio_tokens)
