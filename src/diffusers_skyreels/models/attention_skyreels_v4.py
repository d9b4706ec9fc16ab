"""Attention of the SkyReels V4 blocks: joint attention over [x ; text] and cross-attention.

Every attention call goes through Diffusers' `dispatch_attention_fn`, so `set_attention_backend(...)` (flash,
xformers, sage, native math, ...) and context parallelism apply to all of them.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import nn

# RoPE as Diffusers' real form: `(cos, sin)`, each `[S, head_dim]` with every value repeated for the two entries of a
# rotated pair (what `FluxPosEmbed` returns).
RotaryEmbedding = tuple[torch.Tensor, torch.Tensor]


def rotary_phases(rotary_emb: RotaryEmbedding, extra_tokens: int = 0) -> torch.Tensor:
    """`(cos, sin)` -> unit complex phases `[S + extra_tokens, head_dim / 2]`; the extra (unrotated) tokens get 1."""
    cos, sin = rotary_emb
    phases = torch.complex(cos[..., 0::2].float(), sin[..., 0::2].float())
    if extra_tokens:
        phases = torch.cat([phases, phases.new_ones(*phases.shape[:-2], extra_tokens, phases.shape[-1])], dim=-2)
    return phases


def apply_rotary(x: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs of `x` `[B, S, H, D]` by `phases` `[S, D / 2]`.

    One complex multiplication: the same rotation as `diffusers.models.embeddings.apply_rotary_emb` in its real
    form, in one pass over `x` instead of five (5.2x faster on a CPU for 4096 tokens x 8 heads x 64, one thread).
    """
    rotated = torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * phases.unsqueeze(-2)
    return torch.view_as_real(rotated).flatten(-2).type_as(x)


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


def _heads(attn: SkyReelsV4Attention, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.unflatten(-1, (attn.heads, -1)) for t in tensors)


def _project(
    attn: SkyReelsV4Attention, states: torch.Tensor, phases: torch.Tensor | None, added: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v `[B, S, H, D]` of `states`: projected (with the added, text-stream weights if `added`), QK-normed and
    rotated by `phases` (`None`: no rotation). One step at a time, so that at most one extra tensor is alive."""
    if added:
        query, key, value = _heads(attn, *_project_added_qkv(attn, states))
        norm_q, norm_k = attn.norm_added_q, attn.norm_added_k
    else:
        query, key, value = _heads(attn, *_project_qkv(attn, states))
        norm_q, norm_k = attn.norm_q, attn.norm_k
    query = norm_q(query)
    key = norm_k(key)
    if phases is not None:
        query = apply_rotary(query, phases)
        key = apply_rotary(key, phases)
    return query, key, value


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
            query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1)))
            if rotary_emb is not None:
                query = apply_rotary(query, rotary_phases(rotary_emb))
            key, value = _heads(attn, *_project_kv(attn, encoder_hidden_states))
            key = attn.norm_k(key)
            if encoder_rotary_emb is not None:
                key = apply_rotary(key, rotary_phases(encoder_rotary_emb))
            return attn.to_out[1](attn.to_out[0](self._attend(query, key, value, attention_mask)))

        if encoder_hidden_states is None:
            phases = None if rotary_emb is None else rotary_phases(rotary_emb)
            out = self._attend(*_project(attn, hidden_states, phases), attention_mask)
            return attn.to_out[1](attn.to_out[0](out))

        num_x, num_text = hidden_states.shape[1], encoder_hidden_states.shape[1]
        if attn.add_q_proj is None:
            # Single stream: one set of weights for both streams, so the joint sequence is formed first and the
            # projections, norms and output projection run once on it; text tokens get the identity rotation.
            phases = None if rotary_emb is None else rotary_phases(rotary_emb, extra_tokens=num_text)
            query, key, value = _project(attn, torch.cat([hidden_states, encoder_hidden_states], dim=1), phases)
            out = attn.to_out[0](self._attend(query, key, value, attention_mask))
            out, text_out = out.split([num_x, num_text], dim=1)
            return attn.to_out[1](out), text_out

        # Dual stream: each stream has its own projections and norms; the joint sequence is formed after them.
        phases = None if rotary_emb is None else rotary_phases(rotary_emb)
        query, key, value = _project(attn, hidden_states, phases)
        text_query, text_key, text_value = _project(attn, encoder_hidden_states, None, added=True)
        query = torch.cat([query, text_query], dim=1)
        key = torch.cat([key, text_key], dim=1)
        value = torch.cat([value, text_value], dim=1)
        out, text_out = self._attend(query, key, value, attention_mask).split([num_x, num_text], dim=1)
        return attn.to_out[1](attn.to_out[0](out)), attn.to_add_out(text_out)

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
