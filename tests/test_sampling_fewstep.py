"""The few-step samplers `lcm` and `tcd` against diffusers' LCMScheduler / TCDScheduler, their
options (TCD's eta, LCM's original_inference_steps, explicit timesteps) and their refusals.

The toy-denoiser loops come from test_sampling_parity (same model calls, same latents within
1e-5); full-pipeline parity for every sampler name is in test_pipeline_parity / test_family_sdxl.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from batchgen.noise import item_generators, randn_items  # noqa: E402
from batchgen.sampling import get_sampler  # noqa: E402
from tests.test_sampling_parity import SD1, SEEDS, SHAPE, TOL, ToyDenoiser  # noqa: E402

CLASSES = {"lcm": diffusers.LCMScheduler, "tcd": diffusers.TCDScheduler}


def _reference(name, cfg, steps, strength, noise, clean, options):
    """diffusers' scheduler as StableDiffusion(Img2Img)Pipeline drives it (retrieve_timesteps,
    get_timesteps, add_noise, step with the item generators and the pipeline's eta)."""
    sched = CLASSES[name].from_config(cfg)
    if options.get("timesteps") is not None:
        sched.set_timesteps(timesteps=list(options["timesteps"]))
        steps = len(sched.timesteps)
    else:
        sched.set_timesteps(steps, original_inference_steps=options.get("original_inference_steps"))
    timesteps = sched.timesteps
    if strength is None:
        latents = noise * sched.init_noise_sigma
    else:
        t_start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = timesteps[t_start:]
        sched.set_begin_index(t_start)
        latents = sched.add_noise(clean, noise, timesteps[:1].repeat(noise.shape[0]))
    start, model, gens = latents.clone(), ToyDenoiser(), item_generators(SEEDS)
    kwargs = {"eta": options.get("eta", 0.3)} if "eta" in inspect.signature(sched.step).parameters else {}
    for t in timesteps:
        latents = sched.step(model(sched.scale_model_input(latents, t), t), t, latents, generator=gens,
                             **kwargs).prev_sample
    return start, latents, model.calls


def _compare(name, cfg=None, steps=4, strength=None, options=None):
    cfg = dict(SD1, prediction_type="epsilon") if cfg is None else cfg
    options = options or {}
    noise = randn_items(item_generators([s + 1000 for s in SEEDS]), SHAPE)
    clean = randn_items(item_generators([5, 6, 7]), SHAPE) * 0.8
    ref_start, ref, ref_calls = _reference(name, cfg, steps, strength, noise, clean, options)
    sampler = get_sampler(name, cfg, steps, strength=strength, options=options)
    start = sampler.initial_latents(noise) if strength is None else sampler.noised_latents(clean, noise)
    model = ToyDenoiser()
    ours = sampler.sample(model, start.clone(), item_generators(SEEDS))
    assert (start - ref_start).abs().max().item() <= TOL
    assert [t for t, _ in model.calls] == [t for t, _ in ref_calls]
    for (_, x_in), (_, rx_in) in zip(model.calls, ref_calls):
        assert (x_in - rx_in).abs().max().item() <= TOL
    assert ref.abs().max() > 0.05
    assert (ours - ref).abs().max().item() <= TOL
    return sampler, ours


@pytest.mark.parametrize("strength", [None, 0.6])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_tcd_eta_matches_diffusers(eta, strength):
    _compare("tcd", strength=strength, options={"eta": eta})


@pytest.mark.parametrize("steps", [1, 2, 3, 8])
@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_few_steps_match_diffusers(name, steps):
    sampler, _ = _compare(name, steps=steps)
    assert sampler.timesteps[0] == 999  # the grid's top: (50 * 20) - 1


