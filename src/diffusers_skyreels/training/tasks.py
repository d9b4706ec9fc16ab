"""The multi-task sampler: which part of each training clip is given, and which in-context references join it.

Per sample it draws a video task (T2V, I2V, first + last frame, extension, inpainting box, or keep), an audio task
(none, continuation, keep) and caption dropout; per optimizer step it draws whether an image reference and an audio
reference join the batch (all samples of a step share that, since the model takes one reference tensor per batch;
which frame or chunk is used is per sample), and whether high-resolution keyframe tokens join it (which latent frames:
the pipelines' "auto" keyframes or a random subset of them; one keyframe tensor per batch too). In refiner mode it
draws per sample the ground-truth keyframes put into the refiner's guide (the guide is per sample: it is a channel of
the input) and the noise added to the low-resolution latents. Masks are drawn at the pixel / waveform-sample level
and turned into latent masks only by the conditioning helper (`latent_mask_from_pixels`,
`latent_mask_from_samples`), so training and the pipelines share one definition of "given".

Default rates follow the paper's stages (architecture.md §8): inpainting-style video tasks at 5 % each (I2V, first +
last frame, extension, inpainting), audio continuation and "keep the soundtrack" at 5 % each, in-context references
at 10 % per modality (about 20 % of steps carry a multimodal condition, the paper's SFT rate), caption dropout at 10 %
for classifier-free guidance. The rest is plain T2V / T2A. Video "keep" (video-to-audio) is off by default.
Keyframe steps are off unless asked for (`config.py` turns them on for half the steps with paired data); the refiner
sees ground-truth keyframes in half of its samples (all "auto" ones as the chained pipeline, or a subset as chosen
by a user) and none in the other half (as when it refines a clip alone).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ..pipelines.skyreels_v4.conditioning import (
    auto_keyframe_indices,
    latent_mask_from_pixels,
    latent_mask_from_samples,
    pixel_frames_of_latent,
)
from .randomness import derived_generator

MODES = ("video", "audio", "joint", "refiner")
VIDEO_TASKS = ("t2v", "i2v", "first_last", "extension", "inpaint", "keep")
AUDIO_TASKS = ("none", "continuation", "keep")
# Tasks run by the image-to-video pipeline, whose first image is also keyframe 0 at high resolution.
FIRST_FRAME_TASKS = ("i2v", "first_last")

# Inpainting boxes span this fraction of the frame per side; continuation keeps this fraction of the audio.
BOX_FRACTION = (0.25, 0.75)
CONTINUATION_FRACTION = (0.2, 0.8)
# An audio reference is a chunk of this fraction of the clip's audio latents.
AUDIO_REFERENCE_FRACTION = (0.25, 0.5)


@dataclass(frozen=True)
class TaskRates:
    """Probabilities of each task; what the video (audio) rates leave is T2V (no audio condition)."""

    i2v: float = 0.05
    first_last: float = 0.05
    extension: float = 0.05
    inpaint: float = 0.05
    video_keep: float = 0.0
    audio_continuation: float = 0.05
    audio_keep: float = 0.05
    image_reference: float = 0.1
    audio_reference: float = 0.1
    caption_dropout: float = 0.1
    keyframes: float = 0.0
    keyframe_subset: float = 0.25
    refiner_keyframes: float = 0.5
    guide_noise: float = 0.1

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"The `{field.name}` rate must lie in [0, 1], got {value}.")
        video = self.i2v + self.first_last + self.extension + self.inpaint + self.video_keep
        if video > 1.0 + 1e-9:
            raise ValueError(f"The video task rates sum to {video:.3f}, above 1.")
        if self.audio_continuation + self.audio_keep > 1.0 + 1e-9:
            raise ValueError("The audio task rates (continuation + keep) sum to more than 1.")


@dataclass
class SampleTasks:
    """One sample's draws: its tasks, caption dropout and latent "given" masks (`None` for a modality not trained)."""

    video_task: str | None
    audio_task: str | None
    drop_caption: bool
    video_given: torch.Tensor | None  # [1, 1, T, h, w], 1 = given
    audio_given: torch.Tensor | None  # [1, 1, T_a]


@dataclass(frozen=True)
class RefinerDraws:
    """One refiner sample's draws: the base latent frames given as ground-truth keyframes (maybe none) and the
    standard deviation of the noise added to its low-resolution latents (0: none)."""

    keyframe_indices: list[int]
    guide_noise: float


