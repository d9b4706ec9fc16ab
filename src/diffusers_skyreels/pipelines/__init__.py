"""SkyReels V4 pipelines and the pieces they share."""

from .skyreels_v4 import (
    SkyReelsV4ImageToVideoPipeline,
    SkyReelsV4InpaintPipeline,
    SkyReelsV4Pipeline,
    SkyReelsV4PipelineOutput,
    SkyReelsV4PromptEncoder,
    SkyReelsV4RefinerPipeline,
    SkyReelsV4VideoEditPipeline,
    SkyReelsV4VideoExtensionPipeline,
)

__all__ = [
    "SkyReelsV4ImageToVideoPipeline",
    "SkyReelsV4InpaintPipeline",
    "SkyReelsV4Pipeline",
    "SkyReelsV4PipelineOutput",
    "SkyReelsV4PromptEncoder",
    "SkyReelsV4RefinerPipeline",
    "SkyReelsV4VideoEditPipeline",
    "SkyReelsV4VideoExtensionPipeline",
]
