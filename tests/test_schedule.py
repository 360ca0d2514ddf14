"""The rCM schedule and the expert split, against the numbers in docs/reference.md, "The sampler"."""

import pytest
import torch

from turbowan.wan.schedule import expert_for_steps, network_timestep, num_high_steps, rcm_timesteps


def test_four_step_times_for_sigma_max_200():
    t = rcm_timesteps(4, 200)
    assert t.dtype == torch.float64
    expected = torch.tensor([0.99502488, 0.93378106, 0.85289539, 0.60897905, 0.0], dtype=torch.float64)
    torch.testing.assert_close(t, expected, atol=5e-9, rtol=0)


def test_first_time_for_sigma_max_1600():
    assert rcm_timesteps(4, 1600)[0].item() == pytest.approx(0.99937539, abs=5e-9)


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_fewer_steps_take_a_prefix_of_the_angles(steps):
    t = rcm_timesteps(steps, 200)
    assert len(t) == steps + 1
    assert t[-1].item() == 0.0
    torch.testing.assert_close(t[:-1], rcm_timesteps(4, 200)[:steps])


def test_network_sees_bf16_rounded_times():
    t = rcm_timesteps(4, 200)
    seen = [network_timestep(t[i], torch.bfloat16, "cpu") for i in range(4)]
    assert all(s.shape == (1,) and s.dtype == torch.bfloat16 for s in seen)
    assert [s.item() for s in seen] == [996.0, 932.0, 852.0, 608.0]


@pytest.mark.parametrize(
    "steps, experts",
    [(1, ["high"]), (2, ["high", "high"]), (3, ["high", "high", "low"]), (4, ["high", "high", "low", "low"])],
)
def test_expert_assignment_boundary_0_9(steps, experts):
    assert expert_for_steps(steps, 200, 0.9) == experts


def test_boundary_moves_the_switch_and_never_switches_back():
    assert expert_for_steps(4, 200, 0.5) == ["high"] * 4
    assert expert_for_steps(4, 200, 0.99) == ["high", "low", "low", "low"]
    assert expert_for_steps(4, 200, 0.999) == ["low"] * 4
    assert num_high_steps(rcm_timesteps(4, 200), 0.86) == 2


@pytest.mark.parametrize("steps", [0, 5])
def test_step_count_outside_1_to_4_is_refused(steps):
    with pytest.raises(ValueError, match="num_steps"):
        rcm_timesteps(steps, 200)
