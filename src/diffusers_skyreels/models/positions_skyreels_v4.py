"""Token positions for RoPE (architecture.md §4, §6, §7) and N-D patchify.

Positions are float coordinates in *latent units*: video `(frame, row, column)` of the patch grid, audio `(time,)`
with the audio latent index scaled into video-latent-frame units. The first axis is always time, which is all the
audio<->video cross-attention uses.
"""

from __future__ import annotations

import math

import torch


def patchify(x: torch.Tensor, patch_size: tuple[int, ...]) -> torch.Tensor:
    """`[B, C, d1, ..., dn]` -> `[B, prod(d_i / p_i), C * prod(p_i)]`, tokens in row-major grid order."""
    batch, channels, *dims = x.shape
    grid = [d // p for d, p in zip(dims, patch_size)]
    x = x.reshape(batch, channels, *[v for g, p in zip(grid, patch_size) for v in (g, p)])
    n = len(dims)
    x = x.permute(0, *range(2, 2 + 2 * n, 2), *range(3, 3 + 2 * n, 2), 1)
    return x.reshape(batch, math.prod(grid), math.prod(patch_size) * channels)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, ...], patch_size: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `patchify`: `[B, prod(grid), C * prod(p)]` -> `[B, C, g1 * p1, ..., gn * pn]`."""
    batch = tokens.shape[0]
    n = len(grid)
    x = tokens.reshape(batch, *grid, *patch_size, -1)
    x = x.permute(0, 2 * n + 1, *[v for i in range(n) for v in (1 + i, 1 + n + i)])
    return x.reshape(batch, -1, *[g * p for g, p in zip(grid, patch_size)])


def video_positions(
    frame_positions: torch.Tensor, grid_height: int, grid_width: int, spatial_step: float = 1.0
) -> torch.Tensor:
    """`[F * H * W, 3]` positions `(frame, row * step, column * step)` of a patch grid.

    `frame_positions` gives each latent frame's temporal coordinate (negative for in-context references);
    `spatial_step < 1` places a high-resolution keyframe grid onto the low-resolution one.
    """
    device = frame_positions.device
    num_frames = frame_positions.shape[0]
    rows = torch.arange(grid_height, device=device, dtype=torch.float32) * spatial_step
    cols = torch.arange(grid_width, device=device, dtype=torch.float32) * spatial_step
    return torch.stack(
        [
            frame_positions.float()[:, None, None].expand(num_frames, grid_height, grid_width),
            rows[None, :, None].expand(num_frames, grid_height, grid_width),
            cols[None, None, :].expand(num_frames, grid_height, grid_width),
        ],
        dim=-1,
    ).reshape(-1, 3)


def audio_positions(num_tokens: int, step: float, offset: int = 0, device: torch.device | None = None) -> torch.Tensor:
    """`[num_tokens, 1]` positions `(offset + k) * step`; `step` converts audio tokens to video-latent-frame units."""
    index = torch.arange(offset, offset + num_tokens, device=device, dtype=torch.float32)
    return (index * step)[:, None]
