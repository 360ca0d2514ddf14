"""The rCM time schedule and which expert runs which step (docs/reference.md, "The sampler")."""

from __future__ import annotations

import math

import torch

# TrigFlow angles between atan(sigma_max) and 0, chosen by TurboDiffusion "for better visual quality".
MID_ANGLES = (1.5, 1.4, 1.0)
MAX_STEPS = len(MID_ANGLES) + 1


def rcm_timesteps(num_steps: int, sigma_max: float) -> torch.Tensor:
    """Rectified-flow times t_0 > ... > t_num_steps = 0, float64, shape [num_steps + 1]."""
    if not 1 <= num_steps <= MAX_STEPS:
        raise ValueError(f"num_steps must be 1..{MAX_STEPS}, got {num_steps}")
    if sigma_max <= 0:
        raise ValueError(f"sigma_max must be > 0, got {sigma_max}")
    angles = torch.tensor(
        [math.atan(sigma_max), *MID_ANGLES[: num_steps - 1], 0.0], dtype=torch.float64
    )
    return torch.sin(angles) / (torch.cos(angles) + torch.sin(angles))


def num_high_steps(timesteps: torch.Tensor, boundary: float) -> int:
    """How many leading steps the HIGH-noise expert runs.

    Step i uses the high expert while t_i >= boundary; from the first step with t_i < boundary
    on, the low expert runs every remaining step (it never switches back).
    """
    num_steps = len(timesteps) - 1
    for i in range(num_steps):
        if timesteps[i].item() < boundary:
            return i
    return num_steps


def expert_for_steps(num_steps: int, sigma_max: float, boundary: float) -> list[str]:
    """["high", "high", "low", "low"] for 4 steps with boundary 0.9: one entry per step."""
    t = rcm_timesteps(num_steps, sigma_max)
    n_high = num_high_steps(t, boundary)
    return ["high"] * n_high + ["low"] * (num_steps - n_high)


def network_timestep(t_cur: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """What the network sees for time t_cur: float32(t) * 1000 (in float64), rounded to `dtype`, shape [1]."""
    ones = torch.ones(1, dtype=torch.float64, device=device)
    return (t_cur.float().to(device) * ones * 1000).to(dtype)
