"""Flow-matching samplers (SD3/SD3.5, FLUX.1) against the diffusers schedulers they name: bitwise.

Each case runs diffusers' scheduler the way its pipeline does (StableDiffusion3Pipeline:
``set_timesteps(steps)``; FluxPipeline: ``set_timesteps(sigmas=linspace(1, 1/steps, steps), mu=mu)``,
or ``set_timesteps(steps, mu=mu)`` for a ``use_flow_sigmas`` DPM-Solver; the img2img pipelines cut
the schedule at ``t_start * order``, call ``set_begin_index`` and noise with ``scale_noise``) and
our sampler built by ``get_sampler`` with the same arguments, over the same deterministic toy
velocity model from the same noise. The timesteps the model gets must be equal, and so must every
model input and the final latents, bit for bit (float32 and float16).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from batchgen.noise import item_generators, randn_items  # noqa: E402
from batchgen.sampling import FLOW_SAMPLER_NAMES, SAMPLER_NAMES, flux_mu, get_sampler  # noqa: E402
from tests.diffusers_reference import FLOW_SHIFT_FROM, REFERENCE  # noqa: E402

SHAPE = (4, 8, 8)
SEEDS = [3, 2**62 + 9, 40]
STEPS = 8
PATTERN = torch.linspace(-1.0, 1.0, 4 * 8 * 8).reshape(SHAPE)

SD3 = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0)
FLUX_DEV = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0,
                use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                max_image_seq_len=4096, time_shift_type="exponential")
FLUX_SCHNELL = dict(FLUX_DEV, shift=1.0, use_dynamic_shifting=False)
SD1 = dict(_class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
           num_train_timesteps=1000, prediction_type="epsilon")
# FLUX image sizes (height, width) -> image_seq_len = packed 2x2 patches of the 8x latent
SIZES = [(512, 512), (768, 1024)]


def flux_seq_len(height: int, width: int) -> int:
    return (height // 8 // 2) * (width // 8 // 2)


def flux_sigmas(steps: int) -> np.ndarray:
    return np.linspace(1.0, 1 / steps, steps)  # what FluxPipeline passes


class ToyVelocity:
    """A deterministic elementwise function of (x, t) that records every call (t and x exactly)."""

    def __init__(self):
        self.calls: list[tuple[float, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        tf = torch.as_tensor(t).to(torch.float32)
        self.calls.append((float(tf), x.clone()))
        out = x.float() * (0.9 + 0.1 * torch.cos(tf / 300)) - 0.3 * torch.sin(tf / 150 + 3 * PATTERN)
        return out.to(x.dtype)


def diffusers_scheduler(name, cfg, options):
    cls_name, kwargs = REFERENCE[name]
    kwargs = dict(kwargs)
    kwargs[FLOW_SHIFT_FROM[name]] = options.get("shift", cfg.get("shift", 1.0))
    return getattr(diffusers, cls_name).from_config(cfg, **kwargs)


def run_diffusers(name, cfg, steps, strength, noise, clean, options, sigmas, mu):
    sched = diffusers_scheduler(name, cfg, options)
    kwargs = {} if mu is None else {"mu": mu}
    if sigmas is not None:  # FluxPipeline's retrieve_timesteps: the step count comes from len(sigmas)
        sched.set_timesteps(sigmas=sigmas, **kwargs)
    else:
        sched.set_timesteps(steps, **kwargs)
    full = sched.timesteps.clone()
    if strength is None:
        timesteps, latents = sched.timesteps, noise.clone()
    else:  # StableDiffusion3Img2ImgPipeline / FluxImg2ImgPipeline get_timesteps + prepare_latents
        t_start = int(max(steps - min(steps * strength, steps), 0))
        timesteps = sched.timesteps[t_start * sched.order:]
        sched.set_begin_index(t_start * sched.order)
        first = timesteps[:1].repeat(noise.shape[0])
        if hasattr(sched, "scale_noise"):
            latents = sched.scale_noise(clean, first, noise)
        else:  # DPMSolverMultistep has no scale_noise: its add_noise on flow sigmas is the same forward process
            latents = sched.add_noise(clean, noise, first)
    start = latents.clone()
    model = ToyVelocity()
    for t in timesteps:
        out = model(latents, t)
        latents = sched.step(out, t, latents).prev_sample
    return full, start, latents, model.calls


def run_ours(name, cfg, steps, strength, noise, clean, options, sigmas, mu):
    sampler = get_sampler(name, cfg, steps, strength=strength, options=options, sigmas=sigmas, mu=mu)
    start = sampler.initial_latents(noise) if strength is None else sampler.noised_latents(clean, noise)
    model = ToyVelocity()
    seen = []
    latents = sampler.sample(model, start.clone(), item_generators(SEEDS), callback=lambda i, n: seen.append((i, n)))
    assert seen == [(i, len(sampler.timesteps)) for i in range(len(sampler.timesteps))]
    assert [t for t, _ in model.calls] == [float(t) for t in sampler.timesteps]
    return sampler, start, latents, model.calls


def compare(name, cfg, steps=STEPS, strength=None, options=None, sigmas=None, mu=None, dtype=torch.float32):
    options = options or {}
    noise = randn_items(item_generators([s + 1000 for s in SEEDS]), SHAPE).to(dtype)
    clean = (randn_items(item_generators([5, 6, 7]), SHAPE) * 0.8).to(dtype)
    full, ref_start, ref, ref_calls = run_diffusers(name, cfg, steps, strength, noise, clean, options, sigmas, mu)
    sampler, start, ours, calls = run_ours(name, cfg, steps, strength, noise, clean, options, sigmas, mu)
    # the whole schedule, not only the part img2img runs
    assert sampler.plan.timesteps.dtype == full.dtype and torch.equal(sampler.plan.timesteps, full), name
    assert start.dtype == ref_start.dtype == dtype and torch.equal(start, ref_start), f"{name}: starting latents"
    assert len(calls) == len(ref_calls), f"{name}: {len(calls)} model calls, diffusers made {len(ref_calls)}"
    for k, ((t, x_in), (rt, rx_in)) in enumerate(zip(calls, ref_calls)):
        assert t == rt, f"{name}: call {k} timestep {t} != diffusers {rt}"
        assert torch.equal(x_in, rx_in), f"{name}: call {k} model input off by {(x_in - rx_in).abs().max()}"
    assert ours.dtype == ref.dtype == dtype
    assert torch.isfinite(ref).all() and ref.float().abs().max() > 0.05, f"{name}: degenerate reference"
    assert torch.equal(ours, ref), f"{name}: final latents off by {(ours.float() - ref.float()).abs().max()}"
    return sampler


# --- SD3 / SD3.5: set_timesteps(steps) ------------------------------------------------------------


@pytest.mark.parametrize("strength", [None, 0.6, 1.0])
@pytest.mark.parametrize("name", FLOW_SAMPLER_NAMES)
def test_sd3_matches_diffusers(name, strength):
    compare(name, SD3, strength=strength)


@pytest.mark.parametrize("strength", [None, 0.45])
@pytest.mark.parametrize("name", FLOW_SAMPLER_NAMES)
def test_shift_option_matches_diffusers(name, strength):
    compare(name, SD3, strength=strength, options={"shift": 2.0})


@pytest.mark.parametrize("strength", [None, 0.6])
@pytest.mark.parametrize("name", FLOW_SAMPLER_NAMES)
def test_float16_is_bitwise(name, strength):
    compare(name, SD3, strength=strength, dtype=torch.float16)


@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("name", ["flow_heun", "flow_dpmpp_2m"])
def test_few_steps_match_diffusers(name, steps):
    compare(name, SD3, steps=steps)


def test_many_steps_dpm_keeps_second_order_to_the_end():
    """From 15 steps on, DPM-Solver++ no longer lowers the order at the last steps (lower_order_final)."""
    compare("flow_dpmpp_2m", SD3, steps=16, strength=0.9)


def test_heun_schedule_and_img2img_begin():
    """Heun: every inner sigma twice (2 * steps - 1 calls); img2img starts on a predictor at t_start * 2."""
    full = get_sampler("flow_heun", SD3, 5)
    assert len(full.timesteps) == 9 and torch.equal(full.timesteps[1::2], full.timesteps[2::2])
    cut = get_sampler("flow_heun", SD3, 5, strength=0.6)  # t_start = int(5 - 3.0) = 2
    assert cut.plan.begin == 4 and torch.equal(cut.timesteps, full.timesteps[4:])


# --- FLUX.1-dev: dynamic shifting, set_timesteps(sigmas=..., mu=...) ---------------------------------


@pytest.mark.parametrize("strength", [None, 0.7])
@pytest.mark.parametrize("size", SIZES)
def test_flux_dev_euler_matches_diffusers(size, strength):
    mu = flux_mu(flux_seq_len(*size), FLUX_DEV)
    compare("flow_euler", FLUX_DEV, strength=strength, sigmas=flux_sigmas(STEPS), mu=mu)


@pytest.mark.parametrize("size", SIZES)
def test_flux_dev_linear_time_shift_matches_diffusers(size):
    cfg = dict(FLUX_DEV, time_shift_type="linear")
    compare("flow_euler", cfg, strength=0.8, sigmas=flux_sigmas(STEPS), mu=flux_mu(flux_seq_len(*size), cfg))


def test_dynamic_shift_without_sigmas_matches_diffusers():
    """A dynamically shifted config driven like SD3 (steps + mu, no sigmas): the other set_timesteps path."""
    compare("flow_euler", FLUX_DEV, mu=flux_mu(4096, FLUX_DEV))


@pytest.mark.parametrize("strength", [None, 0.7])
@pytest.mark.parametrize("size", SIZES)
def test_flux_dev_dpm_matches_diffusers(size, strength):
    """FluxPipeline drops sigmas for a use_flow_sigmas scheduler: set_timesteps(steps, mu=mu), flow_shift = exp(mu)."""
    compare("flow_dpmpp_2m", FLUX_DEV, strength=strength, mu=flux_mu(flux_seq_len(*size), FLUX_DEV))


def test_flux_dev_float16_is_bitwise():
    mu = flux_mu(flux_seq_len(*SIZES[1]), FLUX_DEV)
    compare("flow_euler", FLUX_DEV, strength=0.5, sigmas=flux_sigmas(STEPS), mu=mu, dtype=torch.float16)
    compare("flow_dpmpp_2m", FLUX_DEV, strength=0.5, mu=mu, dtype=torch.float16)


def test_mu_changes_the_schedule():
    small, large = (get_sampler("flow_euler", FLUX_DEV, 4, sigmas=flux_sigmas(4), mu=flux_mu(n, FLUX_DEV))
                    for n in (1024, 4096))
    assert (large.plan.sigmas[1:-1] > small.plan.sigmas[1:-1]).all()  # bigger images: more time at high noise


# --- FLUX.1-schnell: shift 1, no dynamic shifting, explicit sigmas ------------------------------------


@pytest.mark.parametrize("strength", [None, 0.75])
@pytest.mark.parametrize("steps", [1, 4])
def test_flux_schnell_euler_matches_diffusers(steps, strength):
    compare("flow_euler", FLUX_SCHNELL, steps=steps, strength=strength, sigmas=flux_sigmas(steps))


@pytest.mark.parametrize("strength", [None, 0.75])
@pytest.mark.parametrize("name", ["flow_heun", "flow_dpmpp_2m"])
def test_flux_schnell_without_sigmas_matches_diffusers(name, strength):
    """Their diffusers schedulers take no sigmas: on schnell's config they run set_timesteps(steps)."""
    compare(name, FLUX_SCHNELL, steps=4, strength=strength)