@dataclass(frozen=True)
class StepReferences:
    """Whether this optimizer step's batch carries an image reference and an audio reference (its length)."""

    image: bool
    audio_latents: int  # 0: none


def _choose(generator: torch.Generator, options: tuple[str, ...], rates: list[float]) -> str:
    """`options[0]` takes what `rates` (for `options[1:]`) leave."""
    u = float(torch.rand((), generator=generator))
    for option, rate in zip(options[1:], rates, strict=True):
        if u < rate:
            return option
        u -= rate
    return options[0]


def _uniform_int(generator: torch.Generator, low: int, high: int) -> int:
    """An integer in `[low, high]`."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator))


class TaskSampler:
    """Draws tasks and references for the clips of one training size.

    Args:
        rates: task probabilities.
        mode: `"video"`, `"audio"`, `"joint"` or `"refiner"`: which modalities are trained. Keeping a modality whole
            only makes sense in joint mode (the other one is generated from it), so `keep` rates are ignored otherwise;
            a sample never keeps both. The refiner has no task draws, only its keyframes and guide noise.
        num_frames, height, width: the clip in pixels; `temporal_factor`, `spatial_factor`: the video VAE's.
        num_audio_latents, audio_hop_length: the clip's audio latents and samples per latent.
        seed: the run's seed; draws are keyed by the global sample number (see `randomness.py`).
        keyframe_stride: spacing of the "auto" keyframes.
    """

    def __init__(
        self,
        rates: TaskRates,
        mode: str,
        num_frames: int,
        height: int,
        width: int,
        temporal_factor: int,
        spatial_factor: int,
        num_audio_latents: int,
        audio_hop_length: int,
        seed: int,
        keyframe_stride: int = 4,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
        self.rates = rates
        self.mode = mode
        self.num_frames, self.height, self.width = num_frames, height, width
        self.temporal_factor, self.spatial_factor = temporal_factor, spatial_factor
        self.num_latent_frames = (num_frames - 1) // temporal_factor + 1
        self.num_audio_latents, self.audio_hop_length = num_audio_latents, audio_hop_length
        self.seed = seed
        self.auto_keyframes = auto_keyframe_indices(self.num_latent_frames, keyframe_stride)
        joint = mode == "joint"
        self._video_rates = [rates.i2v, rates.first_last, rates.extension, rates.inpaint, rates.video_keep * joint]
        self._audio_rates = [rates.audio_continuation, rates.audio_keep * joint]
        needs_two_frames = rates.first_last + rates.extension
        if self.trains_video and needs_two_frames > 0 and self.num_latent_frames < 2:
            raise ValueError(
                f"First + last frame and extension tasks need at least 2 latent frames; {num_frames} frames make "
                f"{self.num_latent_frames}. Use more frames or set those rates to 0."
            )

    @property
    def trains_video(self) -> bool:
        return self.mode in ("video", "joint")

    @property
    def trains_audio(self) -> bool:
        return self.mode in ("audio", "joint")

    # -- per sample ------------------------------------------------------------------------------------------------

    def sample(self, sample_number: int) -> SampleTasks:
        """The draws of global sample `sample_number`."""
        generator = derived_generator(self.seed, "task", sample_number)
        video_task = audio_task = video_given = audio_given = None
        if self.trains_video:
            video_task = _choose(generator, VIDEO_TASKS, self._video_rates)
            video_given = self.video_given(video_task, generator)
        if self.trains_audio:
            audio_task = "none" if video_task == "keep" else _choose(generator, AUDIO_TASKS, self._audio_rates)
            audio_given = self.audio_given(audio_task, generator)
        caption = derived_generator(self.seed, "caption", sample_number)
        drop_caption = float(torch.rand((), generator=caption)) < self.rates.caption_dropout
        return SampleTasks(video_task, audio_task, drop_caption, video_given, audio_given)

    def video_pixels_given(self, task: str, generator: torch.Generator) -> torch.Tensor:
        """`[1, 1, F, H, W]` bool: the pixels `task` gives."""
        given = torch.zeros(1, 1, self.num_frames, self.height, self.width, dtype=torch.bool)
        last_latent = self.num_latent_frames - 1
        if task == "i2v":
            given[:, :, 0] = True
        elif task == "first_last":
            given[:, :, 0] = True
            given[:, :, list(pixel_frames_of_latent(last_latent, self.temporal_factor))] = True
        elif task == "extension":
            prefix = _uniform_int(generator, 1, last_latent)  # latent frames given
            given[:, :, : pixel_frames_of_latent(prefix - 1, self.temporal_factor)[-1] + 1] = True
        elif task == "inpaint":
            given[:] = True
            start = _uniform_int(generator, 0, self.num_frames - 1)
            stop = _uniform_int(generator, start + 1, self.num_frames)
            box = []
            for size in (self.height, self.width):
                extent = max(1, round(size * float(torch.empty(()).uniform_(*BOX_FRACTION, generator=generator))))
                offset = _uniform_int(generator, 0, size - extent)
                box.append(slice(offset, offset + extent))
            given[:, :, start:stop, box[0], box[1]] = False
        elif task == "keep":
            given[:] = True
        elif task != "t2v":
            raise ValueError(f"Unknown video task {task!r}; choose from {VIDEO_TASKS}.")
        return given

    def video_given(self, task: str, generator: torch.Generator) -> torch.Tensor:
        """`[1, 1, T, h, w]` latent mask of `task` (through the conditioning helper)."""
        pixels = self.video_pixels_given(task, generator)
        return latent_mask_from_pixels(pixels, self.temporal_factor, self.spatial_factor)

    def audio_given(self, task: str, generator: torch.Generator) -> torch.Tensor:
        """`[1, 1, T_a]` latent mask of `task`, from a per-sample mask over the clip's waveform."""
        num_samples = self.num_audio_latents * self.audio_hop_length
        given = torch.zeros(1, num_samples, dtype=torch.bool)
        if task == "continuation":
            fraction = float(torch.empty(()).uniform_(*CONTINUATION_FRACTION, generator=generator))
            given[:, : round(fraction * num_samples)] = True
        elif task == "keep":
            given[:] = True
        elif task != "none":
            raise ValueError(f"Unknown audio task {task!r}; choose from {AUDIO_TASKS}.")
        return latent_mask_from_samples(given, self.num_audio_latents, self.audio_hop_length)

    # -- references ------------------------------------------------------------------------------------------------

    def step_references(self, step: int) -> StepReferences:
        """Whether optimizer step `step` carries an image reference / an audio reference (shared by its batch)."""
        generator = derived_generator(self.seed, "reference", step)
        image = float(torch.rand((), generator=generator)) < self.rates.image_reference
        audio = float(torch.rand((), generator=generator)) < self.rates.audio_reference
        low, high = (max(1, round(f * self.num_audio_latents)) for f in AUDIO_REFERENCE_FRACTION)
        length = _uniform_int(generator, low, high) if audio and self.trains_audio else 0
        return StepReferences(image=image and self.mode != "audio", audio_latents=length)

    def reference_choice(self, sample_number: int, num_image_candidates: int, audio_latents: int) -> tuple[int, int]:
        """Per sample: which reference-frame candidate and at which audio latent the audio reference chunk starts."""
        generator = derived_generator(self.seed, "reference_choice", sample_number)
        candidate = _uniform_int(generator, 0, num_image_candidates - 1)
        offset = _uniform_int(generator, 0, max(0, self.num_audio_latents - audio_latents))
        return candidate, offset

    # -- keyframes -------------------------------------------------------------------------------------------------

    def _keyframe_choice(self, generator: torch.Generator) -> list[int]:
        """The "auto" keyframes, or (at the subset rate) each of them kept with probability 1/2, at least one."""
        if _uniform(generator) >= self.rates.keyframe_subset:
            return list(self.auto_keyframes)
        kept = [i for i in self.auto_keyframes if _uniform(generator) < 0.5]
        return kept or [self.auto_keyframes[_uniform_int(generator, 0, len(self.auto_keyframes) - 1)]]

    def step_keyframes(self, step: int) -> list[int] | None:
        """The base latent frames whose high-resolution keyframe tokens join step `step`'s batch (`None`: none)."""
        generator = derived_generator(self.seed, "keyframes", step)
        if not self.trains_video or _uniform(generator) >= self.rates.keyframes:
            return None
        return self._keyframe_choice(generator)

    def refiner_draws(self, sample_number: int, max_guide_noise: float) -> RefinerDraws:
        """Refiner sample `sample_number`'s ground-truth keyframes and guide noise (std uniform in
        `[0, max_guide_noise]`)."""
        generator = derived_generator(self.seed, "refiner_guide", sample_number)
        keyframes = self._keyframe_choice(generator) if _uniform(generator) < self.rates.refiner_keyframes else []
        noise = max_guide_noise * _uniform(generator) if _uniform(generator) < self.rates.guide_noise else 0.0
        return RefinerDraws(keyframes, noise)
