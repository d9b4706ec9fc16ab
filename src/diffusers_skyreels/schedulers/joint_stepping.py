"""Step several latents (video, audio) with one Diffusers scheduler on the same sigma.

Diffusers' schedulers advance their step index on every `step` call, so calling `step` once per modality would
desynchronise them. The modalities are flattened and concatenated, stepped once, and split again: one scheduler,
one sigma schedule, any first- or multi-step scheduler (its history is kept in the same concatenated form).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from diffusers import SchedulerMixin


def step_jointly(
    scheduler: SchedulerMixin,
    timestep: torch.Tensor,
    model_outputs: Sequence[torch.Tensor | None],
    samples: Sequence[torch.Tensor | None],
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> list[torch.Tensor | None]:
    """Return `samples` advanced by one scheduler step; `None` entries (a modality not generated) stay `None`."""
    present = [i for i, sample in enumerate(samples) if sample is not None]
    if not present:
        raise ValueError("`step_jointly` needs at least one latent to step.")
    for i in present:
        if model_outputs[i] is None or model_outputs[i].shape != samples[i].shape:
            raise ValueError(f"Model output {i} does not match its latents {tuple(samples[i].shape)}.")
    sizes = [samples[i][0].numel() for i in present]
    flat_output = torch.cat([model_outputs[i].flatten(1) for i in present], dim=1)
    flat_sample = torch.cat([samples[i].flatten(1) for i in present], dim=1)
    kwargs = {"return_dict": False}
    if generator is not None and "generator" in inspect.signature(scheduler.step).parameters:
        kwargs["generator"] = generator
    stepped = scheduler.step(flat_output, timestep, flat_sample, **kwargs)[0]
    result: list[torch.Tensor | None] = [None] * len(samples)
    for i, chunk in zip(present, stepped.split(sizes, dim=1)):
        result[i] = chunk.reshape(samples[i].shape).to(samples[i].dtype)
    return result
