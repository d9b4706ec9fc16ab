"""SkyReels V4 for Diffusers: joint video + audio generation, inpainting and editing.

Importing the package registers its classes with Diffusers (see `registration.py`), so that
`DiffusionPipeline.from_pretrained` and `AutoModel.from_pretrained` load SkyReels V4 folders.
"""

import sys

from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin

from .loaders import SkyReelsV4LoraLoaderMixin
from .models import (
    SkyReelsV4AudioTransformer,
    SkyReelsV4RefinerTransformer,
    SkyReelsV4Transformer,
    SkyReelsV4TransformerOutput,
)
from .pipelines import (
    SkyReelsV4ImageToVideoPipeline,
    SkyReelsV4InpaintPipeline,
    SkyReelsV4Pipeline,
    SkyReelsV4PipelineOutput,
    SkyReelsV4PromptEncoder,
    SkyReelsV4RefinerPipeline,
    SkyReelsV4VideoEditPipeline,
    SkyReelsV4VideoExtensionPipeline,
)
from .registration import register_with_diffusers

__version__ = "0.1.0"

# Classes that saved folders name and Diffusers must be able to resolve.
_REGISTERED_CLASSES = [
    "SkyReelsV4AudioTransformer",
    "SkyReelsV4ImageToVideoPipeline",
    "SkyReelsV4InpaintPipeline",
    "SkyReelsV4Pipeline",
    "SkyReelsV4RefinerPipeline",
    "SkyReelsV4RefinerTransformer",
    "SkyReelsV4Transformer",
    "SkyReelsV4VideoEditPipeline",
    "SkyReelsV4VideoExtensionPipeline",
]

__all__ = [
    "DiffusionPipeline",
    "ModelMixin",
    "SchedulerMixin",
    "SkyReelsV4AudioTransformer",
    "SkyReelsV4ImageToVideoPipeline",
    "SkyReelsV4InpaintPipeline",
    "SkyReelsV4LoraLoaderMixin",
    "SkyReelsV4Pipeline",
    "SkyReelsV4PipelineOutput",
    "SkyReelsV4PromptEncoder",
    "SkyReelsV4RefinerPipeline",
    "SkyReelsV4RefinerTransformer",
    "SkyReelsV4Transformer",
    "SkyReelsV4TransformerOutput",
    "SkyReelsV4VideoEditPipeline",
    "SkyReelsV4VideoExtensionPipeline",
    "register_with_diffusers",
]

register_with_diffusers(sys.modules[__name__], _REGISTERED_CLASSES)