@pytest.mark.parametrize("strength", [None, 0.5])
def test_lcm_original_inference_steps_matches_diffusers(strength):
    """LatentConsistencyModelPipeline passes original_inference_steps to set_timesteps; so does the option."""
    sampler, _ = _compare("lcm", steps=4, strength=strength, options={"original_inference_steps": 100})
    default = get_sampler("lcm", dict(SD1), 4)
    assert sampler.plan.timesteps.tolist() == [999, 749, 499, 249] != default.plan.timesteps.tolist()


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_config_keys_match_diffusers(name):
    """v-prediction, a 500-step grid, another timestep_scaling, clipping: the config is read like diffusers."""
    cfg = dict(SD1, prediction_type="v_prediction", original_inference_steps=25, timestep_scaling=4.0,
               clip_sample=True, clip_sample_range=0.5, beta_schedule="linear", timestep_spacing="trailing")
    _compare(name, cfg=cfg, steps=3)
    _compare(name, cfg=cfg, steps=5, strength=0.7)


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_items_do_not_depend_on_batch_mates(name):
    sampler = get_sampler(name, dict(SD1), 4, options={"eta": 0.5} if name == "tcd" else {})
    seeds = [3, 99, 2**40]

    def render(item_seeds, step_seeds=None):
        noise = randn_items(item_generators(item_seeds), SHAPE)
        return sampler.sample(ToyDenoiser(), sampler.initial_latents(noise), item_generators(step_seeds or item_seeds))

    batch = render(seeds)
    for pos, seed in enumerate(seeds):
        assert torch.equal(render([seed])[0], batch[pos])
    assert not torch.equal(render([seeds[0]], step_seeds=[seeds[0] + 1])[0], batch[0])


def test_tcd_without_eta_draws_no_step_noise():
    sampler = get_sampler("tcd", dict(SD1), 4, options={"eta": 0.0})
    noise = randn_items(item_generators([1]), SHAPE)
    a = sampler.sample(ToyDenoiser(), noise, item_generators([1]))
    b = sampler.sample(ToyDenoiser(), noise, item_generators([2]))
    assert torch.equal(a, b)


@pytest.mark.parametrize("name,options,match", [
    ("tcd", {"eta": 1.5}, r"gamma must be in \[0, 1\]"),
    ("tcd", {"eta": -0.1}, "must be >= 0"),
    ("lcm", {"eta": 0.3}, "not accepted by sampler 'lcm'"),
    ("lcm", {"original_inference_steps": 0}, "expected an integer >= 1"),
    ("lcm", {"original_inference_steps": 2}, "steps: 4 is more than original_inference_steps=2"),
    ("tcd", {"original_inference_steps": 20}, "not accepted by sampler 'tcd'"),
])
def test_bad_options_are_refused(name, options, match):
    with pytest.raises(ValueError, match=match):
        get_sampler(name, dict(SD1), 4, options=options)


def test_flow_config_is_refused():
    flow = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0)
    with pytest.raises(ValueError, match="needs a noise/v-prediction checkpoint"):
        get_sampler("lcm", flow, 4)


def test_timesteps_are_on_the_distillation_grid():
    ts = get_sampler("lcm", dict(SD1), 4).plan.timesteps.numpy()
    assert ts.tolist() == [999, 759, 499, 259] and np.all(ts % 20 == 19)


# --- explicit timesteps (sampler_options.timesteps) ------------------------------------------------


@pytest.mark.parametrize("strength", [None, 0.5, 0.8])
@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_explicit_timesteps_match_diffusers(name, strength):
    """DMD2's schedule: set_timesteps(timesteps=[999, 749, 499, 249]); img2img cuts it like get_timesteps."""
    sampler, _ = _compare(name, steps=4, strength=strength, options={"timesteps": [999, 749, 499, 249]})
    assert sampler.plan.timesteps.tolist() == [999, 749, 499, 249]


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_timesteps_off_the_grid_and_small_scaling_match_diffusers(name):
    """Timesteps near 0 with timestep_scaling 1: LCM's boundary scalings c_skip/c_out really act."""
    cfg = dict(SD1, prediction_type="epsilon", timestep_scaling=1.0)
    _compare(name, cfg=cfg, steps=4, options={"timesteps": [999, 500, 20, 3]})


