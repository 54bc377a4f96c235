"""Bad sampler names, options, steps, strength and configs fail with errors that say what and where."""

from __future__ import annotations

import pytest
import torch

from batchgen.noise import item_generators
from batchgen.sampling import SAMPLER_NAMES, get_sampler

SD1 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
           steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon")
FLOW = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0)


def test_every_documented_name_is_accepted():
    expected = {"ddim", "plms", "euler", "euler_a", "heun", "lms", "dpmpp_2m", "dpmpp_2m_sde", "unipc",
                "flow_euler", "euler_karras", "euler_a_karras", "heun_karras", "lms_karras", "dpmpp_2m_karras",
                "dpmpp_2m_sde_karras", "flow_heun", "flow_dpmpp_2m", "lcm", "tcd"}
    assert set(SAMPLER_NAMES) == expected
    for name in SAMPLER_NAMES:
        sampler = get_sampler(name, FLOW if name.startswith("flow_") else SD1, 4)
        assert sampler.timesteps.ndim == 1 and len(sampler.timesteps) >= 4


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_sampler("ddim_karras", SD1, 10)
    msg = str(err.value)
    assert "ddim_karras" in msg
    for name in SAMPLER_NAMES:
        assert name in msg


@pytest.mark.parametrize("name, option, accepted", [
    ("euler", "eta", "it takes: timestep_spacing"),
    ("ddim", "shift", "eta"),
    ("dpmpp_2m_sde_karras", "eta", "it takes: timestep_spacing"),
    ("flow_euler", "timestep_spacing", "shift"),
    ("lcm", "timestep_spacing", "original_inference_steps, timesteps"),
    ("flow_euler", "eta", "shift"),
])
def test_option_the_sampler_does_not_take(name, option, accepted):
    cfg = FLOW if name == "flow_euler" else SD1
    with pytest.raises(ValueError) as err:
        get_sampler(name, cfg, 10, options={option: 1.0})
    msg = str(err.value)
    assert repr(option) in msg and repr(name) in msg and accepted in msg


@pytest.mark.parametrize("options, word", [({"eta": -0.1}, "eta"), ({"eta": "big"}, "eta"), ({"eta": True}, "eta")])
def test_bad_option_values(options, word):
    with pytest.raises(ValueError, match=word):
        get_sampler("ddim", SD1, 10, options=options)
    with pytest.raises(ValueError, match="shift"):
        get_sampler("flow_euler", FLOW, 10, options={"shift": 0})


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "10", 1001])
def test_bad_steps_name_steps(steps):
    with pytest.raises(ValueError, match="steps"):
        get_sampler("euler", SD1, steps)


@pytest.mark.parametrize("name", ["ddim", "heun", "dpmpp_2m", "flow_euler"])
def test_strength_that_leaves_no_step(name):
    # SD img2img keeps int(steps * strength) steps; SD3 (flow) keeps steps - int(steps - steps * strength)
    cfg, strength = (FLOW, 0.0) if name == "flow_euler" else (SD1, 0.05)
    with pytest.raises(ValueError) as err:
        get_sampler(name, cfg, 10, strength=strength)
    assert "strength" in str(err.value) and "steps" in str(err.value)


@pytest.mark.parametrize("strength", [-0.1, 1.5, "0.5"])
def test_strength_out_of_range(strength):
    with pytest.raises(ValueError, match="strength"):
        get_sampler("euler", SD1, 10, strength=strength)


def test_strength_cuts_like_diffusers_img2img():
    full = get_sampler("heun", SD1, 10)
    cut = get_sampler("heun", SD1, 10, strength=0.5)  # int(10 * 0.5) = 5 steps kept, heun order 2
    assert torch.equal(cut.timesteps, full.timesteps[5 * 2:])
    assert len(get_sampler("ddim", SD1, 10, strength=1.0).timesteps) == 10


def test_flow_and_noise_samplers_refuse_each_others_checkpoints():
    with pytest.raises(ValueError, match="flow_euler"):
        get_sampler("euler", FLOW, 10)
    with pytest.raises(ValueError, match="flow-matching"):
        get_sampler("flow_euler", SD1, 10)
    with pytest.raises(ValueError, match="flow_euler"):
        get_sampler("ddim", dict(SD1, prediction_type="flow"), 10)


@pytest.mark.parametrize("key, value, name", [
    ("prediction_type", "sample", "euler"),
    ("timestep_spacing", "sideways", "ddim"),
    ("beta_schedule", "cubic", "dpmpp_2m"),
    ("thresholding", True, "ddim"),
    ("use_exponential_sigmas", True, "euler"),
    ("predict_x0", False, "unipc"),
    ("solver_type", "bh1", "unipc"),
])
def test_unsupported_config_values_are_named(key, value, name):
    with pytest.raises(ValueError) as err:
        get_sampler(name, dict(SD1, **{key: value}), 10)
    assert key in str(err.value) and repr(value) in str(err.value)


def test_config_must_be_a_dict():
    with pytest.raises(ValueError, match="scheduler_config"):
        get_sampler("euler", ["not", "a", "dict"], 10)


def test_generators_must_match_the_batch():
    sampler = get_sampler("euler_a", SD1, 3)
    x = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match="generators"):
        sampler.sample(lambda x_in, t: x_in, x, item_generators([1]))


def test_model_gets_scaled_input_and_float32_timesteps():
    seen = []

    def model(x_in, t):
        seen.append((t.dtype, t.ndim, x_in.abs().max().item()))
        return torch.zeros_like(x_in)

    sampler = get_sampler("euler", SD1, 3)
    x = sampler.initial_latents(torch.ones(1, 4, 8, 8))
    sampler.sample(model, x, item_generators([0]))
    assert all(dtype == torch.float32 and ndim == 0 for dtype, ndim, _ in seen)
    # Euler starts at sigma_max and scales the model input by 1/sqrt(sigma^2 + 1)
    sigma = float(sampler.init_noise_sigma)
    assert sigma > 14 and abs(seen[0][2] - sigma / (sigma**2 + 1) ** 0.5) < 1e-6
