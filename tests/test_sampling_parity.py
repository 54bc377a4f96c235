"""Every sampler against the diffusers scheduler it names: same model calls, same latents (1e-5).

Both loops run the same deterministic toy denoiser from the same per-item noise; we record what
the denoiser receives at every call (timestep exactly, scaled input within 1e-5) and compare the
final latents. diffusers is only the reference here.
"""

from __future__ import annotations

import inspect

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from batchgen.noise import item_generators, randn_items  # noqa: E402
from batchgen.sampling import SAMPLER_NAMES, get_sampler  # noqa: E402
from tests.diffusers_reference import REFERENCE  # noqa: E402

TOL = 1e-5
SHAPE = (4, 8, 8)
SEEDS = [11, 2**62 + 5, 7]
STEPS = 10

SD1 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
           steps_offset=1, set_alpha_to_one=False, clip_sample=False, skip_prk_steps=True,
           _class_name="PNDMScheduler")
FLOW = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0)

NOISE_SAMPLERS = [n for n in SAMPLER_NAMES if not n.startswith("flow_")]  # flow ones: test_sampling_flow.py
PATTERN = torch.linspace(-1.0, 1.0, 4 * 8 * 8).reshape(SHAPE)


class ToyDenoiser:
    """A deterministic elementwise function of (x_in, t) that records every call."""

    def __init__(self):
        self.calls: list[tuple[float, torch.Tensor]] = []

    def __call__(self, x_in: torch.Tensor, t) -> torch.Tensor:
        tf = torch.as_tensor(t).to(torch.float32)
        self.calls.append((float(tf), x_in.clone()))
        out = x_in.float() * (0.85 + 0.1 * torch.cos(tf / 300)) + 0.2 * torch.sin(tf / 100 + 3 * PATTERN)
        return out.to(x_in.dtype)


def diffusers_scheduler(name: str, cfg: dict, options: dict):
    cls_name, kwargs = REFERENCE[name]
    kwargs = dict(kwargs)
    if name == "flow_euler" and "shift" in options:
        kwargs["shift"] = options["shift"]
    if name == "euler_a_karras":
        # diffusers 0.42's EulerAncestral has no use_karras_sigmas: run its step over the Karras
        # sigmas/timesteps of EulerDiscreteScheduler(use_karras_sigmas=True).
        return getattr(diffusers, cls_name).from_config(cfg), diffusers.EulerDiscreteScheduler.from_config(
            cfg, use_karras_sigmas=True)
    return getattr(diffusers, cls_name).from_config(cfg, **kwargs), None