def test_sigmas_accepted_exactly_where_diffusers_accepts_them():
    """get_sampler takes sigmas / mu for a flow sampler iff its diffusers scheduler's set_timesteps does."""
    for name in FLOW_SAMPLER_NAMES:
        params = inspect.signature(getattr(diffusers, REFERENCE[name][0]).set_timesteps).parameters
        for arg, cfg, value in (("sigmas", FLUX_SCHNELL, flux_sigmas(4)), ("mu", FLUX_DEV, 0.9)):
            if name == "flow_heun" and arg == "mu":
                cfg = SD3  # flow_heun refuses FLUX_DEV itself (use_dynamic_shifting)
            if arg in params:
                get_sampler(name, cfg, 4, **{arg: value})
            else:
                with pytest.raises(ValueError, match=arg):
                    get_sampler(name, cfg, 4, **{arg: value})


# --- flux_mu ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [FLUX_DEV, {}, dict(base_image_seq_len=64, max_image_seq_len=1024, base_shift=0.3,
                                                     max_shift=2.0)])
def test_flux_mu_equals_calculate_shift(cfg):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for seq in (1, 256, 1024, 3072, 4080, 4096, 16384):
        ref = calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                              cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        assert flux_mu(seq, cfg) == ref and isinstance(flux_mu(seq, cfg), float)


