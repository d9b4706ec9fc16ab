"""The one channel-concat conditioning helper (architecture.md §5).

Every task is inpainting in disguise: the transformers read `[noisy latents ; condition latents I ; mask M]`, where
`M` is 1 on the latent voxels that are given and `I` holds there the VAE latents of the given content (encoded with
black in place of every pixel that is not given, silence for audio), and elsewhere the latents of an all-black clip
(of silence). A voxel counts as given only when every pixel (sample) it covers is given: latent
frame 0 covers pixel frame 0, latent frame `j >= 1` covers frames `4j - 3 .. 4j`, and each latent covers an 8x8
pixel block (with the VAE's factors). Pipelines and the training script decide *what* is given; only this module
turns that into `I` and `M`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .latent_codecs import AudioCodec, VideoCodec


@dataclass
class ChannelCondition:
    """Condition latents `I` `[B, C, *dims]` and mask `M` `[B, 1, *dims]` (1 = given, 0 = generate)."""

    latents: torch.Tensor
    mask: torch.Tensor

    def model_input(self, noisy_latents: torch.Tensor) -> torch.Tensor:
        """`[noisy ; I ; M]` along channels, in the dtype of `noisy_latents`."""
        dtype = noisy_latents.dtype
        return torch.cat([noisy_latents, self.latents.to(dtype), self.mask.to(dtype)], dim=1)

    def repeat_interleave(self, repeats: int) -> ChannelCondition:
        return ChannelCondition(self.latents.repeat_interleave(repeats, 0), self.mask.repeat_interleave(repeats, 0))

    def cat(self, other: ChannelCondition) -> ChannelCondition:
        """Stack along the batch (e.g. the unconditional and conditional halves of classifier-free guidance)."""
        return ChannelCondition(torch.cat([self.latents, other.latents]), torch.cat([self.mask, other.mask]))

    def noised(self, strength: float, generator: torch.Generator | None = None) -> ChannelCondition:
        """Add Gaussian noise of std `strength` to `I`: a weaker condition, against frozen image-to-video output."""
        if strength < 0:
            raise ValueError(f"`condition_noise` must be >= 0, got {strength}.")
        if strength == 0:
            return self
        noise = torch.randn(
            self.latents.shape, generator=generator, device=self.latents.device, dtype=self.latents.dtype
        )
        return ChannelCondition(self.latents + strength * noise, self.mask)

    @property
    def has_given(self) -> bool:
        return bool(self.mask.any())


def pixel_frames_of_latent(latent_frame: int, temporal_factor: int = 4) -> range:
    """The pixel frames latent frame `latent_frame` covers (the VAE is causal: frame 0 alone, then groups)."""
    if latent_frame == 0:
        return range(0, 1)
    return range(temporal_factor * latent_frame - temporal_factor + 1, temporal_factor * latent_frame + 1)


def latent_mask_from_pixels(given: torch.Tensor, temporal_factor: int, spatial_factor: int) -> torch.Tensor:
    """`[B, 1, F, H, W]` per-pixel "given" -> `[B, 1, T, h, w]`, 1 where every covered pixel is given."""
    given = given.bool()
    batch, _, num_frames, height, width = given.shape
    if (num_frames - 1) % temporal_factor or height % spatial_factor or width % spatial_factor:
        raise ValueError(
            f"A pixel mask of {num_frames} frames of {height}x{width} does not tile into latents "
            f"({temporal_factor}k + 1 frames, multiples of {spatial_factor} pixels)."
        )
    groups = given[:, :, 1:].unflatten(2, (-1, temporal_factor)).all(dim=3)
    per_frame = torch.cat([given[:, :, :1], groups], dim=2)
    per_frame = per_frame.unflatten(3, (-1, spatial_factor)).unflatten(5, (-1, spatial_factor))
    return per_frame.all(dim=6).all(dim=4).float()


def latent_mask_from_samples(given: torch.Tensor, num_latents: int, hop_length: int) -> torch.Tensor:
    """`[B, samples]` per-sample "given" -> `[B, 1, num_latents]`, 1 where every covered sample is given."""
    covered = given.bool()[:, : num_latents * hop_length]
    if covered.shape[1] < num_latents * hop_length:
        raise ValueError(f"{given.shape[1]} audio samples cannot cover {num_latents} latents of {hop_length} samples.")
    return covered.unflatten(1, (num_latents, hop_length)).all(dim=2)[:, None].float()


def video_condition(
    codec: VideoCodec,
    batch_size: int,
    num_frames: int,
    height: int,
    width: int,
    frames: torch.Tensor | None = None,
    frame_indices: Sequence[int] | None = None,
    pixel_mask: torch.Tensor | None = None,
    device: torch.device | None = None,
    generator: torch.Generator | None = None,
) -> ChannelCondition:
    """Condition of a clip of `num_frames` x `height` x `width` pixels from the frames that are given.

    Args:
        frames: `[B, 3, n, H, W]` in `[-1, 1]`, the given frames (`None`: nothing given).
        frame_indices: the pixel frame each of the `n` frames goes to (default `0 .. n - 1`); repeats not allowed.
        pixel_mask: `[B, 1, n, H, W]` (or `[B, 1, num_frames, H, W]`), 1 on the pixels of the given frames that are
            kept; default: all of them. Inpainting passes the source video with 0 on the region to regenerate.
    """
    shape = (batch_size, 1, num_frames, height, width)
    if frames is None:
        if pixel_mask is not None or frame_indices is not None:
            raise ValueError("`pixel_mask` and `frame_indices` need `frames`.")
        return ChannelCondition(
            codec.black_latents(batch_size, num_frames, height, width, device=device),
            torch.zeros(batch_size, 1, (num_frames - 1) // codec.temporal_factor + 1,
                        height // codec.spatial_factor, width // codec.spatial_factor, device=device),
        )
    if frames.ndim != 5 or frames.shape[0] != batch_size or frames.shape[1] != 3 or frames.shape[3:] != shape[3:]:
        raise ValueError(
            f"`frames` must have shape [{batch_size}, 3, n, {height}, {width}], got {tuple(frames.shape)}."
        )
    count = frames.shape[2]
    indices = list(range(count)) if frame_indices is None else [int(i) for i in frame_indices]
    if len(indices) != count:
        raise ValueError(f"Got {count} frames but {len(indices)} `frame_indices`.")
    if len(set(indices)) != count or min(indices) < 0 or max(indices) >= num_frames:
        raise ValueError(f"`frame_indices` must be distinct frames in [0, {num_frames - 1}], got {indices}.")

    given = torch.zeros(shape, dtype=torch.bool, device=frames.device)
    if pixel_mask is None:
        given[:, :, indices] = True
    elif pixel_mask.shape == shape:
        given[:, :, indices] = pixel_mask[:, :, indices].bool()
    elif pixel_mask.shape == (batch_size, 1, count, height, width):
        given[:, :, indices] = pixel_mask.bool()
    else:
        raise ValueError(
            f"`pixel_mask` must have shape [{batch_size}, 1, {count} or {num_frames}, {height}, {width}] (the video), "
            f"got {tuple(pixel_mask.shape)}."
        )
    video = torch.full(shape[:1] + (3,) + shape[2:], -1.0, dtype=frames.dtype, device=frames.device)
    video[:, :, indices] = frames
    video = torch.where(given, video, torch.full_like(video, -1.0))
    mask = latent_mask_from_pixels(given, codec.temporal_factor, codec.spatial_factor).to(frames.device)
    black = codec.black_latents(batch_size, num_frames, height, width, device=frames.device)
    return condition_from_clip_latents(codec.encode(video, generator=generator), mask, black)


def video_condition_from_latents(
    codec: VideoCodec | None,
    latents: torch.Tensor,
    latent_indices: Sequence[int] | None = None,
    num_latent_frames: int | None = None,
    mask: torch.Tensor | None = None,
) -> ChannelCondition:
    """Condition from latents that are already encoded (no decode/encode round trip, so no colour drift).

    Either `latents` covers the whole clip and `mask` `[B, 1, T, h, w]` says what is given (the refiner's guide), or
    `latents` holds `m` given latent frames placed at `latent_indices` of a `num_latent_frames` clip whose other
    frames are the latents of black frames (video extension from the previous segment's latents).
    """
    if latent_indices is None:
        if mask is None or mask.shape[2:] != latents.shape[2:] or mask.shape[:2] != (latents.shape[0], 1):
            raise ValueError(
                f"Full-clip condition latents {tuple(latents.shape)} need a mask of shape "
                f"{(latents.shape[0], 1, *latents.shape[2:])}, got {None if mask is None else tuple(mask.shape)}."
            )
        return ChannelCondition(latents, mask.float())
    if codec is None or num_latent_frames is None:
        raise ValueError("Placing latents at `latent_indices` needs the video `codec` and `num_latent_frames`.")
    indices = [int(i) for i in latent_indices]
    if len(indices) != latents.shape[2] or len(set(indices)) != len(indices):
        raise ValueError(f"Got {latents.shape[2]} latent frames but `latent_indices` {indices}.")
    if min(indices) < 0 or max(indices) >= num_latent_frames:
        raise ValueError(f"`latent_indices` must lie in [0, {num_latent_frames - 1}], got {indices}.")
    batch, _, _, h, w = latents.shape
    num_frames = (num_latent_frames - 1) * codec.temporal_factor + 1
    full = codec.black_latents(
        batch, num_frames, h * codec.spatial_factor, w * codec.spatial_factor, device=latents.device
    ).to(latents.dtype)
    full[:, :, indices] = latents
    given = torch.zeros(batch, 1, num_latent_frames, h, w, device=latents.device)
    given[:, :, indices] = 1.0
    return ChannelCondition(full, given)


def condition_from_clip_latents(
    clip_latents: torch.Tensor, given: torch.Tensor, null_latents: torch.Tensor
) -> ChannelCondition:
    """Condition from the latents of the whole clip and a latent-level "given" mask (training on cached latents).

    `I` takes the clip's latents where `given` is 1 and `null_latents` (black video or silence latents, broadcast)
    elsewhere. With the causal video VAE this equals the pixel path exactly for conditions that are a prefix in time
    (first frame, extension); for other shapes the given voxels' latents saw the clip's own content around them
    instead of black, an approximation that avoids re-encoding every sample.
    """
    if given.shape[0] != clip_latents.shape[0] or given.shape[1] != 1 or given.shape[2:] != clip_latents.shape[2:]:
        raise ValueError(
            f"`given` must have shape {(clip_latents.shape[0], 1, *clip_latents.shape[2:])}, got {tuple(given.shape)}."
        )
    latents = torch.where(given.bool(), clip_latents, null_latents.to(clip_latents).expand_as(clip_latents))
    return ChannelCondition(latents, given.float())


def auto_keyframe_indices(num_latent_frames: int, stride: int = 4) -> list[int]:
    """`keyframe_indices="auto"`: every `stride`-th base latent frame and the last (training draws the same)."""
    if stride < 1:
        raise ValueError(f"`keyframe_stride` must be >= 1, got {stride}.")
    last = num_latent_frames - 1
    return sorted(set(range(0, last + 1, stride)) | {last})


def refiner_num_latent_frames(num_latent_frames: int, temporal_scale: int) -> int:
    """Latent frames after frame interpolation: latent frame `j` of the base clip becomes `j * temporal_scale`."""
    return (num_latent_frames - 1) * temporal_scale + 1


def refiner_condition(
    low_res_latents: torch.Tensor,
    spatial_scale: int,
    temporal_scale: int,
    keyframe_latents: torch.Tensor | None = None,
    keyframe_indices: Sequence[int] | None = None,
    preserved: ChannelCondition | None = None,
) -> ChannelCondition:
    """The refiner's guide and mask (architecture.md §7).

    The guide is `low_res_latents` `[B, C, T, h, w]` interpolated linearly to `[B, C, (T - 1) * ts + 1, h * ss,
    w * ss]` (time at frame instants, space at pixel areas). High-resolution keyframe latents `[B, C, K, h * ss,
    w * ss]` for base latent frames `keyframe_indices` are put back exactly at `index * ts` with mask 1. `preserved`
    (a high-resolution condition, e.g. the inpainting source) wins wherever its mask is 1.
    """
    for name, scale in (("spatial_scale", spatial_scale), ("temporal_scale", temporal_scale)):
        if int(scale) != scale or scale < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {scale}.")
    batch, channels, frames, height, width = low_res_latents.shape
    size = (refiner_num_latent_frames(frames, temporal_scale), height * spatial_scale, width * spatial_scale)
    guide = low_res_latents.float()
    if temporal_scale > 1 and frames > 1:
        guide = torch.nn.functional.interpolate(
            guide.permute(0, 3, 4, 1, 2).reshape(-1, channels, frames), size=size[0], mode="linear",
            align_corners=True,
        )
        guide = guide.reshape(batch, height, width, channels, size[0]).permute(0, 3, 4, 1, 2)
    if spatial_scale > 1:
        guide = torch.nn.functional.interpolate(
            guide.transpose(1, 2).flatten(0, 1), size=size[1:], mode="bilinear", align_corners=False
        )
        guide = guide.unflatten(0, (batch, size[0])).transpose(1, 2)
    guide = guide.to(low_res_latents.dtype).contiguous()
    mask = torch.zeros(batch, 1, *size, device=guide.device)

    if (keyframe_latents is None) != (keyframe_indices is None):
        raise ValueError("`keyframe_latents` and `keyframe_indices` go together.")
    if keyframe_latents is not None:
        indices = [int(i) for i in keyframe_indices]
        expected = (batch, channels, len(indices), *size[1:])
        if tuple(keyframe_latents.shape) != expected:
            raise ValueError(
                f"Keyframe latents must have shape {expected} (one high-resolution latent per index), got "
                f"{tuple(keyframe_latents.shape)}."
            )
        if len(set(indices)) != len(indices) or (indices and (min(indices) < 0 or max(indices) >= frames)):
            raise ValueError(f"`keyframe_indices` must be distinct latent frames in [0, {frames - 1}], got {indices}.")
        positions = [i * temporal_scale for i in indices]
        guide[:, :, positions] = keyframe_latents.to(guide.dtype)
        mask[:, :, positions] = 1.0
    if preserved is not None:
        if preserved.latents.shape != guide.shape:
            raise ValueError(
                f"The preserved condition {tuple(preserved.latents.shape)} does not match the refined latent grid "
                f"{tuple(guide.shape)}."
            )
        keep = preserved.mask.bool()
        guide = torch.where(keep, preserved.latents.to(guide.dtype), guide)
        mask = torch.maximum(mask, preserved.mask.to(mask.dtype))
    return ChannelCondition(guide, mask)


def audio_condition(
    codec: AudioCodec,
    batch_size: int,
    num_latents: int,
    waveform: torch.Tensor | None = None,
    sample_mask: torch.Tensor | None = None,
    device: torch.device | None = None,
    generator: torch.Generator | None = None,
) -> ChannelCondition:
    """Condition of `num_latents` audio latents from the samples that are given (silence elsewhere).

    Args:
        waveform: `[B, n]` mono in `[-1, 1]` from the start of the clip (`n` may be shorter than the clip: audio
            continuation keeps the prefix), or `None` for nothing given.
        sample_mask: `[B, n]`, 1 on the samples that are kept (default: all of `waveform`).
    """
    num_samples = num_latents * codec.hop_length
    if waveform is None:
        if sample_mask is not None:
            raise ValueError("`sample_mask` needs a `waveform`.")
        silence = torch.zeros(batch_size, num_samples, device=device)
        return ChannelCondition(
            codec.encode(silence, generator=generator), torch.zeros(batch_size, 1, num_latents, device=device)
        )
    if waveform.ndim != 2 or waveform.shape[0] != batch_size:
        raise ValueError(f"The audio `waveform` must have shape [{batch_size}, samples], got {tuple(waveform.shape)}.")
    if sample_mask is not None and sample_mask.shape != waveform.shape:
        raise ValueError(f"`sample_mask` must have the waveform's shape {tuple(waveform.shape)}.")
    length = min(waveform.shape[1], num_samples)
    given = torch.zeros(batch_size, num_samples, dtype=torch.bool, device=waveform.device)
    given[:, :length] = True if sample_mask is None else sample_mask[:, :length].bool()
    audio = torch.zeros(batch_size, num_samples, dtype=waveform.dtype, device=waveform.device)
    audio[:, :length] = waveform[:, :length]
    audio = torch.where(given, audio, torch.zeros_like(audio))
    mask = latent_mask_from_samples(given, num_latents, codec.hop_length)
    silence = codec.encode(torch.zeros_like(audio[:1]), generator=generator)
    return condition_from_clip_latents(codec.encode(audio, generator=generator), mask, silence)
