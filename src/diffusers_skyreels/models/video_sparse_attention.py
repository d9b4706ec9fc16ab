"""Video Sparse Attention (VSA, Zhang et al., arXiv 2505.13389) for the SkyReels V4 refiner.

The video patch grid is tiled into cubes (default 4x4x4 = 64 tokens). A coarse stage mean-pools queries and keys per
cube, scores every query cube against every key cube and keeps, per query cube and head, the `top_k` best key cubes.
A fine stage then runs exact token-level attention of each query cube over the tokens of its selected key cubes plus
all "extra" tokens (in-context references before the grid, text after it). Extra tokens attend densely to everything.

VSA combines the stages as `O = O_fine + G_c * O_coarse`, where `O_coarse` is the cube-level attention output
broadcast back to the tokens of each query cube and `G_c` is a gate computed from the hidden states. Here the gate is
an explicit, optional input (`coarse_gate`); `None` means a zero gate, so with `top_k` = all cubes VSA equals dense
attention exactly. `add_coarse_gate` gives an attention module a zero-initialised gate projection, so a model
fine-tuned from dense weights starts from the fine-only output and learns to use the coarse term.

Two implementations share the coarse stage: a pure PyTorch one that reorders tokens into cube-major order, gathers
the selected key cubes per query cube and runs batched dense attention over them (chunked to bound memory), and one
on `torch.nn.attention.flex_attention` with a `BlockMask` whose blocks are the cubes (compiled on CUDA).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention_skyreels_v4 import RotaryEmbedding, SkyReelsV4Attention, SkyReelsV4AttnProcessor

Backend = Literal["auto", "torch", "flex"]

# Elements of gathered key + value tensors per fine-stage chunk (8 MiB in float32): bounds the memory of the gathers.
# On the 2-core CPU, chunks from 0.5 MiB to 32 MiB ran equally fast at 16k and 32k tokens.
_FINE_CHUNK_ELEMENTS = 1 << 21
# flex_attention's GPU kernels tile blocks by 16 tokens; cubes are padded up to a multiple of it in the flex path.
_FLEX_BLOCK_MULTIPLE = 16


@dataclass(frozen=True)
class SparseLayout:
    """Where the video patch grid sits in an attention sequence, and how sparse VSA over it is.

    Tokens `[grid_offset, grid_offset + T * H * W)` of the sequence are the patch grid in row-major `(t, h, w)` order;
    every other token is an extra token (dense). Grid dims need not be multiples of `cube_size`: edge cubes are
    partial and hold only real tokens.

    Args:
        grid_offset: index of the first grid token in the sequence.
        grid_size: `(T, H, W)` of the patch grid.
        top_k: key cubes each query cube attends to in the fine stage, `1 <= top_k <= num_cubes`.
        cube_size: `(t, h, w)` extent of a cube; the paper uses `(4, 4, 4)`.
    """

    grid_offset: int
    grid_size: tuple[int, int, int]
    top_k: int
    cube_size: tuple[int, int, int] = (4, 4, 4)

    def __post_init__(self) -> None:
        for name in ("grid_size", "cube_size"):
            dims = tuple(getattr(self, name))
            if len(dims) != 3 or any(int(d) != d or d < 1 for d in dims):
                raise ValueError(f"`{name}` must be three integers >= 1, got {dims}.")
            object.__setattr__(self, name, tuple(int(d) for d in dims))
        if self.grid_offset < 0:
            raise ValueError(f"`grid_offset` must be >= 0, got {self.grid_offset}.")
        if not 1 <= self.top_k <= self.num_cubes:
            raise ValueError(
                f"`top_k` must be in [1, {self.num_cubes}] (the number of cubes of grid {self.grid_size} with cube "
                f"{self.cube_size}), got {self.top_k}."
            )

    @classmethod
    def from_sparsity(
        cls,
        grid_offset: int,
        grid_size: tuple[int, int, int],
        sparsity: float,
        cube_size: tuple[int, int, int] = (4, 4, 4),
    ) -> SparseLayout:
        """Layout keeping `ceil((1 - sparsity) * num_cubes)` key cubes (at least one), as VSA's sparsity setting."""
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"`sparsity` must be in [0, 1), got {sparsity}.")
        layout = cls(grid_offset, grid_size, 1, cube_size)
        # Rounded first so that e.g. 0.125 * 256 lands on 32, not on 32.000000000000004 -> 33.
        return replace(layout, top_k=max(1, math.ceil(round((1.0 - sparsity) * layout.num_cubes, 6))))

    @property
    def cube_grid(self) -> tuple[int, int, int]:
        """Number of cubes along `(t, h, w)`, counting partial edge cubes."""
        return tuple(math.ceil(g / c) for g, c in zip(self.grid_size, self.cube_size, strict=True))

    @property
    def num_cubes(self) -> int:
        return math.prod(self.cube_grid)

    @property
    def num_grid_tokens(self) -> int:
        return math.prod(self.grid_size)

    @property
    def grid_end(self) -> int:
        return self.grid_offset + self.num_grid_tokens


