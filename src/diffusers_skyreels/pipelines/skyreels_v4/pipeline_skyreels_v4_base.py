"""What every SkyReels V4 task pipeline shares: components, prompt encoding, media preprocessing, the joint
denoising loop and decoding. The task pipelines only decide what is given (through `conditioning.py`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from diffusers import (
    AutoencoderKLWan,
    AutoencoderOobleck,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    MMAudioVAE,
    MMAudioVocoder,
)
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from ...models import SkyReelsV4AudioTransformer, SkyReelsV4Transformer
from ...schedulers import step_jointly
from .conditioning import ChannelCondition, audio_condition
from .latent_codecs import AudioCodec, VideoCodec
from .pipeline_output import SkyReelsV4PipelineOutput
from .prompt_encoder import SkyReelsV4PromptEncoder
from .timing import ClipTiming, clip_timing

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("np", "pil", "pt", "latent")
ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor
VideoInput = Sequence[PIL.Image.Image] | np.ndarray | torch.Tensor
AudioInput = np.ndarray | torch.Tensor


@dataclass
class TaskInputs:
    """What a task pipeline hands to the shared loop, per prompt (batch `B`, before `num_videos_per_prompt`)."""

    video_condition: ChannelCondition | None = None
    audio_condition: ChannelCondition | None = None
    reference_latents: torch.Tensor | None = None
    audio_reference_latents: torch.Tensor | None = None
    # A soundtrack returned as is instead of the decoded audio (edit / inpaint with `keep_audio=True`).
    kept_audio: torch.Tensor | None = None


class SkyReelsV4BasePipeline(DiffusionPipeline):
    r"""Base of the SkyReels V4 pipelines (not loadable itself).

    Components:
        tokenizer, text_encoder, image_processor: the Qwen-VL prompt encoder (transformers).
        transformer ([`SkyReelsV4Transformer`]): the video branch.
        vae ([`AutoencoderKLWan`]): the video VAE.
        scheduler ([`FlowMatchEulerDiscreteScheduler`] or another flow-matching scheduler).
        audio_transformer ([`SkyReelsV4AudioTransformer`], optional): the audio branch.
        audio_vae ([`MMAudioVAE`] or [`AutoencoderOobleck`], optional) and vocoder ([`MMAudioVocoder`], for MMAudio).

    Model CPU offload: `audio_transformer` runs nested inside `transformer` in joint generation, so it is hooked on
    its own (not chained after `transformer`, which would offload one while the other runs) and released as soon as
    denoising ends.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae->audio_vae->vocoder"
    _optional_components = ["audio_transformer", "audio_vae", "vocoder", "image_processor"]
    _callback_tensor_inputs = ["latents", "audio_latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        tokenizer,
        text_encoder,
        transformer: SkyReelsV4Transformer,
        vae: AutoencoderKLWan,
        scheduler: FlowMatchEulerDiscreteScheduler,
        audio_transformer: SkyReelsV4AudioTransformer | None = None,
        audio_vae: MMAudioVAE | AutoencoderOobleck | None = None,
        vocoder: MMAudioVocoder | None = None,
        image_processor=None,
    ) -> None:
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            transformer=transformer,
            vae=vae,
            scheduler=scheduler,
            audio_transformer=audio_transformer,
            audio_vae=audio_vae,
            vocoder=vocoder,
            image_processor=image_processor,
        )
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    # -- sizes -----------------------------------------------------------------------------------------------------

    @property
    def vae_scale_factor_spatial(self) -> int:
        return self.vae.config.scale_factor_spatial if getattr(self, "vae", None) is not None else 8

    @property
    def vae_scale_factor_temporal(self) -> int:
        return self.vae.config.scale_factor_temporal if getattr(self, "vae", None) is not None else 4

    @property
    def audio_codec(self) -> AudioCodec | None:
        if getattr(self, "audio_vae", None) is None:
            return None
        return AudioCodec(self.audio_vae, getattr(self, "vocoder", None))

    @property
    def audio_sample_rate(self) -> int | None:
        codec = self.audio_codec
        return None if codec is None else codec.sample_rate

    def clip_timing(
        self, fps: float, num_frames: int | None = None, duration_seconds: float | None = None
    ) -> ClipTiming:
        """Frame, latent and audio-sample counts of a clip, consistent across both modalities."""
        codec = self.audio_codec
        return clip_timing(
            fps,
            num_frames=num_frames,
            duration_seconds=duration_seconds,
            vae_temporal_factor=self.vae_scale_factor_temporal,
            audio_sample_rate=codec.sample_rate if codec is not None else 44100,
            audio_hop_length=codec.hop_length if codec is not None else 1024,
        )

    # -- prompt ----------------------------------------------------------------------------------------------------

    def prompt_encoder(self) -> SkyReelsV4PromptEncoder:
        return SkyReelsV4PromptEncoder(self.text_encoder, self.tokenizer, getattr(self, "image_processor", None))

    def encode_prompt(self, prompt: str | list[str] | None, **kwargs: Any):
        """Prompt embeddings and masks for both branches; see `SkyReelsV4PromptEncoder.encode_prompt`."""
        kwargs.setdefault("device", self._execution_device)
        return self.prompt_encoder().encode_prompt(prompt, **kwargs)

    # -- input checks ----------------------------------------------------------------------------------------------

    def check_inputs(
        self,
        prompt,
        prompt_embeds,
        negative_prompt,
        negative_prompt_embeds,
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        audio_guidance_scale: float,
        output_type: str,
        callback_on_step_end_tensor_inputs: list[str] | None,
        generate_video: bool,
        generate_audio: bool,
    ) -> None:
        """Checks every task shares; raises `ValueError` before any model runs."""
        if prompt is None and prompt_embeds is None:
            raise ValueError("Provide `prompt` or `prompt_embeds`.")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Provide only one of `prompt` and `prompt_embeds`.")
        if not generate_video and not generate_audio:
            raise ValueError("Nothing to generate: `generate_video` and `generate_audio` are both False.")
        if generate_audio and (self.audio_transformer is None or self.audio_vae is None):
            raise ValueError("`generate_audio=True` needs the `audio_transformer` and `audio_vae` components.")
        if self.audio_vae is not None:
            AudioCodec(self.audio_vae, self.vocoder)  # raises if an MMAudio VAE has no vocoder
        multiple = self.vae_scale_factor_spatial * self.transformer.config.patch_size[1]
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise ValueError(
                f"`height` and `width` must be positive multiples of {multiple} (VAE factor x patch size), got "
                f"{height}x{width}; for example {max(multiple, round(height / multiple) * multiple)}x"
                f"{max(multiple, round(width / multiple) * multiple)}."
            )
        if num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be >= 1, got {num_inference_steps}.")
        for name, scale in (("guidance_scale", guidance_scale), ("audio_guidance_scale", audio_guidance_scale)):
            if scale < 1:
                raise ValueError(f"`{name}` must be >= 1 (1 disables classifier-free guidance), got {scale}.")
        uses_cfg = (generate_video and guidance_scale > 1) or (generate_audio and audio_guidance_scale > 1)
        if not uses_cfg and (negative_prompt is not None or negative_prompt_embeds is not None):
            raise ValueError(
                "A negative prompt is only used with classifier-free guidance: set `guidance_scale` (or "
                "`audio_guidance_scale`) above 1, or drop the negative prompt."
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        unknown = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` {unknown} are not in {self._callback_tensor_inputs}."
            )

    @staticmethod
    def _check_latents(name: str, latents: torch.Tensor | None, shape: tuple[int, ...]) -> None:
        if latents is None:
            return
        if tuple(latents.shape) != shape:
            raise ValueError(f"`{name}` must have shape {shape}, got {tuple(latents.shape)}.")
        if not torch.isfinite(latents).all():
            raise ValueError(f"`{name}` contains NaN or infinite values.")

    # -- media -----------------------------------------------------------------------------------------------------

    @staticmethod
    def _to_pil(image: ImageInput, name: str) -> PIL.Image.Image:
        if isinstance(image, PIL.Image.Image):
            return image.convert("RGB")
        array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
            array = array.transpose(1, 2, 0)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"`{name}` must be an RGB image (PIL, or an HxWx3 / 3xHxW array), got {array.shape}.")
        if array.dtype != np.uint8:
            array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
        return PIL.Image.fromarray(array)

    def preprocess_image(
        self, image: ImageInput, height: int, width: int, resize_mode: str | None, name: str = "image"
    ) -> torch.Tensor:
        """An image as `[3, H, W]` in `[-1, 1]`; a size other than `height x width` needs a `resize_mode`.

        `resize_mode`: `"pad"` (fit inside, pad black), `"crop"` (fill, center-crop) or `"stretch"`.
        """
        pil = self._to_pil(image, name)
        if pil.size != (width, height):
            if resize_mode is None:
                raise ValueError(
                    f"`{name}` is {pil.size[0]}x{pil.size[1]} but the video is {width}x{height}; resize it or pass "
                    "`resize_mode` ('pad', 'crop' or 'stretch')."
                )
            if resize_mode == "pad":
                pil = PIL.ImageOps.pad(pil, (width, height), color=(0, 0, 0))
            elif resize_mode == "crop":
                pil = PIL.ImageOps.fit(pil, (width, height))
            elif resize_mode == "stretch":
                pil = pil.resize((width, height), PIL.Image.BICUBIC)
            else:
                raise ValueError(f"`resize_mode` must be 'pad', 'crop', 'stretch' or None, got {resize_mode!r}.")
        array = np.asarray(pil, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1)

    def preprocess_video(
        self, video: VideoInput, height: int, width: int, resize_mode: str | None, name: str = "video"
    ) -> torch.Tensor:
        """Frames (list of images, `[F, H, W, 3]` array or `[F, 3, H, W]` tensor) as `[3, F, H, W]` in `[-1, 1]`."""
        if isinstance(video, (np.ndarray, torch.Tensor)):
            if video.ndim != 4:
                raise ValueError(f"`{name}` must be a list of frames or a 4D array of frames, got {video.ndim}D.")
            frames = list(video)
        else:
            frames = list(video)
        if not frames:
            raise ValueError(f"`{name}` is empty: it needs at least one frame.")
        return torch.stack(
            [self.preprocess_image(f, height, width, resize_mode, f"{name} frame {i}") for i, f in enumerate(frames)],
            dim=1,
        )

    def source_video(
        self, video: VideoInput, height: int | None, width: int | None, resize_mode: str | None, name: str = "video"
    ) -> tuple[torch.Tensor, int, int]:
        """A user's clip as `[1, 3, F, H, W]` in `[-1, 1]`, with its size (taken from the clip when not given)."""
        if video is None or len(video) == 0:
            raise ValueError(f"`{name}` is empty: it needs at least one frame.")
        first = self._to_pil(video[0], f"{name} frame 0")
        height = first.size[1] if height is None else height
        width = first.size[0] if width is None else width
        return self.preprocess_video(video, height, width, resize_mode, name)[None], height, width

    def audio_waveform(self, audio: AudioInput, name: str = "audio") -> torch.Tensor:
        """A mono waveform at the audio VAE's sample rate as `[1, samples]` float32 on the execution device."""
        waveform = torch.as_tensor(np.asarray(audio, dtype=np.float32))
        if waveform.ndim == 2 and 1 in waveform.shape:
            waveform = waveform.reshape(-1)
        if waveform.ndim != 1 or waveform.numel() == 0:
            raise ValueError(f"`{name}` must be a non-empty mono waveform (1-D), got shape {tuple(waveform.shape)}.")
        return waveform[None].to(self._execution_device)

    def soundtrack_condition(
        self, audio: AudioInput | None, keep_audio: bool, timing: ClipTiming, generate_audio: bool
    ) -> tuple[ChannelCondition | None, torch.Tensor | None]:
        """Audio condition of an edited clip: regenerate (default) or keep the given soundtrack.

        Kept audio is fully given to the audio branch, so the video is generated to match it, and the original
        waveform is returned untouched.
        """
        if keep_audio and audio is None:
            raise ValueError("`keep_audio=True` needs the clip's `audio`.")
        if audio is not None and not keep_audio:
            raise ValueError(
                "`audio` is only used with `keep_audio=True`; to guide a new soundtrack pass it as `reference_audio`."
            )
        if not generate_audio:
            if keep_audio:
                raise ValueError("`keep_audio=True` needs `generate_audio=True` (the audio branch reads it).")
            return None, None
        device = self._execution_device
        if not keep_audio:
            return audio_condition(self.audio_codec, 1, timing.num_audio_latents, device=device), None
        waveform = self.audio_waveform(audio)
        if waveform.shape[1] < timing.num_audio_samples:
            raise ValueError(
                f"`audio` has {waveform.shape[1]} samples but the clip needs {timing.num_audio_samples} "
                f"({timing.duration_seconds:.3f} s at {timing.audio_sample_rate} Hz) to be kept."
            )
        waveform = waveform[:, : timing.num_audio_samples]
        condition = audio_condition(self.audio_codec, 1, timing.num_audio_latents, waveform=waveform, device=device)
        return condition, waveform

    def video_mask(self, mask, num_frames: int, height: int, width: int, name: str) -> torch.Tensor:
        """A user mask (`[F, H, W]`, `[H, W]` for every frame, PIL images, arrays) as `[1, 1, F, H, W]` of 0/1."""
        if isinstance(mask, PIL.Image.Image):
            mask = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
        elif isinstance(mask, (list, tuple)):
            mask = np.stack(
                [np.asarray(m.convert("L"), dtype=np.float32) / 255.0 if isinstance(m, PIL.Image.Image) else
                 np.asarray(m, dtype=np.float32) for m in mask]
            )
        mask = torch.as_tensor(np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask, dtype=np.float32))
        if mask.ndim == 2:
            mask = mask[None].expand(num_frames, -1, -1)
        if mask.ndim == 4 and mask.shape[1] == 1:
            mask = mask[:, 0]
        if tuple(mask.shape) != (num_frames, height, width):
            raise ValueError(
                f"`{name}` must match the video: shape ({num_frames}, {height}, {width}) or ({height}, {width}), got "
                f"{tuple(mask.shape)}."
            )
        return (mask > 0.5).float()[None, None].to(self._execution_device)

    @staticmethod
    def batch_size_of(prompt: str | list[str] | None, prompt_embeds: torch.Tensor | None) -> int:
        if prompt is None:
            return prompt_embeds.shape[0]
        return 1 if isinstance(prompt, str) else len(prompt)

    def prepare_references(
        self,
        reference_images: Sequence[ImageInput] | None,
        reference_audio: Sequence[AudioInput] | None,
        height: int,
        width: int,
        generate_audio: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """In-context references shared by all prompts: video latents `[1, C, N, h, w]`, audio latents `[1, C, T]`."""
        device = self._execution_device
        video = audio = None
        if reference_images:
            video = self.encode_reference_images(reference_images, height, width, device)
        if reference_audio:
            if not generate_audio:
                raise ValueError("`reference_audio` guides the audio branch; it needs `generate_audio=True`.")
            audio = self.encode_reference_audio(reference_audio, device)
        return video, audio

    def encode_reference_images(
        self, images: Sequence[ImageInput], height: int, width: int, device: torch.device
    ) -> torch.Tensor:
        """In-context reference images -> `[1, C, N, h, w]` latents, each padded to the target size first (§6)."""
        codec = VideoCodec(self.vae)
        pixels = torch.stack(
            [self.preprocess_image(image, height, width, "pad", f"reference_images[{i}]") for i, image in
             enumerate(images)]
        )
        latents = codec.encode(pixels[:, :, None].to(device))  # [N, C, 1, h, w]: each reference alone, one frame
        return latents[:, :, 0].transpose(0, 1)[None]

    def encode_reference_audio(self, clips: Sequence[AudioInput], device: torch.device) -> torch.Tensor:
        """Reference audio clips (mono, at the audio VAE's sample rate) -> `[1, C, T_ref]`, concatenated in time."""
        codec = self.audio_codec
        latents = []
        for i, clip in enumerate(clips):
            waveform = torch.as_tensor(np.asarray(clip, dtype=np.float32)).reshape(-1)
            if waveform.numel() < codec.hop_length:
                raise ValueError(f"`reference_audio[{i}]` is shorter than one audio latent ({codec.hop_length} samples).")
            usable = waveform.numel() // codec.hop_length * codec.hop_length
            latents.append(codec.encode(waveform[None, :usable].to(device)))
        return torch.cat(latents, dim=2)

    # -- the shared loop -------------------------------------------------------------------------------------------

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def audio_guidance_scale(self) -> float:
        return self._audio_guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def _release(self, *names: str) -> None:
        """Offload these components now when model CPU offload is on (their hooks would keep them resident)."""
        models = [getattr(self, name, None) for name in names]
        for hook in getattr(self, "_all_hooks", []):
            if any(hook.model is model for model in models if model is not None):
                hook.offload()

    @staticmethod
    def _stack_text(
        negative: torch.Tensor, negative_mask: torch.Tensor, positive: torch.Tensor, positive_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`[negative ; positive]` along the batch, right-padded to one length with masked zeros."""
        length = max(negative.shape[1], positive.shape[1])

        def pad(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            extra = length - x.shape[1]
            return (
                torch.nn.functional.pad(x, (0, 0, 0, extra)),
                torch.nn.functional.pad(mask.to(torch.long), (0, extra)),
            )

        (neg, neg_mask), (pos, pos_mask) = pad(negative, negative_mask), pad(positive, positive_mask)
        return torch.cat([neg, pos]), torch.cat([neg_mask, pos_mask])

    # Arguments every task's `__call__` forwards unchanged to `generate`.
    _GENERATE_ARGS = (
        "prompt", "negative_prompt", "height", "width", "num_inference_steps", "guidance_scale",
        "audio_guidance_scale", "num_videos_per_prompt", "generator", "latents", "audio_latents", "prompt_embeds",
        "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask", "output_type",
        "return_dict", "attention_kwargs", "callback_on_step_end", "callback_on_step_end_tensor_inputs",
        "max_sequence_length",
    )

    def run_task(
        self, call_args: dict[str, Any], task: TaskInputs, timing: ClipTiming, generate_video: bool,
        generate_audio: bool, prompt_images: Sequence[ImageInput] | None = None,
        prompt_videos: Sequence[VideoInput] | None = None,
    ) -> SkyReelsV4PipelineOutput | tuple:
        """Run the shared loop with a task's `__call__` arguments (its `locals()`) and its conditions."""
        return self.generate(
            task=task,
            timing=timing,
            generate_video=generate_video,
            generate_audio=generate_audio,
            prompt_images=prompt_images,
            prompt_videos=prompt_videos,
            **{name: call_args[name] for name in self._GENERATE_ARGS},
        )

    def generate(
        self,
        *,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        task: TaskInputs,
        timing: ClipTiming,
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        audio_guidance_scale: float,
        num_videos_per_prompt: int,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        audio_latents: torch.Tensor | None,
        prompt_embeds: torch.Tensor | None,
        prompt_attention_mask: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        negative_prompt_attention_mask: torch.Tensor | None,
        prompt_images: Sequence[ImageInput] | None,
        prompt_videos: Sequence[VideoInput] | None,
        generate_video: bool,
        generate_audio: bool,
        output_type: str,
        return_dict: bool,
        attention_kwargs: dict[str, Any] | None,
        callback_on_step_end: Callable | None,
        callback_on_step_end_tensor_inputs: list[str],
        max_sequence_length: int | None,
    ) -> SkyReelsV4PipelineOutput | tuple:
        """Encode the prompt, denoise both modalities on one sigma schedule, decode. Inputs are already checked."""
        device = self._execution_device
        self._guidance_scale = guidance_scale
        self._audio_guidance_scale = audio_guidance_scale
        self._interrupt = False
        cfg_video = generate_video and guidance_scale > 1
        cfg_audio = generate_audio and audio_guidance_scale > 1
        do_cfg = cfg_video or cfg_audio

        batch = self.batch_size_of(prompt, prompt_embeds) * num_videos_per_prompt
        video_shape = audio_shape = None
        if generate_video:
            codec = VideoCodec(self.vae)
            video_shape = (
                batch,
                codec.latent_channels,
                timing.num_latent_frames,
                height // codec.spatial_factor,
                width // codec.spatial_factor,
            )
            self._check_latents("latents", latents, video_shape)
        if generate_audio:
            audio_shape = (batch, self.audio_codec.latent_channels, timing.num_audio_latents)
            self._check_latents("audio_latents", audio_latents, audio_shape)

        # 1. Prompt (once, outside the loop).
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
                images=prompt_images or None,
                videos=prompt_videos or None,
                max_sequence_length=max_sequence_length,
                device=device,
            )
        )
        if not generate_video:
            self._release("text_encoder")  # nothing else would offload it before the audio branch runs

        # 2. Conditions, references and initial noise.
        transformer_dtype = (self.transformer if generate_video else self.audio_transformer).dtype
        copies = 2 if do_cfg else 1

        def expand(x: torch.Tensor | None) -> torch.Tensor | None:
            if x is None:
                return None
            x = x.to(device)
            if x.shape[0] != batch:
                x = x.repeat_interleave(batch // x.shape[0], dim=0)
            return torch.cat([x] * copies) if copies > 1 else x

        video_cond = audio_cond = None
        if generate_video:
            condition = task.video_condition
            video_cond = ChannelCondition(expand(condition.latents), expand(condition.mask))
            if latents is None:
                latents = randn_tensor(video_shape, generator=generator, device=device, dtype=torch.float32)
        if generate_audio:
            condition = task.audio_condition
            audio_cond = ChannelCondition(expand(condition.latents), expand(condition.mask))
            if audio_latents is None:
                audio_latents = randn_tensor(audio_shape, generator=generator, device=device, dtype=torch.float32)
        latents = None if latents is None else latents.to(device, torch.float32)
        audio_latents = None if audio_latents is None else audio_latents.to(device, torch.float32)
        reference_latents = expand(task.reference_latents)
        audio_reference_latents = expand(task.audio_reference_latents)

        def model_text(positive, positive_mask, negative, negative_mask):
            if do_cfg:
                text, mask = self._stack_text(negative, negative_mask, positive, positive_mask)
            else:
                text, mask = positive, positive_mask
            # No padding anywhere: drop the mask so that fast attention backends apply (one check, not per step).
            return text.to(transformer_dtype), None if mask is None or bool(mask.all()) else mask

        text, text_mask = model_text(
            prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask
        )

        # 3. Denoising loop: one sigma schedule for both modalities.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        caches = [m for m, used in ((self.transformer, generate_video), (self.audio_transformer, generate_audio)) if used]
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                timestep = t.expand(batch * copies)
                video_in = audio_in = None
                if generate_video:
                    video_in = video_cond.model_input(torch.cat([latents] * copies)).to(transformer_dtype)
                if generate_audio:
                    audio_in = audio_cond.model_input(torch.cat([audio_latents] * copies)).to(transformer_dtype)
                with contextlib.ExitStack() as stack:
                    for model in caches:
                        stack.enter_context(model.cache_context("denoise"))
                    if generate_video:
                        video_pred, _, audio_pred = self.transformer(
                            hidden_states=video_in,
                            timestep=timestep,
                            encoder_hidden_states=text,
                            encoder_attention_mask=text_mask,
                            reference_latents=reference_latents,
                            audio_transformer=self.audio_transformer if generate_audio else None,
                            audio_hidden_states=audio_in,
                            audio_reference_latents=audio_reference_latents if generate_audio else None,
                            attention_kwargs=attention_kwargs,
                            audio_attention_kwargs=attention_kwargs,
                            return_dict=False,
                        )
                    else:
                        video_pred = None
                        audio_pred = self.audio_transformer(
                            audio_in,
                            timestep,
                            text,
                            text_mask,
                            reference_latents=audio_reference_latents,
                            num_video_frames=timing.num_latent_frames,
                            attention_kwargs=attention_kwargs,
                            return_dict=False,
                        )[0]

                if do_cfg:
                    if generate_video:
                        uncond, cond = video_pred.float().chunk(2)
                        video_pred = uncond + guidance_scale * (cond - uncond) if cfg_video else cond
                    if generate_audio:
                        uncond, cond = audio_pred.float().chunk(2)
                        audio_pred = uncond + audio_guidance_scale * (cond - uncond) if cfg_audio else cond
                latents, audio_latents = step_jointly(
                    self.scheduler, t, [video_pred, audio_pred], [latents, audio_latents]
                )

                if callback_on_step_end is not None:
                    available = {
                        "latents": latents,
                        "audio_latents": audio_latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    outputs = callback_on_step_end(
                        self, i, t, {k: available[k] for k in callback_on_step_end_tensor_inputs}
                    )
                    latents = outputs.pop("latents", latents)
                    audio_latents = outputs.pop("audio_latents", audio_latents)
                    if "prompt_embeds" in outputs or "negative_prompt_embeds" in outputs:
                        prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                        negative_prompt_embeds = outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                        text, text_mask = model_text(
                            prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
                            negative_prompt_attention_mask,
                        )
                progress_bar.update()
        self._release("audio_transformer")

        # 4. Decode.
        frames = audio = None
        if output_type == "latent":
            frames, audio = latents, audio_latents
        else:
            if generate_video:
                video = VideoCodec(self.vae).decode(latents)
                frames = self.video_processor.postprocess_video(video.float(), output_type=output_type)
            if generate_audio:
                audio = task.kept_audio if task.kept_audio is not None else self.audio_codec.decode(audio_latents)
                audio = torch.nn.functional.pad(audio, (0, max(0, timing.num_audio_samples - audio.shape[1])))
                audio = audio[:, : timing.num_audio_samples].float().cpu()
                if task.kept_audio is not None and audio.shape[0] != batch:
                    audio = audio.repeat_interleave(batch // audio.shape[0], dim=0)
                if output_type != "pt":
                    audio = audio.numpy()
        self.maybe_free_model_hooks()

        sample_rate = self.audio_sample_rate if generate_audio else None
        if not return_dict:
            return frames, audio, sample_rate, timing.fps
        return SkyReelsV4PipelineOutput(frames=frames, audio=audio, audio_sample_rate=sample_rate, fps=timing.fps)