@pytest.mark.parametrize("seq, cfg, word", [
    (0, FLUX_DEV, "image_seq_len"), (1024.0, FLUX_DEV, "image_seq_len"), (True, FLUX_DEV, "image_seq_len"),
    (1024, dict(FLUX_DEV, base_shift=None), "base_shift"), (1024, dict(FLUX_DEV, max_shift="big"), "max_shift"),
    (1024, dict(FLUX_DEV, max_image_seq_len=256), "max_image_seq_len"), (1024, [1], "scheduler_config"),
])
def test_flux_mu_errors(seq, cfg, word):
    with pytest.raises(ValueError, match=word):
        flux_mu(seq, cfg)


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in SAMPLER_NAMES if n not in FLOW_SAMPLER_NAMES])
def test_noise_samplers_refuse_flow_checkpoints(name):
    for cfg in (SD3, FLUX_DEV):
        with pytest.raises(ValueError) as err:
            get_sampler(name, cfg, 10)
        msg = str(err.value)
        assert repr(name) in msg and "FlowMatchEulerDiscreteScheduler" in msg and "flow_heun" in msg


@pytest.mark.parametrize("name", FLOW_SAMPLER_NAMES)
def test_flow_samplers_refuse_noise_checkpoints(name):
    with pytest.raises(ValueError) as err:
        get_sampler(name, SD1, 10)
    msg = str(err.value)
    assert repr(name) in msg and "PNDMScheduler" in msg and "'epsilon'" in msg
    with pytest.raises(ValueError, match="v_prediction"):
        get_sampler(name, dict(beta_schedule="linear", prediction_type="v_prediction"), 10)


