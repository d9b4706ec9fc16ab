"""SkyReels V4 pipelines."""

from .conditioning import (
    ChannelCondition,
    audio_condition,
    condition_from_clip_latents,
    refiner_condition,
    video_condition,
    video_condition_from_latents,
)
from .latent_codecs import AudioCodec, VideoCodec
from .pipeline_output import SkyReelsV4PipelineOutput
from .pipeline_skyreels_v4 import SkyReelsV4Pipeline
from .pipeline_skyreels_v4_edit import SkyReelsV4VideoEditPipeline
from .pipeline_skyreels_v4_extension import SkyReelsV4VideoExtensionPipeline
from .pipeline_skyreels_v4_i2v import SkyReelsV4ImageToVideoPipeline
from .pipeline_skyreels_v4_inpaint import SkyReelsV4InpaintPipeline
from .pipeline_skyreels_v4_refiner import SkyReelsV4RefinerPipeline
from .prompt_encoder import (
    DEFAULT_SYSTEM_PROMPT,
    DEFAULT_TEXT_ENCODER_ID,
    ENHANCER_SYSTEM_PROMPT,
    SkyReelsV4PromptEncoder,
    SkyReelsV4PromptInputs,
)
from .timing import ClipTiming, clip_timing

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "DEFAULT_TEXT_ENCODER_ID",
    "ENHANCER_SYSTEM_PROMPT",
    "AudioCodec",
    "ChannelCondition",
    "ClipTiming",
    "SkyReelsV4ImageToVideoPipeline",
    "SkyReelsV4InpaintPipeline",
    "SkyReelsV4Pipeline",
    "SkyReelsV4PipelineOutput",
    "SkyReelsV4PromptEncoder",
    "SkyReelsV4PromptInputs",
    "SkyReelsV4RefinerPipeline",
    "SkyReelsV4VideoEditPipeline",
    "SkyReelsV4VideoExtensionPipeline",
    "VideoCodec",
    "audio_condition",
    "clip_timing",
    "condition_from_clip_latents",
    "refiner_condition",
    "video_condition",
    "video_condition_from_latents",
]
