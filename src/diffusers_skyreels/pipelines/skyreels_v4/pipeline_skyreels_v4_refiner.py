"""`SkyReelsV4RefinerPipeline`: super-resolution + frame interpolation of a base clip or of a user's video."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.video_processor import VideoProcessor

from ...models import SkyReelsV4RefinerTransformer
from .conditioning import ChannelCondition, video_condition
from .latent_codecs import VideoCodec
from .pipeline_output import SkyReelsV4PipelineOutput
from .pipeline_skyreels_v4_base import AudioInput, ImageInput, SkyReelsV4BasePipeline, VideoInput


class SkyReelsV4RefinerPipeline(SkyReelsV4BasePipeline):
    r"""The refiner stage of the low-res + keyframes + refiner strategy (architecture.md §7), on its own.

    It refines a base pipeline's output given as latents (`output_type="latent"`, with its `keyframe_latents`; no
    decode/encode round trip), or upscales and frame-interpolates a user's own video. For inpainting results, the
    high-resolution source is kept in the preserved region (`source_video` + `preserve_mask`). A soundtrack passed as
    `audio` is returned cut to the refined duration.

    Components: tokenizer, text_encoder, image_processor (the prompt encoder), refiner
    ([`SkyReelsV4RefinerTransformer`]), vae ([`AutoencoderKLWan`]), scheduler.
    """

    model_cpu_offload_seq = "text_encoder->refiner->vae"
    _optional_components = ["image_processor"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        tokenizer,
        text_encoder,
        refiner: SkyReelsV4RefinerTransformer,
        vae: AutoencoderKLWan,
        scheduler: FlowMatchEulerDiscreteScheduler,
        image_processor=None,
    ) -> None:
        DiffusionPipeline.__init__(self)  # the base pipeline's __init__ registers the base components
        self.register_modules(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            refiner=refiner,
            vae=vae,
            scheduler=scheduler,
            image_processor=image_processor,
        )
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        latents: torch.Tensor | None = None,
        keyframe_latents: torch.Tensor | None = None,
        keyframe_indices: Sequence[int] | None = None,
        video: VideoInput | None = None,
        audio: AudioInput | None = None,
        audio_sample_rate: int | None = None,
        source_video: VideoInput | None = None,
        preserve_mask: Any = None,
        resize_mode: str | None = None,
        height: int | None = None,
        width: int | None = None,
        fps: float = 16.0,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        refined_latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        reference_images: Sequence[ImageInput] | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        max_sequence_length: int | None = None,
    ) -> SkyReelsV4PipelineOutput | tuple:
        r"""Refine a clip to `spatial_scale`x the size and `temporal_scale`x the frame rate.

        Args:
            latents: the base clip's normalized latents `[B, C, T, h, w]` (a base pipeline's `output_type="latent"`).
            keyframe_latents, keyframe_indices: the base pass's high-resolution keyframes, put back exactly.
            video: instead of `latents`, a clip to upscale (`4k + 1` frames of `height` x `width`, default its own).
            audio, audio_sample_rate: a soundtrack to return alongside, cut to the refined duration.
            source_video, preserve_mask: for inpainting results, the high-resolution source and 1 on the pixels kept
                from it (at the refined size and frame rate).
            fps: the frame rate of the input clip; the output has `fps * temporal_scale`.
            refined_latents: initial noise of the refined latents.
            Other arguments: as in [`SkyReelsV4Pipeline.__call__`].
        """
        if (latents is None) == (video is None):
            raise ValueError("Pass the clip to refine as exactly one of `latents` and `video`.")
        if (audio is None) != (audio_sample_rate is None):
            raise ValueError("`audio` and `audio_sample_rate` go together.")
        codec = VideoCodec(self.vae)
        device = self._execution_device
        if video is not None:
            pixels, height, width = self.source_video(video, height, width, resize_mode)
            num_frames = pixels.shape[2]
        else:
            if latents.ndim != 5 or latents.shape[1] != codec.latent_channels:
                raise ValueError(
                    f"`latents` must have shape [B, {codec.latent_channels}, T, h, w], got {tuple(latents.shape)}."
                )
            height, width = latents.shape[3] * codec.spatial_factor, latents.shape[4] * codec.spatial_factor
            num_frames = (latents.shape[2] - 1) * codec.temporal_factor + 1
        timing = self.clip_timing(fps, num_frames=num_frames)
        callback_on_step_end_tensor_inputs = list(callback_on_step_end_tensor_inputs)
        self.check_inputs(
            prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, height, width, num_inference_steps,
            guidance_scale, 1.0, output_type, callback_on_step_end_tensor_inputs, True, False,
        )
        out_timing = self.refined_timing(timing)
        scale = self.refiner.config.spatial_scale
        out_height, out_width = height * scale, width * scale
        preserved = None
        if (source_video is None) != (preserve_mask is None):
            raise ValueError("`source_video` and `preserve_mask` go together.")
        if source_video is not None:
            source, _, _ = self.source_video(source_video, out_height, out_width, resize_mode, "source_video")
            if source.shape[2] != out_timing.num_frames:
                raise ValueError(
                    f"`source_video` must have the refined frame count {out_timing.num_frames}, got {source.shape[2]}."
                )
            given = self.video_mask(preserve_mask, out_timing.num_frames, out_height, out_width, "preserve_mask")
            preserved = video_condition(
                codec, 1, out_timing.num_frames, out_height, out_width, frames=source.to(device), pixel_mask=given
            )
        waveform = None if audio is None else self.audio_waveform(audio)

        batch = self.batch_size_of(prompt, prompt_embeds) * num_videos_per_prompt
        low_res = codec.encode(pixels.to(device)) if video is not None else latents.to(device, torch.float32)
        do_cfg = guidance_scale > 1
        copies = 2 if do_cfg else 1

        def expand(x: torch.Tensor | None) -> torch.Tensor | None:
            if x is None:
                return None
            x = x.to(device)
            return x.repeat_interleave(batch // x.shape[0], dim=0) if x.shape[0] != batch else x

        if batch % low_res.shape[0]:
            raise ValueError(f"{low_res.shape[0]} clips cannot be spread over {batch} prompts x videos per prompt.")
        self._guidance_scale, self._audio_guidance_scale, self._interrupt = guidance_scale, 1.0, False
        prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask = (
            self.encode_prompt(
                prompt,
                negative_prompt=negative_prompt,
                do_classifier_free_guidance=do_cfg,
                num_videos_per_prompt=num_videos_per_prompt,
                prompt_embeds=prompt_embeds,
                prompt_attention_mask=prompt_attention_mask,
                negative_prompt_embeds=negative_prompt_embeds,
                negative_prompt_attention_mask=negative_prompt_attention_mask,
                images=reference_images or None,
                max_sequence_length=max_sequence_length,
                device=device,
            )
        )
        if do_cfg:
            text, text_mask = self._stack_text(
                negative_prompt_embeds, negative_prompt_attention_mask, prompt_embeds, prompt_attention_mask
            )
        else:
            text, text_mask = prompt_embeds, prompt_attention_mask
        text_mask = None if bool(text_mask.all()) else text_mask
        references = None
        if reference_images:
            references = self.encode_reference_images(reference_images, out_height, out_width, device)
            references = torch.cat([expand(references)] * copies)

        def on_step_end(step: int, t: torch.Tensor, tensors: dict) -> dict:
            if callback_on_step_end is None:
                return {}
            available = {
                "latents": tensors["latents"],
                "prompt_embeds": prompt_embeds,
                "negative_prompt_embeds": negative_prompt_embeds,
            }
            outputs = callback_on_step_end(self, step, t, {k: available[k] for k in callback_on_step_end_tensor_inputs})
            return {"latents": outputs["latents"]} if "latents" in outputs else {}

        refined = self.run_refiner(
            expand(low_res),
            expand(keyframe_latents),
            None if keyframe_indices is None else list(keyframe_indices),
            text=text,
            text_mask=text_mask,
            reference_latents=references,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            attention_kwargs=attention_kwargs,
            preserved=None if preserved is None else ChannelCondition(expand(preserved.latents), expand(preserved.mask)),
            refined_latents=refined_latents,
            callback=on_step_end,
        )

        frames = refined
        if output_type != "latent":
            frames = self.video_processor.postprocess_video(codec.decode(refined).float(), output_type=output_type)
        out_audio = None
        if waveform is not None:
            samples = round(out_timing.duration_seconds * audio_sample_rate)
            out_audio = torch.nn.functional.pad(waveform, (0, max(0, samples - waveform.shape[1])))[:, :samples]
            out_audio = out_audio.float().cpu().repeat_interleave(batch, dim=0)
            if output_type != "pt":
                out_audio = out_audio.numpy()
        self.maybe_free_model_hooks()
        if not return_dict:
            return frames, out_audio, audio_sample_rate, out_timing.fps
        return SkyReelsV4PipelineOutput(
            frames=frames, audio=out_audio, audio_sample_rate=audio_sample_rate, fps=out_timing.fps
        )
