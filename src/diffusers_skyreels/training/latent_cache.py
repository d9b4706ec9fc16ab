"""Latents of training clips: computed on the fly with the frozen VAEs and text encoder, or read from a cache.

The cache (`--cache_dir`) is a folder of safetensors files (never pickle)::

    cache_index.json          settings it was made with, the cached clips, the skipped ones
    null.safetensors          black-video and silence latents (conditions where nothing is given), embedding of ""
    latents/000000.safetensors  per clip: video_latents [C, T, h, w], reference_latents [C, K, h, w] (K frames,
                              each encoded alone as an image), audio_latents [C_a, T_a] (if the clip has sound),
                              prompt_embeds [L, D] (no padding); with paired data also high_res_latents
                              [C, T', sh, sw] and high_res_reference_latents [C, K, sh, sw] (the same reference frames)

With paired data (`dataset.PairedScales`) the null file also holds `video_high`, the latents of a black
high-resolution clip (the condition of keyframes that are not given).

It holds whatever each clip has, independent of the training mode, so one cache serves video, audio and joint runs.
Using a cache made with other settings (size, frames, rate, VAEs, text encoder) is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from ..pipelines.skyreels_v4.latent_codecs import AudioCodec, VideoCodec
from .dataset import ClipRecord, PairedScales, ScanReport, clip_requirements, decode_clip, probe_clip
from .randomness import SampleOrder

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
INDEX_NAME = "cache_index.json"
NULL_NAME = "null.safetensors"


def reference_frame_indices(num_frames: int, count: int) -> list[int]:
    """The pixel frames offered as in-context image references: `count` evenly spaced ones."""
    return torch.linspace(0, num_frames - 1, count).round().long().unique().tolist()


def _config_digest(*modules: torch.nn.Module | None) -> str:
    """A short digest of the modules' configs: a cache is only valid for the encoders it was made with.

    Library versions and private keys are left out, so that upgrading Diffusers or Transformers keeps a cache.
    """
    configs = []
    for module in modules:
        config = getattr(module, "config", None)
        if config is not None:
            config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            config = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
        configs.append(config)
    return hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode()).hexdigest()[:16]


class LatentEncoder:
    """The frozen encoders of a SkyReels V4 pipeline, as training needs them (no gradients).

    Args:
        pipeline: a loaded SkyReels V4 pipeline (its `vae`, `audio_vae` / `vocoder`, text encoder).
        height, width, num_frames: the training clip in pixels.
        num_audio_latents: audio latents of the clip (`clip_timing`).
        num_reference_frames: how many evenly spaced frames are offered as image references.
        paired: the scales of the high-resolution clip that comes with each training clip (`None`: none).
    """

    def __init__(
        self,
        pipeline,
        height: int,
        width: int,
        num_frames: int,
        num_audio_latents: int,
        num_reference_frames: int,
        paired: PairedScales | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.video_codec = VideoCodec(pipeline.vae)
        self.audio_codec: AudioCodec | None = pipeline.audio_codec
        self.height, self.width, self.num_frames = height, width, num_frames
        self.num_audio_latents = num_audio_latents
        self.reference_frames = reference_frame_indices(num_frames, num_reference_frames)
        self.paired = paired
        # The same instants in the high-resolution clip (frame `i` is its frame `i * temporal`).
        self.high_res_reference_frames = [i * paired.temporal for i in self.reference_frames] if paired else None

    @property
    def device(self) -> torch.device:
        return self.pipeline.vae.device

    def settings(self) -> dict:
        """What a cache must have been made with to be reused."""
        audio = self.audio_codec
        return {
            "format": CACHE_FORMAT,
            "height": self.height,
            "width": self.width,
            "num_frames": self.num_frames,
            "num_audio_latents": self.num_audio_latents,
            "audio_sample_rate": None if audio is None else audio.sample_rate,
            "reference_frames": self.reference_frames,
            "paired": None if self.paired is None else self.paired.settings(),
            "encoders": _config_digest(
                self.pipeline.vae, getattr(self.pipeline, "audio_vae", None), self.pipeline.text_encoder
            ),
        }

    @torch.no_grad()
    def encode_video(
        self, video: torch.Tensor, reference_frames: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, 3, F, H, W]` -> clip latents `[B, C, T, h, w]` and reference candidates `[B, C, K, h, w]` (the
        `reference_frames`, default the training clip's, each encoded alone)."""
        video = video.to(self.device)
        latents = self.video_codec.encode(video).float()
        reference_frames = self.reference_frames if reference_frames is None else reference_frames
        frames = video[:, :, reference_frames].transpose(1, 2).flatten(0, 1)[:, :, None]  # [B*K, 3, 1, H, W]
        references = self.video_codec.encode(frames).float()[:, :, 0]
        references = references.unflatten(0, (video.shape[0], -1)).transpose(1, 2)
        return latents, references

    def encode_high_res(self, video_high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """High-resolution clips `[B, 3, F', sH, sW]` -> their latents and reference candidates (paired data)."""
        return self.encode_video(video_high, self.high_res_reference_frames)

    @torch.no_grad()
    def encode_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """Mono `[B, samples]` -> `[B, C_a, T_a]` (the samples that whole latents cover)."""
        samples = self.num_audio_latents * self.audio_codec.hop_length
        audio = torch.nn.functional.pad(audio, (0, max(0, samples - audio.shape[1])))[:, :samples]
        return self.audio_codec.encode(audio.to(self.device)).float()

    @torch.no_grad()
    def encode_prompts(self, texts: list[str]) -> list[torch.Tensor]:
        """One `[L_i, D]` embedding per caption (padding removed)."""
        embeds = []
        for text in texts:
            prompt_embeds, mask, _, _ = self.pipeline.encode_prompt(
                text, do_classifier_free_guidance=False, device=self.device
            )
            embeds.append(prompt_embeds[0][mask[0].bool()].float())
        return embeds

    @torch.no_grad()
    def null_latents(self) -> dict[str, torch.Tensor]:
        """Black-video and silence latents and the embedding of the empty prompt (caption dropout)."""
        # The empty prompt is what the pipelines' classifier-free guidance uses as its negative.
        _, _, empty, empty_mask = self.pipeline.encode_prompt(
            "-", negative_prompt="", do_classifier_free_guidance=True, device=self.device
        )
        null = {
            "video": self.video_codec.black_latents(1, self.num_frames, self.height, self.width, self.device)[0],
            "prompt_embeds": empty[0][empty_mask[0].bool()].float(),
        }
        if self.paired is not None:
            high_height, high_width, high_frames, _ = self.paired.high_res(self.height, self.width, self.num_frames, 1)
            black = self.video_codec.black_latents(1, high_frames, high_height, high_width, self.device)
            null["video_high"] = black[0]
        if self.audio_codec is not None:
            silence = torch.zeros(1, self.num_audio_latents * self.audio_codec.hop_length, device=self.device)
            null["audio"] = self.audio_codec.encode(silence)[0].float()
        return {key: value.float().cpu().contiguous() for key, value in null.items()}


@dataclass
class CachedClip:
    file_name: str
    text: str
    file: str
    has_audio: bool


class LatentCache:
    """Reads (and, through `precompute_latent_cache`, writes) a latent cache folder."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir = Path(cache_dir)

    @property
    def index_path(self) -> Path:
        return self.cache_dir / INDEX_NAME

    def exists(self) -> bool:
        return self.index_path.is_file()

    def index(self) -> dict:
        with open(self.index_path, encoding="utf-8") as file:
            return json.load(file)

    def check_settings(self, settings: dict) -> None:
        """Raise if the cache was made with other settings than `settings`."""
        cached = self.index()["settings"]
        differ = sorted(k for k in set(cached) | set(settings) if cached.get(k) != settings.get(k))
        if differ:
            details = "; ".join(f"{k}: cache {cached.get(k)!r} vs now {settings.get(k)!r}" for k in differ)
            raise ValueError(
                f"The latent cache in {self.cache_dir} was made with other settings ({details}). Delete it or "
                "choose another --cache_dir."
            )

    def clips(self) -> list[CachedClip]:
        return [CachedClip(**entry) for entry in self.index()["clips"]]

    def null_latents(self) -> dict[str, torch.Tensor]:
        return load_file(self.cache_dir / NULL_NAME)

    def load(self, clip: CachedClip) -> dict[str, torch.Tensor]:
        return load_file(self.cache_dir / clip.file)


def precompute_latent_cache(encoder: LatentEncoder, records: list[ClipRecord], cache_dir: str | Path, fps: float,
                            num_audio_samples: int) -> ScanReport:
    """Encode every usable clip into `cache_dir` (see the module doc); returns which clips were cached or skipped.

    Clips that cannot be decoded or are too short (or, with paired data, too slow or too small) are skipped and listed
    in the index; clips without sound are cached without audio latents.
    """
    cache = LatentCache(cache_dir)
    (cache.cache_dir / "latents").mkdir(parents=True, exist_ok=True)
    audio_rate = None if encoder.audio_codec is None else encoder.audio_codec.sample_rate
    report = ScanReport(usable=[])
    entries = []
    size = (encoder.height, encoder.width, encoder.num_frames, fps)
    requirements = clip_requirements(*size, encoder.paired)
    for record in records:
        problem = probe_clip(record.path, needs_audio=False, **requirements)
        if problem is None:
            try:
                media = decode_clip(record.path, *size, audio_rate, num_audio_samples, encoder.paired)
            except ValueError as error:
                problem = ("undecodable", str(error))
        if problem is not None:
            report.skip(problem[0], record, problem[1])
            continue
        video_latents, references = encoder.encode_video(media.video[None])
        tensors = {
            "video_latents": video_latents[0],
            "reference_latents": references[0],
            "prompt_embeds": encoder.encode_prompts([record.text])[0],
        }
        if media.video_high is not None:
            high_latents, high_references = encoder.encode_high_res(media.video_high[None])
            tensors.update(high_res_latents=high_latents[0], high_res_reference_latents=high_references[0])
        if media.audio is not None:
            tensors["audio_latents"] = encoder.encode_audio(media.audio[None])[0]
        file = f"latents/{len(entries):06d}.safetensors"
        save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, cache.cache_dir / file)
        entries.append(CachedClip(record.file_name, record.text, file, media.audio is not None).__dict__)
        report.usable.append(record)
    save_file(encoder.null_latents(), cache.cache_dir / NULL_NAME)
    index = {"settings": encoder.settings(), "clips": entries, "skipped": report.skipped}
    temporary = cache.index_path.with_suffix(".tmp")
    temporary.write_text(json.dumps(index, indent=1), encoding="utf-8")
    temporary.replace(cache.index_path)  # the index is written last: a cache without it is incomplete
    logger.info("Latent cache %s: %s.", cache.cache_dir, report.summary())
    return report


class CachedLatentDataset(Dataset):
    """Cached clips indexed by global sample number. Items: `{"sample_number", "index", "text", "video_latents",
    "reference_latents", "audio_latents", "prompt_embeds", "high_res_latents", "high_res_reference_latents"}` (what
    the run does not use is `None`)."""

    def __init__(
        self, cache: LatentCache, clips: list[CachedClip], seed: int, video: bool, audio: bool, high_res: bool = False
    ) -> None:
        self.cache = cache
        self.clips = clips
        self.order = SampleOrder(len(clips), seed)
        self.video, self.audio, self.high_res = video, audio, high_res

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, sample_number: int) -> dict:
        index = self.order(sample_number)
        tensors = self.cache.load(self.clips[index])
        return {
            "sample_number": sample_number,
            "index": index,
            "text": self.clips[index].text,
            "video_latents": tensors["video_latents"] if self.video else None,
            "reference_latents": tensors["reference_latents"] if self.video else None,
            "audio_latents": tensors["audio_latents"] if self.audio else None,
            "prompt_embeds": tensors["prompt_embeds"],
            "high_res_latents": tensors["high_res_latents"] if self.high_res else None,
            "high_res_reference_latents": tensors["high_res_reference_latents"] if self.high_res else None,
        }
