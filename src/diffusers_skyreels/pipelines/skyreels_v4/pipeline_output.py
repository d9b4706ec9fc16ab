"""Output of the SkyReels V4 pipelines."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput


@dataclass
class SkyReelsV4PipelineOutput(BaseOutput):
    """A batch of clips with their soundtracks.

    Args:
        frames: the videos, by `output_type`: `np.ndarray` `[B, F, H, W, 3]` in `[0, 1]`, lists of PIL images,
            a tensor `[B, F, 3, H, W]`, or the video latents for `"latent"`; `None` when no video was generated.
        audio: mono waveforms `[B, samples]` in `[-1, 1]` (`np.ndarray`, or a tensor for `"pt"`), or the audio latents
            for `"latent"`; `None` when no audio was generated.
        audio_sample_rate: samples per second of `audio`.
        fps: frames per second of `frames`.
        keyframe_latents: with `output_type="latent"` and keyframes but no refinement, the high-resolution keyframe
            latents `[B, C, K, H', W']` for [`SkyReelsV4RefinerPipeline`].
        keyframe_indices: the base latent frame of each keyframe.
    """

    frames: np.ndarray | torch.Tensor | list[list[PIL.Image.Image]] | None
    audio: np.ndarray | torch.Tensor | None
    audio_sample_rate: int | None
    fps: float
    keyframe_latents: torch.Tensor | None = None
    keyframe_indices: list[int] | None = None
