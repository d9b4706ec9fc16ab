"""The training loop: full training or LoRA fine-tuning of the video branch, the audio branch, both jointly, or the
refiner.

Built on `accelerate` (devices, DDP / FSDP, mixed precision, gradient accumulation), PEFT (LoRA) and
`diffusers.training_utils`. The frozen VAEs and text encoder come from the pipeline folder the run starts from (or
their outputs from a latent cache). Every batch is a mix of tasks (`tasks.py`) turned into `[noisy ; I ; M]` inputs
by the conditioning helper, trained with the flow-matching objective of `flow_matching.py`.

The low-res + keyframes + refiner strategy (architecture.md §7) trains on paired data (`dataset.PairedScales`): each
clip also at the refiner's `spatial_scale`x size and `temporal_scale`x frame rate. The video branch then learns, on
some steps, to predict high-resolution keyframe tokens in the same pass, built as `prepare_refinement` builds them at
inference; `--mode refiner` trains the refiner on the guide `refiner_condition` builds from the clip's low-resolution
latents and ground-truth keyframes, as `run_refiner` does at inference.

Multi-process: on GPUs, `accelerate launch --multi_gpu --num_processes N examples/train_skyreels_v4.py ...` (DDP), or
FSDP through `accelerate config` (`distributed_type: FSDP`, `fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP`,
`fsdp_transformer_layer_cls_to_wrap: SkyReelsV4TransformerBlock`; checkpoints and the final save gather full state
dicts with `torch.distributed.checkpoint.state_dict`, so no FSDP state-dict setting is needed). On CPUs,
`torchrun --standalone --nproc_per_node N examples/train_skyreels_v4.py ...` (gloo; `accelerate launch` runs a
multi-CPU config as one process unless MPI is set up). The global batch is `train_batch_size x processes x
gradient_accumulation_steps`; its samples, tasks, timesteps and noise do not depend on how it is split
(`randomness.py`), so the losses match a single process (tested with two CPU processes; FSDP is untested here).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers import DiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import _collate_lora_metadata, cast_training_params, free_memory
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..pipelines.skyreels_v4.conditioning import ChannelCondition, condition_from_clip_latents, refiner_condition
from ..pipelines.skyreels_v4.pipeline_output import SkyReelsV4PipelineOutput
from ..pipelines.skyreels_v4.pipeline_skyreels_v4_base import SkyReelsV4BasePipeline
from ..pipelines.skyreels_v4.pipeline_skyreels_v4_refiner import SkyReelsV4RefinerPipeline
from ..utils.media_io import export_to_video_with_audio, export_to_wav
from ..utils.model_card import push_folder_to_hub, save_model_card
from .checkpoint import load_checkpoint, prune_checkpoints, resolve_checkpoint, save_checkpoint
from .config import TrainingConfig
from .dataset import ClipDataset, PairedScales, ScanReport, clip_requirements, collate, read_metadata, scan_clips
from .flow_matching import TimestepSampler, masked_mse, noisy_latents, sigma_to_timestep, velocity_target
from .latent_cache import CachedLatentDataset, LatentCache, LatentEncoder, precompute_latent_cache
from .randomness import GlobalBatchSampler, derived_generator
from .tasks import FIRST_FRAME_TASKS, SampleTasks, TaskSampler

logger = logging.getLogger(__name__)

# The branches each mode trains, by pipeline component name.
BRANCHES = {
    "video": ("transformer",), "audio": ("audio_transformer",), "joint": ("transformer", "audio_transformer"),
    "refiner": ("refiner",),
}
# How the LoRA settings name each branch (`TrainingConfig.lora_targets`, `--audio_rank`).
LORA_BRANCH_NAMES = {"transformer": "video", "audio_transformer": "audio", "refiner": "refiner"}
# Layers that only run in joint generation; frozen (and kept free of LoRA) when one branch trains alone, where they
# would get no gradient.
CROSS_MODAL_LAYERS = ("attn_cross_modal", "norm_cross_modal")


class SkyReelsV4TrainingModule(nn.Module):
    """The trained branches as one module, so that DDP / FSDP wrap them (and synchronise gradients) together.

    In joint mode the video branch runs the audio branch in lockstep, as in the pipelines. The refiner is trained
    alone.
    """

    def __init__(
        self, transformer: nn.Module | None, audio_transformer: nn.Module | None, refiner: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.audio_transformer = audio_transformer
        self.refiner = refiner

    def forward(
        self,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        num_video_frames: int,
        video_input: torch.Tensor | None = None,
        reference_latents: torch.Tensor | None = None,
        keyframe_input: torch.Tensor | None = None,
        keyframe_indices: list[int] | None = None,
        audio_input: torch.Tensor | None = None,
        audio_reference_latents: torch.Tensor | None = None,
        audio_timestep: torch.Tensor | None = None,
        refiner_input: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Velocity predictions by name: `video`, `keyframe` (`None` without `keyframe_input`) and `audio` of the
        trained branches, or `refiner`. `audio_timestep` (joint mode with separate noise levels) defaults to
        `timestep`; `reference_latents` go to the video branch or the refiner."""
        if self.refiner is not None:
            refined = self.refiner(
                refiner_input, timestep, encoder_hidden_states, encoder_attention_mask,
                reference_latents=reference_latents, return_dict=False,
            )[0]
            return {"refiner": refined}
        if self.transformer is not None:
            video, keyframes, audio = self.transformer(
                hidden_states=video_input,
                timestep=timestep,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
                reference_latents=reference_latents,
                keyframe_hidden_states=keyframe_input,
                keyframe_indices=keyframe_indices,
                audio_transformer=self.audio_transformer,
                audio_hidden_states=audio_input,
                audio_reference_latents=audio_reference_latents,
                audio_timestep=audio_timestep,
                return_dict=False,
            )
            predictions = {"video": video, "keyframe": keyframes}
            return predictions if audio is None else {**predictions, "audio": audio}
        audio = self.audio_transformer(
            audio_input,
            timestep,
            encoder_hidden_states,
            encoder_attention_mask,
            reference_latents=audio_reference_latents,
            num_video_frames=num_video_frames,
            return_dict=False,
        )[0]
        return {"audio": audio}