@pytest.mark.parametrize("cfg", [dict(SD1, prediction_type="flow_prediction"),
                                 dict(SD1, _class_name="DPMSolverMultistepScheduler", use_flow_sigmas=True)])
def test_dpm_flow_configs_are_flow_but_refused(cfg):
    with pytest.raises(ValueError, match="flow-matching"):
        get_sampler("dpmpp_2m", cfg, 10)
    if cfg.get("use_flow_sigmas"):
        with pytest.raises(ValueError, match="use_flow_sigmas"):
            get_sampler("flow_dpmpp_2m", cfg, 10)


@pytest.mark.parametrize("name", ["flow_euler", "flow_dpmpp_2m"])
def test_dynamic_shifting_needs_mu(name):
    with pytest.raises(ValueError) as err:
        get_sampler(name, FLUX_DEV, 10)
    assert "mu" in str(err.value) and "use_dynamic_shifting" in str(err.value)


@pytest.mark.parametrize("name", ["flow_euler", "flow_dpmpp_2m"])
@pytest.mark.parametrize("cfg", [SD3, FLUX_SCHNELL])
def test_mu_without_dynamic_shifting_is_an_error(name, cfg):
    with pytest.raises(ValueError) as err:
        get_sampler(name, cfg, 10, mu=0.8)
    assert "mu" in str(err.value) and "use_dynamic_shifting" in str(err.value)


def test_heun_refuses_dynamic_shifting():
    with pytest.raises(ValueError) as err:
        get_sampler("flow_heun", FLUX_DEV, 10)
    assert "use_dynamic_shifting=True" in str(err.value) and "FlowMatchHeunDiscreteScheduler" in str(err.value)