class _CubeTables(NamedTuple):
    index: torch.Tensor  # [C, P] grid token of each cube slot (0 in padding slots)
    valid: torch.Tensor  # [C, P] bool, False in padding slots of partial cubes
    count: torch.Tensor  # [C] real tokens per cube
    position: torch.Tensor  # [N] flat slot (in C * P) of each grid token


@functools.lru_cache(maxsize=32)
def _cube_tables(
    grid_size: tuple[int, int, int], cube_size: tuple[int, int, int], slots: int, device: torch.device
) -> _CubeTables:
    """Cube-major token order of a grid: cubes in raster order, tokens in raster order inside each cube.

    Each cube gets `slots >= prod(cube_size)` slots; slots past the cube's real tokens are padding.
    """
    grid_t, grid_h, grid_w = grid_size
    axes = []
    for axis, (size, cube) in enumerate(zip(grid_size, cube_size, strict=True)):
        starts = torch.arange(math.ceil(size / cube), device=device) * cube
        coords = starts[:, None] + torch.arange(cube, device=device)  # [cubes along the axis, offset in the cube]
        shape = [1] * 6
        shape[axis], shape[axis + 3] = coords.shape
        axes.append(coords.view(shape))
    t, h, w = axes
    valid = ((t < grid_t) & (h < grid_h) & (w < grid_w)).flatten(0, 2).flatten(1)
    index = (t * (grid_h * grid_w) + h * grid_w + w).flatten(0, 2).flatten(1)
    pad = slots - index.shape[1]
    index = F.pad(torch.where(valid, index, 0), (0, pad))
    valid = F.pad(valid, (0, pad))
    position = torch.empty(math.prod(grid_size), dtype=torch.long, device=device)
    position[index[valid]] = torch.arange(valid.numel(), device=device)[valid.flatten()]
    return _CubeTables(index, valid, valid.sum(-1), position)


def _to_cubes(x: torch.Tensor, tables: _CubeTables) -> torch.Tensor:
    """`[B, N, H, D]` grid tokens -> `[B, H, C, P, D]` cube-major (padding slots hold token 0)."""
    cubes = x.index_select(1, tables.index.flatten()).unflatten(1, tables.index.shape)
    return cubes.permute(0, 3, 1, 2, 4)


def _cube_means(cubes: torch.Tensor, tables: _CubeTables) -> torch.Tensor:
    """Mean over the real tokens of each cube, `[B, H, C, P, D]` -> `[B, H, C, D]`, accumulated in float32."""
    weights = tables.valid.float() / tables.count[:, None].float()
    return torch.einsum("bhcpd,cp->bhcd", cubes.float(), weights)


class _BlockOrder(NamedTuple):
    order: torch.Tensor  # [L] sequence token of each slot: the cubes, then the extra tokens packed into blocks
    valid: torch.Tensor  # [L] bool, False in padding slots
    inverse: torch.Tensor  # [S] slot of each sequence token
    extra: torch.Tensor  # [E] the extra tokens, in sequence order
    num_cubes: int
    num_blocks: int  # cubes + extra blocks


