"""Video Sparse Attention: equality with dense attention, an independent masked-dense reference, the processor."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from diffusers_skyreels.models.attention_skyreels_v4 import SkyReelsV4Attention, SkyReelsV4AttnProcessor
from diffusers_skyreels.models.video_sparse_attention import (
    SkyReelsV4SparseAttnProcessor,
    SparseLayout,
    add_coarse_gate,
    flex_attention_available,
    video_sparse_attention,
)

# Uncompiled flex_attention (the CPU reference of the flex path) warns that it materialises the scores.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

BACKENDS = ["torch", pytest.param("flex", marks=pytest.mark.skipif(not flex_attention_available(), reason="no flex"))]
PREFIX, GRID, CUBE, SUFFIX = 5, (5, 6, 7), (4, 4, 4), 9  # 2 x 2 x 2 cubes, all partial but one
SEQ = PREFIX + math.prod(GRID) + SUFFIX


def _qkv(batch=2, seq=SEQ, heads=3, head_dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seq, heads, head_dim, generator=generator) for _ in range(3)]


def _sdpa(query, key, value, mask=None):
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), mask)
    return out.transpose(1, 2)


def _reference_cubes(layout):
    """Grid token ids of each cube, from token coordinates (independent of the implementation's tables)."""
    cubes = {}
    grid_t, grid_h, grid_w = layout.grid_size
    for t, h, w in itertools.product(range(grid_t), range(grid_h), range(grid_w)):
        cube = tuple(c // s for c, s in zip((t, h, w), layout.cube_size, strict=True))
        cubes.setdefault(cube, []).append((t * grid_h + h) * grid_w + w)
    return [cubes[c] for c in sorted(cubes)]


def _reference_coarse(query, key, value, layout):
    """Cube-mean scores (float64, loops) and the coarse output per grid token, `[B, H, C, C]` and `[B, N, H, D]`."""
    cubes = _reference_cubes(layout)
    grid = slice(layout.grid_offset, layout.grid_end)
    q, k, v = (t[:, grid].double() for t in (query, key, value))
    q_mean, k_mean, v_mean = (torch.stack([t[:, ids].mean(1) for ids in cubes], dim=1) for t in (q, k, v))
    scores = torch.einsum("bchd,bkhd->bhck", q_mean, k_mean) / math.sqrt(query.shape[-1])
    coarse_cubes = torch.einsum("bhck,bkhd->bchd", scores.softmax(-1), v_mean)
    coarse = torch.empty_like(q)
    for c, ids in enumerate(cubes):
        coarse[:, ids] = coarse_cubes[:, c : c + 1]
    return scores, coarse


def _reference_vsa(query, key, value, layout, key_padding_mask=None):
    """Dense attention masked to each query cube's top-k key cubes (plus the extra tokens), in float64."""
    batch, seq, heads, _ = query.shape
    cubes = _reference_cubes(layout)
    scores, _ = _reference_coarse(query, key, value, layout)
    grid_ids = [[layout.grid_offset + i for i in ids] for ids in cubes]
    in_grid = torch.zeros(seq, dtype=torch.bool)
    in_grid[layout.grid_offset : layout.grid_end] = True
    mask = torch.ones(batch, heads, seq, seq, dtype=torch.bool)
    for b, h in itertools.product(range(batch), range(heads)):
        for c, queries in enumerate(grid_ids):
            allowed = ~in_grid.clone()
            for chosen in scores[b, h, c].topk(layout.top_k).indices.tolist():
                allowed[grid_ids[chosen]] = True
            mask[b, h, queries] = allowed
    if key_padding_mask is not None:
        mask &= key_padding_mask[:, None, None, :]
    return _sdpa(query.double(), key.double(), value.double(), mask).float()


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_top_k_equals_dense(backend):
    query, key, value = _qkv()
    layout = SparseLayout(PREFIX, GRID, top_k=8, cube_size=CUBE)
    out = video_sparse_attention(query, key, value, layout, backend=backend)
    torch.testing.assert_close(out, _sdpa(query, key, value), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "layout",
    [
        SparseLayout(PREFIX, GRID, top_k=3, cube_size=CUBE),
        SparseLayout(PREFIX, GRID, top_k=5, cube_size=(2, 3, 2)),  # 3 x 2 x 4 cubes
        SparseLayout(0, (4, 4, 8), top_k=1, cube_size=(2, 2, 2)),  # grid ends before the text tokens
    ],
    ids=["k3", "k5-small-cubes", "k1-no-prefix"],
)
def test_top_k_matches_masked_dense_reference(layout, backend):
    query, key, value = _qkv(seed=1)
    out = video_sparse_attention(query, key, value, layout, backend=backend)
    expected = _reference_vsa(query, key, value, layout)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(out, _sdpa(query, key, value), atol=1e-3)  # the sparsity is real


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_padding_mask(backend):
    query, key, value = _qkv(seed=2)
    layout = SparseLayout(PREFIX, GRID, top_k=2, cube_size=CUBE)
    keep = torch.ones(2, SEQ, dtype=torch.bool)
    keep[0, -4:] = False  # padded text
    keep[1, :2] = False
    out = video_sparse_attention(query, key, value, layout, key_padding_mask=keep, backend=backend)
    torch.testing.assert_close(out, _reference_vsa(query, key, value, layout, keep), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_coarse_gate(backend):
    query, key, value = _qkv(seed=3)
    layout = SparseLayout(PREFIX, GRID, top_k=3, cube_size=CUBE)
    fine = video_sparse_attention(query, key, value, layout, backend=backend)
    zero_gate = torch.zeros(2, math.prod(GRID), 3, 16)
    assert torch.equal(video_sparse_attention(query, key, value, layout, coarse_gate=zero_gate, backend=backend), fine)

    gate = torch.rand(2, math.prod(GRID), 3, 16)
    out = video_sparse_attention(query, key, value, layout, coarse_gate=gate, backend=backend)
    _, coarse = _reference_coarse(query, key, value, layout)
    expected = fine.clone()
    expected[:, layout.grid_offset : layout.grid_end] += gate * coarse.float()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_gradients_flow():
    query, key, value = (t.requires_grad_() for t in _qkv(seed=4))
    gate = torch.rand(1, math.prod(GRID), 3, 16, requires_grad=True)
    layout = SparseLayout(PREFIX, GRID, top_k=3, cube_size=CUBE)
    out = video_sparse_attention(query, key, value, layout, coarse_gate=gate, backend="torch")
    out.square().sum().backward()
    for tensor in (query, key, value, gate):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


def test_bfloat16_keeps_dtype_and_matches():
    query, key, value = _qkv(seed=5)
    layout = SparseLayout(PREFIX, GRID, top_k=8, cube_size=CUBE)
    out = video_sparse_attention(*(t.bfloat16() for t in (query, key, value)), layout)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _sdpa(query, key, value), atol=3e-2, rtol=0)


def test_from_sparsity():
    layout = SparseLayout.from_sparsity(0, (16, 16, 16), sparsity=0.875)
    assert layout.num_cubes == 64 and layout.top_k == 8
    assert SparseLayout.from_sparsity(0, (5, 6, 7), sparsity=0.99).top_k == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(grid_offset=0, grid_size=GRID, top_k=9), "top_k"),
        (dict(grid_offset=0, grid_size=GRID, top_k=0), "top_k"),
        (dict(grid_offset=0, grid_size=GRID, top_k=1, cube_size=(4, 0, 4)), "cube_size"),
        (dict(grid_offset=0, grid_size=(5, -1, 7), top_k=1), "grid_size"),
        (dict(grid_offset=-1, grid_size=GRID, top_k=1), "grid_offset"),
    ],
)
def test_bad_layouts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseLayout(**kwargs)


