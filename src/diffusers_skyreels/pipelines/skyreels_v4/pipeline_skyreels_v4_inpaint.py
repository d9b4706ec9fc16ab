"""`SkyReelsV4InpaintPipeline`: regenerate a spatio-temporal region of a clip."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .conditioning import video_condition
from .latent_codecs import VideoCodec
from .pipeline_output import SkyReelsV4PipelineOutput
from .pipeline_skyreels_v4_base import AudioInput, ImageInput, SkyReelsV4BasePipeline, TaskInputs, VideoInput


class SkyReelsV4InpaintPipeline(SkyReelsV4BasePipeline):
    r"""Video inpainting: the masked region is generated, everything else is given through the channel-concat
    condition. A `reference_image` (`@image_1`) can show what to put there. The soundtrack is regenerated to match the
    new video (the audio branch attends to it), or kept with `keep_audio=True`.
    """

    @torch.no_grad()
    def __call__(
        self,
        video: VideoInput,
        mask: Any,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        reference_image: ImageInput | None = None,
        audio: AudioInput | None = None,
        keep_audio: bool = False,
        resize_mode: str | None = None,
        height: int | None = None,
        width: int | None = None,
        fps: float = 16.0,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        audio_guidance_scale: float = 5.0,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        audio_latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        reference_images: Sequence[ImageInput] | None = None,
        reference_audio: Sequence[AudioInput] | None = None,
        generate_audio: bool = True,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        max_sequence_length: int | None = None,
    ) -> SkyReelsV4PipelineOutput | tuple:
        r"""Regenerate the masked region of `video`.

        Args:
            video: the source clip (`4k + 1` frames; size `height` x `width`, default the clip's own).
            mask: 1 (white) on the region to regenerate, as in Diffusers' inpainting pipelines: `[F, H, W]`, or
                `[H, W]` for every frame; PIL images or arrays.
            reference_image: an image of what to put in the region, referenced as `@image_1`.
            audio, keep_audio: the source soundtrack, kept as is with `keep_audio=True` (else regenerated).
            Other arguments: as in [`SkyReelsV4Pipeline.__call__`].
        """
        pixels, height, width = self.source_video(video, height, width, resize_mode)
        timing = self.clip_timing(fps, num_frames=pixels.shape[2])
        callback_on_step_end_tensor_inputs = list(callback_on_step_end_tensor_inputs)
        self.check_inputs(
            prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, height, width, num_inference_steps,
            guidance_scale, audio_guidance_scale, output_type, callback_on_step_end_tensor_inputs, True,
            generate_audio,
        )
        regenerate = self.video_mask(mask, timing.num_frames, height, width, "mask")
        audio_cond, kept_audio = self.soundtrack_condition(audio, keep_audio, timing, generate_audio)
        images = ([reference_image] if reference_image is not None else []) + list(reference_images or [])
        references, audio_references = self.prepare_references(images, reference_audio, height, width, generate_audio)
        condition = video_condition(
            VideoCodec(self.vae), 1, timing.num_frames, height, width,
            frames=pixels.to(self._execution_device), pixel_mask=1.0 - regenerate,
        )
        task = TaskInputs(
            video_condition=condition,
            audio_condition=audio_cond,
            reference_latents=references,
            audio_reference_latents=audio_references,
            kept_audio=kept_audio,
        )
        return self.run_task(locals(), task, timing, True, generate_audio, prompt_images=images)
