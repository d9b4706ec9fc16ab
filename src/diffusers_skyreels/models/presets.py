"""Named sizes of the SkyReels V4 branches (architecture.md §9). The paper gives no sizes; none of these is its.

- `tiny`: for tests, builds and runs in milliseconds on a CPU.
- `demo`: the size of the model this package trains and ships (examples/demo).
- `large`: 14B-class widths (5120 = 40 heads x 128, 40 blocks) for memory planning and GPU benchmarks; build it on
  the `meta` device to count parameters without allocating them.
"""

from __future__ import annotations

from typing import Any

_SHARED: dict[str, dict[str, Any]] = {
    "tiny": dict(
        num_attention_heads=2,
        attention_head_dim=16,
        num_dual_stream_layers=1,
        num_single_stream_layers=1,
        ffn_dim=64,
        text_embed_dim=32,
        freq_dim=32,
    ),
    "demo": dict(
        num_attention_heads=4,
        attention_head_dim=32,
        num_dual_stream_layers=2,
        num_single_stream_layers=4,
        ffn_dim=512,
        text_embed_dim=64,
        freq_dim=64,
        # RoPE's fastest pair turns 1 rad per position and each next one theta ** (-2 / axis dim) times slower. With
        # the usual 10000 and 5-6 pairs per axis, only the fastest pair turns noticeably over the demo's 9 x 4 x 4
        # token grid, so frame t + 6 looks like frame t (6 rad ~ 2 pi). 32 spreads the pairs over 1 .. 1/16 rad per
        # position (examples/demo/README.md has the measured effect).
        rope_theta=32.0,
    ),
    "large": dict(
        num_attention_heads=40,
        attention_head_dim=128,
        num_dual_stream_layers=10,
        num_single_stream_layers=30,
        ffn_dim=13824,
        text_embed_dim=3584,
        freq_dim=256,
    ),
}

# Latent channels of the VAEs each preset is paired with: the tiny test VAEs, the demo's own VAEs, and Wan-VAE (16)
# with the MMAudio VAE (40) for `large`.
_LATENT_CHANNELS = {"tiny": (4, 4), "demo": (8, 8), "large": (16, 40)}


def preset_config(name: str, branch: str) -> dict[str, Any]:
    """The config of branch `"video"`, `"audio"` or `"refiner"` in preset `name`."""
    if name not in _SHARED:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(_SHARED)}.")
    video_channels, audio_channels = _LATENT_CHANNELS[name]
    config = dict(_SHARED[name])
    if branch in ("video", "refiner"):
        config.update(in_channels=2 * video_channels + 1, out_channels=video_channels)
        if branch == "refiner":
            config.update(spatial_scale=2, temporal_scale=2)
    elif branch == "audio":
        config.update(in_channels=2 * audio_channels + 1, out_channels=audio_channels)
    else:
        raise ValueError(f"Unknown branch {branch!r}; choose 'video', 'audio' or 'refiner'.")
    return config


PRESET_NAMES = tuple(_SHARED)
