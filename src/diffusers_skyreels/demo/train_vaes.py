"""Trains the demo's two small VAEs on the bouncing world: a Wan video VAE and an Oobleck waveform VAE.

No pretrained VAE can be downloaded for the demo, and the released ones are far too slow for a CPU, so the demo trains
its own in a few minutes. Clips are rendered in memory with `render_clip` (no mp4 round trip), from a seeded random
stream, so the same seed and thread count give the same weights.

- Video: `AutoencoderKLWan` with 8 latent channels, Wan's 4x temporal and a 4x spatial compression (at 8x, a
  14-pixel ball covers two latent pixels and this small VAE lost its colour and shape). Its temporal
  taps start out looking at the current frame only, so it first learns on single frames (cheap 32 x 32 crops,
  thousands of steps), then on 9-frame clips (whole 64 x 64 frames). Both phases alternate 64 x 64 renders and
  crops of 128 x 128 renders (objects twice as large), because the same VAE decodes the refiner's 128 x 128
  output and a convolutional VAE only reproduces the object scales it has seen. The loss weights the object pixels
  up; otherwise the flat background dominates. After training, per-channel `latents_mean` / `latents_std` are
  measured and stored in the config, which `VideoCodec` uses to normalize.
- Audio: `AutoencoderOobleck` (mono, 16 kHz, hop 256 = 62.5 latents/s, 8 latent channels), decoded without a
  vocoder. Loss: waveform MSE + L1, a multi-resolution STFT loss ramped in once pings come out, and a small KL.
  `AudioCodec` uses its latents as they come, so after training they are brought to unit standard deviation by
  scaling weights (`rescale_audio_latents`).

The two VAEs train in two single-threaded processes at once: on a small shared CPU that is faster than one process
with two threads (see `--num-threads`).

Run `python -m diffusers_skyreels.demo.train_vaes --output-dir DIR` to write `DIR/vae`, `DIR/audio_vae` and
`DIR/vae_report.json` (settings, wall-clock times and the quality figures of held-out clips).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, AutoencoderOobleck
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

from diffusers_skyreels.demo.world import (
    BACKGROUND,
    COLOURS,
    PING_DURATION_S,
    PITCHES_HZ,
    REFERENCE_WIDTH,
    SHAPE_SIZES,
    ClipSpec,
    render_clip,
    sample_clip_spec,
)

SAMPLE_RATE = 16000
FPS = 16
HIRES_WIDTH = 128
# Independent random streams derived from the one seed.
VIDEO_TRAIN_STREAM, AUDIO_TRAIN_STREAM, STATISTICS_STREAM, EVALUATION_STREAM = range(4)
# Fill ratio (pixel area / bounding-box area) halfway between a disc (pi / 4) and a square (1).
SQUARE_FILL_THRESHOLD = 0.89


@dataclass
class VideoVAESettings:
    """Architecture and training settings of the video VAE: an image phase, then a clip phase."""

    base_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    z_dim: int = 8
    image_steps: int = 800
    image_batch_size: int = 8
    image_crop_size: int = 32
    image_learning_rate: float = 1e-3
    clip_steps: int = 400
    clip_batch_size: int = 2
    clip_frames: int = 9
    clip_crop_size: int = 64
    clip_learning_rate: float = 5e-4
    warmup_steps: int = 20
    foreground_weight: float = 20.0
    kl_weight: float = 1e-4
    posterior_std_init: float = 0.01


@dataclass
class AudioVAESettings:
    """Architecture and training settings of the audio VAE; the encoder's width is twice `latent_channels`.

    Two stages of 16x: the last transposed convolution then has 32-sample kernels, long enough to hold a period of
    the pings (12-36 samples), and such a decoder learns them in a few hundred steps; with Stable Audio's small
    first strides (2, 4, 4, 8) it was still stuck on silence after 200 steps.
    """

    latent_channels: int = 8
    downsampling_ratios: tuple[int, ...] = (16, 16)
    channel_multiples: tuple[int, ...] = (2, 4)
    decoder_channels: int = 16
    steps: int = 600
    batch_size: int = 4
    segment_samples: int = 8192
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    l1_weight: float = 1.0
    # The STFT loss is ramped in linearly over these steps (see `audio_vae_loss`).
    stft_ramp: tuple[int, int] = (150, 250)
    stft_floor: float = 1e-2
    kl_weight: float = 1e-3
    posterior_std_init: float = 0.01
    fft_sizes: tuple[int, ...] = (128, 256, 512, 1024)
    # Share of training segments placed so that they contain a ping; the rest are uniform (often silent).
    ping_fraction: float = 0.8


# --------------------------------------------------------------------------------------------------------------------
# Models


def build_video_vae(settings: VideoVAESettings) -> AutoencoderKLWan:
    """A fresh `AutoencoderKLWan` with identity latent statistics (replaced after training).

    Two departures from the default initialization, both to make a short run work:
    - the posterior's log-variance starts at `2 log(posterior_std_init)` instead of 0: with unit noise on the small
      initial means the decoder sees almost pure noise and learns to ignore the latents;
    - see `hold_frames_in_time`.
    """
    if len(settings.dim_mult) < 3:
        raise ValueError(f"`dim_mult` needs at least 3 levels for the 4x temporal compression, got {settings.dim_mult}.")
    vae = AutoencoderKLWan(
        base_dim=settings.base_dim,
        z_dim=settings.z_dim,
        dim_mult=list(settings.dim_mult),
        num_res_blocks=settings.num_res_blocks,
        temperal_downsample=[False] * (len(settings.dim_mult) - 3) + [True, True],
        scale_factor_spatial=2 ** (len(settings.dim_mult) - 1),
        latents_mean=[0.0] * settings.z_dim,
        latents_std=[1.0] * settings.z_dim,
    )
    hold_frames_in_time(vae)
    with torch.no_grad():
        vae.quant_conv.bias[settings.z_dim :] = 2.0 * math.log(settings.posterior_std_init)
    return vae


@torch.no_grad()
def hold_frames_in_time(vae: AutoencoderKLWan) -> None:
    """Makes the VAE code each frame on its own: temporal taps see only the current frame.

    Causal 3D convolutions keep only their last temporal tap; the temporal down-samplers copy their last input frame
    and the up-samplers repeat theirs. A clip is then coded as a sample-and-hold of single frames, so what is learnt
    on single frames (which never reach the other taps) carries over unchanged when training moves on to clips.
    """
    resamplers = [getattr(module, "time_conv", None) for module in vae.modules() if isinstance(module, WanResample)]
    for module in vae.modules():
        if not isinstance(module, WanCausalConv3d) or module.kernel_size[0] == 1:
            continue
        if any(module is conv for conv in resamplers):
            identity = torch.eye(module.in_channels).repeat(module.out_channels // module.in_channels, 1)
            module.weight.zero_()
            module.weight[:, :, -1, 0, 0] = identity
            module.bias.zero_()
        else:
            module.weight[:, :, :-1] = 0.0


def build_audio_vae(settings: AudioVAESettings) -> AutoencoderOobleck:
    """A fresh mono 16 kHz `AutoencoderOobleck`; its posterior std starts near `posterior_std_init` (see the video VAE)."""
    vae = AutoencoderOobleck(
        encoder_hidden_size=2 * settings.latent_channels,
        downsampling_ratios=list(settings.downsampling_ratios),
        channel_multiples=list(settings.channel_multiples),
        decoder_channels=settings.decoder_channels,
        decoder_input_channels=settings.latent_channels,
        audio_channels=1,
        sampling_rate=SAMPLE_RATE,
    )
    with torch.no_grad():
        # The posterior std is softplus(scale) + 1e-4; this bias makes it `posterior_std_init` for a zero input.
        vae.encoder.conv2.bias[settings.latent_channels :] = math.log(math.expm1(settings.posterior_std_init))
    return vae


def decode_unclamped(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """`vae.decode` without its final clamp to [-1, 1], which would stop the gradient of saturated pixels.

    Decodes one latent frame at a time with the causal feature cache, exactly like `AutoencoderKLWan._decode`.
    """
    cache = [None] * sum(isinstance(module, WanCausalConv3d) for module in vae.decoder.modules())
    hidden = vae.post_quant_conv(latents)
    frames = [
        vae.decoder(hidden[:, :, i : i + 1], feat_cache=cache, feat_idx=[0], first_chunk=i == 0)
        for i in range(hidden.shape[2])
    ]
    return torch.cat(frames, dim=2)


def kl_divergence(posterior) -> torch.Tensor:
    """KL divergence of a diagonal Gaussian posterior from N(0, 1), averaged over latent elements."""
    return 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()


# --------------------------------------------------------------------------------------------------------------------
# Data


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 `[F, H, W, 3]` -> float `[3, F, H, W]` in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def tensor_to_frames(video: torch.Tensor) -> np.ndarray:
    """`[B, 3, F, H, W]` in [-1, 1] -> uint8 `[B, F, H, W, 3]`."""
    return ((video.clamp(-1, 1) + 1.0) * 127.5).round().byte().permute(0, 2, 3, 4, 1).numpy()


def _crop_around_object(rng: np.random.Generator, centre: float, extent: int, crop: int) -> int:
    """Start of a `crop`-long window that holds `centre` up to a jitter of a quarter crop, inside `[0, extent)`."""
    jitter = int(rng.integers(-crop // 4, crop // 4 + 1))
    return int(np.clip(round(centre - crop / 2) + jitter, 0, extent - crop))


def video_batch(rng: np.random.Generator, batch_size: int, num_frames: int, size: int, crop_size: int) -> torch.Tensor:
    """Random clips rendered at `size` x `size` and cropped around the object: `[B, 3, F, crop, crop]` in [-1, 1]."""
    clips = []
    for _ in range(batch_size):
        clip = render_clip(sample_clip_spec(rng), width=size, height=size, fps=FPS, num_frames=num_frames)
        top = _crop_around_object(rng, clip.centre_y, size, crop_size)
        left = _crop_around_object(rng, float(clip.centre_x[num_frames // 2]), size, crop_size)
        clips.append(frames_to_tensor(clip.frames[:, top : top + crop_size, left : left + crop_size]))
    return torch.stack(clips)


def video_batches(
    rng: np.random.Generator, batch_size: int, num_frames: int, crop_size: int
) -> Iterator[torch.Tensor]:
    """Endless training batches, alternating crops of 64 x 64 and of 128 x 128 renders."""
    for step in itertools.count():
        size = HIRES_WIDTH if step % 2 else REFERENCE_WIDTH
        yield video_batch(rng, batch_size, num_frames, size, min(size, crop_size))


def render_audio(spec: ClipSpec, num_frames: int = 33) -> tuple[np.ndarray, list[float]]:
    """Soundtrack and bounce times of a clip; the audio does not depend on the frame size, so frames are tiny."""
    clip = render_clip(spec, width=16, height=16, fps=FPS, num_frames=num_frames, sample_rate=SAMPLE_RATE)
    return clip.audio, clip.bounce_times


def audio_batch(rng: np.random.Generator, batch_size: int, num_samples: int, ping_fraction: float) -> torch.Tensor:
    """Random soundtrack segments `[B, 1, num_samples]`, most placed to contain a whole ping."""
    # Whole demo-length soundtracks (at least), so that most hold a bounce.
    num_frames = max(33, math.ceil(num_samples / SAMPLE_RATE * FPS) + 1)
    ping_samples = round(PING_DURATION_S * SAMPLE_RATE)
    segments = []
    for _ in range(batch_size):
        audio, bounces = render_audio(sample_clip_spec(rng), num_frames)
        latest = len(audio) - num_samples
        if bounces and rng.uniform() < ping_fraction:
            onset = round(float(rng.choice(bounces)) * SAMPLE_RATE)
            start = int(np.clip(onset - rng.integers(0, num_samples - ping_samples), 0, latest))
        else:
            start = int(rng.integers(0, latest + 1))
        segments.append(torch.from_numpy(audio[start : start + num_samples]))
    return torch.stack(segments)[:, None]


def audio_batches(rng: np.random.Generator, settings: AudioVAESettings) -> Iterator[torch.Tensor]:
    """Endless training batches of soundtrack segments."""
    while True:
        yield audio_batch(rng, settings.batch_size, settings.segment_samples, settings.ping_fraction)


# --------------------------------------------------------------------------------------------------------------------
# Losses and training


def foreground_mask(video: torch.Tensor) -> torch.Tensor:
    """`[B, 1, F, H, W]`: 1 on pixels that differ from the background and on their 8 neighbours, else 0."""
    background = torch.tensor(BACKGROUND, dtype=video.dtype, device=video.device).view(1, 3, 1, 1, 1) / 127.5 - 1.0
    differs = ((video - background).abs().amax(dim=1, keepdim=True) > 0.5 / 127.5).to(video.dtype)
    return F.max_pool3d(differs, kernel_size=(1, 3, 3), stride=1, padding=(0, 1, 1))


def video_vae_loss(
    vae: AutoencoderKLWan,
    video: torch.Tensor,
    settings: VideoVAESettings,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Foreground-weighted MSE + L1 reconstruction of a posterior sample + `kl_weight` * KL.

    The MSE is what gets a fresh model going: it first learns a blurred blob where the object probably is, which
    tells the encoder what to encode; L1 alone keeps outputting the background (its optimum for an object of
    uncertain position) for hundreds of steps. L1 then sharpens the edges.
    """
    posterior = vae.encode(video).latent_dist
    error = decode_unclamped(vae, posterior.sample(generator)) - video
    weights = 1.0 + settings.foreground_weight * foreground_mask(video)
    reconstruction_loss = (weights * (error.pow(2) + error.abs())).mean() / weights.mean()
    return reconstruction_loss + settings.kl_weight * kl_divergence(posterior)


