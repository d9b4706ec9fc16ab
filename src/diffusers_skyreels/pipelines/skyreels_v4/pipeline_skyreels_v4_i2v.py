"""`SkyReelsV4ImageToVideoPipeline`: first frame, optional last frame and keyframes -> video + audio."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .conditioning import audio_condition, pixel_frames_of_latent, video_condition
from .latent_codecs import VideoCodec
from .pipeline_output import SkyReelsV4PipelineOutput
from .pipeline_skyreels_v4_base import AudioInput, ImageInput, SkyReelsV4BasePipeline, TaskInputs


class SkyReelsV4ImageToVideoPipeline(SkyReelsV4BasePipeline):
    r"""Image to video with synchronized audio.

    The first image fixes latent frame 0. A last image and keyframe images each fix one whole latent frame (the 4
    pixel frames it covers show the image), since a latent frame only counts as given when all its pixels are.
    """

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput | list[ImageInput],
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        last_image: ImageInput | list[ImageInput] | None = None,
        keyframe_images: Sequence[ImageInput] | None = None,
        keyframe_times: Sequence[float] | None = None,
        resize_mode: str | None = None,
        condition_noise: float = 0.0,
        height: int = 480,
        width: int = 832,
        num_frames: int | None = None,
        duration_seconds: float | None = None,
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
        refine: bool = False,
        keyframe_indices: Sequence[int] | str | None = None,
        refiner_num_inference_steps: int | None = None,
        refiner_guidance_scale: float | None = None,
    ) -> SkyReelsV4PipelineOutput | tuple:
        r"""Animate an image, optionally towards a last image through keyframes.

        Args:
            image: the first frame (one for all prompts, or one per prompt).
            last_image: the last frame (one for all prompts, or one per prompt).
            keyframe_images, keyframe_times: images shown at these times (seconds), one latent frame each.
            resize_mode: how images of another size fit the video: `"pad"`, `"crop"`, `"stretch"`; `None` requires
                the exact size.
            condition_noise: std of the noise added to the condition latents; > 0 loosens a too-strong first frame
                (frozen output).
            refine, keyframe_indices, refiner_num_inference_steps, refiner_guidance_scale: as in
                [`SkyReelsV4Pipeline.__call__`]; keyframe 0 is the first image at the refined size.
            Other arguments: as in [`SkyReelsV4Pipeline.__call__`].
        """
        if num_frames is None and duration_seconds is None:
            num_frames = 81
        timing = self.clip_timing(fps, num_frames=num_frames, duration_seconds=duration_seconds)
        callback_on_step_end_tensor_inputs = list(callback_on_step_end_tensor_inputs)
        self.check_inputs(
            prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, height, width, num_inference_steps,
            guidance_scale, audio_guidance_scale, output_type, callback_on_step_end_tensor_inputs, True,
            generate_audio,
        )
        batch = self.batch_size_of(prompt, prompt_embeds)
        frames, indices = self._place_images(
            image, last_image, keyframe_images, keyframe_times, batch, timing.num_frames, fps, height, width,
            resize_mode,
        )
        references, audio_references = self.prepare_references(
            reference_images, reference_audio, height, width, generate_audio
        )
        device = self._execution_device
        condition = video_condition(
            VideoCodec(self.vae), batch, timing.num_frames, height, width, frames=frames.to(device),
            frame_indices=indices, generator=generator if isinstance(generator, torch.Generator) else None,
        )
        task = TaskInputs(
            video_condition=condition.noised(condition_noise, generator if isinstance(generator, torch.Generator)
                                             else None),
            reference_latents=references,
            audio_reference_latents=audio_references,
        )
        if generate_audio:
            task.audio_condition = audio_condition(self.audio_codec, 1, timing.num_audio_latents, device=device)
        first_frame = None
        if refine or keyframe_indices is not None:
            scale = self.refiner.config.spatial_scale if self.refiner is not None else 1
            # The image already fits the base size, so scaling it to the refined size keeps its framing.
            first_frame = torch.stack(
                [self.preprocess_image(im, height * scale, width * scale, resize_mode or "stretch", "image")
                 for im in self._images_per_prompt(image, batch, "image")]
            )
        refinement = self.prepare_refinement(
            refine, keyframe_indices, timing, height, width, first_frame=first_frame,
            reference_images=reference_images, num_inference_steps=refiner_num_inference_steps,
            guidance_scale=refiner_guidance_scale,
        )
        return self.run_task(
            locals(), task, timing, True, generate_audio, prompt_images=reference_images, refinement=refinement
        )

    def _place_images(
        self, image, last_image, keyframe_images, keyframe_times, batch: int, num_frames: int, fps: float,
        height: int, width: int, resize_mode: str | None,
    ) -> tuple[torch.Tensor, list[int]]:
        """Pixel frames `[B, 3, n, H, W]` and the frame each goes to, holding each non-first image for a latent."""
        factor = self.vae_scale_factor_temporal
        last_latent = (num_frames - 1) // factor
        if image is None:
            raise ValueError("`image` (the first frame) is required.")
        placements: dict[int, list[ImageInput]] = {0: self._images_per_prompt(image, batch, "image")}
        if last_image is not None:
            if last_latent == 0:
                raise ValueError("A one-frame clip has no separate last frame; drop `last_image`.")
            placements[last_latent] = self._images_per_prompt(last_image, batch, "last_image")
        if (keyframe_images is None) != (keyframe_times is None):
            raise ValueError("`keyframe_images` and `keyframe_times` go together.")
        for i, (key_image, time) in enumerate(zip(keyframe_images or [], keyframe_times or [], strict=True)):
            frame = round(time * fps)
            if not 0 <= frame < num_frames:
                raise ValueError(
                    f"`keyframe_times[{i}]` = {time} s is outside the clip (0 to {(num_frames - 1) / fps:.3f} s)."
                )
            latent = math.ceil(frame / factor)
            if latent in placements:
                raise ValueError(
                    f"`keyframe_times[{i}]` = {time} s falls in latent frame {latent}, which another image already "
                    "fixes (the first image, the last image or another keyframe); keyframes must be at least "
                    f"{factor} frames apart."
                )
            placements[latent] = self._images_per_prompt(key_image, batch, f"keyframe_images[{i}]")
        frames, indices = [], []
        for latent in sorted(placements):
            pixels = torch.stack(
                [self.preprocess_image(im, height, width, resize_mode, "image") for im in placements[latent]]
            )
            for frame in pixel_frames_of_latent(latent, factor):
                frames.append(pixels)
                indices.append(frame)
        return torch.stack(frames, dim=2), indices

    @staticmethod
    def _images_per_prompt(value, batch: int, name: str) -> list:
        if isinstance(value, (list, tuple)):
            if len(value) != batch:
                raise ValueError(f"`{name}` has {len(value)} images for {batch} prompts.")
            return list(value)
        return [value] * batch
