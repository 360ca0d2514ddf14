"""Progress a person can follow in a job log: what is loaded, how big, how fast; step timings."""

import logging
import re

import torch

from turbowan.wan.models import load_transformer, load_vae
from turbowan.wan.sampler import SamplerState, make_generator, run_steps
from turbowan.wan.schedule import rcm_timesteps


def test_model_loads_say_what_size_and_speed(demo_models, caplog):
    caplog.set_level(logging.INFO, logger="turbowan")
    load_transformer(demo_models["high"], torch.device("cpu"))
    load_vae(demo_models["vae"], torch.device("cpu"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("loading ", "loaded "))]
    high, vae = re.escape(demo_models["high"]), re.escape(demo_models["vae"])
    assert re.fullmatch(rf"loading expert {high} \(0\.\d\d GB\) onto cpu", lines[0])
    took = r"in \d+\.\d s \(\d+\.\d\d GB/s\); host RSS \d+\.\d\d GB \(peak \d+\.\d\d GB\)"
    assert re.fullmatch(rf"loaded expert {high}: .* {took}", lines[1])
    assert re.fullmatch(rf"loading VAE {vae} \(0\.\d\d GB\) onto cpu", lines[2])
    assert re.fullmatch(rf"loaded VAE {vae}: .* {took}", lines[3])


def test_sampling_logs_each_step_and_the_expert_total(caplog):
    caplog.set_level(logging.INFO, logger="turbowan")
    t = rcm_timesteps(4, 200.0)
    state = SamplerState(torch.zeros(1, 2, 1, 2, 2, dtype=torch.float64), make_generator(0, "cpu"), 0)
    run_steps(state, lambda x, t_cur: torch.zeros_like(x), t, 2, ode=True, expert_name="high")
    lines = [r.getMessage() for r in caplog.records]
    assert re.fullmatch(r"step 1/4 \(high expert, t=0\.9950\): \d+\.\d\d s", lines[0])
    assert lines[1].startswith("step 2/4 (high expert, t=0.9338)")
    assert re.fullmatch(r"high expert: 2 step\(s\) in \d+\.\d\d s", lines[2])
