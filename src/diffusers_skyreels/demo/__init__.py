"""Demo data: the procedural bouncing world (`world.py`) that the project's small demo model is trained on.

Names are loaded lazily so that `python -m diffusers_skyreels.demo.world` does not import `world` twice.
"""

import importlib

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "PITCHES_HZ",
    "PROMPT_TEMPLATES",
    "SHAPE_SIZES",
    "SPEEDS",
    "ClipSpec",
    "RenderedClip",
    "bounce_times",
    "frame_centres_x",
    "object_centre_x",
    "object_centre_y",
    "object_size",
    "parse_prompt",
    "render_clip",
    "sample_clip_spec",
    "speed_px_per_s",
    "write_dataset",
]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module(".world", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
