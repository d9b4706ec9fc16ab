"""`SkyReelsV4Pipeline`: text -> video + synchronized audio (also video-only and audio-only)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .conditioning import audio_condition, video_condition
from .latent_codecs import VideoCodec
from .pipeline_output import SkyReelsV4PipelineOutput
from .pipeline_skyreels_v4_base import AudioInput, ImageInput, SkyReelsV4BasePipeline, TaskInputs

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import diffusers_skyreels  # registers the SkyReels V4 classes with Diffusers
        >>> from diffusers import DiffusionPipeline
        >>> from diffusers_skyreels.utils.media_io import export_to_video_with_audio

        >>> pipe = DiffusionPipeline.from_pretrained("path/to/skyreels-v4")
        >>> out = pipe("A red ball bounces between two walls. <sfx>a ping at every bounce</sfx>", num_frames=33)
        >>> export_to_video_with_audio(out.frames[0], "clip.mp4", fps=out.fps, audio=out.audio[0],
        ...                            audio_sample_rate=out.audio_sample_rate)
        ```
"""


class SkyReelsV4Pipeline(SkyReelsV4BasePipeline):
    r"""Text to video with synchronized audio (T2VA), video only (T2V) or audio only (T2A).

    Both modalities are denoised together on one sigma schedule; the audio and video branches attend to each other in
    every block. Reference images (`@image_N` in the prompt) and reference audio (`@audio_N`) join as in-context
    tokens. See [`SkyReelsV4BasePipeline`] for the components.
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
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
        generate_video: bool = True,
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
        r"""Generate clips with sound from text.

        Args:
            prompt: the prompt(s); audio is described with `<dialogue>`, `<sfx>`, `<bgm>`, `<singing>` tags.
            negative_prompt: used with classifier-free guidance (`guidance_scale > 1` or `audio_guidance_scale > 1`).
            height, width: video size in pixels, multiples of 16.
            num_frames: frames, of the form `4k + 1`; or give `duration_seconds` (default: 81 frames).
            fps: frame rate; the audio spans exactly `num_frames / fps` seconds.
            num_inference_steps: denoising steps, shared by both modalities.
            guidance_scale, audio_guidance_scale: classifier-free guidance per modality (1 disables it).
            num_videos_per_prompt: clips per prompt.
            generator: a `torch.Generator` (or one per clip) for reproducible noise.
            latents, audio_latents: initial noise to start from, `[B, C, T, h, w]` and `[B, C_a, T_a]`.
            prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask: precomputed
                prompt encodings (see `encode_prompt`).
            reference_images: in-context reference images, `@image_1`... in the prompt; padded to the video size.
            reference_audio: reference waveforms (mono, at the audio VAE's sample rate), `@audio_1`...
            generate_video, generate_audio: which modalities to generate.
            output_type: `"np"`, `"pil"`, `"pt"` or `"latent"`.
            return_dict: return a [`SkyReelsV4PipelineOutput`] instead of `(frames, audio, sample_rate, fps)`.
            attention_kwargs: passed to both transformers (`{"scale": s}` scales LoRA layers).
            callback_on_step_end: `fn(pipe, step, timestep, tensors) -> dict`, called after every step with the
                tensors named in `callback_on_step_end_tensor_inputs` (`latents`, `audio_latents`, `prompt_embeds`,
                `negative_prompt_embeds`); returned tensors replace them.
            max_sequence_length: most prompt tokens.
            refine: run the refiner after the base pass: `spatial_scale`x the size and `temporal_scale`x the frame
                rate (e.g. 480p 16 fps -> 960p 32 fps), guided by the base latents and high-resolution keyframes.
            keyframe_indices: base latent frames predicted at high resolution in the base pass (`"auto"`: every
                4th and the last; the default with `refine=True`).
            refiner_num_inference_steps, refiner_guidance_scale: the refiner pass's settings (default: the base's).
        """
        if num_frames is None and duration_seconds is None:
            num_frames = 81
        timing = self.clip_timing(fps, num_frames=num_frames, duration_seconds=duration_seconds)
        callback_on_step_end_tensor_inputs = list(callback_on_step_end_tensor_inputs)
        self.check_inputs(
            prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, height, width, num_inference_steps,
            guidance_scale, audio_guidance_scale, output_type, callback_on_step_end_tensor_inputs, generate_video,
            generate_audio,
        )
        references, audio_references = self.prepare_references(
            reference_images, reference_audio, height, width, generate_audio
        )
        device = self._execution_device
        task = TaskInputs(reference_latents=references, audio_reference_latents=audio_references)
        if generate_video:
            task.video_condition = video_condition(
                VideoCodec(self.vae), 1, timing.num_frames, height, width, device=device
            )
        if generate_audio:
            task.audio_condition = audio_condition(self.audio_codec, 1, timing.num_audio_latents, device=device)
        refinement = self.prepare_refinement(
            refine and generate_video, keyframe_indices if generate_video else None, timing, height, width,
            reference_images=reference_images, num_inference_steps=refiner_num_inference_steps,
            guidance_scale=refiner_guidance_scale,
        )
        return self.run_task(
            locals(), task, timing, generate_video, generate_audio, prompt_images=reference_images,
            refinement=refinement,
        )
