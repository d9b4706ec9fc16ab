"""`SkyReelsV4VideoExtensionPipeline`: continue a clip (and its soundtrack) by some seconds."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .conditioning import audio_condition, video_condition, video_condition_from_latents
from .latent_codecs import VideoCodec
from .pipeline_output import SkyReelsV4PipelineOutput
from .pipeline_skyreels_v4_base import AudioInput, ImageInput, SkyReelsV4BasePipeline, TaskInputs, VideoInput


class SkyReelsV4VideoExtensionPipeline(SkyReelsV4BasePipeline):
    r"""Video extension: the given clip is the fixed prefix of a longer clip, which the model completes.

    Pass the clip as frames (`video`), or, to chain segments without a decode/encode round trip (which drifts in
    colour), as the previous segment's `video_latents` (e.g. `output_type="latent"`). A given soundtrack (`audio`)
    is continued too. The output is the whole clip, prefix included (regenerated, held to the given frames by the
    condition).
    """

    @torch.no_grad()
    def __call__(
        self,
        video: VideoInput | None = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        video_latents: torch.Tensor | None = None,
        audio: AudioInput | None = None,
        extension_seconds: float = 2.0,
        resize_mode: str | None = None,
        condition_noise: float = 0.0,
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
        r"""Extend a clip by `extension_seconds`.

        Args:
            video: the clip to continue, as frames (size: `height` x `width`, default the clip's own).
            video_latents: instead of `video`, its normalized latents `[1, C, m, h, w]` (all `m` frames are kept).
            audio: the clip's soundtrack (mono, at the audio VAE's sample rate), continued with the video.
            extension_seconds: how much to add; the total is rounded up to a valid frame count.
            condition_noise: std of the noise added to the condition latents (looser continuation).
            Other arguments: as in [`SkyReelsV4Pipeline.__call__`].
        """
        if (video is None) == (video_latents is None):
            raise ValueError("Pass the clip to extend as exactly one of `video` and `video_latents`.")
        if extension_seconds <= 0:
            raise ValueError(f"`extension_seconds` must be positive, got {extension_seconds}.")
        codec = VideoCodec(self.vae)
        factor = self.vae_scale_factor_temporal
        new_frames = max(1, round(extension_seconds * fps))
        if video is not None:
            pixels, height, width = self.source_video(video, height, width, resize_mode)
            given_frames = pixels.shape[2]
            num_frames = factor * math.ceil((given_frames - 1 + new_frames) / factor) + 1
        else:
            if video_latents.ndim != 5 or video_latents.shape[1] != codec.latent_channels:
                raise ValueError(
                    f"`video_latents` must have shape [1, {codec.latent_channels}, m, h, w], got "
                    f"{tuple(video_latents.shape)}."
                )
            given_latents = video_latents.shape[2]
            height = video_latents.shape[3] * codec.spatial_factor
            width = video_latents.shape[4] * codec.spatial_factor
            given_frames = (given_latents - 1) * factor + 1
            num_frames = (given_latents - 1 + math.ceil(new_frames / factor)) * factor + 1
        timing = self.clip_timing(fps, num_frames=num_frames)
        callback_on_step_end_tensor_inputs = list(callback_on_step_end_tensor_inputs)
        self.check_inputs(
            prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, height, width, num_inference_steps,
            guidance_scale, audio_guidance_scale, output_type, callback_on_step_end_tensor_inputs, True,
            generate_audio,
        )
        if audio is not None and not generate_audio:
            raise ValueError("`audio` is continued by the audio branch; it needs `generate_audio=True`.")
        references, audio_references = self.prepare_references(
            reference_images, reference_audio, height, width, generate_audio
        )
        device = self._execution_device
        noise_generator = generator if isinstance(generator, torch.Generator) else None
        if video is not None:
            condition = video_condition(
                codec, 1, timing.num_frames, height, width, frames=pixels.to(device),
                frame_indices=range(given_frames),
            )
        else:
            condition = video_condition_from_latents(
                codec, video_latents.to(device), latent_indices=range(video_latents.shape[2]),
                num_latent_frames=timing.num_latent_frames,
            )
        task = TaskInputs(
            video_condition=condition.noised(condition_noise, noise_generator),
            reference_latents=references,
            audio_reference_latents=audio_references,
        )
        if generate_audio:
            waveform = None
            if audio is not None:
                prefix_samples = round(given_frames / fps * self.audio_sample_rate)
                waveform = self.audio_waveform(audio)[:, :prefix_samples]
            task.audio_condition = audio_condition(
                self.audio_codec, 1, timing.num_audio_latents, waveform=waveform, device=device
            )
        return self.run_task(locals(), task, timing, True, generate_audio, prompt_images=reference_images)