@pytest.mark.parametrize("name, arg, value, words", [
    ("flow_heun", "sigmas", flux_sigmas(10), ["sigmas", "FlowMatchHeunDiscreteScheduler", "flow_euler"]),
    ("flow_heun", "mu", 1.0, ["mu", "FlowMatchHeunDiscreteScheduler"]),
    ("flow_dpmpp_2m", "sigmas", flux_sigmas(10), ["sigmas", "DPMSolverMultistepScheduler", "sigmas=None"]),
    ("euler", "sigmas", flux_sigmas(10), ["sigmas", "'euler'", "flow_euler"]),
    ("dpmpp_2m", "mu", 1.0, ["mu", "'dpmpp_2m'"]),
])
def test_schedule_args_the_sampler_does_not_take(name, arg, value, words):
    cfg = SD1 if name in ("euler", "dpmpp_2m") else FLUX_SCHNELL
    with pytest.raises(ValueError) as err:
        get_sampler(name, cfg, 10, **{arg: value})
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("sigmas, word", [
    (flux_sigmas(9), "9 values"), ([1.0, 0.5, 0.0] + [0.1] * 7, "(0, 1]"), ([2.0] + [0.5] * 9, "(0, 1]"),
    ([float("nan")] * 10, "(0, 1]"), ("1.0", "1-d"), (np.ones((2, 5)), "1-d"), (3.0, "1-d"),
])
def test_bad_sigmas(sigmas, word):
    with pytest.raises(ValueError) as err:
        get_sampler("flow_euler", FLUX_SCHNELL, 10, sigmas=sigmas)
    assert "sigmas" in str(err.value) and word in str(err.value)


@pytest.mark.parametrize("mu", ["0.5", True, float("inf"), [1.0]])
def test_bad_mu(mu):
    with pytest.raises(ValueError, match="mu"):
        get_sampler("flow_euler", FLUX_DEV, 10, sigmas=flux_sigmas(10), mu=mu)


@pytest.mark.parametrize("key, value, names", [
    ("invert_sigmas", True, FLOW_SAMPLER_NAMES),
    ("shift_terminal", 0.1, FLOW_SAMPLER_NAMES),
    ("stochastic_sampling", True, FLOW_SAMPLER_NAMES),
    ("use_karras_sigmas", True, FLOW_SAMPLER_NAMES),
    ("use_exponential_sigmas", True, FLOW_SAMPLER_NAMES),
    ("use_beta_sigmas", True, FLOW_SAMPLER_NAMES),
    ("use_lu_lambdas", True, ["flow_dpmpp_2m"]),
    ("thresholding", True, ["flow_dpmpp_2m"]),
    ("final_sigmas_type", "sigma_min", ["flow_dpmpp_2m"]),
    ("time_shift_type", "cubic", ["flow_euler", "flow_dpmpp_2m"]),
    ("shift", 0, FLOW_SAMPLER_NAMES),
])
def test_unsupported_flow_config_values_are_named(key, value, names):
    for name in names:
        with pytest.raises(ValueError) as err:
            get_sampler(name, dict(SD3, **{key: value}), 10)
        assert key in str(err.value) and repr(value) in str(err.value), name


def test_dpm_refuses_linear_dynamic_shift():
    cfg = dict(FLUX_DEV, time_shift_type="linear")
    with pytest.raises(ValueError) as err:
        get_sampler("flow_dpmpp_2m", cfg, 10, mu=0.9)
    assert "time_shift_type" in str(err.value) and "'linear'" in str(err.value)


@pytest.mark.parametrize("name", ["flow_euler", "flow_dpmpp_2m"])
def test_shift_option_with_dynamic_shifting_is_an_error(name):
    with pytest.raises(ValueError, match="shift"):
        get_sampler(name, FLUX_DEV, 10, mu=0.9, options={"shift": 2.0})


@pytest.mark.parametrize("name", FLOW_SAMPLER_NAMES)
def test_flow_strength_that_leaves_no_step(name):
    with pytest.raises(ValueError) as err:
        get_sampler(name, SD3, 10, strength=0.0)
    assert "strength" in str(err.value) and "steps" in str(err.value)
