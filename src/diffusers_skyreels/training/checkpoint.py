"""Training checkpoints that are safe to load: tensors in safetensors, everything else in JSON, no pickle.

`checkpoint-<step>/` holds

    trainable.safetensors   the trainable parameters (full weights or LoRA), by name
    optimizer.safetensors   the optimizer's per-parameter state tensors, keyed `<parameter name>::<state key>`
    training_state.json     step, optimizer param groups, LR-scheduler state, and the run's fingerprint

No RNG state is stored: every random draw is keyed by the global sample number or step (`randomness.py`), so a
resumed run continues with the draws it would have made. (`Accelerator.save_state` is not used because it pickles the
optimizer and RNG states.) State dicts go through `torch.distributed.checkpoint.state_dict`, which gathers full
tensors under DDP and FSDP alike. A checkpoint is written to a temporary folder and renamed when complete, so a crash
while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
SEPARATOR = "::"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under `output_dir`, oldest first."""
    found = []
    for path in Path(output_dir).glob(f"{PREFIX}*"):
        suffix = path.name[len(PREFIX):]
        if path.is_dir() and suffix.isdigit() and (path / "training_state.json").is_file():
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(output_dir: str | Path, resume_from: str | None) -> Path | None:
    """`"latest"` -> the newest checkpoint in `output_dir` (or `None`: start fresh); a path -> that checkpoint."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.info("No checkpoint in %s: starting from step 0.", output_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if not path.is_dir() and (Path(output_dir) / resume_from).is_dir():
        path = Path(output_dir) / resume_from
    if not (path / "training_state.json").is_file():
        raise ValueError(
            f"--resume_from_checkpoint {resume_from!r} is not a checkpoint folder (no training_state.json)."
        )
    return path


def _options(**kwargs: Any) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer behind accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def save_checkpoint(
    accelerator,
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    step: int,
    fingerprint: dict[str, Any],
    trainable: set[str],
) -> Path:
    """Write `directory` (all processes must call this; the main process writes).

    `trainable`: names of the trainable parameters in the unwrapped model (what is saved of the weights).
    """
    directory = Path(directory)
    weights = {k: v for k, v in get_model_state_dict(model, options=_options()).items() if k in trainable}
    optimizer_state = get_optimizer_state_dict(model, _inner(optimizer), options=_options())
    if accelerator.is_main_process:
        temporary = directory.with_name(directory.name + ".incomplete")
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        save_file({k: v.detach().contiguous() for k, v in weights.items()}, temporary / "trainable.safetensors")
        tensors, scalars = {}, {}
        for name, state in optimizer_state["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{name}{SEPARATOR}{key}"] = value.detach().contiguous()
                else:
                    scalars[f"{name}{SEPARATOR}{key}"] = value
        save_file(tensors, temporary / "optimizer.safetensors")
        state = {
            "step": step,
            "fingerprint": fingerprint,
            "optimizer_param_groups": optimizer_state["param_groups"],
            "optimizer_scalars": scalars,
            "lr_scheduler": lr_scheduler.state_dict(),
        }
        (temporary / "training_state.json").write_text(json.dumps(state, indent=1, default=list), encoding="utf-8")
        shutil.rmtree(directory, ignore_errors=True)
        temporary.rename(directory)
    accelerator.wait_for_everyone()
    return directory


def _differences(saved: Any, current: Any, path: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        found = []
        for key in sorted(set(saved) | set(current)):
            found += _differences(saved.get(key), current.get(key), f"{path}.{key}" if path else key)
        return found
    return [] if saved == current else [f"{path}: checkpoint {saved!r}, this run {current!r}"]


def load_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    fingerprint: dict[str, Any],
    trainable: set[str],
) -> int:
    """Restore weights, optimizer and scheduler from `directory`; returns the step to continue from.

    Raises `ValueError` if the checkpoint belongs to a different run setup (mode, model configs, LoRA settings).
    """
    directory = Path(directory)
    state = json.loads((directory / "training_state.json").read_text(encoding="utf-8"))
    # JSON turns tuples into lists: compare the fingerprint as JSON.
    differences = _differences(state["fingerprint"], json.loads(json.dumps(fingerprint, default=list)))
    if differences:
        raise ValueError(
            f"Cannot resume from {directory}: it was saved by an incompatible run ("
            + "; ".join(differences[:10]) + ")."
        )
    weights = load_file(directory / "trainable.safetensors")
    if set(weights) != trainable:
        missing, extra = sorted(trainable - set(weights)), sorted(set(weights) - trainable)
        raise ValueError(
            f"Cannot resume from {directory}: its trainable parameters differ from this run's (missing "
            f"{missing[:5]}, unexpected {extra[:5]})."
        )
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))

    optimizer_state: dict[str, Any] = {"state": {}, "param_groups": state["optimizer_param_groups"]}
    for key, value in list(load_file(directory / "optimizer.safetensors").items()) + list(
        state["optimizer_scalars"].items()
    ):
        name, entry = key.split(SEPARATOR)
        optimizer_state["state"].setdefault(name, {})[entry] = value
    for group in optimizer_state["param_groups"]:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    set_optimizer_state_dict(model, _inner(optimizer), optimizer_state, options=StateDictOptions(full_state_dict=True))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    return int(state["step"])


def prune_checkpoints(output_dir: str | Path, keep: int | None) -> None:
    """Delete the oldest checkpoints so that at most `keep` remain (`None`: keep all)."""
    if keep is None:
        return
    found = list_checkpoints(output_dir)
    for path in found[: max(0, len(found) - keep)]:
        logger.info("Removing old checkpoint %s", path)
        shutil.rmtree(path)
