"""What every SkyReels V4 task pipeline shares: components, prompt encoding, media preprocessing, the joint
denoising loop and decoding. The task pipelines only decide what is given (through `conditioning.py`)."""

from __future__ import annotations

import contextlib
import os
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

from ...loaders import SkyReelsV4LoraLoaderMixin
from ...models import SkyReelsV4AudioTransformer, SkyReelsV4RefinerTransformer, SkyReelsV4Transformer
from ...schedulers import step_jointly
from ...utils.model_card import write_pipeline_card
from .conditioning import (
    ChannelCondition,
    audio_condition,
    auto_keyframe_indices,
    refiner_condition,
    refiner_num_latent_frames,
)
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


@dataclass
class RefinementInputs:
    """Keyframes for the base pass and the refiner pass of the low-res + keyframes + refiner strategy (§7)."""

    refine: bool = False
    keyframe_indices: list[int] | None = None
    # Condition of the high-resolution keyframe latents, per prompt: black latents, a given first frame for I2V.
    keyframe_condition: ChannelCondition | None = None
    reference_images: Sequence[ImageInput] | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None


class SkyReelsV4BasePipeline(DiffusionPipeline, SkyReelsV4LoraLoaderMixin):
    r"""Base of the SkyReels V4 pipelines (not loadable itself).

    Components:
        tokenizer, text_encoder, image_processor: the Qwen-VL prompt encoder (transformers).
        transformer ([`SkyReelsV4Transformer`]): the video branch.
        vae ([`AutoencoderKLWan`]): the video VAE.
        scheduler ([`FlowMatchEulerDiscreteScheduler`] or another flow-matching scheduler).
        audio_transformer ([`SkyReelsV4AudioTransformer`], optional): the audio branch.
        audio_vae ([`MMAudioVAE`] or [`AutoencoderOobleck`], optional) and vocoder ([`MMAudioVocoder`], for MMAudio).
        refiner ([`SkyReelsV4RefinerTransformer`], optional): super-resolution + frame interpolation (`refine=True`).

    Model CPU offload: `audio_transformer` runs nested inside `transformer` in joint generation, so it is hooked on
    its own (not chained after `transformer`, which would offload one while the other runs) and released as soon as
    denoising ends.
    """

    model_cpu_offload_seq = "text_encoder->transformer->refiner->vae->audio_vae->vocoder"
    _optional_components = ["audio_transformer", "audio_vae", "vocoder", "image_processor", "refiner"]
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
        refiner: SkyReelsV4RefinerTransformer | None = None,
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
            refiner=refiner,
        )
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Diffusers' `save_pretrained`, plus a model card (`README.md`) describing the saved components."""
        super().save_pretrained(save_directory, *args, **kwargs)
        write_pipeline_card(self, save_directory)

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
        audio_vae = getattr(self, "audio_vae", None)
        if generate_audio and (getattr(self, "audio_transformer", None) is None or audio_vae is None):
            raise ValueError("`generate_audio=True` needs the `audio_transformer` and `audio_vae` components.")
        if audio_vae is not None:
            AudioCodec(audio_vae, self.vocoder)  # raises if an MMAudio VAE has no vocoder
        denoiser = getattr(self, "transformer", None) or self.refiner
        multiple = self.vae_scale_factor_spatial * denoiser.config.patch_size[1]
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

    def prepare_refinement(
        self,
        refine: bool,
        keyframe_indices: Sequence[int] | str | None,
        timing: ClipTiming,
        height: int,
        width: int,
        first_frame: torch.Tensor | None = None,
        reference_images: Sequence[ImageInput] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        keyframe_stride: int = 4,
    ) -> RefinementInputs:
        """Keyframes (base latent frames; `"auto"` = every `keyframe_stride` and the last; `[]` = none) and the
        refiner settings.

        A keyframe of base latent frame `j` is the high-resolution latent frame `j * temporal_scale` of the refined
        clip, so that the refiner can put it back as is. `first_frame` (`[B, 3, H', W']` in `[-1, 1]` at the refined
        size) gives keyframe 0 for image-to-video.
        """
        if keyframe_indices is None and not refine:
            return RefinementInputs()
        if self.refiner is None:
            raise ValueError("Keyframes and `refine=True` need the `refiner` component (its scales define them).")
        last = timing.num_latent_frames - 1
        if keyframe_indices is None or keyframe_indices == "auto":
            keyframe_indices = auto_keyframe_indices(timing.num_latent_frames, keyframe_stride)
        elif isinstance(keyframe_indices, str):
            raise ValueError(f"`keyframe_indices` must be a list of latent frames or 'auto', got {keyframe_indices!r}.")
        indices = [int(i) for i in keyframe_indices]
        if not indices:  # refine from the low-resolution guide alone
            return RefinementInputs(
                refine=refine, reference_images=reference_images, num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
            )
        if len(set(indices)) != len(indices) or any(not 0 <= i <= last for i in indices):
            raise ValueError(f"`keyframe_indices` must be distinct latent frames in [0, {last}], got {indices}.")
        spatial, temporal = self.refiner.config.spatial_scale, self.refiner.config.temporal_scale
        high_frames = (refiner_num_latent_frames(timing.num_latent_frames, temporal) - 1) * self.vae_scale_factor_temporal + 1
        device = self._execution_device
        codec = VideoCodec(self.vae)
        positions = [i * temporal for i in indices]
        black = codec.black_latents(1, high_frames, height * spatial, width * spatial, device=device)[:, :, positions]
        mask = torch.zeros(1, 1, *black.shape[2:], device=device)
        if first_frame is not None and 0 in indices:
            given = codec.encode(first_frame[:, :, None].to(device))
            black = black.expand(given.shape[0], -1, -1, -1, -1).clone()
            mask = mask.expand(given.shape[0], -1, -1, -1, -1).clone()
            black[:, :, indices.index(0)] = given[:, :, 0]
            mask[:, :, indices.index(0)] = 1.0
        return RefinementInputs(
            refine=refine,
            keyframe_indices=indices,
            keyframe_condition=ChannelCondition(black, mask),
            reference_images=reference_images,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
        )

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
        prompt_videos: Sequence[VideoInput] | None = None, refinement: RefinementInputs | None = None,
    ) -> SkyReelsV4PipelineOutput | tuple:
        """Run the shared loop with a task's `__call__` arguments (its `locals()`) and its conditions."""
        return self.generate(
            task=task,
            timing=timing,
            generate_video=generate_video,
            generate_audio=generate_audio,
            prompt_images=prompt_images,
            prompt_videos=prompt_videos,
            refinement=refinement,
            **{name: call_args[name] for name in self._GENERATE_ARGS},
        )

    def denoise(
        self,
        *,
        video_model: torch.nn.Module | None,
        audio_model: torch.nn.Module | None,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        video_condition: ChannelCondition | None,
        audio_condition: ChannelCondition | None,
        latents: torch.Tensor | None,
        audio_latents: torch.Tensor | None,
        keyframe_condition: ChannelCondition | None,
        keyframe_latents: torch.Tensor | None,
        keyframe_indices: list[int] | None,
        reference_latents: torch.Tensor | None,
        audio_reference_latents: torch.Tensor | None,
        num_video_frames: int,
        num_inference_steps: int,
        guidance_scale: float,
        audio_guidance_scale: float,
        attention_kwargs: dict[str, Any] | None,
        callback: Callable[[int, torch.Tensor, dict], dict] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Denoise video (with keyframes) and audio latents on one sigma schedule; returns all three.

        Conditions, text and references are already batched as the model sees them (`[uncond ; cond]` with
        guidance); `latents` / `audio_latents` / `keyframe_latents` hold one half. `callback(step, t, tensors)` may
        replace `latents`, `audio_latents` and `text` / `text_mask`.
        """
        device = self._execution_device
        copies = text.shape[0] // (latents if latents is not None else audio_latents).shape[0]
        cfg_video = video_model is not None and copies > 1 and guidance_scale > 1
        cfg_audio = audio_model is not None and copies > 1 and audio_guidance_scale > 1
        dtype = (video_model or audio_model).dtype

        def guided(prediction: torch.Tensor | None, scale: float, enabled: bool) -> torch.Tensor | None:
            if prediction is None or copies == 1:
                return prediction
            uncond, cond = prediction.float().chunk(2)
            return uncond + scale * (cond - uncond) if enabled else cond

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)  # else its first `step` looks the timestep up: a device sync
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                timestep = t.expand(text.shape[0])
                with contextlib.ExitStack() as stack:
                    for model in (video_model, audio_model):
                        if model is not None:
                            stack.enter_context(model.cache_context("denoise"))
                    audio_in = None
                    if audio_model is not None:
                        audio_in = audio_condition.model_input(torch.cat([audio_latents] * copies)).to(dtype)
                    if video_model is not None:
                        keyframes_in = None
                        if keyframe_latents is not None:
                            keyframes_in = keyframe_condition.model_input(torch.cat([keyframe_latents] * copies))
                            keyframes_in = keyframes_in.to(dtype)
                        joint = {}
                        if audio_model is not None:
                            joint = dict(
                                audio_transformer=audio_model,
                                audio_hidden_states=audio_in,
                                audio_reference_latents=audio_reference_latents,
                                audio_attention_kwargs=attention_kwargs,
                            )
                        if keyframes_in is not None:
                            joint.update(keyframe_hidden_states=keyframes_in, keyframe_indices=keyframe_indices)
                        output = video_model(
                            hidden_states=video_condition.model_input(torch.cat([latents] * copies)).to(dtype),
                            timestep=timestep,
                            encoder_hidden_states=text,
                            encoder_attention_mask=text_mask,
                            reference_latents=reference_latents,
                            attention_kwargs=attention_kwargs,
                            return_dict=True,
                            **joint,
                        )
                        video_pred, keyframe_pred, audio_pred = output.sample, output.keyframe_sample, output.audio_sample
                    else:
                        video_pred = keyframe_pred = None
                        audio_pred = audio_model(
                            audio_in,
                            timestep,
                            text,
                            text_mask,
                            reference_latents=audio_reference_latents,
                            num_video_frames=num_video_frames,
                            attention_kwargs=attention_kwargs,
                            return_dict=False,
                        )[0]

                latents, keyframe_latents, audio_latents = step_jointly(
                    self.scheduler,
                    t,
                    [
                        guided(video_pred, guidance_scale, cfg_video),
                        guided(keyframe_pred, guidance_scale, cfg_video),
                        guided(audio_pred, audio_guidance_scale, cfg_audio),
                    ],
                    [latents, keyframe_latents, audio_latents],
                )
                if callback is not None:
                    updates = callback(i, t, {"latents": latents, "audio_latents": audio_latents})
                    latents = updates.get("latents", latents)
                    audio_latents = updates.get("audio_latents", audio_latents)
                    text, text_mask = updates.get("text", text), updates.get("text_mask", text_mask)
                progress_bar.update()
        return latents, keyframe_latents, audio_latents

    def refined_timing(self, timing: ClipTiming) -> ClipTiming:
        """The timing of a clip after the refiner's frame interpolation (audio cut to the refined duration)."""
        temporal = self.refiner.config.temporal_scale
        frames = (refiner_num_latent_frames(timing.num_latent_frames, temporal) - 1) * self.vae_scale_factor_temporal
        return self.clip_timing(timing.fps * temporal, num_frames=frames + 1)

    def run_refiner(
        self,
        latents: torch.Tensor,
        keyframe_latents: torch.Tensor | None,
        keyframe_indices: list[int] | None,
        *,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        reference_latents: torch.Tensor | None,
        num_inference_steps: int,
        guidance_scale: float,
        generator: torch.Generator | list[torch.Generator] | None,
        attention_kwargs: dict[str, Any] | None,
        preserved: ChannelCondition | None = None,
        refined_latents: torch.Tensor | None = None,
        callback: Callable[[int, torch.Tensor, dict], dict] | None = None,
    ) -> torch.Tensor:
        """Denoise high-resolution latents guided by `latents` (low-res, `[B, C, T, h, w]`) and the keyframes.

        `text` / `reference_latents` are batched as the refiner sees them (`[uncond ; cond]` with guidance).
        """
        refiner = self.refiner
        guide = refiner_condition(
            latents,
            refiner.config.spatial_scale,
            refiner.config.temporal_scale,
            keyframe_latents,
            keyframe_indices,
            preserved=preserved,
        )
        copies = text.shape[0] // latents.shape[0]
        if refined_latents is None:
            refined_latents = randn_tensor(
                tuple(guide.latents.shape), generator=generator, device=latents.device, dtype=torch.float32
            )
        elif refined_latents.shape != guide.latents.shape:
            raise ValueError(
                f"`refined_latents` must have shape {tuple(guide.latents.shape)}, got {tuple(refined_latents.shape)}."
            )
        refined, _, _ = self.denoise(
            video_model=refiner,
            audio_model=None,
            text=text.to(refiner.dtype),
            text_mask=text_mask,
            video_condition=ChannelCondition(torch.cat([guide.latents] * copies), torch.cat([guide.mask] * copies)),
            audio_condition=None,
            latents=refined_latents.to(latents.device, torch.float32),
            audio_latents=None,
            keyframe_condition=None,
            keyframe_latents=None,
            keyframe_indices=None,
            reference_latents=reference_latents,
            audio_reference_latents=None,
            num_video_frames=0,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            audio_guidance_scale=1.0,
            attention_kwargs=attention_kwargs,
            callback=callback,
        )
        return refined

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
        refinement: RefinementInputs | None = None,
    ) -> SkyReelsV4PipelineOutput | tuple:
        """Encode the prompt, denoise both modalities (and keyframes) on one sigma schedule, optionally refine, decode.

        Inputs are already checked by the task pipeline.
        """
        device = self._execution_device
        self._guidance_scale = guidance_scale
        self._audio_guidance_scale = audio_guidance_scale
        self._interrupt = False
        do_cfg = (generate_video and guidance_scale > 1) or (generate_audio and audio_guidance_scale > 1)
        refinement = refinement or RefinementInputs()
        video_model = self.transformer if generate_video else None
        audio_model = self.audio_transformer if generate_audio else None

        batch = self.batch_size_of(prompt, prompt_embeds) * num_videos_per_prompt
        codec = VideoCodec(self.vae)
        video_shape = (
            batch, codec.latent_channels, timing.num_latent_frames,
            height // codec.spatial_factor, width // codec.spatial_factor,
        )
        if generate_video:
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
        copies = 2 if do_cfg else 1
        model_dtype = (video_model or audio_model).dtype

        def expand(x: torch.Tensor | None) -> torch.Tensor | None:
            """Per-prompt (or shared) tensors -> the model batch `[uncond ; cond]`."""
            if x is None:
                return None
            x = x.to(device)
            if x.shape[0] != batch:
                x = x.repeat_interleave(batch // x.shape[0], dim=0)
            return torch.cat([x] * copies) if copies > 1 else x

        def expand_condition(condition: ChannelCondition | None) -> ChannelCondition | None:
            return None if condition is None else ChannelCondition(expand(condition.latents), expand(condition.mask))

        def model_text(positive, positive_mask, negative, negative_mask):
            if do_cfg:
                text, mask = self._stack_text(negative, negative_mask, positive, positive_mask)
            else:
                text, mask = positive, positive_mask
            # No padding anywhere: drop the mask so that fast attention backends apply (one check, not per step).
            return text.to(model_dtype), None if mask is None or bool(mask.all()) else mask

        text, text_mask = model_text(
            prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask
        )

        def on_step_end(step: int, t: torch.Tensor, tensors: dict) -> dict:
            nonlocal prompt_embeds, negative_prompt_embeds
            if callback_on_step_end is None:
                return {}
            available = {**tensors, "prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}
            outputs = callback_on_step_end(self, step, t, {k: available[k] for k in callback_on_step_end_tensor_inputs})
            updates = {k: outputs[k] for k in ("latents", "audio_latents") if k in outputs}
            if "prompt_embeds" in outputs or "negative_prompt_embeds" in outputs:
                prompt_embeds = outputs.get("prompt_embeds", prompt_embeds)
                negative_prompt_embeds = outputs.get("negative_prompt_embeds", negative_prompt_embeds)
                updates["text"], updates["text_mask"] = model_text(
                    prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask
                )
            return updates

        # 2. Initial noise and the base pass (video, keyframes, audio together).
        if generate_video and latents is None:
            latents = randn_tensor(video_shape, generator=generator, device=device, dtype=torch.float32)
        if generate_audio and audio_latents is None:
            audio_latents = randn_tensor(audio_shape, generator=generator, device=device, dtype=torch.float32)
        keyframe_latents = None
        if generate_video and refinement.keyframe_condition is not None:
            keyframe_shape = (batch, *refinement.keyframe_condition.latents.shape[1:])
            keyframe_latents = randn_tensor(keyframe_shape, generator=generator, device=device, dtype=torch.float32)
        latents = None if latents is None else latents.to(device, torch.float32)
        audio_latents = None if audio_latents is None else audio_latents.to(device, torch.float32)

        latents, keyframe_latents, audio_latents = self.denoise(
            video_model=video_model,
            audio_model=audio_model,
            text=text,
            text_mask=text_mask,
            video_condition=expand_condition(task.video_condition),
            audio_condition=expand_condition(task.audio_condition),
            latents=latents,
            audio_latents=audio_latents,
            keyframe_condition=expand_condition(refinement.keyframe_condition),
            keyframe_latents=keyframe_latents,
            keyframe_indices=refinement.keyframe_indices,
            reference_latents=expand(task.reference_latents),
            audio_reference_latents=expand(task.audio_reference_latents),
            num_video_frames=timing.num_latent_frames,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            audio_guidance_scale=audio_guidance_scale,
            attention_kwargs=attention_kwargs,
            callback=on_step_end,
        )
        self._release("audio_transformer")

        # 3. The refiner pass: super-resolution + frame interpolation guided by the base latents and keyframes.
        out_timing = timing
        if generate_video and refinement.refine:
            references = None
            if refinement.reference_images:
                scale = self.refiner.config.spatial_scale
                references = self.encode_reference_images(
                    refinement.reference_images, height * scale, width * scale, device
                )
            latents = self.run_refiner(
                latents,
                keyframe_latents,
                refinement.keyframe_indices if keyframe_latents is not None else None,
                text=text,
                text_mask=text_mask,
                reference_latents=expand(references),
                num_inference_steps=refinement.num_inference_steps or num_inference_steps,
                guidance_scale=guidance_scale if refinement.guidance_scale is None else refinement.guidance_scale,
                generator=generator,
                attention_kwargs=attention_kwargs,
            )
            out_timing = self.refined_timing(timing)

        # 4. Decode.
        frames = audio = None
        if output_type == "latent":
            frames, audio = latents, audio_latents
        else:
            if generate_video:
                video = codec.decode(latents)
                frames = self.video_processor.postprocess_video(video.float(), output_type=output_type)
            if generate_audio:
                audio = task.kept_audio if task.kept_audio is not None else self.audio_codec.decode(audio_latents)
                audio = torch.nn.functional.pad(audio, (0, max(0, out_timing.num_audio_samples - audio.shape[1])))
                audio = audio[:, : out_timing.num_audio_samples].float().cpu()
                if task.kept_audio is not None and audio.shape[0] != batch:
                    audio = audio.repeat_interleave(batch // audio.shape[0], dim=0)
                if output_type != "pt":
                    audio = audio.numpy()
        self.maybe_free_model_hooks()

        sample_rate = self.audio_sample_rate if generate_audio else None
        keyframes = keyframe_latents if output_type == "latent" and not refinement.refine else None
        if not return_dict:
            return frames, audio, sample_rate, out_timing.fps
        return SkyReelsV4PipelineOutput(
            frames=frames,
            audio=audio,
            audio_sample_rate=sample_rate,
            fps=out_timing.fps,
            keyframe_latents=keyframes,
            keyframe_indices=refinement.keyframe_indices if keyframes is not None else None,
        )
