"""The one transformer block shared by the video branch, the audio branch and the refiner."""

from __future__ import annotations

import torch
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.models.attention import FeedForward
from diffusers.utils.torch_utils import maybe_allow_in_graph
from torch import nn

from .attention_skyreels_v4 import RotaryEmbedding, SkyReelsV4Attention
from .video_sparse_attention import SparseLayout

# adaLN-single: each stream gets (shift, scale, gate) for the attention and for the MLP.
NUM_MODULATIONS = 6


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift, x, 1 + scale)


@maybe_allow_in_graph
class SkyReelsV4TransformerBlock(nn.Module):
    """A dual-stream or single-stream MMDiT block with optional text and audio<->video cross-attention.

    Order (architecture.md §3):
        1. joint attention over `[x ; text]` (adaLN-modulated, gated residual);
        2. text cross-attention `x += Attn(q=x, kv=text_embeds)` (video branch);
        3. cross-modal attention `x += Attn(q=x, kv=partner)` with temporal RoPE on both sides (joint generation);
        4. MLP (adaLN-modulated, gated residual).

    A dual-stream block gives the text tokens their own modulation, QKV, output and MLP weights; a single-stream block
    runs both streams through one set of weights (equivalent to processing the concatenation `[x ; text]`).
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        ffn_dim: int,
        dual_stream: bool,
        text_cross_attention: bool,
        cross_modal_attention: bool,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.dual_stream = dual_stream
        self.ff_chunk_size: int | None = None
        heads, head_dim = num_attention_heads, attention_head_dim

        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.attn = SkyReelsV4Attention(dim, heads, head_dim, added_projections=dual_stream, eps=eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ff = FeedForward(dim, inner_dim=ffn_dim, activation_fn="gelu-approximate")
        self.scale_shift_table = nn.Parameter(torch.randn(1, NUM_MODULATIONS, dim) / dim**0.5)
        if dual_stream:
            self.ff_context = FeedForward(dim, inner_dim=ffn_dim, activation_fn="gelu-approximate")
            self.context_scale_shift_table = nn.Parameter(torch.randn(1, NUM_MODULATIONS, dim) / dim**0.5)

        self.norm_text = self.attn_text = None
        if text_cross_attention:
            self.norm_text = nn.LayerNorm(dim, eps=eps)
            self.attn_text = SkyReelsV4Attention(dim, heads, head_dim, cross_attention=True, eps=eps)

        self.norm_cross_modal = self.attn_cross_modal = None
        if cross_modal_attention:
            self.norm_cross_modal = nn.LayerNorm(dim, eps=eps)
            self.attn_cross_modal = SkyReelsV4Attention(
                dim, heads, head_dim, cross_attention=True, eps=eps, zero_init_output=True
            )

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rotary_emb: RotaryEmbedding,
        attention_mask: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
        partner_hidden_states: torch.Tensor | None = None,
        temporal_rotary_emb: RotaryEmbedding | None = None,
        partner_temporal_rotary_emb: RotaryEmbedding | None = None,
        sparse_layout: SparseLayout | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance `hidden_states` (x tokens) and `encoder_hidden_states` (text tokens) by one block.

        `temb` holds the branch's timestep projection, `[B, 2 * 6, dim]` (x stream, then text stream).
        `partner_hidden_states` are the other modality's tokens; `None` skips the cross-modal attention.
        `sparse_layout` locates the video grid for Video Sparse Attention (with a sparse processor).
        """
        x, text = hidden_states, encoder_hidden_states
        shift, scale, gate, mlp_shift, mlp_scale, mlp_gate = (
            self.scale_shift_table + temb[:, :NUM_MODULATIONS]
        ).unbind(1)
        if self.dual_stream:
            modulation = self.context_scale_shift_table + temb[:, NUM_MODULATIONS:]
            c_shift, c_scale, c_gate, c_mlp_shift, c_mlp_scale, c_mlp_gate = modulation.unbind(1)
            ff_context = self.ff_context
        else:
            c_shift, c_scale, c_gate, c_mlp_shift, c_mlp_scale, c_mlp_gate = (
                shift, scale, gate, mlp_shift, mlp_scale, mlp_gate
            )
            ff_context = self.ff

        # 1. Joint attention over [x ; text].
        attn_out, text_attn_out = self.attn(
            _modulate(self.norm1(x), shift[:, None], scale[:, None]),
            _modulate(self.norm1(text), c_shift[:, None], c_scale[:, None]),
            attention_mask=attention_mask,
            rotary_emb=rotary_emb,
            sparse_layout=sparse_layout,
        )
        x = torch.addcmul(x, gate[:, None], attn_out)
        text = torch.addcmul(text, c_gate[:, None], text_attn_out)

        # 2. Text cross-attention.
        if self.attn_text is not None:
            x = x + self.attn_text(self.norm_text(x), text_embeds, attention_mask=text_attention_mask)

        # 3. Audio<->video cross-attention.
        if partner_hidden_states is not None and self.attn_cross_modal is not None:
            x = x + self.attn_cross_modal(
                self.norm_cross_modal(x),
                partner_hidden_states,
                rotary_emb=temporal_rotary_emb,
                encoder_rotary_emb=partner_temporal_rotary_emb,
            )

        # 4. MLP.
        mlp_out = self._feed_forward(self.ff, _modulate(self.norm2(x), mlp_shift[:, None], mlp_scale[:, None]))
        x = torch.addcmul(x, mlp_gate[:, None], mlp_out)
        text = torch.addcmul(
            text,
            c_mlp_gate[:, None],
            ff_context(_modulate(self.norm2(text), c_mlp_shift[:, None], c_mlp_scale[:, None])),
        )
        return x, text

    def _feed_forward(self, ff: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """`ff` over the tokens, `ff_chunk_size` of them at a time when set: its hidden layer is several times wider
        than the tokens, so chunking bounds that part of the peak memory (see `enable_forward_chunking`)."""
        if self.ff_chunk_size is None or hidden_states.shape[1] <= self.ff_chunk_size:
            return ff(hidden_states)
        return torch.cat([ff(part) for part in hidden_states.split(self.ff_chunk_size, dim=1)], dim=1)


# Caching hooks (FirstBlockCache, TaylorSeer, ...) find the block's streams through this registry.
TransformerBlockRegistry.register(
    model_class=SkyReelsV4TransformerBlock,
    metadata=TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=1),
)