@dataclass
class TrainingResult:
    """What a run did: per-step logs (`step`, `loss`, `lr`, and per trained output `loss_video`, `loss_audio`,
    `loss_keyframe` (steps with keyframes) or `loss_refiner`) and where it wrote."""

    history: list[dict[str, float]] = field(default_factory=list)
    output_dir: Path | None = None
    scan: ScanReport | None = None  # the clips used and skipped


def pad_text(embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`[L_i, D]` embeddings -> `[B, L, D]` right-padded with zeros, and the `[B, L]` mask (`None`: no padding)."""
    length = max(e.shape[0] for e in embeds)
    text = torch.stack([nn.functional.pad(e, (0, 0, 0, length - e.shape[0])) for e in embeds])
    mask = torch.stack([(torch.arange(length) < e.shape[0]).long() for e in embeds])
    return text, None if bool(mask.all()) else mask


def check_lora_targets(model: nn.Module, targets: list[str], branch: str, excluded: tuple[str, ...]) -> None:
    """Raise if a LoRA target names no linear layer of `model` (PEFT matches a name or a `.`-suffix of it)."""
    names = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(part in name.split(".") for part in excluded)
    ]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        suffixes = sorted({".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.split(".")[-1]
                           for n in names})
        note = f" (layers under {list(excluded)} are excluded: they only run jointly)" if excluded else ""
        raise ValueError(
            f"LoRA target module(s) {unmatched} match no linear layer of the {branch} branch{note}. Its linear "
            f"layers are named: {', '.join(suffixes)}."
        )


class SkyReelsV4Trainer:
    """Sets up and runs one training run from a `TrainingConfig`. `run()` trains; `precompute()` fills the cache."""

    def __init__(self, config: TrainingConfig) -> None:
        config.check()
        self.config = config
        self.output_dir = Path(config.output_dir)
        # accelerate only sets up several CPU processes (gloo) when told to use the CPU.
        several_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.accelerator = Accelerator(
            cpu=config.cpu or (several_processes and not torch.cuda.is_available()),
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            log_with=config.report_to,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / "logs")),
        )
        self.branches = BRANCHES[config.mode]
        self.trains_video = "transformer" in self.branches
        self.trains_audio = "audio_transformer" in self.branches
        self.trains_refiner = "refiner" in self.branches
        # High-resolution latents are read only by keyframe tokens and the refiner.
        self.needs_high_res = self.trains_refiner or config.resolved_keyframe_rate > 0
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            self.accelerator.mixed_precision, torch.float32
        )
        self.pipeline = self._load_pipeline()
        self.paired = None
        if config.paired:
            refiner = self.pipeline.refiner.config
            self.paired = PairedScales(refiner.spatial_scale, refiner.temporal_scale)
        self.timing = self.pipeline.clip_timing(config.fps, num_frames=config.num_frames)
        self.encoder = LatentEncoder(
            self.pipeline, config.height, config.width, config.num_frames, self.timing.num_audio_latents,
            config.num_reference_frames, self.paired,
        )

    # -- setup -----------------------------------------------------------------------------------------------------

    def _load_pipeline(self) -> SkyReelsV4BasePipeline:
        config = self.config
        pipeline = DiffusionPipeline.from_pretrained(config.pretrained_model_name_or_path)
        if not isinstance(pipeline, SkyReelsV4BasePipeline):
            raise ValueError(
                f"{config.pretrained_model_name_or_path} holds a {type(pipeline).__name__}, not a SkyReels V4 "
                "pipeline."
            )
        if self.trains_audio and (pipeline.audio_transformer is None or pipeline.audio_vae is None):
            raise ValueError(f"--mode {config.mode} needs the pipeline's `audio_transformer` and `audio_vae`.")
        multiple = pipeline.vae_scale_factor_spatial * pipeline.transformer.config.patch_size[1]
        if config.height % multiple or config.width % multiple:
            raise ValueError(
                f"--height and --width must be multiples of {multiple}, got {config.height}x{config.width}."
            )
        if config.paired:
            self._check_paired(pipeline)
        pipeline.set_progress_bar_config(disable=True)
        device = self.accelerator.device
        # Frozen parts: on the device, the text encoder and video VAE in the compute dtype (the audio VAE and vocoder
        # stay as loaded: their STFT / mel code needs float32). Stored dtypes are restored before saving.
        self.frozen_dtypes = {}
        for name in ("text_encoder", "vae", "audio_vae", "vocoder"):
            module = getattr(pipeline, name, None)
            if module is not None:
                self.frozen_dtypes[name] = module.dtype
                module.requires_grad_(False).eval().to(device)
                if name in ("text_encoder", "vae") and module.dtype != self.weight_dtype:
                    module.to(self.weight_dtype)
        for name in ("transformer", "audio_transformer", "refiner"):
            module = getattr(pipeline, name, None)
            if module is not None:
                module.requires_grad_(False)
        return pipeline

    def _check_paired(self, pipeline: SkyReelsV4BasePipeline) -> None:
        """Raise if paired data, keyframe tokens or the refiner cannot work with this pipeline and size."""
        config = self.config
        refiner = getattr(pipeline, "refiner", None)
        if refiner is None:
            needs = "--mode refiner" if self.trains_refiner else "--paired_data"
            raise ValueError(
                f"{needs} needs the pipeline's `refiner` component: its spatial_scale and temporal_scale define the "
                "high-resolution clips (and it is what --mode refiner trains). Add one, e.g. `pipe.register_modules("
                "refiner=SkyReelsV4RefinerTransformer.from_video_branch(pipe.transformer))`, and save the pipeline."
            )
        scale = refiner.config.spatial_scale
        multiple = pipeline.vae_scale_factor_spatial * refiner.config.patch_size[1]
        if (config.height * scale) % multiple or (config.width * scale) % multiple:
            raise ValueError(
                f"--paired_data: the high-resolution clip ({config.width * scale}x{config.height * scale}, the "
                f"refiner's spatial_scale {scale} x --width/--height) must have sides that are multiples of "
                f"{multiple} (VAE factor x the refiner's patch size)."
            )
        if config.resolved_keyframe_rate > 0 and pipeline.transformer.config.patch_size[0] != 1:
            raise ValueError("Keyframe tokens need a video branch with a temporal patch size of 1; set "
                             "--keyframe_rate 0.")

    def _prepare_branch(self, name: str) -> nn.Module:
        """Make a branch trainable: all of it (full training) or LoRA adapters on it."""
        config = self.config
        model = getattr(self.pipeline, name)
        excluded = CROSS_MODAL_LAYERS if config.mode in ("video", "audio") else ()
        if config.use_lora:
            branch = LORA_BRANCH_NAMES[name]
            targets = config.lora_targets(branch)
            check_lora_targets(model, targets, branch, excluded)
            rank = config.audio_rank if branch == "audio" and config.audio_rank is not None else config.rank
            model.to(self.accelerator.device)
            if model.dtype != self.weight_dtype:
                model.to(self.weight_dtype)
            model.add_adapter(LoraConfig(
                r=rank,
                lora_alpha=config.lora_alpha if config.lora_alpha is not None else rank,
                init_lora_weights="gaussian",
                target_modules=targets,
                exclude_modules=f".*({'|'.join(excluded)}).*" if excluded else None,
            ))
            cast_training_params(model, torch.float32)
        else:
            model.to(self.accelerator.device)
            if model.dtype != torch.float32:
                model.to(torch.float32)  # full training keeps fp32 master weights
            for module_name, parameter in model.named_parameters():
                parameter.requires_grad_(not any(part in module_name.split(".") for part in excluded))
        model.train()
        if config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        return model

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed by this run."""
        config = self.config
        configs = {
            name: {k: v for k, v in dict(getattr(self.pipeline, name).config).items() if not k.startswith("_")}
            for name in self.branches
        }
        lora = None
        if config.use_lora:
            lora = {
                branch: {"rank": config.audio_rank if branch == "audio" and config.audio_rank else config.rank,
                         "alpha": config.lora_alpha, "targets": config.lora_targets(branch)}
                for branch in (LORA_BRANCH_NAMES[name] for name in self.branches)
            }
        return {"mode": config.mode, "model_configs": configs, "lora": lora}

    # -- data ------------------------------------------------------------------------------------------------------

    def precompute(self) -> ScanReport:
        """Fill `--cache_dir` from `--dataset_dir` (main process; the others wait)."""
        config = self.config
        if not config.dataset_dir:
            raise ValueError(
                f"The latent cache {config.cache_dir} does not exist yet: --dataset_dir is needed to make it."
            )
        records = read_metadata(config.dataset_dir, config.metadata_file, config.video_column, config.caption_column)
        report = None
        if self.accelerator.is_main_process:
            report = precompute_latent_cache(
                self.encoder, records, config.cache_dir, config.fps, self.timing.num_audio_samples
            )
        self.accelerator.wait_for_everyone()
        return report

    def _build_dataset(self) -> tuple[torch.utils.data.Dataset, dict[str, torch.Tensor], ScanReport]:
        """The training set, the null latents (black video, silence, empty prompt) and the scan report."""
        config = self.config
        if config.cache_dir:
            cache = LatentCache(config.cache_dir)
            if not cache.exists():
                self.precompute()
            cache.check_settings(self.encoder.settings())
            report = ScanReport(usable=[])
            clips = []
            for clip in cache.clips():
                if self.trains_audio and not clip.has_audio:
                    report.skipped.setdefault("no audio", []).append((clip.file_name, "no audio stream"))
                else:
                    clips.append(clip)
            for reason, entries in cache.index()["skipped"].items():
                report.skipped.setdefault(reason, []).extend(tuple(entry) for entry in entries)
            report.usable = clips
            report.enforce(config.strict)
            dataset = CachedLatentDataset(cache, clips, config.seed, self.trains_video or self.trains_refiner,
                                          self.trains_audio, high_res=self.needs_high_res)
            return dataset, cache.null_latents(), report
        records = read_metadata(config.dataset_dir, config.metadata_file, config.video_column, config.caption_column)
        size = (config.height, config.width, config.num_frames, config.fps)
        report = scan_clips(records, needs_audio=self.trains_audio, **clip_requirements(*size, self.paired))
        report.enforce(config.strict)
        dataset = ClipDataset(
            report.usable, config.seed, *size, self.encoder.audio_codec.sample_rate if self.trains_audio else None,
            self.timing.num_audio_samples, self.paired,
        )
        return dataset, self.encoder.null_latents(), report

    def _latents(self, batch: dict) -> dict:
        """Latents of a batch: read from the cache, or encoded now with the frozen encoders."""
        if "prompt_embeds" in batch:
            return batch
        latents = {"video_latents": None, "reference_latents": None, "audio_latents": None}
        if self.trains_video or self.trains_refiner:
            latents["video_latents"], latents["reference_latents"] = self.encoder.encode_video(batch["video"])
        if self.needs_high_res:
            latents["high_res_latents"], latents["high_res_reference_latents"] = self.encoder.encode_high_res(
                batch["video_high"]
            )
        if self.trains_audio:
            latents["audio_latents"] = self.encoder.encode_audio(batch["audio"])
        latents["prompt_embeds"] = self.encoder.encode_prompts(batch["text"])
        latents["sample_number"] = batch["sample_number"]
        return latents

    # -- one micro-batch -------------------------------------------------------------------------------------------

    def model_inputs(self, batch: dict, step: int) -> tuple[dict, dict]:
        """Forward kwargs of the training module and the loss targets `{name: (target, given)}` (names as the
        module's predictions)."""
        config, device = self.config, self.accelerator.device
        latents = self._latents(batch)
        numbers = [int(n) for n in latents["sample_number"]]
        per_sample = [(n,) for n in numbers]  # noise stream keys
        tasks = [self.task_sampler.sample(n) for n in numbers]
        references = self.task_sampler.step_references(step)
        choices = [
            self.task_sampler.reference_choice(n, len(self.encoder.reference_frames), references.audio_latents)
            for n in numbers
        ]

        embeds = [
            self.null["prompt_embeds"] if task.drop_caption else embed
            for embed, task in zip(latents["prompt_embeds"], tasks, strict=True)
        ]
        text, text_mask = pad_text([e.float().cpu() for e in embeds])
        num_train_timesteps = self.pipeline.scheduler.config.num_train_timesteps
        sigmas = torch.tensor([self.timesteps.sample(derived_generator(config.seed, "timestep", n)) for n in numbers])
        audio_sigmas = sigmas
        inputs = {
            "timestep": sigma_to_timestep(sigmas, num_train_timesteps).to(device),
            "encoder_hidden_states": text.to(device),
            "encoder_attention_mask": None if text_mask is None else text_mask.to(device),
            "num_video_frames": self.timing.num_latent_frames,
        }
        if config.separate_modality_timesteps and self.trains_video and self.trains_audio:
            audio_sigmas = torch.tensor(
                [self.timesteps.sample(derived_generator(config.seed, "audio_timestep", n)) for n in numbers]
            )
            inputs["audio_timestep"] = sigma_to_timestep(audio_sigmas, num_train_timesteps).to(device)
        targets = {}

        def image_references(candidates: torch.Tensor) -> torch.Tensor:
            """Each sample's chosen reference frame, `[B, C, 1, h, w]`."""
            return torch.stack(
                [candidates[i][:, choice : choice + 1] for i, (choice, _) in enumerate(choices)]
            ).float().to(device)

        if self.trains_video:
            x0 = latents["video_latents"].float().to(device)
            given = torch.cat([t.video_given for t in tasks]).to(device)
            condition = condition_from_clip_latents(x0, given, self.null["video"].to(device)[None])
            noise = self._noise("video_noise", x0.shape[1:], per_sample)
            inputs["video_input"], targets["video"] = self._flow_pair(x0, noise, sigmas, condition)
            if references.image:
                inputs["reference_latents"] = image_references(latents["reference_latents"])
            keyframes = self.task_sampler.step_keyframes(step)
            if keyframes is not None:
                inputs["keyframe_indices"] = keyframes
                inputs["keyframe_input"], targets["keyframe"] = self._keyframe_pair(
                    latents["high_res_latents"], keyframes, tasks, numbers, sigmas
                )
        if self.trains_audio:
            x0 = latents["audio_latents"].float().to(device)
            given = torch.cat([t.audio_given for t in tasks]).to(device)
            condition = condition_from_clip_latents(x0, given, self.null["audio"].to(device)[None])
            noise = self._noise("audio_noise", x0.shape[1:], per_sample)
            inputs["audio_input"], targets["audio"] = self._flow_pair(x0, noise, audio_sigmas, condition)
            if references.audio_latents:
                length = references.audio_latents
                inputs["audio_reference_latents"] = torch.stack(
                    [latents["audio_latents"][i][:, offset : offset + length] for i, (_, offset) in enumerate(choices)]
                ).float().to(device)
        if self.trains_refiner:
            x0 = latents["high_res_latents"].float().to(device)
            guide = self._refiner_guide(latents["video_latents"], x0, numbers)
            noise = self._noise("video_noise", x0.shape[1:], per_sample)
            inputs["refiner_input"], targets["refiner"] = self._flow_pair(x0, noise, sigmas, guide)
            if references.image:
                inputs["reference_latents"] = image_references(latents["high_res_reference_latents"])
        return inputs, targets

    def _noise(self, purpose: str, shape: Sequence[int], keys: list[tuple[int, ...]]) -> torch.Tensor:
        """`[len(keys), *shape]` Gaussian noise, row `i` from the stream `(purpose, *keys[i])` (drawn on the CPU)."""
        return torch.stack(
            [torch.randn(tuple(shape), generator=derived_generator(self.config.seed, purpose, *key)) for key in keys]
        ).to(self.accelerator.device)

    @staticmethod
    def _flow_pair(
        x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, condition: ChannelCondition
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The model input `[noisy ; I ; M]` of clean latents `x0` and its loss target `(velocity, given)`."""
        return condition.model_input(noisy_latents(x0, noise, sigmas)), (velocity_target(x0, noise), condition.mask)

    def _keyframe_pair(
        self,
        high_res_latents: torch.Tensor,
        indices: list[int],
        tasks: list[SampleTasks],
        numbers: list[int],
        sigmas: torch.Tensor,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Keyframe tokens of base latent frames `indices`, as `prepare_refinement` conditions them at inference.

        The target of keyframe `j` is the high-resolution latent frame `j * temporal_scale`, noised at its sample's
        sigma (one pass denoises both). The condition is the black high-resolution clip's latents there with mask 0,
        except keyframe 0 of samples whose task the image-to-video pipeline runs (`FIRST_FRAME_TASKS`): that is
        given, and the causal VAE's first latent frame is exactly the first frame encoded alone, as the pipeline does
        with the image. Each keyframe's noise has its own stream per (sample, latent frame), so that it does not
        depend on which other keyframes the step has.
        """
        device = self.accelerator.device
        positions = [j * self.paired.temporal for j in indices]
        x0 = high_res_latents[:, :, positions].float().to(device)
        given = torch.zeros(x0.shape[0], 1, *x0.shape[2:], device=device)
        if 0 in indices:
            for i, task in enumerate(tasks):
                if task.video_task in FIRST_FRAME_TASKS:
                    given[i, :, indices.index(0)] = 1.0
        condition = condition_from_clip_latents(x0, given, self.null["video_high"][None, :, positions].to(device))
        channels, _, height, width = x0.shape[1:]
        noise = self._noise("keyframe_noise", (channels, height, width), [(n, j) for n in numbers for j in indices])
        noise = noise.unflatten(0, (len(numbers), len(indices))).transpose(1, 2)
        return self._flow_pair(x0, noise, sigmas, condition)

    def _refiner_guide(
        self, low_res_latents: torch.Tensor, high_res_latents: torch.Tensor, numbers: list[int]
    ) -> ChannelCondition:
        """The refiner's guide and mask per sample, built by `refiner_condition` exactly as `run_refiner` builds them
        from the base pass: the low-resolution latents (plus each sample's guide noise, if drawn) upsampled, and its
        drawn ground-truth keyframes (high-resolution latent frames `j * temporal_scale`) put back with mask 1.

        The guide noise (`--refiner_guide_noise_rate`, `--refiner_guide_noise_strength`) is conditioning augmentation
        as in cascaded diffusion models: at inference the low-resolution latents come from the base model, not the
        VAE, so the refiner learns not to copy their errors.
        """
        device, scales = self.accelerator.device, self.paired
        guides = []
        for i, n in enumerate(numbers):
            draws = self.task_sampler.refiner_draws(n, self.config.refiner_guide_noise_strength)
            low = low_res_latents[i : i + 1].float().to(device)
            if draws.guide_noise:
                low = low + draws.guide_noise * self._noise("guide_noise", low.shape[1:], [(n,)])
            keyframes = None
            if draws.keyframe_indices:
                positions = [j * scales.temporal for j in draws.keyframe_indices]
                keyframes = high_res_latents[i : i + 1, :, positions].float().to(device)
            indices = draws.keyframe_indices if keyframes is not None else None
            guides.append(refiner_condition(low, scales.spatial, scales.temporal, keyframes, indices))
        return ChannelCondition(torch.cat([g.latents for g in guides]), torch.cat([g.mask for g in guides]))

    def losses(self, model: nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """`loss` (the weighted sum that is optimised) and the per-output means `loss_<name>` (video, keyframe,
        audio, refiner; each over the voxels to generate)."""
        config = self.config
        weights = {"video": config.video_loss_weight, "keyframe": config.keyframe_loss_weight,
                   "audio": config.audio_loss_weight, "refiner": 1.0}
        inputs, targets = self.model_inputs(batch, step)
        predictions = model(**inputs)
        out = {}
        total = 0.0
        for name, (target, given) in targets.items():
            out[f"loss_{name}"] = masked_mse(predictions[name], target, given).mean()
            total = total + weights[name] * out[f"loss_{name}"]
        out["loss"] = total
        return out

    # -- the run ---------------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Data, trainable branches, optimizer, scheduler, and the resumed state: everything `run()` steps."""
        config, accelerator = self.config, self.accelerator
        self.dataset, self.null, self.scan = self._build_dataset()
        if config.cache_dir and not config.validation_prompt:
            self._offload_encoders()
        self.task_sampler = TaskSampler(
            config.task_rates(), config.mode, config.num_frames, config.height, config.width,
            self.pipeline.vae_scale_factor_temporal, self.pipeline.vae_scale_factor_spatial,
            self.timing.num_audio_latents, self.encoder.audio_codec.hop_length if self.encoder.audio_codec else 1,
            config.seed, config.keyframe_stride,
        )
        self.timesteps = TimestepSampler(
            config.weighting_scheme, config.logit_mean, config.logit_std, config.mode_scale, config.timestep_shift
        )
        if config.separate_modality_timesteps and config.mode != "joint":
            logger.info("--separate_modality_timesteps: mode %s trains one modality, so it has one timestep.",
                        config.mode)

        branches = {name: self._prepare_branch(name) for name in self.branches}
        module = SkyReelsV4TrainingModule(
            branches.get("transformer"), branches.get("audio_transformer"), branches.get("refiner")
        )
        self.trainable_parameters = [p for p in module.parameters() if p.requires_grad]
        self.trainable_names = {name for name, p in module.named_parameters() if p.requires_grad}
        optimizer = torch.optim.AdamW(
            self.trainable_parameters, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
        )
        # Stepped once per optimizer step by `train_step` (accelerate would step it once per process).
        self.lr_scheduler = get_scheduler(
            config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=config.max_train_steps,
        )
        self.model, self.optimizer = accelerator.prepare(module, optimizer)

        self.start_step = 0
        checkpoint = resolve_checkpoint(self.output_dir, config.resume_from_checkpoint)
        if checkpoint is not None:
            self.start_step = load_checkpoint(
                checkpoint, self.model, self.optimizer, self.lr_scheduler, self.fingerprint(), self.trainable_names
            )
            logger.info("Resumed from %s at step %d.", checkpoint, self.start_step)

    def batches(self) -> DataLoader:
        """This process's micro-batches from the current step to the end (`randomness.GlobalBatchSampler`)."""
        config, accelerator = self.config, self.accelerator
        self.sampler = GlobalBatchSampler(
            config.train_batch_size, accelerator.num_processes, accelerator.process_index,
            config.gradient_accumulation_steps, self.start_step, config.max_train_steps,
        )
        return DataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=collate,
                          num_workers=config.dataloader_num_workers)

    def train_step(self, batches, step: int) -> dict[str, float]:
        """One optimizer step (all its micro-batches); returns the losses averaged over processes and micro-steps."""
        config, accelerator = self.config, self.accelerator
        logs: dict[str, float] = {}
        for _ in range(config.gradient_accumulation_steps):
            batch = next(batches)
            with accelerator.accumulate(self.model):
                losses = self.losses(self.model, batch, step)
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(self.trainable_parameters, config.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
            for key, value in losses.items():
                mean = accelerator.reduce(value.detach().float(), reduction="mean")
                logs[key] = logs.get(key, 0.0) + float(mean) / config.gradient_accumulation_steps
        self.lr_scheduler.step()
        logs["lr"] = self.lr_scheduler.get_last_lr()[0]
        logs["step"] = step + 1
        return logs

    def run(self) -> TrainingResult:
        """Train (or only fill the cache with `--precompute_only`) and write the outputs; returns the step logs.

        Losses are also appended to `output_dir/logs/losses.jsonl` (one JSON object per step).
        """
        config, accelerator = self.config, self.accelerator
        if config.precompute_only:
            return TrainingResult(output_dir=Path(config.cache_dir), scan=self.precompute())
        self.prepare()
        batches = iter(self.batches())
        log_file = self.output_dir / "logs" / "losses.jsonl"
        if accelerator.is_main_process:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            accelerator.init_trackers("skyreels-v4", config={k: v for k, v in asdict(config).items()
                                                             if isinstance(v, (int, float, str, bool))})
        logger.info(
            "Training %s (%s) on %d clips: steps %d to %d of %d samples (%d per process x %d processes x %d "
            "accumulation).", config.mode, "LoRA" if config.use_lora else "full", len(self.dataset),
            self.start_step + 1, config.max_train_steps, self.sampler.global_batch_size, config.train_batch_size,
            accelerator.num_processes, config.gradient_accumulation_steps,
        )

        result = TrainingResult(output_dir=self.output_dir, scan=self.scan)
        progress = tqdm(total=config.max_train_steps, initial=self.start_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
        for step in range(self.start_step, config.max_train_steps):
            logs = self.train_step(batches, step)
            result.history.append(logs)
            progress.update(1)
            progress.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k != "step"})
            accelerator.log({k: v for k, v in logs.items() if k != "step"}, step=step + 1)
            if accelerator.is_main_process:
                with open(log_file, "a", encoding="utf-8") as file:
                    file.write(json.dumps(logs) + "\n")

            done = step + 1
            if config.checkpointing_steps and done % config.checkpointing_steps == 0:
                save_checkpoint(accelerator, self.output_dir / f"checkpoint-{done}", self.model, self.optimizer,
                                self.lr_scheduler, done, self.fingerprint(), self.trainable_names)
                if accelerator.is_main_process:
                    prune_checkpoints(self.output_dir, config.checkpoints_total_limit)
            if config.validation_prompt and config.validation_steps and done % config.validation_steps == 0:
                self.validate(self.model, done)
        progress.close()

        final_validated = config.validation_steps and config.max_train_steps % config.validation_steps == 0
        if config.validation_prompt and not final_validated:
            self.validate(self.model, config.max_train_steps)
        self.save(self.model)
        accelerator.end_training()
        return result

    def _offload_encoders(self) -> None:
        """With a latent cache and no validation the frozen encoders are not needed on the device."""
        for name in self.frozen_dtypes:
            getattr(self.pipeline, name).to("cpu")
        free_memory()

    @torch.no_grad()
    def validate(self, model: nn.Module, step: int) -> list[Path]:
        """Generate validation samples with the current weights; mp4 with sound (wav in audio mode; in refiner mode,
        the refined first clip of the training set, mp4 without sound)."""
        config, accelerator = self.config, self.accelerator
        paths = []
        if accelerator.is_main_process:
            folder = self.output_dir / "validation"
            folder.mkdir(parents=True, exist_ok=True)
            module = accelerator.unwrap_model(model)
            module.eval()
            generator = torch.Generator(accelerator.device).manual_seed(config.seed)
            with accelerator.autocast():
                if self.trains_refiner:
                    output = self._refine_training_clip(generator)
                else:
                    output = self.pipeline(
                        config.validation_prompt, height=config.height, width=config.width,
                        num_frames=config.num_frames, fps=config.fps,
                        num_inference_steps=config.validation_inference_steps,
                        guidance_scale=config.validation_guidance_scale,
                        audio_guidance_scale=config.validation_guidance_scale,
                        num_videos_per_prompt=config.num_validation_samples, generator=generator,
                        generate_video=self.trains_video, generate_audio=self.trains_audio,
                    )
            module.train()
            for i in range(config.num_validation_samples):
                path = folder / f"step-{step:06d}-{i}"
                if self.trains_video or self.trains_refiner:
                    audio = output.audio[i] if output.audio is not None else None
                    paths.append(Path(export_to_video_with_audio(
                        output.frames[i], path.with_suffix(".mp4"), fps=round(output.fps), audio=audio,
                        audio_sample_rate=output.audio_sample_rate,
                    )))
                else:
                    paths.append(Path(export_to_wav(output.audio[i], path.with_suffix(".wav"),
                                                    output.audio_sample_rate)))
            logger.info("Validation samples of step %d: %s", step, [str(p) for p in paths])
            free_memory()
        accelerator.wait_for_everyone()
        return paths

    def _refine_training_clip(self, generator: torch.Generator) -> SkyReelsV4PipelineOutput:
        """`SkyReelsV4RefinerPipeline` (with the refiner being trained) on the low-resolution latents of the first
        training sample, without keyframes, as when a clip is refined on its own."""
        config, pipeline = self.config, self.pipeline
        refiner_pipeline = SkyReelsV4RefinerPipeline(
            tokenizer=pipeline.tokenizer, text_encoder=pipeline.text_encoder, refiner=pipeline.refiner,
            vae=pipeline.vae, scheduler=pipeline.scheduler, image_processor=pipeline.image_processor,
        )
        refiner_pipeline.set_progress_bar_config(disable=True)
        low_res = self._latents(collate([self.dataset[0]]))["video_latents"]
        return refiner_pipeline(
            config.validation_prompt, latents=low_res.float().to(self.accelerator.device), fps=config.fps,
            num_inference_steps=config.validation_inference_steps, guidance_scale=config.validation_guidance_scale,
            num_videos_per_prompt=config.num_validation_samples, generator=generator,
        )

    def save(self, model: nn.Module) -> Path:
        """Write the result: the pipeline (full training) or one LoRA file, a model card, and push if asked."""
        config, accelerator = self.config, self.accelerator
        # Gathered from every process (FSDP shards), so every process takes part.
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if accelerator.is_main_process:
            per_branch = {
                name: {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
                for name in self.branches
            }
            if config.use_lora:
                layers, modules = {}, {}
                for name in self.branches:
                    branch = getattr(self.pipeline, name)
                    layers[f"{name}_lora_layers"] = get_peft_model_state_dict(branch, state_dict=per_branch[name])
                    modules[name] = branch
                type(self.pipeline).save_lora_weights(self.output_dir, **layers, **_collate_lora_metadata(modules))
            else:
                self._save_pipeline(per_branch)
            self._write_card()
            if config.push_to_hub:
                push_folder_to_hub(
                    self.output_dir, config.hub_model_id or self.output_dir.name, token=config.hub_token,
                    private=config.hub_private, ignore_patterns=["checkpoint-*", "logs/*"],
                )
        accelerator.wait_for_everyone()
        return self.output_dir

    def _save_pipeline(self, per_branch: dict[str, dict[str, torch.Tensor]]) -> None:
        """`save_pretrained` of the pipeline with the trained branches (rebuilt from the gathered weights)."""
        pipeline = self.pipeline
        components = dict(pipeline.components)
        for name, weights in per_branch.items():
            branch = getattr(pipeline, name)
            trained = type(branch).from_config(branch.config)
            trained.load_state_dict(weights)
            components[name] = trained
        for name, dtype in self.frozen_dtypes.items():
            components[name] = components[name].to("cpu")
            if components[name].dtype != dtype:
                components[name].to(dtype)
        type(pipeline)(**components).save_pretrained(self.output_dir, safe_serialization=True)

    def _write_card(self) -> None:
        config = self.config
        kind = "LoRA fine-tuning" if config.use_lora else "full training"
        summary = (
            f"{kind} of {', '.join(f'`{b}`' for b in self.branches)} (`--mode {config.mode}`) with "
            f"`examples/train_skyreels_v4.py`: {config.max_train_steps} steps, learning rate {config.learning_rate}, "
            f"{config.width}x{config.height}, {config.num_frames} frames at {config.fps:g} fps, flow matching with "
            f"{config.weighting_scheme} timesteps."
        )
        if self.paired is not None:
            height, width, frames, fps = self.paired.high_res(config.height, config.width, config.num_frames,
                                                              config.fps)
            summary += f" Paired high-resolution clips: {width}x{height}, {frames} frames at {fps:g} fps."
        if config.resolved_keyframe_rate > 0:
            summary += (
                f" High-resolution keyframe tokens (every {config.keyframe_stride} latent frames and the last) on "
                f"{config.resolved_keyframe_rate:.0%} of the steps, loss weight {config.keyframe_loss_weight:g}."
            )
        if self.trains_refiner:
            summary += (
                " The refiner runs after the base pass with `pipe(prompt, refine=True)`, or alone in "
                "`SkyReelsV4RefinerPipeline`."
            )
        if config.use_lora:
            trained = [LORA_BRANCH_NAMES[name] for name in self.branches]
            rank = {b: config.audio_rank if b == "audio" and config.audio_rank else config.rank for b in trained}
            summary += " LoRA " + ", ".join(
                f"rank {rank[b]} on {', '.join(config.lora_targets(b))} ({b})" for b in trained
            ) + "."
        save_model_card(
            self.output_dir,
            base_model=config.pretrained_model_name_or_path,
            instance_prompt=config.trigger_prompt,
            lora=config.use_lora,
            branches=list(self.branches),
            example_prompt=config.validation_prompt or "A red ball bounces between the walls of a dark room.",
            training_summary=summary,
            repo_id=config.hub_model_id if config.push_to_hub else None,
        )


def train(config: TrainingConfig) -> TrainingResult:
    """Run `config` (see `TrainingConfig`); the Python entry point of `examples/train_skyreels_v4.py`."""
    return SkyReelsV4Trainer(config).run()