def multi_resolution_stft_loss(
    prediction: torch.Tensor, target: torch.Tensor, fft_sizes: Iterable[int], floor: float = 1e-2
) -> torch.Tensor:
    """Spectral convergence + L1 of log magnitudes, averaged over STFT sizes; waveforms are `[B, samples]`.

    Magnitudes are floored at `floor` before the log (a ping's peak magnitude is about `n_fft / 8`, so 1e-2 sits
    60-80 dB below it): a lower floor makes inaudible noise in the silences dominate the loss and the model
    collapses to silence in a short run.
    """
    losses = []
    for n_fft in fft_sizes:
        window = torch.hann_window(n_fft, dtype=prediction.dtype, device=prediction.device)
        predicted, wanted = (
            torch.stft(waveform, n_fft, hop_length=n_fft // 4, window=window, return_complex=True).abs()
            for waveform in (prediction, target)
        )
        convergence = torch.linalg.vector_norm(wanted - predicted) / torch.linalg.vector_norm(wanted).clamp_min(1e-6)
        log_distance = ((predicted + floor).log() - (wanted + floor).log()).abs().mean()
        losses.append(convergence + log_distance)
    return torch.stack(losses).mean()


def audio_vae_loss(
    vae: AutoencoderOobleck,
    audio: torch.Tensor,
    settings: AudioVAESettings,
    step: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Relative MSE + L1 on the waveform + a ramped multi-resolution STFT loss + `kl_weight` * KL.

    A fresh decoder first outputs silence. From there only the MSE pulls it out within a few hundred steps: L1's
    optimum for an uncertain phase is still silence, and magnitude losses give gradients of random phase at zero
    output while their log term rewards silence. So the STFT loss starts at `stft_ramp[0]`, once pings come out, and
    reaches full weight at `stft_ramp[1]`; `step=None` means full weight. The MSE is relative to the batch energy.
    """
    posterior = vae.encode(audio).latent_dist
    reconstruction = vae.decode(posterior.sample(generator)).sample
    error = reconstruction - audio
    loss = error.pow(2).mean() / audio.pow(2).mean().clamp_min(1e-4) + settings.l1_weight * error.abs().mean()
    first, full = settings.stft_ramp
    stft_weight = 1.0 if step is None else min(1.0, max(0.0, (step - first) / max(1, full - first)))
    if stft_weight > 0:
        stft = multi_resolution_stft_loss(reconstruction[:, 0], audio[:, 0], settings.fft_sizes, settings.stft_floor)
        loss = loss + stft_weight * stft
    return loss + settings.kl_weight * kl_divergence(posterior)


def train(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, int], torch.Tensor],
    batches: Iterable[torch.Tensor],
    steps: int,
    learning_rate: float,
    warmup_steps: int = 0,
    log: Callable[[str], None] | None = None,
    log_every: int = 25,
) -> list[float]:
    """AdamW with linear warm-up then cosine decay to 10 %, gradient clipping at 1; returns the loss of every step."""

    def schedule(step: int) -> float:
        warmup = min(1.0, (step + 1) / max(1, warmup_steps))
        return warmup * (0.55 + 0.45 * math.cos(math.pi * step / steps))

    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.99), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses = []
    start = time.perf_counter()
    for step, batch in zip(range(steps), batches):
        loss = loss_fn(batch, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log is not None and (step + 1) % log_every == 0:
            recent = np.mean(losses[-log_every:])
            log(f"step {step + 1}/{steps}  loss {recent:.4f}  {time.perf_counter() - start:.0f} s")
    model.eval()
    return losses


def train_video_vae(
    settings: VideoVAESettings, seed: int = 0, log: Callable[[str], None] | None = None
) -> tuple[AutoencoderKLWan, list[float]]:
    """Builds and trains the video VAE on freshly rendered frames, then clips; returns it (eval mode) and the losses."""
    torch.manual_seed(seed)
    vae = build_video_vae(settings)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng([seed, VIDEO_TRAIN_STREAM])

    def loss_fn(video: torch.Tensor, step: int) -> torch.Tensor:
        return video_vae_loss(vae, video, settings, generator)

    images = video_batches(rng, settings.image_batch_size, 1, settings.image_crop_size)
    losses = train(
        vae, loss_fn, images, settings.image_steps, settings.image_learning_rate, settings.warmup_steps, log, 250
    )
    clips = video_batches(rng, settings.clip_batch_size, settings.clip_frames, settings.clip_crop_size)
    losses += train(vae, loss_fn, clips, settings.clip_steps, settings.clip_learning_rate, settings.warmup_steps, log)
    return vae, losses


def train_audio_vae(
    settings: AudioVAESettings, seed: int = 0, log: Callable[[str], None] | None = None
) -> tuple[AutoencoderOobleck, list[float]]:
    """Builds and trains the audio VAE on freshly rendered soundtracks; returns it (eval mode) and the step losses."""
    torch.manual_seed(seed)
    vae = build_audio_vae(settings)
    generator = torch.Generator().manual_seed(seed)
    losses = train(
        vae,
        lambda audio, step: audio_vae_loss(vae, audio, settings, step, generator),
        audio_batches(np.random.default_rng([seed, AUDIO_TRAIN_STREAM]), settings),
        settings.steps,
        settings.learning_rate,
        settings.warmup_steps,
        log,
    )
    return vae, losses


# --------------------------------------------------------------------------------------------------------------------
# Latent statistics


def statistics_videos(
    seed: int, num_clips: int, num_hires_clips: int, batch_size: int = 8, num_frames: int = 33
) -> Iterator[torch.Tensor]:
    """Batches of whole clips for the latent statistics: `num_clips` at 64 x 64, then `num_hires_clips` at 128."""
    rng = np.random.default_rng([seed, STATISTICS_STREAM])
    for size, count in ((REFERENCE_WIDTH, num_clips), (HIRES_WIDTH, num_hires_clips)):
        for first in range(0, count, batch_size):
            yield video_batch(rng, min(batch_size, count - first), num_frames, size, size)


@torch.no_grad()
def latent_statistics(vae: AutoencoderKLWan, videos: Iterable[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of the posterior modes (what `VideoCodec.encode` returns raw)."""
    total = total_squares = count = 0
    for video in videos:
        latents = vae.encode(video).latent_dist.mode().double().transpose(0, 1).flatten(1)
        total = total + latents.sum(dim=1)
        total_squares = total_squares + latents.pow(2).sum(dim=1)
        count += latents.shape[1]
    mean = total / count
    std = (total_squares / count - mean.pow(2)).clamp_min(0).sqrt()
    return mean.tolist(), std.tolist()


@torch.no_grad()
def audio_latent_std(vae: AutoencoderOobleck, seed: int, num_clips: int = 32) -> float:
    """Standard deviation of the posterior means of `num_clips` demo soundtracks (statistics stream)."""
    rng = np.random.default_rng([seed, STATISTICS_STREAM])
    tracks = [render_audio(sample_clip_spec(rng))[0] for _ in range(num_clips)]
    length = len(tracks[0]) // vae.hop_length * vae.hop_length
    audio = torch.stack([torch.from_numpy(track[:length]) for track in tracks])[:, None]
    return float(vae.encode(audio).latent_dist.mode().std())


@torch.no_grad()
def rescale_audio_latents(vae: AutoencoderOobleck, factor: float) -> None:
    """Multiply the latents of `vae` by `factor` without changing its reconstructions.

    `AudioCodec` uses Oobleck latents as they come (Oobleck has no `scaling_factor`), and flow matching wants latents
    of about unit scale against its unit noise; so the scale goes into the weights instead: the encoder's mean output
    and the decoder's first convolution (both weight-normed, so their gains) are scaled by `factor` and `1 / factor`.
    """
    channels = vae.config.decoder_input_channels
    vae.encoder.conv2.weight_g[:channels] *= factor
    vae.encoder.conv2.bias[:channels] *= factor
    vae.decoder.conv1.weight_g /= factor


def set_latent_statistics(vae: AutoencoderKLWan, mean: list[float], std: list[float]) -> None:
    """Stores the statistics in the config, so they are saved with the weights and used by `VideoCodec`."""
    vae.register_to_config(latents_mean=[float(m) for m in mean], latents_std=[float(s) for s in std])


# --------------------------------------------------------------------------------------------------------------------
# Evaluation


def evaluation_specs(seed: int, count: int) -> list[ClipSpec]:
    """Held-out specs that cycle through every colour and shape."""
    rng = np.random.default_rng([seed, EVALUATION_STREAM])
    combinations = list(itertools.product(COLOURS, SHAPE_SIZES))
    return [
        dataclasses.replace(sample_clip_spec(rng), colour=colour, shape=shape)
        for colour, shape in itertools.islice(itertools.cycle(combinations), count)
    ]


def object_fill_ratio(frame: np.ndarray, colour: str) -> float:
    """Object pixel count over its bounding-box area: pi / 4 for a disc, 1 for a square.

    A pixel belongs to the object when its projection on the background -> colour direction passes halfway.
    """
    background = np.array(BACKGROUND, dtype=np.float64)
    direction = np.array(COLOURS[colour], dtype=np.float64) - background
    coverage = (frame.astype(np.float64) - background) @ direction / (direction @ direction)
    mask = coverage > 0.5
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return float("nan")
    return float(mask.sum() / ((rows[-1] - rows[0] + 1) * (columns[-1] - columns[0] + 1)))


def _psnr(reconstruction: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB of uint8 images, optionally over masked pixels `[..., H, W]` only."""
    error = (reconstruction.astype(np.float64) - reference.astype(np.float64)) ** 2
    mse = error.mean() if mask is None else error[mask].mean()
    return float(10.0 * np.log10(255.0**2 / max(mse, 1e-10)))


@torch.no_grad()
def evaluate_video_vae(
    vae: AutoencoderKLWan, specs: list[ClipSpec], size: int, num_frames: int, batch_size: int = 4
) -> dict:
    """Reconstruction quality of whole clips: PSNR (all pixels and object pixels), object colour and shape."""
    psnr, object_psnr, colour_errors, shape_correct, fill_ratios = [], [], [], [], {"ball": [], "square": []}
    for first in range(0, len(specs), batch_size):
        clips = [render_clip(spec, size, size, FPS, num_frames) for spec in specs[first : first + batch_size]]
        video = torch.stack([frames_to_tensor(clip.frames) for clip in clips])
        reconstructed = tensor_to_frames(vae.decode(vae.encode(video).latent_dist.mode()).sample)
        mask = foreground_mask(video)[:, 0].bool().numpy()
        for clip, frames, object_mask in zip(clips, reconstructed, mask):
            spec = clip.spec
            psnr.append(_psnr(frames, clip.frames))
            object_psnr.append(_psnr(frames, clip.frames, object_mask))
            colour = np.array(COLOURS[spec.colour], dtype=np.float64)
            exact = torch.from_numpy((clip.frames == colour.astype(np.uint8)).all(axis=-1)).float()
            interior = (-F.max_pool2d(-exact, 3, stride=1, padding=1)).bool().numpy()
            mean_rgb = frames[interior].astype(np.float64).mean(axis=0)
            colour_errors.append(float(np.abs(mean_rgb - colour).mean()))
            ratio = float(np.nanmedian([object_fill_ratio(frame, spec.colour) for frame in frames]))
            fill_ratios[spec.shape].append(ratio)
            shape_correct.append((ratio > SQUARE_FILL_THRESHOLD) == (spec.shape == "square"))
    return {
        "num_clips": len(specs),
        "size": size,
        "num_frames": num_frames,
        "psnr_db": float(np.mean(psnr)),
        "psnr_db_min": float(np.min(psnr)),
        "object_psnr_db": float(np.mean(object_psnr)),
        "interior_colour_error_mean": float(np.mean(colour_errors)),
        "interior_colour_error_max": float(np.max(colour_errors)),
        "shape_accuracy": float(np.mean(shape_correct)),
        "fill_ratio_ball": float(np.mean(fill_ratios["ball"])) if fill_ratios["ball"] else None,
        "fill_ratio_square": float(np.mean(fill_ratios["square"])) if fill_ratios["square"] else None,
    }


def detect_onset(audio: np.ndarray, around: float, threshold: float = 0.1, window_s: float = 0.05) -> float | None:
    """First time (s) within `around` +- `window_s` at which |audio| reaches `threshold`, or None."""
    first = max(0, round((around - window_s) * SAMPLE_RATE))
    last = min(len(audio), round((around + window_s) * SAMPLE_RATE))
    loud = np.flatnonzero(np.abs(audio[first:last]) >= threshold)
    return None if len(loud) == 0 else (first + int(loud[0])) / SAMPLE_RATE


def peak_frequency(segment: np.ndarray) -> float:
    """Frequency (Hz) of the largest Hann-windowed FFT magnitude, zero-padded to 2^16 points (0.24 Hz bins)."""
    spectrum = np.abs(np.fft.rfft(segment * np.hanning(len(segment)), n=1 << 16))
    return float(np.argmax(spectrum) * SAMPLE_RATE / (1 << 16))


@torch.no_grad()
def evaluate_audio_vae(vae: AutoencoderOobleck, specs: list[ClipSpec], num_frames: int = 33) -> dict:
    """Ping pitch and onset accuracy, silence level and latent scale on the soundtracks of whole clips."""
    hop = vae.hop_length
    soundtracks = [render_audio(spec, num_frames) for spec in specs]
    length = len(soundtracks[0][0]) // hop * hop
    audio = torch.stack([torch.from_numpy(track[:length]) for track, _ in soundtracks])[:, None]
    latents = vae.encode(audio).latent_dist.mode()
    reconstructed = vae.decode(latents).sample[:, 0].clamp(-1, 1).numpy()
    ping = round(PING_DURATION_S * SAMPLE_RATE)
    pitch_errors, onset_errors, reference_onset_errors, missed = [], [], [], 0
    quiet_recon, quiet_original = [], []
    for spec, (original, bounces), recon in zip(specs, soundtracks, reconstructed):
        pitch = PITCHES_HZ[spec.colour]
        busy = np.zeros(length, dtype=bool)
        for bounce in bounces:
            start = math.ceil(bounce * SAMPLE_RATE)
            # Silence is measured away from pings: 10 ms before each until 20 ms after its end.
            busy[max(0, start - SAMPLE_RATE // 100) : start + ping + SAMPLE_RATE // 50] = True
            if start + ping > length:
                continue
            pitch_errors.append(abs(peak_frequency(recon[start : start + ping]) - pitch) / pitch)
            onset = detect_onset(recon, bounce)
            reference = detect_onset(original, bounce)
            if onset is None:
                missed += 1
            else:
                onset_errors.append(abs(onset - bounce) * 1000.0)
            reference_onset_errors.append(abs(reference - bounce) * 1000.0)
        quiet_recon.append(recon[~busy])
        quiet_original.append(original[:length][~busy])
    quiet = np.concatenate(quiet_recon)
    flat = latents.transpose(0, 1).flatten(1)
    return {
        "num_clips": len(specs),
        "num_pings": len(pitch_errors),
        "pitch_within_3_percent": float(np.mean(np.array(pitch_errors) <= 0.03)),
        "pitch_error_percent_mean": float(100.0 * np.mean(pitch_errors)),
        "pitch_error_percent_max": float(100.0 * np.max(pitch_errors)),
        "missed_onsets": missed,
        "onset_error_ms_mean": float(np.mean(onset_errors)) if onset_errors else None,
        "onset_error_ms_max": float(np.max(onset_errors)) if onset_errors else None,
        "onset_detector_bias_ms_on_original": float(np.mean(reference_onset_errors)),
        "silence_rms_dbfs": float(20.0 * np.log10(max(np.sqrt(np.mean(quiet**2)), 1e-10))),
        "silence_max_abs": float(np.abs(quiet).max()),
        "original_silence_max_abs": float(np.abs(np.concatenate(quiet_original)).max()),
        "ping_peak_abs": float(np.abs(reconstructed).max()),
        "latent_std": float(latents.std()),
        "latent_mean": float(latents.mean()),
        "latent_channel_std": flat.std(dim=1).tolist(),
        "latent_channel_mean": flat.mean(dim=1).tolist(),
    }


def _timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


@torch.no_grad()
def time_video_vae(vae: AutoencoderKLWan, num_frames: int, size: int) -> dict:
    """Wall-clock seconds to encode and to decode one clip (batch 1)."""
    video = torch.rand(1, 3, num_frames, size, size) * 2 - 1
    latents, encode_s = _timed(lambda: vae.encode(video).latent_dist.mode())
    _, decode_s = _timed(lambda: vae.decode(latents).sample)
    return {
        "num_frames": num_frames,
        "size": size,
        "latent_shape": list(latents.shape),
        "encode_s": encode_s,
        "decode_s": decode_s,
    }


@torch.no_grad()
def time_audio_vae(vae: AutoencoderOobleck, seconds: float = 2.0) -> dict:
    """Wall-clock seconds to encode and to decode `seconds` of mono audio (batch 1)."""
    audio = torch.rand(1, 1, round(seconds * SAMPLE_RATE) // vae.hop_length * vae.hop_length) * 2 - 1
    latents, encode_s = _timed(lambda: vae.encode(audio).latent_dist.mode())
    _, decode_s = _timed(lambda: vae.decode(latents).sample)
    return {"seconds": seconds, "latent_shape": list(latents.shape), "encode_s": encode_s, "decode_s": decode_s}


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())


def _logger(name: str, start: float) -> Callable[[str], None]:
    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {name}: {message}", flush=True)

    return log


def run_video_job(
    output_dir: Path,
    settings: VideoVAESettings,
    seed: int,
    num_threads: int,
    statistics_clips: tuple[int, int],
    evaluation_clips: tuple[int, int],
) -> dict:
    """Trains the video VAE, stores its latent statistics, saves it to `output_dir/vae` and returns its report.

    `statistics_clips` and `evaluation_clips` are (64 x 64, 128 x 128) clip counts; evaluation clips are held out.
    """
    torch.set_num_threads(num_threads)
    start = time.perf_counter()
    log = _logger("video", start)
    log(str(settings))
    vae, losses = train_video_vae(settings, seed, log)
    train_s = time.perf_counter() - start
    mean, std = latent_statistics(vae, statistics_videos(seed, *statistics_clips))
    set_latent_statistics(vae, mean, std)
    statistics_s = time.perf_counter() - start - train_s
    vae.save_pretrained(output_dir / "vae")
    log(f"trained in {train_s:.0f} s, latent statistics in {statistics_s:.0f} s; evaluating")
    evaluation_start = time.perf_counter()
    report = {
        "settings": dataclasses.asdict(settings),
        "parameters": sum(p.numel() for p in vae.parameters()),
        "saved_bytes": _folder_bytes(output_dir / "vae"),
        "train_wall_s": train_s,
        "statistics_wall_s": statistics_s,
        "statistics_clips": {"64x64x33": statistics_clips[0], "128x128x33": statistics_clips[1]},
        "loss_image_phase_first_50": float(np.mean(losses[:50])),
        "loss_image_phase_last_50": float(np.mean(losses[settings.image_steps - 50 : settings.image_steps])),
        "loss_clip_phase_first_25": float(np.mean(losses[settings.image_steps : settings.image_steps + 25])),
        "loss_clip_phase_last_25": float(np.mean(losses[-25:])),
        "latents_mean": mean,
        "latents_std": std,
        "eval_64x64x33": evaluate_video_vae(vae, evaluation_specs(seed, evaluation_clips[0]), REFERENCE_WIDTH, 33),
        "eval_128x128x65": evaluate_video_vae(vae, evaluation_specs(seed, evaluation_clips[1]), HIRES_WIDTH, 65),
        "timing_64x64x33": time_video_vae(vae, 33, REFERENCE_WIDTH),
        "timing_128x128x65": time_video_vae(vae, 65, HIRES_WIDTH),
    }
    report["eval_wall_s"] = time.perf_counter() - evaluation_start
    log(json.dumps({key: value for key, value in report.items() if key.startswith(("eval", "timing"))}))
    return report


def run_audio_job(
    output_dir: Path, settings: AudioVAESettings, seed: int, num_threads: int, evaluation_clips: int
) -> dict:
    """Trains the audio VAE, saves it to `output_dir/audio_vae` and returns its report (held-out soundtracks)."""
    torch.set_num_threads(num_threads)
    start = time.perf_counter()
    log = _logger("audio", start)
    log(str(settings))
    vae, losses = train_audio_vae(settings, seed, log)
    train_s = time.perf_counter() - start
    raw_latent_std = audio_latent_std(vae, seed)
    rescale_audio_latents(vae, 1.0 / raw_latent_std)
    vae.save_pretrained(output_dir / "audio_vae")
    report = {
        "settings": dataclasses.asdict(settings),
        "hop_length": vae.hop_length,
        "parameters": sum(p.numel() for p in vae.parameters()),
        "saved_bytes": _folder_bytes(output_dir / "audio_vae"),
        "train_wall_s": train_s,
        "loss_first_25": float(np.mean(losses[:25])),
        "loss_last_25": float(np.mean(losses[-25:])),
        "latent_std_before_rescaling": raw_latent_std,
        "eval": evaluate_audio_vae(vae, evaluation_specs(seed, evaluation_clips)),
        "timing_2s": time_audio_vae(vae),
    }
    report["eval_wall_s"] = time.perf_counter() - start - train_s
    log(json.dumps(report["eval"]))
    return report


# --------------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> dict:
    """Command-line entry point: trains both VAEs, saves them and writes `vae_report.json`; returns the report."""
    video_defaults, audio_defaults = VideoVAESettings(), AudioVAESettings()
    parser = argparse.ArgumentParser(
        prog="python -m diffusers_skyreels.demo.train_vaes",
        description="Train the demo's video VAE (AutoencoderKLWan) and audio VAE (AutoencoderOobleck) on the "
        "bouncing world; writes DIR/vae, DIR/audio_vae and DIR/vae_report.json.",
    )
    parser.add_argument("--output-dir", required=True, type=Path, help="folder to write the VAEs and report to")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--num-threads", type=int, default=1, help="torch threads per training process (default: 1)")
    parser.add_argument(
        "--parallel",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train the audio VAE in a second process while the video VAE trains (default: on)",
    )
    parser.add_argument("--image-steps", type=int, default=video_defaults.image_steps, help="video VAE image steps")
    parser.add_argument("--clip-steps", type=int, default=video_defaults.clip_steps, help="video VAE clip steps")
    parser.add_argument("--audio-steps", type=int, default=audio_defaults.steps, help="audio VAE steps")
    parser.add_argument("--stats-clips", type=int, default=192, help="64 x 64 clips for the latent statistics")
    parser.add_argument("--stats-hires-clips", type=int, default=16, help="128 x 128 clips for the statistics")
    parser.add_argument("--eval-clips", type=int, default=16, help="held-out 64 x 64 clips and soundtracks")
    parser.add_argument("--eval-hires-clips", type=int, default=4, help="held-out 128 x 128 x 65-frame clips")
    parser.add_argument("--skip-video", action="store_true", help="train and report the audio VAE only")
    parser.add_argument("--skip-audio", action="store_true", help="train and report the video VAE only")
    args = parser.parse_args(argv)

    output_dir: Path = args.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    video_settings = dataclasses.replace(video_defaults, image_steps=args.image_steps, clip_steps=args.clip_steps)
    audio_settings = dataclasses.replace(audio_defaults, steps=args.audio_steps)
    report: dict = {
        "command": "python -m diffusers_skyreels.demo.train_vaes " + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed,
        "torch_threads_per_process": args.num_threads,
        "parallel": args.parallel,
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
        },
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
    }
    start = time.perf_counter()
    audio_job = (run_audio_job, output_dir, audio_settings, args.seed, args.num_threads, args.eval_clips)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = pool.submit(*audio_job) if args.parallel and not args.skip_audio else None
        if not args.skip_video:
            report["video_vae"] = run_video_job(
                output_dir,
                video_settings,
                args.seed,
                args.num_threads,
                (args.stats_clips, args.stats_hires_clips),
                (args.eval_clips, args.eval_hires_clips),
            )
        if not args.skip_audio:
            report["audio_vae"] = pending.result() if pending is not None else audio_job[0](*audio_job[1:])
    report["total_wall_s"] = time.perf_counter() - start
    report["load_average_at_end"] = list(os.getloadavg())
    (output_dir / "vae_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"Wrote {output_dir / 'vae_report.json'} after {report['total_wall_s']:.0f} s", flush=True)
    return report


if __name__ == "__main__":
    main()