def test_bad_inputs():
    query, key, value = _qkv()
    layout = SparseLayout(PREFIX, GRID, top_k=2, cube_size=CUBE)
    with pytest.raises(ValueError, match="needs 229 tokens"):
        video_sparse_attention(*_qkv(seq=220), SparseLayout(PREFIX + 14, GRID, top_k=2, cube_size=CUBE))
    with pytest.raises(ValueError, match="query and key must share"):
        video_sparse_attention(query, key[:, :-1], value[:, :-1], layout)
    with pytest.raises(ValueError, match="boolean"):
        video_sparse_attention(query, key, value, layout, key_padding_mask=torch.ones(2, SEQ))
    with pytest.raises(ValueError, match="broadcast"):
        video_sparse_attention(query, key, value, layout, key_padding_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="backend"):
        video_sparse_attention(query, key, value, layout, backend="xformers")


# --- The attention processor on a real SkyReels V4 attention module. ---

DIM, HEADS, HEAD_DIM, REFS, TEXT = 32, 2, 16, 4, 7
X_TOKENS = REFS + math.prod(GRID)


def _module_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, X_TOKENS, DIM, generator=generator)
    text = torch.randn(2, TEXT, DIM, generator=generator)
    angles = torch.randn(X_TOKENS, HEAD_DIM // 2, generator=generator).repeat_interleave(2, dim=-1)
    keep = torch.ones(2, X_TOKENS + TEXT, dtype=torch.bool)
    keep[1, -3:] = False  # padded text of the second sample, as the branch builds it
    return x, text, (angles.cos(), angles.sin()), keep[:, None, None, :]


class _Recorder(SkyReelsV4AttnProcessor):
    """The dense processor, keeping the q, k, v it attends over."""

    def _attend(self, query, key, value, attention_mask):
        self.qkv = (query, key, value)
        return super()._attend(query, key, value, attention_mask)


def _attention(added_projections, seed=0):
    torch.manual_seed(seed)
    return SkyReelsV4Attention(DIM, HEADS, HEAD_DIM, added_projections=added_projections).eval()


@pytest.mark.parametrize("added_projections", [False, True], ids=["single-stream", "dual-stream"])
def test_processor_without_layout_is_the_parent(added_projections):
    attn = _attention(added_projections)
    x, text, rope, mask = _module_inputs()
    dense = attn(x, text, attention_mask=mask, rotary_emb=rope)
    attn.set_processor(SkyReelsV4SparseAttnProcessor())
    for got, expected in zip(attn(x, text, attention_mask=mask, rotary_emb=rope), dense, strict=True):
        assert torch.equal(got, expected)
    for got, expected in zip(attn.processor(attn, x, text, mask, rope, sparse_layout=None), dense, strict=True):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("added_projections", [False, True], ids=["single-stream", "dual-stream"])
def test_processor_full_top_k_matches_dense(added_projections):
    attn = _attention(added_projections)
    x, text, rope, mask = _module_inputs()
    dense = SkyReelsV4AttnProcessor()(attn, x, text, mask, rope)
    processor = SkyReelsV4SparseAttnProcessor()
    layout = SparseLayout(REFS, GRID, top_k=8, cube_size=CUBE)
    for got, expected in zip(processor(attn, x, text, mask, rope, sparse_layout=layout), dense, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    add_coarse_gate(attn)  # zero-initialised: still dense
    gated = processor(attn, x, text, mask, rope, sparse_layout=layout)
    for got, expected in zip(gated, dense, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.nn.init.normal_(attn.to_gate_compress.weight)
    assert not torch.allclose(processor(attn, x, text, mask, rope, sparse_layout=layout)[0], dense[0], atol=1e-3)


def test_processor_sparse_matches_functional_and_trains():
    attn = _attention(True)
    x, text, rope, mask = _module_inputs(seed=1)
    layout = SparseLayout(REFS, GRID, top_k=2, cube_size=CUBE)
    recorder = _Recorder()
    recorder(attn, x, text, mask, rope)
    query, key, value = recorder.qkv
    processor = SkyReelsV4SparseAttnProcessor(backend="torch")
    attn.set_processor(processor)
    expected = video_sparse_attention(query, key, value, layout, key_padding_mask=mask[:, 0, 0]).flatten(2)
    out, text_out = attn.processor(attn, x, text, mask, rope, sparse_layout=layout)
    torch.testing.assert_close(out, attn.to_out[0](expected[:, :X_TOKENS]), atol=1e-5, rtol=0)
    torch.testing.assert_close(text_out, attn.to_add_out(expected[:, X_TOKENS:]), atol=1e-5, rtol=0)

    add_coarse_gate(attn)
    out, text_out = attn.processor(attn, x, text, mask, rope, sparse_layout=layout)
    (out.square().mean() + text_out.square().mean()).backward()
    grads = [p.grad for p in attn.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert attn.to_gate_compress.weight.grad.abs().sum() > 0  # the zero gate still learns


def test_processor_cross_attention_ignores_layout():
    torch.manual_seed(0)
    attn = SkyReelsV4Attention(DIM, HEADS, HEAD_DIM, cross_attention=True)
    x, text, _, _ = _module_inputs()
    layout = SparseLayout(REFS, GRID, top_k=1, cube_size=CUBE)
    expected = SkyReelsV4AttnProcessor()(attn, x, text)
    assert torch.equal(SkyReelsV4SparseAttnProcessor()(attn, x, text, sparse_layout=layout), expected)


def test_processor_bad_inputs():
    attn = _attention(False)
    x, text, rope, mask = _module_inputs()
    processor = SkyReelsV4SparseAttnProcessor()
    with pytest.raises(ValueError, match="past the"):
        processor(attn, x, text, mask, rope, sparse_layout=SparseLayout(REFS + 1, GRID, top_k=1, cube_size=CUBE))
    layout = SparseLayout(REFS, GRID, top_k=1, cube_size=CUBE)
    with pytest.raises(ValueError, match="key-padding"):
        processor(attn, x, text, mask.float(), rope, sparse_layout=layout)
    with pytest.raises(ValueError, match="cross-attention"):
        add_coarse_gate(SkyReelsV4Attention(DIM, HEADS, HEAD_DIM, cross_attention=True))
    assert processor._sparse_call is None  # a failed call leaves no layout behind
