"""Pixel/waveform <-> normalized latents, for the VAEs the SkyReels V4 pipelines accept.

The transformers see normalized latents. These wrappers keep each VAE's normalization in one place so pipelines,
the conditioning helper and the training script all encode and decode the same way.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, AutoencoderOobleck, MMAudioVAE, MMAudioVocoder


def _latents(encoder_output, generator: torch.Generator | None, sample: bool) -> torch.Tensor:
    distribution = encoder_output.latent_dist
    return distribution.sample(generator) if sample else distribution.mode()


class VideoCodec:
    """`AutoencoderKLWan` with its per-channel `latents_mean` / `latents_std` normalization."""

    def __init__(self, vae: AutoencoderKLWan) -> None:
        self.vae = vae
        self._black: tuple[tuple, torch.Tensor] | None = None

    @property
    def temporal_factor(self) -> int:
        return self.vae.config.scale_factor_temporal

    @property
    def spatial_factor(self) -> int:
        return self.vae.config.scale_factor_spatial

    @property
    def latent_channels(self) -> int:
        return self.vae.config.z_dim

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.latent_channels, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
        std = torch.tensor(self.vae.config.latents_std, device=like.device, dtype=like.dtype).view(shape)
        return mean, std

    def encode(
        self, video: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False
    ) -> torch.Tensor:
        """`[B, 3, F, H, W]` in `[-1, 1]` -> normalized latents `[B, C, (F - 1) / 4 + 1, H / 8, W / 8]`."""
        latents = _latents(self.vae.encode(video.to(self.vae.dtype)), generator, sample)
        mean, std = self._stats(latents)
        return (latents - mean) / std

    def black_latents(
        self, batch_size: int, num_frames: int, height: int, width: int, device: torch.device | None = None
    ) -> torch.Tensor:
        """Latents of an all-black clip (what the condition holds where nothing is given); the last shape is cached."""
        key = (num_frames, height, width, str(device))
        if self._black is None or self._black[0] != key:
            black = torch.full((1, 3, num_frames, height, width), -1.0, device=device)
            with torch.no_grad():
                self._black = (key, self.encode(black))
        return self._black[1].expand(batch_size, -1, -1, -1, -1).clone()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents -> `[B, 3, F, H, W]` in `[-1, 1]`."""
        latents = latents.to(self.vae.dtype)
        mean, std = self._stats(latents)
        return self.vae.decode(latents * std + mean, return_dict=False)[0]


class AudioCodec:
    """A mono audio VAE: `MMAudioVAE` + `MMAudioVocoder` (mel latents) or `AutoencoderOobleck` (waveform latents)."""

    def __init__(self, audio_vae: MMAudioVAE | AutoencoderOobleck, vocoder: MMAudioVocoder | None = None) -> None:
        if isinstance(audio_vae, MMAudioVAE) and vocoder is None:
            raise ValueError("An `MMAudioVAE` decodes to mel spectrograms and needs a `vocoder` (`MMAudioVocoder`).")
        if not isinstance(audio_vae, (MMAudioVAE, AutoencoderOobleck)):
            raise ValueError(
                f"`audio_vae` must be an MMAudioVAE or an AutoencoderOobleck, got {type(audio_vae).__name__}."
            )
        self.audio_vae = audio_vae
        self.vocoder = vocoder
        self._is_mel = isinstance(audio_vae, MMAudioVAE)

    @property
    def sample_rate(self) -> int:
        config = self.audio_vae.config
        return config.sample_rate if self._is_mel else config.sampling_rate

    @property
    def hop_length(self) -> int:
        """Waveform samples per latent."""
        return self.audio_vae.latent_hop_length if self._is_mel else self.audio_vae.hop_length

    @property
    def latent_channels(self) -> int:
        config = self.audio_vae.config
        return config.latent_channels if self._is_mel else config.decoder_input_channels

    @property
    def _scale(self) -> float:
        return self.audio_vae.config.scaling_factor if self._is_mel else 1.0

    def encode(
        self, waveform: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False
    ) -> torch.Tensor:
        """Mono `[B, samples]` in `[-1, 1]` -> normalized latents `[B, C, samples / hop]`."""
        waveform = waveform.to(self.audio_vae.dtype)
        if not self._is_mel:
            waveform = waveform[:, None].expand(-1, self.audio_vae.config.audio_channels, -1)
        return _latents(self.audio_vae.encode(waveform), generator, sample) * self._scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents -> mono `[B, samples]` in `[-1, 1]` (`latents * hop` samples)."""
        latents = latents.to(self.audio_vae.dtype) / self._scale
        decoded = self.audio_vae.decode(latents, return_dict=False)[0]
        if self._is_mel:
            return self.vocoder(decoded.to(self.vocoder.dtype), return_dict=False)[0][:, 0].float()
        return decoded.mean(dim=1).float().clamp(-1, 1)
