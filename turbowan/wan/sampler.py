"""The rCM sampling loop, split into resumable pieces.

`sample_high` and `sample_low` run in different processes (one expert each). Everything the
loop carries from one step to the next is in `SamplerState`: the float64 state `x`, the random
generator's state and the index of the next step. Saving it after the high steps and restoring
it before the low steps reproduces the single-process loop bit for bit (docs/reference.md, "The
sampler").
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .schedule import network_timestep, num_high_steps, rcm_timesteps

log = logging.getLogger(__name__)

# velocity(x_float64, t_cur_float64_0d) -> v_float64, same shape as x
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SamplerState:
    x: torch.Tensor  # float64 [1, 16, lat_t, lat_h, lat_w]
    generator: torch.Generator
    next_step: int


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """The one generator of a row: on the sampling device, as in the official loop."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(int(seed))
    return generator


def restore_generator(state: torch.Tensor, device: torch.device | str) -> torch.Generator:
    generator = torch.Generator(device=torch.device(device))
    generator.set_state(state.cpu())
    return generator


def initial_state(
    noise_shape: tuple[int, ...], seed: int, timesteps: torch.Tensor, device: torch.device | str
) -> SamplerState:
    """Noise scaled by t_0, in float64 (no image term: the image enters through y)."""
    generator = make_generator(seed, device)
    noise = torch.randn(*noise_shape, dtype=torch.float32, device=device, generator=generator)
    x = noise.to(torch.float64) * timesteps[0].to(device)
    return SamplerState(x=x, generator=generator, next_step=0)


def rcm_step(
    x: torch.Tensor,
    v: torch.Tensor,
    t_cur: torch.Tensor,
    t_next: torch.Tensor,
    ode: bool,
    generator: torch.Generator,
) -> torch.Tensor:
    """One rCM update; the dtypes follow the official loop exactly."""
    if ode:
        return x - (t_cur - t_next) * v
    noise = torch.randn(*x.shape, dtype=torch.float32, device=x.device, generator=generator)
    # t_next (0-d float64) * noise (float32) is computed in float32, then added in float64.
    return (1 - t_next) * (x - t_cur * v) + t_next * noise


def run_steps(
    state: SamplerState,
    velocity: VelocityFn,
    timesteps: torch.Tensor,
    stop: int,
    ode: bool,
    expert_name: str = "",
    before_step: Callable[[], None] | None = None,
) -> SamplerState:
    """Run steps state.next_step .. stop-1 with one network; returns the advanced state.

    before_step() runs before each step: it may raise to stop the loop there (a cancelled job)."""
    timesteps = timesteps.to(state.x.device)
    x = state.x
    loop_started = time.perf_counter()
    for i in range(state.next_step, stop):
        if before_step is not None:
            before_step()
        started = time.perf_counter()
        t_cur, t_next = timesteps[i], timesteps[i + 1]
        v = velocity(x, t_cur)
        x = rcm_step(x, v, t_cur, t_next, ode, state.generator)
        log.info(
            "step %d/%d (%s expert, t=%.4f): %.2f s",
            i + 1, len(timesteps) - 1, expert_name, t_cur.item(), time.perf_counter() - started,
        )
    if stop > state.next_step:
        log.info("%s expert: %d step(s) in %.2f s",
                 expert_name, stop - state.next_step, time.perf_counter() - loop_started)
    return SamplerState(x=x, generator=state.generator, next_step=max(stop, state.next_step))


def dit_velocity(
    transformer: torch.nn.Module, text: torch.Tensor, y: torch.Tensor, dtype: torch.dtype
) -> VelocityFn:
    """Wrap a diffusers WanTransformer3DModel as velocity(x, t) for one row.

    text: [1, 512, text_dim] and y: [1, 20, lat_t, lat_h, lat_w], both already on the device.
    """

    @torch.no_grad()
    def velocity(x: torch.Tensor, t_cur: torch.Tensor) -> torch.Tensor:
        hidden = torch.cat([x.to(dtype), y.to(dtype)], dim=1)  # [1, 36, lat_t, lat_h, lat_w]
        timestep = network_timestep(t_cur, dtype, x.device)
        out = transformer(
            hidden_states=hidden,
            timestep=timestep,
            encoder_hidden_states=text.to(dtype),
            return_dict=False,
        )[0]
        return out.to(torch.float64)

    return velocity


def sample_single_process(
    high: VelocityFn,
    low: VelocityFn,
    noise_shape: tuple[int, ...],
    seed: int,
    num_steps: int,
    sigma_max: float,
    boundary: float,
    ode: bool,
    device: torch.device | str,
) -> torch.Tensor:
    """The whole loop in one process, as the official script runs it: the reference for the split."""
    t = rcm_timesteps(num_steps, sigma_max)
    state = initial_state(noise_shape, seed, t, device)
    n_high = num_high_steps(t, boundary)
    state = run_steps(state, high, t, n_high, ode, "high")
    state = run_steps(state, low, t, num_steps, ode, "low")
    return state.x
