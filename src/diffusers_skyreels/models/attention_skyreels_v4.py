"""Attention of the SkyReels V4 blocks: joint attention over [x ; text] and cross-attention.

Every attention call goes through Diffusers' `dispatch_attention_fn`, so `set_attention_backend(...)` (flash,
xformers, sage, native math, ...) and context parallelism apply to all of them.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

RotaryEmbedding = tuple[torch.Tensor, torch.Tensor]


def _project_qkv(attn: SkyReelsV4Attention, hidden_states: torch.Tensor):
    if attn.fused_projections:
        return attn.to_qkv(hidden_states).chunk(3, dim=-1)
    return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)


def _project_added_qkv(attn: SkyReelsV4Attention, encoder_hidden_states: torch.Tensor):
    if attn.fused_projections:
        return attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
    return (
        attn.add_q_proj(encoder_hidden_states),
        attn.add_k_proj(encoder_hidden_states),
        attn.add_v_proj(encoder_hidden_states),
    )


def _project_kv(attn: SkyReelsV4Attention, context: torch.Tensor):
    if attn.fused_projections:
        return attn.to_kv(context).chunk(2, dim=-1)
    return attn.to_k(context), attn.to_v(context)


class SkyReelsV4AttnProcessor:
    """Joint attention over `[x ; text]` (self-attention) or cross-attention `q = x, kv = context`.

    Joint mode: text is projected with its own weights when the attention has added projections (dual-stream blocks)
    and with the shared ones otherwise (single-stream blocks). RoPE rotates the `x` tokens only: text carries no
    position. Cross mode: `rotary_emb` rotates the queries and `encoder_rotary_emb` the keys (the audio<->video
    attention uses temporal positions on both sides).
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: SkyReelsV4Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: RotaryEmbedding | None = None,
        encoder_rotary_emb: RotaryEmbedding | None = None,
        sparse_layout: object | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # `sparse_layout` is for `SkyReelsV4SparseAttnProcessor`; this processor is the dense setting and ignores it.
        if attn.is_cross_attention:
            query = attn.to_q(hidden_states)
            key, value = _project_kv(attn, encoder_hidden_states)
            query, key, value = (t.unflatten(-1, (attn.heads, -1)) for t in (query, key, value))
            query, key = attn.norm_q(query), attn.norm_k(key)
            if rotary_emb is not None:
                query = apply_rotary_emb(query, rotary_emb, sequence_dim=1)
            if encoder_rotary_emb is not None:
                key = apply_rotary_emb(key, encoder_rotary_emb, sequence_dim=1)
            out = self._attend(query, key, value, attention_mask)
            return attn.to_out[1](attn.to_out[0](out))

        query, key, value = (t.unflatten(-1, (attn.heads, -1)) for t in _project_qkv(attn, hidden_states))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if rotary_emb is not None:
            query = apply_rotary_emb(query, rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, rotary_emb, sequence_dim=1)
        if encoder_hidden_states is None:
            out = self._attend(query, key, value, attention_mask)
            return attn.to_out[1](attn.to_out[0](out))

        dual_stream = attn.add_q_proj is not None
        text_qkv = (_project_added_qkv if dual_stream else _project_qkv)(attn, encoder_hidden_states)
        text_query, text_key, text_value = (t.unflatten(-1, (attn.heads, -1)) for t in text_qkv)
        if dual_stream:
            text_query, text_key = attn.norm_added_q(text_query), attn.norm_added_k(text_key)
        else:
            text_query, text_key = attn.norm_q(text_query), attn.norm_k(text_key)

        out = self._attend(
            torch.cat([query, text_query], dim=1),
            torch.cat([key, text_key], dim=1),
            torch.cat([value, text_value], dim=1),
            attention_mask,
        )
        out, text_out = out.split([hidden_states.shape[1], encoder_hidden_states.shape[1]], dim=1)
        out = attn.to_out[1](attn.to_out[0](out))
        text_out = attn.to_add_out(text_out) if dual_stream else attn.to_out[0](text_out)
        return out, text_out

    def _attend(self, query, key, value, attention_mask) -> torch.Tensor:
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        return out.flatten(2, 3).type_as(query)


class SkyReelsV4Attention(nn.Module, AttentionModuleMixin):
    """Multi-head attention with per-head QK RMS-norm.

    Args:
        dim: width of the query stream (and of the output).
        heads, head_dim: the head layout; `heads * head_dim` is the inner width.
        cross_attention: queries from `hidden_states`, keys/values from `encoder_hidden_states`.
        added_projections: give the text stream of a joint attention its own QKV / norm / output weights.
        zero_init_output: start the output projection at zero, so the layer is initially a no-op on the residual.
    """

    _default_processor_cls = SkyReelsV4AttnProcessor
    _available_processors = [SkyReelsV4AttnProcessor]

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        cross_attention: bool = False,
        added_projections: bool = False,
        bias: bool = True,
        eps: float = 1e-6,
        zero_init_output: bool = False,
        processor: SkyReelsV4AttnProcessor | None = None,
    ) -> None:
        super().__init__()
        if cross_attention and added_projections:
            raise ValueError("`added_projections` applies to joint self-attention only, not to cross-attention.")
        inner_dim = heads * head_dim
        self.heads = heads
        self.head_dim = head_dim
        self.is_cross_attention = cross_attention
        self.use_bias = bias
        self.added_proj_bias = bias

        self.to_q = nn.Linear(dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(dim, inner_dim, bias=bias)
        self.norm_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, dim, bias=bias), nn.Dropout(0.0)])
        if zero_init_output:
            nn.init.zeros_(self.to_out[0].weight)
            if bias:
                nn.init.zeros_(self.to_out[0].bias)

        self.add_q_proj = self.add_k_proj = self.add_v_proj = None
        if added_projections:
            self.add_q_proj = nn.Linear(dim, inner_dim, bias=bias)
            self.add_k_proj = nn.Linear(dim, inner_dim, bias=bias)
            self.add_v_proj = nn.Linear(dim, inner_dim, bias=bias)
            self.norm_added_q = nn.RMSNorm(head_dim, eps=eps)
            self.norm_added_k = nn.RMSNorm(head_dim, eps=eps)
            self.to_add_out = nn.Linear(inner_dim, dim, bias=bias)

        self.set_processor(processor if processor is not None else self._default_processor_cls())

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: RotaryEmbedding | None = None,
        encoder_rotary_emb: RotaryEmbedding | None = None,
        sparse_layout: object | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if sparse_layout is None:
            return self.processor(
                self, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, encoder_rotary_emb
            )
        return self.processor(
            self, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, encoder_rotary_emb, sparse_layout
        )