@functools.lru_cache(maxsize=32)
def _block_order(layout: SparseLayout, seq_len: int, slots: int, device: torch.device) -> _BlockOrder:
    """The sequence as blocks of `slots` tokens: one block per cube, then the extra tokens in as many blocks as needed."""
    tables = _cube_tables(layout.grid_size, layout.cube_size, slots, device)
    num_cubes = tables.index.shape[0]
    extra = torch.cat(
        [torch.arange(layout.grid_offset, device=device), torch.arange(layout.grid_end, seq_len, device=device)]
    )
    extra_slots = math.ceil(extra.numel() / slots) * slots
    order = torch.cat([tables.index.flatten() + layout.grid_offset, F.pad(extra, (0, extra_slots - extra.numel()))])
    valid = torch.cat([tables.valid.flatten(), torch.arange(extra_slots, device=device) < extra.numel()])
    inverse = torch.empty(seq_len, dtype=torch.long, device=device)
    inverse[layout.grid_offset : layout.grid_end] = tables.position
    inverse[extra] = num_cubes * slots + torch.arange(extra.numel(), device=device)
    return _BlockOrder(order, valid, inverse, extra, num_cubes, num_cubes + extra_slots // slots)


def _key_blocks(blocks: _BlockOrder, key_mask: torch.Tensor | None, batch: int) -> torch.Tensor:
    """`[B, L]` validity of every key slot: real token and not masked."""
    valid = blocks.valid.expand(batch, -1)
    if key_mask is not None:
        valid = valid & key_mask[:, blocks.order]
    return valid


def _attend_torch(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: SparseLayout,
    selected: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Sparse attention by gathering, per query cube, its selected cube blocks and the extra blocks: `[B, S, H, D]`.

    Query cubes are batched (in chunks) through SDPA over their gathered keys; extra queries use dense SDPA.
    """
    batch, seq_len, heads, head_dim = query.shape
    slots = math.prod(layout.cube_size)
    blocks = _block_order(layout, seq_len, slots, query.device)
    num_cubes, num_blocks = blocks.num_cubes, blocks.num_blocks

    def to_blocks(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, order).unflatten(1, (-1, slots)).permute(0, 3, 1, 2, 4)  # [B, H, blocks, P, D]

    q_cubes = to_blocks(query, blocks.order[: num_cubes * slots]).flatten(0, 2)  # [B * H * C, P, D]
    k_blocks, v_blocks = (to_blocks(t, blocks.order).flatten(0, 2) for t in (key, value))
    slot_valid = _key_blocks(blocks, key_mask, batch)
    # Known from the shapes, without reading `slot_valid` (a device sync in every call): partial edge cubes, a
    # partly filled last block of extra tokens, or a key mask.
    needs_mask = (
        key_mask is not None
        or any(g % c for g, c in zip(layout.grid_size, layout.cube_size))
        or (seq_len - layout.num_grid_tokens) % slots != 0
    )
    slot_valid = slot_valid.reshape(batch * num_blocks, slots)

    # Key blocks of each query cube: its selected cubes, then every extra block.
    extra_blocks = torch.arange(num_cubes, num_blocks, device=query.device).expand(batch, heads, num_cubes, -1)
    key_block = torch.cat([selected, extra_blocks], dim=-1)
    keys_per_cube = key_block.shape[-1] * slots
    # Flat index of those blocks in `k_blocks` ([B * H * blocks, P, D]) and in `slot_valid` ([B * blocks, P]),
    # one row per (batch, head, query cube).
    kv_index = key_block + torch.arange(batch * heads, device=query.device).view(batch, heads, 1, 1) * num_blocks
    mask_index = key_block + torch.arange(batch, device=query.device).view(batch, 1, 1, 1) * num_blocks
    kv_index, mask_index = kv_index.flatten(0, 2), mask_index.flatten(0, 2)

    chunk = max(1, _FINE_CHUNK_ELEMENTS // (keys_per_cube * head_dim * 2))
    outs = []
    for start in range(0, kv_index.shape[0], chunk):
        rows = slice(start, start + chunk)
        gathered = (1, kv_index[rows].shape[0], keys_per_cube)
        keys, values = (
            t.index_select(0, kv_index[rows].flatten()).view(*gathered, head_dim) for t in (k_blocks, v_blocks)
        )
        mask = None
        if needs_mask:
            mask = slot_valid.index_select(0, mask_index[rows].flatten()).view(gathered).unsqueeze(2)
        outs.append(F.scaled_dot_product_attention(q_cubes[None, rows], keys, values, attn_mask=mask, scale=scale)[0])
    grid_out = torch.cat(outs).view(batch, heads, num_cubes * slots, head_dim).transpose(1, 2)  # [B, C * P, H, D]
    grid_out = grid_out.index_select(1, blocks.inverse[layout.grid_offset : layout.grid_end])
    if seq_len == layout.num_grid_tokens:
        return grid_out

    mask = None if key_mask is None else key_mask[:, None, None, :]
    extra_out = F.scaled_dot_product_attention(
        query.index_select(1, blocks.extra).transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        attn_mask=mask,
        scale=scale,
    ).transpose(1, 2)
    return torch.cat([extra_out[:, : layout.grid_offset], grid_out, extra_out[:, layout.grid_offset :]], dim=1)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # Static shapes: one compile per sequence shape (fixed across the layers and steps of a generation). Automatic
    # dynamic shapes hit an Inductor C++ codegen error for CPU flex_attention in torch 2.13.
    return torch.compile(flex_attention, dynamic=False)


def flex_attention_available() -> bool:
    """Whether this PyTorch has `torch.nn.attention.flex_attention` (the block-mask fast path)."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _attend_flex(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: SparseLayout,
    selected: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
    compile_flex: bool,
) -> torch.Tensor:
    """Sparse attention (grid and extra queries) in one flex_attention call: returns `[B, S, H, D]`.

    Tokens are reordered to blocks (`_block_order`), each cube padded to a block of `slots` tokens. Query block
    `c < C` sees its selected cube blocks and all extra blocks; extra query blocks see every block; the mask_mod
    drops padding slots and masked keys.
    """
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    batch, seq_len, heads, _ = query.shape
    device = query.device
    slots = math.ceil(math.prod(layout.cube_size) / _FLEX_BLOCK_MULTIPLE) * _FLEX_BLOCK_MULTIPLE
    blocks = _block_order(layout, seq_len, slots, device)
    num_cubes, num_blocks = blocks.num_cubes, blocks.num_blocks
    kv_valid = _key_blocks(blocks, key_mask, batch).contiguous()

    allowed = torch.zeros(batch, heads, num_blocks, num_blocks, dtype=torch.bool, device=device)
    allowed[:, :, :num_cubes].scatter_(-1, selected, True)
    allowed[:, :, :num_cubes, num_cubes:] = True
    allowed[:, :, num_cubes:] = True
    # Listed blocks first, ascending; `kv_num_blocks` says how many of each row are real.
    kv_num_blocks = allowed.sum(-1, dtype=torch.int32)
    kv_indices = allowed.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        # Uncompiled flex evaluates only the mask_mod, so it must carry the block selection as well.
        return kv_valid[b, kv_idx] & allowed[b, h, q_idx // slots, kv_idx // slots]

    block_mask = BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, BLOCK_SIZE=slots, mask_mod=mask_mod)
    attend = _compiled_flex_attention() if compile_flex else flex_attention
    kernel_options = None
    if query.is_cuda:
        # Default GPU tiles can be 128 tokens; a tile must divide the block (one cube), or flex refuses the mask.
        tile = next(size for size in (64, 32, 16) if slots % size == 0)
        kernel_options = {"BLOCK_M": tile, "BLOCK_N": tile}
    q, k, v = (t.index_select(1, blocks.order).transpose(1, 2) for t in (query, key, value))
    out = attend(q, k, v, block_mask=block_mask, scale=scale, kernel_options=kernel_options)
    return out.transpose(1, 2).index_select(1, blocks.inverse)


def video_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: SparseLayout,
    coarse_gate: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: Backend = "auto",
    compile_flex: bool | None = None,
) -> torch.Tensor:
    """Video Sparse Attention over `[B, S, heads, head_dim]` tensors (self-attention; same layout for q and k).

    Args:
        query, key, value: `[B, S, H, D]`, Diffusers' `dispatch_attention_fn` layout.
        layout: where the patch grid sits in the sequence, cube size and `top_k`.
        coarse_gate: `G_c`, broadcastable to `[B, T*H*W, H, D]` (grid tokens only); adds `G_c * O_coarse` to the
            grid outputs. `None` (zero gate) leaves the fine stage alone, which equals dense attention when `top_k`
            is the number of cubes.
        key_padding_mask: boolean, broadcastable to `[B, S]`, `True` for keys that may be attended to. It masks keys
            in the fine stage; the coarse cube means always pool every real grid token.
        scale: softmax scale, `1 / sqrt(D)` by default.
        backend: `"torch"` (gather + batched SDPA), `"flex"` (flex_attention with a cube BlockMask) or `"auto"`
            (flex for CUDA inference when available, else torch). Training stays on the torch path under "auto":
            flex's default Hopper backward tiles are 128 tokens, wider than a 64-token cube block.
        compile_flex: run flex_attention through `torch.compile`; default: on CUDA only. Uncompiled flex materialises
            the full score matrix (a reference, for tests); compiled flex on CPU was not faster than the torch path.

    Returns:
        `[B, S, H, D]`, like `query`.
    """
    if query.dim() != 4 or key.shape != value.shape or query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"`query`, `key`, `value` must be [B, S, H, D] with matching key/value shapes, got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}."
        )
    if query.shape[:3] != key.shape[:3]:
        raise ValueError(
            f"VSA is self-attention over one layout: query and key must share [B, S, H], got {tuple(query.shape)} "
            f"and {tuple(key.shape)}."
        )
    batch, seq_len, heads, head_dim = query.shape
    if layout.grid_end > seq_len:
        raise ValueError(
            f"The grid {layout.grid_size} at offset {layout.grid_offset} needs {layout.grid_end} tokens, but the "
            f"sequence has {seq_len}."
        )
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"`key_padding_mask` must be boolean, got {key_padding_mask.dtype}.")
        try:
            key_padding_mask = key_padding_mask.to(query.device).expand(batch, seq_len)
        except RuntimeError as error:
            raise ValueError(f"`key_padding_mask` must broadcast to [B, S] = {[batch, seq_len]}.") from error
    if backend not in ("auto", "torch", "flex"):
        raise ValueError(f"`backend` must be 'auto', 'torch' or 'flex', got {backend!r}.")
    if backend == "auto":
        training = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        backend = "flex" if query.is_cuda and not training and flex_attention_available() else "torch"
    scale = head_dim**-0.5 if scale is None else scale

    tables = _cube_tables(layout.grid_size, layout.cube_size, math.prod(layout.cube_size), query.device)
    grid = slice(layout.grid_offset, layout.grid_end)
    q_means = _cube_means(_to_cubes(query[:, grid], tables), tables)
    k_means = _cube_means(_to_cubes(key[:, grid], tables), tables)
    cube_scores = torch.matmul(q_means, k_means.transpose(-1, -2)) * scale
    selected = cube_scores.topk(layout.top_k, dim=-1, sorted=False).indices

    if backend == "flex":
        compile_flex = query.is_cuda if compile_flex is None else compile_flex
        out = _attend_flex(query, key, value, layout, selected, key_padding_mask, scale, compile_flex)
    else:
        out = _attend_torch(query, key, value, layout, selected, key_padding_mask, scale)
    if coarse_gate is None:
        return out

    v_means = _cube_means(_to_cubes(value[:, grid], tables), tables)
    coarse = torch.matmul(cube_scores.softmax(dim=-1), v_means).to(query.dtype).transpose(1, 2)  # [B, C, H, D]
    cube_of_token = tables.position // tables.index.shape[1]
    grid_out = out[:, grid] + coarse_gate * coarse.index_select(1, cube_of_token)
    return torch.cat([out[:, : layout.grid_offset], grid_out, out[:, layout.grid_end :]], dim=1)


