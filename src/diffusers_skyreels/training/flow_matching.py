"""The flow-matching objective of SkyReels V4 (architecture.md §8), with its sign convention in this one place.

The paper writes `z_t = t * z_0 + (1 - t) * eps` (t = 1 is data) and regresses the velocity `z_0 - eps`. Diffusers'
flow-matching schedulers use `sigma = 1 - t`:

    noisy = (1 - sigma) * x0 + sigma * noise,        target = noise - x0   (the paper's target, negated)

and the transformers are fed `timestep = sigma * num_train_timesteps` and predict that target, so that
`FlowMatchEulerDiscreteScheduler.step`, which does `x += (sigma_next - sigma) * model_output`, moves exactly along
the straight path from noise to data (`tests/test_training.py` checks this with one scheduler step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

WEIGHTING_SCHEMES = ("uniform", "logit_normal", "mode")


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """`(1 - sigma) * x0 + sigma * noise`, with `sigma` `[B]` broadcast over the other dimensions."""
    sigma = sigma.to(x0).reshape(-1, *([1] * (x0.ndim - 1)))
    return (1.0 - sigma) * x0 + sigma * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the transformers predict: the velocity toward noise, `noise - x0` (d noisy / d sigma)."""
    return noise - x0


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE `[B]` over the latent voxels to generate (`given == 0`), averaged over channels.

    Why only there: the given voxels are read from the condition channels, the model is never asked to produce them
    at inference, and counting them would reward copying the condition. A sample with nothing to generate in this
    modality (e.g. audio kept as is) contributes 0. Each sample is normalised by its own voxel count, so that the
    batch mean is the same however a global batch is split over processes.
    """
    generate = 1.0 - given.to(torch.float32)
    squared = (prediction.float() - target.float()).pow(2).mean(dim=1, keepdim=True) * generate
    dims = tuple(range(1, squared.ndim))
    return squared.sum(dim=dims) / generate.sum(dim=dims).clamp_min(1.0)


@dataclass(frozen=True)
class TimestepSampler:
    """Draws the noise level `sigma` in [0, 1] of one sample.

    `uniform` is the paper's `t ~ U(0, 1)`; `logit_normal` (`sigmoid(N(logit_mean, logit_std))`, positive mean =
    noisier) and `mode` (SD3's mode sampling with `mode_scale`) come from `diffusers.training_utils`. `shift > 1` then
    moves the draw toward noise with the scheduler's time shift `shift * s / (1 + (shift - 1) * s)`.
    """

    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0

    def __post_init__(self) -> None:
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"`weighting_scheme` must be one of {WEIGHTING_SCHEMES}, got {self.weighting_scheme!r}.")
        if self.shift <= 0 or self.logit_std <= 0:
            raise ValueError(f"`shift` and `logit_std` must be positive, got {self.shift} and {self.logit_std}.")

    def sample(self, generator: torch.Generator) -> float:
        sigma = compute_density_for_timestep_sampling(
            "none" if self.weighting_scheme == "uniform" else self.weighting_scheme,
            batch_size=1,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            generator=generator,
        )
        sigma = self.shift * sigma / (1.0 + (self.shift - 1.0) * sigma)
        return float(sigma.clamp(0.0, 1.0))


def sigma_to_timestep(sigma: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """The transformers' `timestep` input: `sigma` in the scheduler's units."""
    return sigma * num_train_timesteps
