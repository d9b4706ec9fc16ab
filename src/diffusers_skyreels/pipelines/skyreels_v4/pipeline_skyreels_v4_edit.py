"""`SkyReelsV4VideoEditPipeline`: instruction editing of a clip given as an in-context reference."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .conditioning import video_condition
from .latent_codecs import VideoCodec
from .pipeline_output import SkyReelsV4PipelineOutput
from .pipeline_skyreels_v4_base import AudioInput, ImageInput, SkyReelsV4BasePipeline, TaskInputs, VideoInput


class SkyReelsV4VideoEditPipeline(SkyReelsV4BasePipeline):
    r"""Video editing by instruction (architecture.md §6): the source clip is `@video_1`.

    The source clip's latents are prepended as in-context reference tokens and its frames go to the prompt encoder
    with the instruction. An optional `preserve_mask` keeps regions exactly (channel-concat condition). The soundtrack
    is regenerated to match the edited video, or kept with `keep_audio=True`.
    """

    @torch.no_grad()
    def __call__(
        self,
        video: VideoInput,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        preserve_mask: Any = None,
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
        r"""Edit `video` as the prompt says ("Make @video_1 take place at night").

        Args:
            video: the source clip (`4k + 1` frames; size `height` x `width`, default the clip's own).
            preserve_mask: 1 on the pixels to keep exactly, `[F, H, W]` or `[H, W]` for every frame.
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
        device = self._execution_device
        codec = VideoCodec(self.vae)
        given = None if preserve_mask is None else self.video_mask(
            preserve_mask, timing.num_frames, height, width, "preserve_mask"
        )
        audio_cond, kept_audio = self.soundtrack_condition(audio, keep_audio, timing, generate_audio)
        image_references, audio_references = self.prepare_references(
            reference_images, reference_audio, height, width, generate_audio
        )
        source_latents = codec.encode(pixels.to(device))
        references = source_latents if image_references is None else torch.cat([source_latents, image_references], 2)
        if given is None:
            condition = video_condition(codec, 1, timing.num_frames, height, width, device=device)
        else:
            condition = video_condition(
                codec, 1, timing.num_frames, height, width, frames=pixels.to(device), pixel_mask=given
            )
        task = TaskInputs(
            video_condition=condition,
            audio_condition=audio_cond,
            reference_latents=references,
            audio_reference_latents=audio_references,
            kept_audio=kept_audio,
        )
        return self.run_task(
            locals(), task, timing, True, generate_audio, prompt_images=reference_images,
            prompt_videos=[list(pixels[0].permute(1, 2, 3, 0).add(1).div(2).clamp(0, 1).cpu().numpy())],
        )