def run_diffusers(name, cfg, steps, strength, noise, clean, seeds, options):
    sched, sigma_source = diffusers_scheduler(name, cfg, options)
    if options.get("timesteps") is not None:  # the pipelines' retrieve_timesteps(timesteps=...)
        sched.set_timesteps(timesteps=list(options["timesteps"]))
    else:
        sched.set_timesteps(steps)
    if sigma_source is not None:
        sigma_source.set_timesteps(steps)
        sched.sigmas, sched.timesteps = sigma_source.sigmas.clone(), sigma_source.timesteps.clone()
    if strength is None:
        timesteps = sched.timesteps
        latents = noise * getattr(sched, "init_noise_sigma", 1.0) if name != "flow_euler" else noise
    else:
        if name == "flow_euler":  # StableDiffusion3Img2ImgPipeline.get_timesteps
            t_start = int(max(steps - min(steps * strength, steps), 0))
        else:  # StableDiffusionImg2ImgPipeline.get_timesteps
            t_start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = sched.timesteps[t_start * sched.order:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        first = timesteps[:1].repeat(noise.shape[0])
        if name == "flow_euler":
            latents = sched.scale_noise(clean, first, noise)
        else:
            latents = sched.add_noise(clean, noise, first)
    start = latents.clone()
    model = ToyDenoiser()
    generators = item_generators(seeds)
    step_params = inspect.signature(sched.step).parameters
    for t in timesteps:
        x_in = sched.scale_model_input(latents, t) if hasattr(sched, "scale_model_input") else latents
        out = model(x_in, t)
        kwargs = {"generator": generators} if "generator" in step_params else {}
        if name == "ddim":
            kwargs["eta"] = options.get("eta", 0.0)
        latents = sched.step(out, t, latents, **kwargs).prev_sample
    return start, latents, model.calls


def run_ours(name, cfg, steps, strength, noise, clean, seeds, options):
    sampler = get_sampler(name, cfg, steps, strength=strength, options=options)
    start = sampler.initial_latents(noise) if strength is None else sampler.noised_latents(clean, noise)
    model = ToyDenoiser()
    progress = []
    latents = sampler.sample(model, start.clone(), item_generators(seeds), callback=lambda i, n: progress.append((i, n)))
    assert progress == [(i, len(sampler.timesteps)) for i in range(len(sampler.timesteps))]
    assert len(model.calls) == len(sampler.timesteps)
    assert [t for t, _ in model.calls] == [float(t) for t in sampler.timesteps]
    return start, latents, model.calls


def compare(name, cfg, steps=STEPS, strength=None, options=None, dtype=torch.float32, tol=TOL):
    if name.startswith("lms"):
        pytest.importorskip("scipy", reason="diffusers' LMSDiscreteScheduler (the reference) needs scipy")
    options = options or {}
    gens = item_generators([s + 1000 for s in SEEDS])
    noise = randn_items(gens, SHAPE).to(dtype)
    clean = (randn_items(item_generators([5, 6, 7]), SHAPE) * 0.8).to(dtype)
    ref_start, ref, ref_calls = run_diffusers(name, cfg, steps, strength, noise, clean, SEEDS, options)
    start, ours, calls = run_ours(name, cfg, steps, strength, noise, clean, SEEDS, options)
    assert start.dtype == ref_start.dtype == dtype and ours.dtype == ref.dtype
    assert (start - ref_start).abs().max().item() <= tol, f"{name}: starting latents differ"
    assert len(calls) == len(ref_calls), f"{name}: {len(calls)} model calls, diffusers made {len(ref_calls)}"
    for k, ((t, x_in), (rt, rx_in)) in enumerate(zip(calls, ref_calls)):
        assert t == rt, f"{name}: call {k} timestep {t} != diffusers {rt}"
        err = (x_in.float() - rx_in.float()).abs().max().item()
        assert err <= tol * max(1.0, rx_in.abs().max().item()), f"{name}: call {k} model input off by {err}"
    err = (ours.float() - ref.float()).abs().max().item()
    assert torch.isfinite(ref).all() and ref.abs().max() > 0.05, f"{name}: degenerate reference result"
    assert err <= tol, f"{name}: final latents off by {err}"
    return ours


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", NOISE_SAMPLERS)
def test_txt2img_matches_diffusers(name, prediction, spacing):
    cfg = dict(SD1, prediction_type=prediction, timestep_spacing=spacing)
    compare(name, cfg)


@pytest.mark.parametrize("name", ["ddim", "plms", "euler_karras", "euler_a", "heun", "lms", "dpmpp_2m_sde", "unipc"])
def test_linspace_spacing_matches_diffusers(name):
    compare(name, dict(SD1, prediction_type="v_prediction", timestep_spacing="linspace"))


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", NOISE_SAMPLERS)
def test_img2img_matches_diffusers(name, prediction, spacing):
    cfg = dict(SD1, prediction_type=prediction, timestep_spacing=spacing)
    compare(name, cfg, strength=0.65)


@pytest.mark.parametrize("strength", [None, 0.5, 1.0])
@pytest.mark.parametrize("options", [{}, {"shift": 2.0}])
def test_flow_euler_matches_diffusers(options, strength):
    compare("flow_euler", FLOW, strength=strength, options=options)


@pytest.mark.parametrize("strength", [None, 0.6])
@pytest.mark.parametrize("name", NOISE_SAMPLERS + ["flow_euler"])
def test_float16_matches_diffusers(name, strength):
    """Half-precision latents: the same casts as diffusers, so the same bits (LMS: within one ulp)."""
    cfg = FLOW if name == "flow_euler" else dict(SD1, prediction_type="epsilon", timestep_spacing="leading")
    options = {"eta": 0.5} if name == "ddim" else {}
    compare(name, cfg, strength=strength, options=options, dtype=torch.float16,
            tol=2e-3 if name.startswith("lms") else 0.0)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("strength", [None, 0.7])
def test_ddim_eta_matches_diffusers(eta, strength):
    compare("ddim", dict(SD1, prediction_type="epsilon"), strength=strength, options={"eta": eta})


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("name", ["plms", "heun", "lms", "dpmpp_2m", "dpmpp_2m_sde_karras", "unipc", "ddim"])
def test_few_steps_match_diffusers(name, steps):
    compare(name, dict(SD1, prediction_type="epsilon", timestep_spacing="trailing"), steps=steps)


@pytest.mark.parametrize("name", ["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_sde", "unipc"])
def test_zero_snr_config_matches_diffusers(name):
    cfg = dict(SD1, prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True)
    compare(name, cfg)


@pytest.mark.parametrize("name", ["ddim", "euler", "heun_karras", "dpmpp_2m", "unipc", "plms"])
def test_default_config_keys_match_diffusers(name):
    """A config with only the beta keys: each sampler falls back to its diffusers class defaults."""
    compare(name, dict(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", num_train_timesteps=1000))


@pytest.mark.parametrize("name", ["ddim", "euler_karras", "dpmpp_2m", "unipc"])
def test_cosine_schedule_matches_diffusers(name):
    compare(name, dict(SD1, beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing"))


@pytest.mark.parametrize("name", ["euler_a", "euler_a_karras", "dpmpp_2m_sde", "dpmpp_2m_sde_karras", "ddim"])
def test_stochastic_samplers_are_batch_invariant(name):
    cfg = dict(SD1, prediction_type="epsilon")
    options = {"eta": 0.8} if name == "ddim" else {}
    seeds = [3, 99, 2**40]
    sampler = get_sampler(name, cfg, 6, options=options)

    def render(item_seeds, step_seeds=None):
        noise = randn_items(item_generators(item_seeds), SHAPE)
        gens = item_generators(step_seeds or item_seeds)
        return sampler.sample(ToyDenoiser(), sampler.initial_latents(noise), gens)

    batch = render(seeds)
    for pos, seed in enumerate(seeds):
        alone = render([seed])
        assert torch.equal(alone[0], batch[pos]), f"{name}: item {pos} changes with its batch-mates"
    moved = render([seeds[2], seeds[0]])
    assert torch.equal(moved[0], batch[2]) and torch.equal(moved[1], batch[0])
    # the per-step noise is really drawn from the item's generator: another seed changes the result
    other = render([seeds[0]], step_seeds=[seeds[0] + 1])
    assert not torch.equal(other[0], batch[0])
