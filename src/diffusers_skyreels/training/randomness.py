"""Deterministic randomness keyed by the global sample number, so that a run is reproducible across restarts and
process counts.

Every random choice of training (data order, task, caption dropout, timestep, noise, references) is drawn from a
generator seeded by `(seed, purpose, key)`, where the key is the *global* sample number `n` (sample `n` is the
`n`-th sample the run consumes, counted over all processes) or the optimizer step. So one process with a batch of 4
sees exactly the same samples, noise and timesteps as two processes with a batch of 2 each, and a resumed run
continues with the draws it would have made without the interruption; no RNG state needs to be checkpointed.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

# One stream per kind of draw, so that enabling one random feature does not shift the draws of another. New purposes
# go at the end: a purpose's position is part of its seed.
PURPOSES = (
    "order", "task", "caption", "timestep", "video_noise", "audio_noise", "reference", "reference_choice",
    "audio_timestep", "keyframes", "keyframe_noise", "refiner_guide", "guide_noise",
)


def derived_seed(seed: int, purpose: str, *keys: int) -> int:
    """A 63-bit seed for `purpose` (one of `PURPOSES`) and integer `keys`, well mixed (NumPy `SeedSequence`)."""
    sequence = np.random.SeedSequence([seed, PURPOSES.index(purpose), *keys])
    return int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def derived_generator(seed: int, purpose: str, *keys: int) -> torch.Generator:
    """A CPU `torch.Generator` for `purpose` and `keys` (draw on the CPU, then move: identical on every device)."""
    return torch.Generator().manual_seed(derived_seed(seed, purpose, *keys))


class SampleOrder:
    """Maps the global sample number to a dataset index: a fresh seeded permutation of the dataset every epoch."""

    def __init__(self, dataset_size: int, seed: int) -> None:
        if dataset_size < 1:
            raise ValueError("The training set is empty.")
        self.dataset_size = dataset_size
        self.seed = seed
        self._epoch: tuple[int, torch.Tensor] | None = None

    def __call__(self, sample_number: int) -> int:
        epoch, position = divmod(sample_number, self.dataset_size)
        if self._epoch is None or self._epoch[0] != epoch:
            generator = derived_generator(self.seed, "order", epoch)
            self._epoch = (epoch, torch.randperm(self.dataset_size, generator=generator))
        return int(self._epoch[1][position])


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this process's micro-batches of global sample numbers, from optimizer step `start_step` on.

    Optimizer step `s` consumes samples `s * G .. (s + 1) * G - 1` with `G = batch_size * num_processes *
    accumulation_steps`; micro-step `m` of process `r` takes the `batch_size` samples at offset
    `(m * num_processes + r) * batch_size` of that range.
    """

    def __init__(
        self,
        batch_size: int,
        num_processes: int,
        process_index: int,
        accumulation_steps: int,
        start_step: int,
        max_steps: int,
    ) -> None:
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.accumulation_steps = accumulation_steps
        self.start_step = start_step
        self.max_steps = max_steps

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_processes * self.accumulation_steps

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step) * self.accumulation_steps

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.max_steps):
            for micro_step in range(self.accumulation_steps):
                first = step * self.global_batch_size
                first += (micro_step * self.num_processes + self.process_index) * self.batch_size
                yield list(range(first, first + self.batch_size))
