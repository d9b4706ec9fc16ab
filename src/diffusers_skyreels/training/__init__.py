"""Training and LoRA fine-tuning of SkyReels V4 (video branch, audio branch, both jointly, or the refiner).

`examples/train_skyreels_v4.py` is the command line; `train(TrainingConfig(...))` the same from Python.
"""

from .checkpoint import list_checkpoints
from .config import TrainingConfig, build_parser, parse_args
from .dataset import ClipDataset, ClipRecord, PairedScales, ScanReport, decode_clip, read_metadata, scan_clips
from .flow_matching import TimestepSampler, masked_mse, noisy_latents, sigma_to_timestep, velocity_target
from .latent_cache import CachedLatentDataset, LatentCache, LatentEncoder, precompute_latent_cache
from .tasks import AUDIO_TASKS, VIDEO_TASKS, SampleTasks, TaskRates, TaskSampler, auto_keyframe_indices
from .trainer import SkyReelsV4Trainer, SkyReelsV4TrainingModule, TrainingResult, train


def main(argv: list[str] | None = None) -> TrainingResult:
    """Command-line entry point: parse the arguments and train."""
    return train(parse_args(argv))


__all__ = [
    "AUDIO_TASKS",
    "VIDEO_TASKS",
    "CachedLatentDataset",
    "ClipDataset",
    "ClipRecord",
    "LatentCache",
    "LatentEncoder",
    "PairedScales",
    "SampleTasks",
    "ScanReport",
    "SkyReelsV4Trainer",
    "SkyReelsV4TrainingModule",
    "TaskRates",
    "TaskSampler",
    "TimestepSampler",
    "TrainingConfig",
    "TrainingResult",
    "auto_keyframe_indices",
    "build_parser",
    "decode_clip",
    "list_checkpoints",
    "main",
    "masked_mse",
    "noisy_latents",
    "parse_args",
    "precompute_latent_cache",
    "read_metadata",
    "scan_clips",
    "sigma_to_timestep",
    "train",
    "velocity_target",
]
