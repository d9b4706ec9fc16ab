"""Training arguments: one dataclass, and the command line generated from it (every field is a `--flag`)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field

from .flow_matching import WEIGHTING_SCHEMES
from .tasks import MODES, TaskRates

LORA_TARGETS = "to_q,to_k,to_v,to_out.0"
# Keyframe steps by default with paired data: half, so that the base model also learns to run without keyframes.
DEFAULT_KEYFRAME_RATE = 0.5


def _arg(default: typing.Any, help: str, **extra: typing.Any) -> typing.Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainingConfig:
    """Everything a training run needs; `python examples/train_skyreels_v4.py --help` lists the same fields."""

    # -- model and data ----------------------------------------------------------------------------------------
    pretrained_model_name_or_path: str | None = _arg(
        None, "Saved SkyReels V4 pipeline folder (its VAEs and text encoder stay frozen). Required.")
    dataset_dir: str | None = _arg(
        None, "Folder with metadata.jsonl (file_name, text) and the clips. Required unless --cache_dir exists.")
    metadata_file: str | None = _arg(None, "Caption file (default: <dataset_dir>/metadata.jsonl).")
    video_column: str = _arg("file_name", "Metadata key of the clip path (relative to dataset_dir).")
    caption_column: str = _arg("text", "Metadata key of the caption.")
    output_dir: str = _arg("skyreels-v4-trained", "Where checkpoints, validation samples and the result go.")
    mode: str = _arg(
        "joint", "Train the video branch, the audio branch, both jointly, or the refiner (super-resolution + frame "
        "interpolation; implies --paired_data).", choices=MODES)
    height: int = _arg(256, "Training height in pixels (multiple of VAE factor x patch size).")
    width: int = _arg(256, "Training width in pixels.")
    num_frames: int = _arg(33, "Frames per training clip, of the form 4k + 1.")
    fps: float = _arg(16.0, "Training frame rate; clips are resampled to it (the paper trains at 16 fps).")
    paired_data: bool = _arg(
        False, "Decode each clip at the refiner's scale (spatial_scale x --height/--width, (num_frames - 1) x "
        "temporal_scale + 1 frames at temporal_scale x --fps) and derive the training clip from it (area "
        "downsampling, every temporal_scale-th frame); both latents are cached. Needed by keyframe tokens and --mode "
        "refiner.")
    strict: bool = _arg(False, "Fail on unusable clips (undecodable, too short, no audio) instead of skipping.")
    cache_dir: str | None = _arg(
        None, "Latent cache folder (safetensors): made on first use, then the VAEs and text encoder do not run.")
    precompute_only: bool = _arg(False, "Fill --cache_dir and exit.")
    num_reference_frames: int = _arg(3, "Evenly spaced frames offered as in-context image references.")
    dataloader_num_workers: int = _arg(0, "DataLoader worker processes (decoding).")

    # -- optimisation ------------------------------------------------------------------------------------------
    seed: int = _arg(0, "Seed of every random draw (data order, tasks, timesteps, noise).")
    train_batch_size: int = _arg(1, "Samples per process per micro-step.")
    gradient_accumulation_steps: int = _arg(1, "Micro-steps per optimizer step.")
    max_train_steps: int = _arg(1000, "Optimizer steps.")
    learning_rate: float = _arg(1e-4, "AdamW learning rate.")
    lr_scheduler: str = _arg("constant_with_warmup", "diffusers.optimization scheduler name.")
    lr_warmup_steps: int = _arg(100, "Warmup steps of the learning rate.")
    adam_beta1: float = _arg(0.9, "AdamW beta1.")
    adam_beta2: float = _arg(0.999, "AdamW beta2.")
    adam_weight_decay: float = _arg(1e-4, "AdamW weight decay.")
    adam_epsilon: float = _arg(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _arg(1.0, "Gradient clipping norm (0 disables).")
    mixed_precision: str | None = _arg(
        None, "no, fp16 or bf16; default: the accelerate config.", choices=(None, "no", "fp16", "bf16"))
    cpu: bool = _arg(False, "Train on the CPU even if a GPU is available (several processes without a CUDA GPU "
                     "always do).")
    gradient_checkpointing: bool = _arg(False, "Recompute block activations in the backward pass (less memory).")

    # -- flow matching -----------------------------------------------------------------------------------------
    weighting_scheme: str = _arg("uniform", "Timestep density (uniform is the paper's).", choices=WEIGHTING_SCHEMES)
    logit_mean: float = _arg(0.0, "logit_normal mean (positive: noisier).")
    logit_std: float = _arg(1.0, "logit_normal standard deviation.")
    mode_scale: float = _arg(1.29, "Scale of the `mode` density.")
    timestep_shift: float = _arg(1.0, "Shift sigma toward noise, as the scheduler's shift (1: none).")
    separate_modality_timesteps: bool = _arg(
        False, "Joint mode: draw the audio noise level independently of the video's (the paper shares one); a "
        "single-branch mode has one modality anyway.")
    video_loss_weight: float = _arg(1.0, "Weight of the video MSE.")
    audio_loss_weight: float = _arg(1.0, "Weight of the audio MSE.")

    # -- tasks (defaults: tasks.py) ----------------------------------------------------------------------------
    i2v_rate: float = _arg(TaskRates.i2v, "Image-to-video: first latent frame given.")
    first_last_rate: float = _arg(TaskRates.first_last, "First and last latent frames given.")
    extension_rate: float = _arg(TaskRates.extension, "Extension: a random prefix of latent frames given.")
    inpaint_rate: float = _arg(TaskRates.inpaint, "Inpainting: all but a random spatio-temporal box given.")
    video_keep_rate: float = _arg(TaskRates.video_keep, "Joint mode: whole video given (video-to-audio).")
    audio_continuation_rate: float = _arg(TaskRates.audio_continuation, "Audio continuation: a prefix given.")
    audio_keep_rate: float = _arg(TaskRates.audio_keep, "Joint mode: whole soundtrack given (audio-to-video).")
    image_reference_rate: float = _arg(TaskRates.image_reference, "Steps with a frame of the clip as image reference.")
    audio_reference_rate: float = _arg(TaskRates.audio_reference, "Steps with a chunk of its audio as reference.")
    caption_dropout_rate: float = _arg(TaskRates.caption_dropout, "Captions replaced by \"\" (for CFG).")

    # -- high-resolution keyframes and the refiner (need paired data) ------------------------------------------
    keyframe_rate: float | None = _arg(
        None, "video / joint: share of steps whose batch also predicts high-resolution keyframe tokens (default: "
        f"{DEFAULT_KEYFRAME_RATE} with --paired_data, else 0).")
    keyframe_stride: int = _arg(4, "Keyframes are every N-th latent frame and the last (the pipelines' 'auto').")
    keyframe_subset_rate: float = _arg(
        TaskRates.keyframe_subset, "Share of keyframe draws (per step in video / joint, per sample in refiner mode) "
        "that keep a random non-empty subset of the 'auto' keyframes instead of all of them.")
    keyframe_loss_weight: float = _arg(1.0, "Weight of the keyframe MSE (added to the video MSE).")
    refiner_keyframe_rate: float = _arg(
        TaskRates.refiner_keyframes, "refiner: share of samples whose guide holds ground-truth high-resolution "
        "keyframes (the chained pipeline's case); the others have none (refining a clip alone).")
    refiner_guide_noise_rate: float = _arg(
        TaskRates.guide_noise, "refiner: share of samples whose low-resolution latents get Gaussian noise before the "
        "guide is built, so that the refiner does not trust the base model's latents blindly.")
    refiner_guide_noise_strength: float = _arg(
        0.1, "refiner: the noise's standard deviation is drawn uniformly in [0, this] (latents have unit scale).")

    # -- LoRA --------------------------------------------------------------------------------------------------
    use_lora: bool = _arg(False, "Train LoRA adapters instead of the full branches.")
    rank: int = _arg(16, "LoRA rank of the video branch.")
    audio_rank: int | None = _arg(None, "LoRA rank of the audio branch (default: --rank).")
    lora_alpha: float | None = _arg(None, "LoRA alpha (default: the rank).")
    lora_target_modules: str = _arg(LORA_TARGETS, "Comma-separated module names to adapt (video branch).")
    audio_lora_target_modules: str | None = _arg(None, "Same for the audio branch (default: --lora_target_modules).")

    # -- checkpoints, validation, output -----------------------------------------------------------------------
    checkpointing_steps: int = _arg(500, "Save a checkpoint every N optimizer steps (0: never).")
    checkpoints_total_limit: int | None = _arg(None, "Keep at most this many checkpoints.")
    resume_from_checkpoint: str | None = _arg(None, "`latest` or a checkpoint folder.")
    validation_prompt: str | None = _arg(None, "Prompt of the validation samples (none: no validation).")
    validation_steps: int = _arg(500, "Generate validation samples every N steps (and at the end).")
    num_validation_samples: int = _arg(1, "Validation samples per prompt.")
    validation_inference_steps: int = _arg(30, "Denoising steps of validation samples.")
    validation_guidance_scale: float = _arg(5.0, "Guidance scale of validation samples (video and audio).")
    report_to: str | None = _arg(None, "accelerate tracker (tensorboard, wandb, ...); losses are logged anyway.")
    trigger_prompt: str | None = _arg(None, "LoRA model card: the phrase that triggers the adapter.")
    push_to_hub: bool = _arg(False, "Upload the result to the Hub.")
    hub_model_id: str | None = _arg(None, "Hub repository (default: the output folder name).")
    hub_token: str | None = _arg(None, "Hub token (default: the logged-in one).")
    hub_private: bool = _arg(False, "Create the Hub repository as private.")

    @property
    def paired(self) -> bool:
        """Whether clips come with their high-resolution twin (asked for, or needed by the refiner)."""
        return self.paired_data or self.mode == "refiner"

    @property
    def resolved_keyframe_rate(self) -> float:
        """`--keyframe_rate`, or its default: keyframes on about half the steps when there is paired data."""
        if self.keyframe_rate is not None:
            return self.keyframe_rate
        return DEFAULT_KEYFRAME_RATE if self.paired and self.mode in ("video", "joint") else 0.0

    def task_rates(self) -> TaskRates:
        return TaskRates(
            i2v=self.i2v_rate, first_last=self.first_last_rate, extension=self.extension_rate,
            inpaint=self.inpaint_rate, video_keep=self.video_keep_rate,
            audio_continuation=self.audio_continuation_rate, audio_keep=self.audio_keep_rate,
            image_reference=self.image_reference_rate, audio_reference=self.audio_reference_rate,
            caption_dropout=self.caption_dropout_rate, keyframes=self.resolved_keyframe_rate,
            keyframe_subset=self.keyframe_subset_rate, refiner_keyframes=self.refiner_keyframe_rate,
            guide_noise=self.refiner_guide_noise_rate,
        )

    def lora_targets(self, branch: str) -> list[str]:
        targets = self.audio_lora_target_modules if branch == "audio" else None
        return [t.strip() for t in (targets or self.lora_target_modules).split(",") if t.strip()]

    def check(self) -> None:
        """Raise `ValueError` on arguments that cannot work (before anything loads)."""
        if not self.pretrained_model_name_or_path:
            raise ValueError("--pretrained_model_name_or_path is required.")
        if not self.dataset_dir and not self.cache_dir:
            raise ValueError("--dataset_dir is required (or an existing --cache_dir).")
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {MODES}, got {self.mode!r}.")
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ValueError(f"--num_frames must have the form 4k + 1, got {self.num_frames}.")
        for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "num_reference_frames",
                     "keyframe_stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.precompute_only and not self.cache_dir:
            raise ValueError("--precompute_only needs --cache_dir.")
        if self.use_lora and (self.rank < 1 or (self.audio_rank is not None and self.audio_rank < 1)):
            raise ValueError("LoRA ranks must be at least 1.")
        if min(self.video_loss_weight, self.audio_loss_weight, self.keyframe_loss_weight) < 0:
            raise ValueError("Loss weights must be non-negative.")
        if self.refiner_guide_noise_strength < 0:
            raise ValueError(f"--refiner_guide_noise_strength must be >= 0, got {self.refiner_guide_noise_strength}.")
        if self.resolved_keyframe_rate > 0:
            if self.mode not in ("video", "joint"):
                raise ValueError(f"--keyframe_rate: keyframe tokens belong to the video branch (--mode video or "
                                 f"joint), not --mode {self.mode}.")
            if not self.paired:
                raise ValueError("--keyframe_rate > 0 needs --paired_data: keyframe targets are high-resolution "
                                 "latents of the clip.")
        self.task_rates()  # validates the rates


def build_parser() -> argparse.ArgumentParser:
    """The command line of `examples/train_skyreels_v4.py`, one `--flag` per `TrainingConfig` field."""
    parser = argparse.ArgumentParser(
        description="Train or fine-tune (LoRA) SkyReels V4: video branch, audio branch, both jointly, or the refiner.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(TrainingConfig)
    for item in dataclasses.fields(TrainingConfig):
        hint = hints[item.name]
        kwargs: dict[str, typing.Any] = {"default": item.default, "help": item.metadata["help"]}
        if hint is bool:
            kwargs["action"] = "store_true"
        else:
            kinds = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
            kwargs["type"] = kinds[0]
            if "choices" in item.metadata:
                kwargs["choices"] = [c for c in item.metadata["choices"] if c is not None]
        parser.add_argument(f"--{item.name}", **kwargs)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainingConfig:
    """Parse the command line into a checked `TrainingConfig`."""
    config = TrainingConfig(**vars(build_parser().parse_args(argv)))
    config.check()
    return config
