"""``sampler_options.timesteps`` for euler, heun, dpmpp_2m(_sde) and flow_euler against diffusers'
``set_timesteps(timesteps=[...])`` of EulerDiscrete / HeunDiscrete / DPMSolverMultistep /
FlowMatchEulerDiscrete (toy denoiser, within 1e-5), the refusals where diffusers raises or has no
list, and one full-pipeline parity run (euler with a list on the tiny SD1, txt2img).

The lcm/tcd side of the option (and the shared validation) is in test_sampling_fewstep.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from batchgen.noise import item_generators, randn_items  # noqa: E402
from batchgen.sampling import get_sampler  # noqa: E402
from tests.test_sampling_parity import FLOW, SD1, SHAPE, compare  # noqa: E402

LIST = [999, 700, 301, 40]  # off any spacing grid: the interpolation between training sigmas counts


@pytest.mark.parametrize("strength", [None, 0.5])
@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "dpmpp_2m_sde"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_timesteps_list_matches_diffusers(name, prediction, strength):
    compare(name, dict(SD1, prediction_type=prediction), steps=len(LIST), strength=strength,
            options={"timesteps": LIST})


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("name", ["euler", "heun"])
def test_spacing_still_sets_the_initial_noise_scale(name, spacing):
    """A list replaces the spacing's timesteps, but Euler/Heun's init_noise_sigma still reads
    timestep_spacing (sqrt(sigma_max^2 + 1) for leading), as in diffusers."""
    compare(name, dict(SD1, prediction_type="epsilon", timestep_spacing=spacing), steps=3,
            options={"timesteps": [980, 500, 3]})


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
def test_final_sigma_min_matches_diffusers(name):
    compare(name, dict(SD1, prediction_type="epsilon", final_sigmas_type="sigma_min"), steps=3,
            options={"timesteps": [900, 450, 10]})


@pytest.mark.parametrize("strength", [None, 0.5])
@pytest.mark.parametrize("options", [{}, {"shift": 1.0}, {"shift": 5.0}])
def test_flow_euler_timesteps_match_diffusers(options, strength):
    """FlowMatchEuler with a list: the model gets the timesteps as given, the sigmas are list/1000
    shifted (so they disagree where shift != 1, as in diffusers, which warns about it)."""
    compare("flow_euler", dict(FLOW), steps=len(LIST), strength=strength, options={"timesteps": LIST, **options})


def test_flow_euler_timesteps_with_dynamic_shift_match_diffusers():
    cfg = dict(FLOW, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    ours = get_sampler("flow_euler", cfg, 3, options={"timesteps": [1000 - 1, 600, 250]}, mu=0.8)
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(cfg)
    sched.set_timesteps(timesteps=[999, 600, 250], mu=0.8)
    assert torch.equal(ours.plan.timesteps, sched.timesteps)
    assert (ours.plan.sigmas - sched.sigmas).abs().max().item() <= 1e-7


def test_schedule_tensors_equal_diffusers():
    """Timesteps bit for bit (Euler/Heun float32, DPM int64) and sigmas to float32 rounding."""
    cfg = dict(SD1, prediction_type="epsilon")
    for name, cls, kwargs in [("euler", diffusers.EulerDiscreteScheduler, {}),
                              ("heun", diffusers.HeunDiscreteScheduler, {}),
                              ("dpmpp_2m", diffusers.DPMSolverMultistepScheduler, {})]:
        sched = cls.from_config(cfg, **kwargs)
        sched.set_timesteps(timesteps=LIST)
        ours = get_sampler(name, cfg, len(LIST), options={"timesteps": LIST})
        assert ours.plan.timesteps.dtype == sched.timesteps.dtype and torch.equal(ours.plan.timesteps, sched.timesteps)
        assert torch.equal(ours.plan.sigmas, sched.sigmas.to(torch.float32)), name


@pytest.mark.parametrize("name,why", [
    ("euler_karras", "Cannot set `timesteps` with `config.use_karras_sigmas = True`"),
    ("heun_karras", "Cannot use `timesteps` with `config.use_karras_sigmas = True`"),
    ("dpmpp_2m_karras", "Cannot use `timesteps` with `config.use_karras_sigmas = True`"),
    ("dpmpp_2m_sde_karras", "Cannot use `timesteps` with `config.use_karras_sigmas = True`"),
])
def test_karras_variants_refuse_as_diffusers_does(name, why):
    cls = {"euler": diffusers.EulerDiscreteScheduler, "heun": diffusers.HeunDiscreteScheduler}.get(
        name.split("_")[0], diffusers.DPMSolverMultistepScheduler)
    with pytest.raises(ValueError, match="Cannot (set|use) `timesteps`"):
        cls.from_config(dict(SD1), use_karras_sigmas=True).set_timesteps(timesteps=[999, 499])
    with pytest.raises(ValueError) as err:
        get_sampler(name, dict(SD1), 2, options={"timesteps": [999, 499]})
    msg = str(err.value)
    assert why in msg and f"use {name.removesuffix('_karras')!r} (the same sampler without Karras sigmas)" in msg


def test_flow_dpm_refuses_a_list_which_diffusers_cannot_take():
    sched = diffusers.DPMSolverMultistepScheduler.from_config(
        dict(FLOW), use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    with pytest.raises(TypeError):
        sched.set_timesteps(timesteps=[999, 499])
    with pytest.raises(ValueError, match=r"fails on a timesteps list\); use one of .*flow_euler"):
        get_sampler("flow_dpmpp_2m", dict(FLOW), 2, options={"timesteps": [999, 499]})


def test_flow_timesteps_with_pipeline_sigmas_are_refused():
    """FLUX.1 / Z-Image pass sigmas; diffusers' retrieve_timesteps takes one of the two."""
    with pytest.raises(ValueError, match="passes explicit sigmas .* not both"):
        get_sampler("flow_euler", dict(FLOW), 2, options={"timesteps": [999, 499]}, sigmas=np.linspace(1, 0.5, 2))


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "flow_euler"])
@pytest.mark.parametrize("options,match", [
    ({"timesteps": [999, 999]}, "strictly descending"),
    ({"timesteps": [1000, 500]}, "not below the checkpoint's num_train_timesteps"),
    ({"timesteps": [999, 499.5]}, "expected an integer >= 0, got 499.5"),
    ({"timesteps": [999]}, "1 timesteps for steps=2; set steps=1"),
])
def test_same_validation_as_lcm(name, options, match):
    cfg = dict(FLOW) if name.startswith("flow") else dict(SD1)
    with pytest.raises(ValueError, match=match):
        get_sampler(name, cfg, 2, options=options)


def test_items_do_not_depend_on_batch_mates():
    """dpmpp_2m_sde draws per-item noise each step: an item alone == the same item in a batch."""
    cfg = dict(SD1, prediction_type="epsilon")
    noise = randn_items(item_generators([1, 2, 3]), SHAPE)
    sampler = get_sampler("dpmpp_2m_sde", cfg, 3, options={"timesteps": [999, 500, 100]})

    def model(x, t):
        return x * 0.9 + 0.01 * float(t) / 1000

    full = sampler.sample(model, sampler.initial_latents(noise), item_generators([1, 2, 3]))
    alone = sampler.sample(model, sampler.initial_latents(noise[1:2]), item_generators([2]))
    assert torch.equal(full[1:2], alone)