def add_coarse_gate(attn: SkyReelsV4Attention) -> nn.Linear:
    """Give `attn` VSA's coarse-stage gate `G_c = to_gate_compress(x)`, zero-initialised.

    A zero gate keeps the layer's output equal to the fine stage alone (dense attention at full `top_k`), so weights
    trained with dense attention stay valid; fine-tuning with VSA then learns how much coarse output to mix in.
    """
    if attn.is_cross_attention:
        raise ValueError("The coarse gate belongs to joint self-attention, not to cross-attention.")
    gate = nn.Linear(attn.to_q.in_features, attn.heads * attn.head_dim, bias=attn.use_bias)
    nn.init.zeros_(gate.weight)
    if gate.bias is not None:
        nn.init.zeros_(gate.bias)
    attn.to_gate_compress = gate.to(device=attn.to_q.weight.device, dtype=attn.to_q.weight.dtype)
    return attn.to_gate_compress


def _key_padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The `[B, 1, 1, S]` boolean key mask of a joint attention as `[B, S]`; VSA takes no other kind of mask."""
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool or attention_mask.dim() != 4 or attention_mask.shape[1:3] != (1, 1):
        raise ValueError(
            "Video sparse attention supports only boolean key-padding masks of shape [B, 1, 1, S], got "
            f"{attention_mask.dtype} {tuple(attention_mask.shape)}."
        )
    return attention_mask[:, 0, 0]


class SkyReelsV4SparseAttnProcessor(SkyReelsV4AttnProcessor):
    """`SkyReelsV4AttnProcessor` that runs the joint self-attention with Video Sparse Attention when given a layout.

    With `sparse_layout=None`, and always for cross-attention, it is the parent processor (dense, through
    `dispatch_attention_fn`, honouring `_attention_backend` and `_parallel_config`): dense attention stays available
    per call. With a layout, the joint sequence `[x ; text]` goes through `video_sparse_attention`; the layout's grid
    must lie inside the `x` tokens, and text tokens are extra (dense) tokens. If the attention module has a
    `to_gate_compress` projection (see `add_coarse_gate`), it supplies the coarse gate from the grid tokens' hidden
    states. The sparse path ignores `_attention_backend` (VSA is its own kernel) and does not support context
    parallelism.

    Args:
        backend: VSA implementation, see `video_sparse_attention`.
    """

    def __init__(self, backend: Backend = "auto") -> None:
        self.backend = backend
        self._sparse_call: tuple[SparseLayout, torch.Tensor | None] | None = None

    def __call__(
        self,
        attn: SkyReelsV4Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: RotaryEmbedding | None = None,
        encoder_rotary_emb: RotaryEmbedding | None = None,
        sparse_layout: SparseLayout | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        args = (attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, encoder_rotary_emb)
        if sparse_layout is None or attn.is_cross_attention:
            return super().__call__(*args)
        if self._parallel_config is not None:
            raise ValueError("Video sparse attention does not support context parallelism; pass `sparse_layout=None`.")
        if sparse_layout.grid_end > hidden_states.shape[1]:
            raise ValueError(
                f"The sparse grid ends at token {sparse_layout.grid_end}, past the {hidden_states.shape[1]} x tokens."
            )
        gate = None
        if getattr(attn, "to_gate_compress", None) is not None:
            grid_states = hidden_states[:, sparse_layout.grid_offset : sparse_layout.grid_end]
            gate = attn.to_gate_compress(grid_states).unflatten(-1, (attn.heads, -1))
        # The parent computes q, k, v and calls `_attend`; the layout reaches `_attend` through this per-call slot.
        self._sparse_call = (sparse_layout, gate)
        try:
            return super().__call__(*args)
        finally:
            self._sparse_call = None

    def _attend(self, query, key, value, attention_mask) -> torch.Tensor:
        if self._sparse_call is None:
            return super()._attend(query, key, value, attention_mask)
        layout, gate = self._sparse_call
        out = video_sparse_attention(
            query,
            key,
            value,
            layout,
            coarse_gate=gate,
            key_padding_mask=_key_padding_mask(attention_mask),
            backend=self.backend,
        )
        return out.flatten(2, 3).type_as(query)