@pytest.mark.parametrize("options,match", [
    ({"timesteps": [999, 999, 499]}, r"strictly descending, but timesteps\[1\]=999 follows 999"),
    ({"timesteps": [249, 499, 749]}, "strictly descending"),
    ({"timesteps": [1000, 500, 10]}, "first timestep 1000 is not below the checkpoint's num_train_timesteps"),
    ({"timesteps": [999, 499.5, 10]}, r"timesteps'\[1\] of 'lcm': expected an integer >= 0, got 499.5"),
    ({"timesteps": [999, 10, -1]}, "expected an integer >= 0, got -1"),
    ({"timesteps": []}, "expected a non-empty list"),
    ({"timesteps": "999,499"}, "expected a non-empty list"),
    ({"timesteps": [999, 499]}, r"2 timesteps for steps=3; set steps=2"),
    ({"timesteps": [999, 499, 9], "original_inference_steps": 4}, "has no effect with an explicit timesteps"),
])
def test_bad_timesteps_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        get_sampler("lcm", dict(SD1), 3, options=options)


def test_integral_floats_are_timesteps():
    """A JSON job spec may carry 999.0: an integral float is that integer."""
    assert get_sampler("tcd", dict(SD1), 2, options={"timesteps": [999.0, 499]}).plan.timesteps.tolist() == [999, 499]


@pytest.mark.parametrize("name,why", [
    ("ddim", "its diffusers scheduler's set_timesteps takes no timesteps list"),
    ("euler_a", "its diffusers scheduler's set_timesteps takes no timesteps list"),
    ("unipc", "its diffusers scheduler's set_timesteps takes no timesteps list"),
    ("flow_heun", "its diffusers scheduler's set_timesteps takes no timesteps list"),
    ("flow_dpmpp_2m", "use_flow_sigmas=True) computes its flow sigmas from the step count"),
])
def test_timesteps_refused_by_other_samplers_naming_them(name, why):
    """lcm, tcd, euler, heun, dpmpp_2m(_sde) and flow_euler take a list (test_sampling_timesteps;
    the Karras variants are refused there, as diffusers refuses them)."""
    cfg = dict(_class_name="FlowMatchEulerDiscreteScheduler", shift=3.0) if name.startswith("flow") else dict(SD1)
    with pytest.raises(ValueError, match=f"sampler option 'timesteps' is not accepted by sampler '{name}'") as err:
        get_sampler(name, cfg, 2, options={"timesteps": [999, 499]})
    assert why in str(err.value)
    assert "use one of euler, heun, dpmpp_2m, dpmpp_2m_sde, lcm, tcd, flow_euler" in str(err.value)


# --- sampler_options.timestep_spacing ---------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["trailing", "linspace", "leading"])
@pytest.mark.parametrize("name", ["ddim", "plms", "euler", "euler_a_karras", "heun", "lms", "dpmpp_2m", "unipc"])
def test_spacing_option_equals_the_config_key(name, spacing):
    """from_config(config, timestep_spacing=X): the option gives the schedule a config with that key
    gives (whose parity with diffusers test_sampling_parity checks)."""
    leading = dict(SD1, prediction_type="epsilon", timestep_spacing="leading")
    ours = get_sampler(name, leading, 4, strength=0.75, options={"timestep_spacing": spacing})
    ref = get_sampler(name, dict(leading, timestep_spacing=spacing), 4, strength=0.75)
    assert torch.equal(ours.plan.timesteps, ref.plan.timesteps) and ours.plan.begin == ref.plan.begin
    for key in ("sigmas", "alphas_cumprod"):
        a, b = getattr(ours.plan, key), getattr(ref.plan, key)
        assert (a is None and b is None) or torch.equal(a, b)
    assert float(ours.init_noise_sigma) == float(ref.init_noise_sigma)


@pytest.mark.parametrize("name,value,match", [
    ("euler", "trailng", "expected one of leading, trailing, linspace, got 'trailng'"),
    ("lcm", "trailing", "not accepted by sampler 'lcm'"),
    ("flow_euler", "trailing", "not accepted by sampler 'flow_euler'"),
])
def test_bad_spacing_option(name, value, match):
    cfg = dict(_class_name="FlowMatchEulerDiscreteScheduler", shift=3.0) if name.startswith("flow") else dict(SD1)
    with pytest.raises(ValueError, match=match):
        get_sampler(name, cfg, 4, options={"timestep_spacing": value})
