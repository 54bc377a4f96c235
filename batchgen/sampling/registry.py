"""Sampler names -> a ready :class:`Sampler` (schedule + loop) built from a checkpoint's scheduler config.

Each name equals one diffusers scheduler built with ``Scheduler.from_config(checkpoint_config,
**options)``; the config keys that scheduler class reads are read here with its defaults.

Flow-matching checkpoints (SD3/SD3.5, FLUX.1) have a FlowMatchEulerDiscreteScheduler config and
take only the ``flow_*`` samplers; every other sampler needs a noise/v-prediction config. A flow
sampler's schedule also depends on how the pipeline calls ``set_timesteps``: SD3 passes only the
step count, FLUX passes explicit ``sigmas`` and, for dynamically shifted checkpoints (FLUX.1-dev),
``mu`` (see :func:`batchgen.sampling.schedules.flux_mu`); ``get_sampler`` takes the same two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from . import schedules as S
from .alpha_samplers import sample_ddim, sample_plms
from .common import Callback, Model, Plan, StepHook
from .consistency import consistency_timesteps, sample_lcm, sample_tcd
from .flow import sample_flow_euler, sample_flow_heun
from .multistep import sample_dpmpp_2m, sample_unipc
from .sigma_samplers import sample_euler, sample_euler_ancestral, sample_heun, sample_lms


@dataclass(frozen=True)
class Spec:
    family: str
    karras: bool = False
    options: dict = field(default_factory=dict)  # option name -> default


_BASE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
             trained_betas=None, prediction_type="epsilon", steps_offset=0, timestep_spacing="linspace")
# Per family: the diffusers class defaults of the config keys it reads (None: key not read).
_DEFAULTS = {
    "ddim": {**_BASE, "timestep_spacing": "leading", "set_alpha_to_one": True, "clip_sample": True,
             "clip_sample_range": 1.0, "rescale_betas_zero_snr": False},
    "plms": {**_BASE, "timestep_spacing": "leading", "set_alpha_to_one": False},
    "euler": {**_BASE, "rescale_betas_zero_snr": False, "final_sigmas_type": "zero", "sigma_min": None,
              "sigma_max": None},
    "euler_a": {**_BASE, "rescale_betas_zero_snr": False},
    "heun": {**_BASE, "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False, "clip_sample_range": 1.0},
    "lms": dict(_BASE),
    "dpm": {**_BASE, "rescale_betas_zero_snr": False, "lower_order_final": True, "euler_at_final": False,
            "final_sigmas_type": "zero", "solver_type": "midpoint"},
    "unipc": {**_BASE, "rescale_betas_zero_snr": False, "solver_order": 2, "solver_type": "bh2", "lower_order_final": True,
              "disable_corrector": [], "final_sigmas_type": "zero"},
    # LCMScheduler / TCDScheduler (both read timestep_spacing but do not use it)
    "lcm": {**_BASE, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "original_inference_steps": 50, "clip_sample": False, "clip_sample_range": 1.0, "set_alpha_to_one": True,
            "timestep_spacing": "leading", "timestep_scaling": 10.0, "rescale_betas_zero_snr": False},
    "tcd": {**_BASE, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "original_inference_steps": 50, "set_alpha_to_one": True, "timestep_spacing": "leading",
            "rescale_betas_zero_snr": False},
    # FlowMatchEulerDiscreteScheduler
    "flow": {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False,
             "time_shift_type": "exponential"},
    # FlowMatchHeunDiscreteScheduler
    "flow_heun": {"num_train_timesteps": 1000, "shift": 1.0},
    # DPMSolverMultistepScheduler.from_config(flow config, use_flow_sigmas=True, flow_shift=shift, ...)
    "flow_dpm": {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False,
                 "time_shift_type": "exponential", "lower_order_final": True, "euler_at_final": False,
                 "final_sigmas_type": "zero", "solver_type": "midpoint"},
}
# Config values no sampler here reproduces: refuse rather than silently sample differently.
_UNSUPPORTED: dict[str, Callable] = {
    "variance_type": lambda v: v in ("learned", "learned_range"),
    "interpolation_type": lambda v: v not in (None, "linear"),
    "timestep_type": lambda v: v not in (None, "discrete"),
    "predict_x0": lambda v: v is False,
    "solver_type": lambda v: v == "bh1",
}
_FAMILY_KEYS = {  # which of _UNSUPPORTED each family's diffusers class reads
    "ddim": {"thresholding"}, "plms": set(), "euler_a": set(), "heun": {"use_exponential_sigmas", "use_beta_sigmas"},
    "lms": {"use_exponential_sigmas", "use_beta_sigmas"},
    "euler": {"use_exponential_sigmas", "use_beta_sigmas", "interpolation_type", "timestep_type"},
    "dpm": {"thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
            "variance_type", "use_dynamic_shifting"},
    "unipc": {"thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas", "predict_x0",
              "use_dynamic_shifting", "solver_type"},
    "lcm": {"thresholding"}, "tcd": {"thresholding"},
}
# Flow families: config keys whose truthy value is refused, and why. FlowMatchHeun and DPM-Solver do
# not read FlowMatchEuler's schedule-changing keys; diffusers would silently run another schedule
# than the checkpoint's, so we refuse instead.
_NOT_IN_HEUN = "FlowMatchHeunDiscreteScheduler does not read it (diffusers would ignore it)"
_NOT_IN_DPM = "DPMSolverMultistepScheduler does not read it (diffusers would ignore it)"
_FLOW_REFUSED: dict[str, dict[str, str]] = {
    "flow": {"invert_sigmas": "not implemented", "shift_terminal": "not implemented",
             "stochastic_sampling": "not implemented", "use_karras_sigmas": "not implemented",
             "use_exponential_sigmas": "not implemented", "use_beta_sigmas": "not implemented"},
    "flow_heun": {"use_dynamic_shifting": _NOT_IN_HEUN + "; use flow_euler or flow_dpmpp_2m with mu",
                  "invert_sigmas": _NOT_IN_HEUN, "shift_terminal": _NOT_IN_HEUN,
                  "stochastic_sampling": _NOT_IN_HEUN, "use_karras_sigmas": _NOT_IN_HEUN,
                  "use_exponential_sigmas": _NOT_IN_HEUN, "use_beta_sigmas": _NOT_IN_HEUN},
    "flow_dpm": {"invert_sigmas": _NOT_IN_DPM, "shift_terminal": _NOT_IN_DPM, "stochastic_sampling": _NOT_IN_DPM,
                 "use_karras_sigmas": "it replaces the flow sigmas by VP Karras sigmas in diffusers",
                 "use_exponential_sigmas": "not implemented", "use_beta_sigmas": "not implemented",
                 "use_lu_lambdas": "not implemented", "thresholding": "not implemented",
                 "variance_type": "not implemented", "use_flow_sigmas": "flow samplers read a FlowMatch* "
                 "config (its `shift`), not a DPMSolverMultistepScheduler one"},
}
_FLOW_REFUSED["flow"]["use_flow_sigmas"] = _FLOW_REFUSED["flow_heun"]["use_flow_sigmas"] = \
    _FLOW_REFUSED["flow_dpm"]["use_flow_sigmas"]
# Which set_timesteps arguments each flow family's diffusers scheduler accepts.
_ACCEPTS = {"flow": {"sigmas", "mu"}, "flow_heun": set(), "flow_dpm": {"mu"}}
_DIFFUSERS_CLASS = {"flow": "FlowMatchEulerDiscreteScheduler", "flow_heun": "FlowMatchHeunDiscreteScheduler",
                    "flow_dpm": "DPMSolverMultistepScheduler"}

SPECS: dict[str, Spec] = {
    "ddim": Spec("ddim", options={"eta": 0.0}),
    "plms": Spec("plms"),
    "euler": Spec("euler"),
    "euler_karras": Spec("euler", karras=True),
    "euler_a": Spec("euler_a"),
    "euler_a_karras": Spec("euler_a", karras=True),
    "heun": Spec("heun"),
    "heun_karras": Spec("heun", karras=True),
    "lms": Spec("lms"),
    "lms_karras": Spec("lms", karras=True),
    "dpmpp_2m": Spec("dpm"),
    "dpmpp_2m_karras": Spec("dpm", karras=True),
    "dpmpp_2m_sde": Spec("dpm", options={}),
    "dpmpp_2m_sde_karras": Spec("dpm", karras=True),
    "unipc": Spec("unipc"),
    "lcm": Spec("lcm", options={"original_inference_steps": None, "timesteps": None}),
    "tcd": Spec("tcd", options={"eta": 0.3, "timesteps": None}),
    "flow_euler": Spec("flow", options={"shift": None}),
    "flow_heun": Spec("flow_heun", options={"shift": None}),
    "flow_dpmpp_2m": Spec("flow_dpm", options={"shift": None}),
}
# Samplers whose diffusers scheduler spaces its timesteps by `timestep_spacing`: the option
# overrides the config's, as ``Scheduler.from_config(config, timestep_spacing=...)`` does (the
# step-distilled recipes: SDXL-Lightning's euler and Hyper-SD's ddim with "trailing").
_SPACED = ("ddim", "plms", "euler", "euler_a", "heun", "lms", "dpm", "unipc")
# Samplers whose diffusers scheduler takes ``set_timesteps(timesteps=[...])``: LCM/TCD, and
# Euler, Heun, DPM-Solver and FlowMatchEuler without Karras sigmas (those raise "Cannot set
# `timesteps` with `config.use_karras_sigmas = True`").
_TAKE_TIMESTEPS = ("lcm", "tcd", "euler", "heun", "dpm", "flow")
for _spec in SPECS.values():
    if _spec.family in _SPACED:
        _spec.options["timestep_spacing"] = None
    if _spec.family in _TAKE_TIMESTEPS and not _spec.karras:
        _spec.options["timesteps"] = None
del _spec
SAMPLER_NAMES: tuple[str, ...] = tuple(SPECS)
FLOW_SAMPLER_NAMES: tuple[str, ...] = tuple(n for n, spec in SPECS.items() if spec.family.startswith("flow"))

_LOOPS: dict[str, Callable] = {
    "ddim": sample_ddim, "plms": sample_plms, "euler": sample_euler, "euler_a": sample_euler_ancestral,
    "heun": sample_heun, "lms": sample_lms, "dpm": sample_dpmpp_2m, "unipc": sample_unipc, "flow": sample_flow_euler,
    "flow_heun": sample_flow_heun, "flow_dpm": sample_dpmpp_2m, "lcm": sample_lcm, "tcd": sample_tcd,
}


class Sampler:
    """A sampler bound to a schedule: timesteps, starting latents and the sampling loop."""

    def __init__(self, name: str, plan: Plan, loop: Callable, init_noise_sigma, noiser: Callable):
        self.name = name
        self.plan = plan
        self._loop = loop
        self.init_noise_sigma = init_noise_sigma
        self._noiser = noiser

    @property
    def timesteps(self) -> torch.Tensor:
        """Model timesteps in call order (what the denoiser gets, one per model call)."""
        return self.plan.timesteps[self.plan.begin :]

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        """txt2img start: the noise scaled to the first noise level."""
        return noise * self.init_noise_sigma

    def noised_latents(self, clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """img2img start: clean latents noised to the first timestep (diffusers add_noise/scale_noise)."""
        return self._noiser(clean, noise, self.plan.begin)

    def noised_at(self, clean: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
        """Clean latents noised to the level of plan index ``index`` (the noise level of that model
        call), as diffusers' ``add_noise`` does once the scheduler has taken ``index`` steps."""
        return self._noiser(clean, noise, index)

    def sample(self, model: Model, x: torch.Tensor, generators: Sequence[torch.Generator],
               callback: Callback = None, after_step: StepHook = None) -> torch.Tensor:
        """Run every step; ``model(x_in, t)`` returns the raw network prediction. ``after_step(index,
        x)`` (optional) may replace the latents after each step (see :data:`~.common.StepHook`)."""
        if len(generators) != x.shape[0]:
            raise ValueError(f"generators: expected {x.shape[0]} (one per item of x), got {len(generators)}")
        return self._loop(model, x, self.plan, generators, callback, after_step)

    def __repr__(self) -> str:
        return f"Sampler({self.name!r}, calls={self.plan.calls})"


def _is_flow(cfg: dict) -> bool:
    return (cfg.get("prediction_type") in ("flow", "flow_prediction") or bool(cfg.get("use_flow_sigmas"))
            or str(cfg.get("_class_name", "")).startswith("FlowMatch"))


def _describe(cfg: dict) -> str:
    """'FlowMatchEulerDiscreteScheduler, prediction_type 'epsilon'' for error messages."""
    parts = [str(cfg["_class_name"])] if cfg.get("_class_name") else []
    if cfg.get("prediction_type") is not None:
        parts.append(f"prediction_type {cfg['prediction_type']!r}")
    return ", ".join(parts) or "no _class_name or prediction_type"


def _read_config(name: str, family: str, scheduler_config: dict) -> dict:
    if not isinstance(scheduler_config, dict):
        raise ValueError(f"scheduler_config: expected a dict, got {type(scheduler_config).__name__}")
    flow = _is_flow(scheduler_config)
    wants_flow = family.startswith("flow")
    if flow != wants_flow:
        flow_names = ", ".join(FLOW_SAMPLER_NAMES)
        if wants_flow:
            raise ValueError(f"sampler {name!r} needs a flow-matching checkpoint (a FlowMatch* scheduler config); "
                             f"this scheduler config ({_describe(scheduler_config)}) is not flow-matching: "
                             f"use one of the other samplers (not {flow_names})")
        raise ValueError(f"sampler {name!r} needs a noise/v-prediction checkpoint (epsilon, v_prediction); this "
                         f"scheduler config ({_describe(scheduler_config)}) is flow-matching: use one of {flow_names}")
    cfg = dict(_DEFAULTS[family])
    cfg.update({k: v for k, v in scheduler_config.items() if k in cfg and v is not None or k == "trained_betas"})
    if wants_flow:
        _check_flow_config(name, family, scheduler_config, cfg)
        return cfg
    for key in sorted(_FAMILY_KEYS[family]):
        value = scheduler_config.get(key)
        if _UNSUPPORTED.get(key, bool)(value) if value is not None else False:
            raise ValueError(f"scheduler config: {key}={value!r} is not supported by sampler {name!r}")
    if cfg["prediction_type"] not in ("epsilon", "v_prediction"):
        raise ValueError(f"scheduler config: prediction_type {cfg['prediction_type']!r} is not supported "
                         f"by sampler {name!r} (epsilon, v_prediction)")
    S.check_spacing(cfg["timestep_spacing"])
    if cfg["beta_schedule"] not in S.BETA_SCHEDULES:
        raise ValueError(f"scheduler config: beta_schedule {cfg['beta_schedule']!r} is not supported; "
                         f"use one of {S.BETA_SCHEDULES}")
    return cfg


def _check_flow_config(name: str, family: str, raw: dict, cfg: dict) -> None:
    for key, why in sorted(_FLOW_REFUSED[family].items()):
        value = raw.get(key)
        if key == "variance_type" and value not in ("learned", "learned_range"):
            continue
        if value:
            raise ValueError(f"scheduler config: {key}={value!r} is not supported by sampler {name!r} ({why}); "
                             f"remove the key or pick another flow sampler")
    shift = cfg["shift"]
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
        raise ValueError(f"scheduler config: shift={shift!r} must be a number > 0")
    if "time_shift_type" in cfg and cfg["time_shift_type"] not in S.TIME_SHIFT_TYPES:
        raise ValueError(f"scheduler config: time_shift_type={cfg['time_shift_type']!r} is not supported; "
                         f"use one of {S.TIME_SHIFT_TYPES}")
    if family == "flow_dpm":
        if cfg["use_dynamic_shifting"] and cfg["time_shift_type"] != "exponential":
            raise ValueError(f"scheduler config: time_shift_type={cfg['time_shift_type']!r} with "
                             f"use_dynamic_shifting is not supported by sampler {name!r} "
                             f"(DPMSolverMultistepScheduler shifts by exp(mu) only); use flow_euler")
        if cfg["final_sigmas_type"] != "zero":
            raise ValueError(f"scheduler config: final_sigmas_type={cfg['final_sigmas_type']!r} is not supported by "
                             f"sampler {name!r} (flow sigmas end at 0: 'zero')")


def _check_options(name: str, spec: Spec, options: Optional[dict]) -> dict:
    options = dict(options or {})
    unknown = sorted(set(options) - set(spec.options))
    if "timesteps" in unknown:
        raise ValueError(timesteps_refusal(name))
    if unknown:
        takes = ", ".join(sorted(spec.options)) or "no options"
        raise ValueError(f"sampler option {unknown[0]!r} is not accepted by sampler {name!r} (it takes: {takes})")
    out = dict(spec.options)
    for key, value in options.items():
        if key in ("timesteps", "original_inference_steps"):
            out[key] = _check_int_option(name, key, value)
            continue
        if key == "timestep_spacing":
            if value is not None and value not in S.SPACINGS:
                raise ValueError(f"sampler option 'timestep_spacing' of {name!r}: expected one of "
                                 f"{', '.join(S.SPACINGS)}, got {value!r}")
            out[key] = value
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"sampler option {key!r} of {name!r}: expected a number, got {value!r}")
        if key == "eta" and not 0 <= value:
            raise ValueError(f"sampler option 'eta' of {name!r}: must be >= 0, got {value}")
        if key == "shift" and not value > 0:
            raise ValueError(f"sampler option 'shift' of {name!r}: must be > 0, got {value}")
        if key == "eta" and spec.family == "tcd" and not value <= 1:
            raise ValueError(f"sampler option 'eta' of {name!r}: TCD's gamma must be in [0, 1], got {value}")
        out[key] = float(value)
    return out


# Why a sampler takes no `timesteps` list although its diffusers scheduler class has the argument.
_TIMESTEPS_REFUSED = {
    "euler": "EulerDiscreteScheduler(use_karras_sigmas=True).set_timesteps raises 'Cannot set `timesteps` with "
             "`config.use_karras_sigmas = True`'",
    "heun": "HeunDiscreteScheduler(use_karras_sigmas=True).set_timesteps raises 'Cannot use `timesteps` with "
            "`config.use_karras_sigmas = True`'",
    "dpm": "DPMSolverMultistepScheduler(use_karras_sigmas=True).set_timesteps raises 'Cannot use `timesteps` with "
           "`config.use_karras_sigmas = True`'",
    "flow_dpm": "DPMSolverMultistepScheduler(use_flow_sigmas=True) computes its flow sigmas from the step count "
                "and fails on a timesteps list",
}


def timesteps_refusal(name: str) -> str:
    """Why sampler ``name`` takes no ``timesteps`` option, and which samplers do."""
    takers = ", ".join(n for n, spec in SPECS.items() if "timesteps" in spec.options)
    why = _TIMESTEPS_REFUSED.get(SPECS[name].family, "its diffusers scheduler's set_timesteps takes no timesteps list")
    if SPECS[name].karras:
        use = f"use {name.removesuffix('_karras')!r} (the same sampler without Karras sigmas)"
    else:
        use = f"use one of {takers}"
    return f"sampler option 'timesteps' is not accepted by sampler {name!r} ({why}); {use}, or drop the option"


def _check_int_option(name: str, key: str, value):
    """``original_inference_steps`` (an integer >= 1) or ``timesteps`` (a list of integers >= 0)."""
    if key == "original_inference_steps":
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"sampler option {key!r} of {name!r}: expected an integer >= 1, got {value!r}")
        return int(value)
    if value is None:
        return None
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__") or len(value) == 0:
        raise ValueError(f"sampler option 'timesteps' of {name!r}: expected a non-empty list of integers "
                         f"(training timesteps, descending, e.g. [999, 749, 499, 249]), got {value!r}")
    out = []
    for i, t in enumerate(value):
        if isinstance(t, float) and t.is_integer():
            t = int(t)
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0:
            raise ValueError(f"sampler option 'timesteps'[{i}] of {name!r}: expected an integer >= 0, got {t!r}")
        out.append(int(t))
    for i in range(1, len(out)):
        if out[i] >= out[i - 1]:
            raise ValueError(f"sampler option 'timesteps' of {name!r}: must be strictly descending, but "
                             f"timesteps[{i}]={out[i]} follows {out[i - 1]}")
    return tuple(out)


def explicit_steps(options, default: int):
    """The step count a request means: the length of ``options["timesteps"]`` when that is a
    non-empty list (steps left unset), else ``default``."""
    ts = options.get("timesteps") if isinstance(options, dict) else None
    return len(ts) if isinstance(ts, (list, tuple)) and ts else default


def _check_timesteps(name: str, cfg: dict, steps: int, opts: dict, sigmas=None) -> None:
    """An explicit timestep list: within the training schedule, one per step."""
    ts = opts.get("timesteps")
    if ts is None:
        return
    num_train = int(cfg["num_train_timesteps"])
    if ts[0] >= num_train:
        raise ValueError(f"sampler option 'timesteps' of {name!r}: the first timestep {ts[0]} is not below the "
                         f"checkpoint's num_train_timesteps ({num_train})")
    if len(ts) != steps:
        raise ValueError(f"sampler option 'timesteps' of {name!r}: {len(ts)} timesteps for steps={steps}; set "
                         f"steps={len(ts)} (generate() infers it from the list when steps is left unset)")
    if sigmas is not None:
        raise ValueError(f"sampler option 'timesteps' of {name!r}: this model's pipeline passes explicit sigmas "
                         f"(FLUX.1, Z-Image: sigmas = linspace(1, 1/steps, steps)), and diffusers' pipelines take "
                         f"timesteps or sigmas, not both; drop the option (or use a model whose pipeline passes "
                         f"neither, e.g. SD3)")
    if opts.get("original_inference_steps") is not None:
        raise ValueError(f"sampler options of {name!r}: original_inference_steps has no effect with an explicit "
                         f"timesteps list; pass one of them")


def _check_schedule_args(name: str, family: str, cfg: dict, steps: int, opts: dict, sigmas, mu):
    """Validate ``sigmas``/``mu`` like the diffusers scheduler's set_timesteps; returns (sigmas, mu)."""
    accepts = _ACCEPTS.get(family, set())
    for arg, value in (("sigmas", sigmas), ("mu", mu)):
        if value is not None and arg not in accepts:
            takers = [n for n in FLOW_SAMPLER_NAMES if arg in _ACCEPTS[SPECS[n].family]]
            where = (f"{_DIFFUSERS_CLASS[family]}.set_timesteps takes no {arg}" if family in _DIFFUSERS_CLASS
                     else "it is not a flow-matching sampler")
            hint = " (FluxPipeline passes sigmas=None for it)" if family == "flow_dpm" else ""
            raise ValueError(f"{arg}: sampler {name!r} does not take {arg} ({where}){hint}; pass {arg}=None "
                             f"or use {' or '.join(takers)}")
    if sigmas is not None:
        if isinstance(sigmas, (str, bytes)) or np.ndim(sigmas) != 1:
            raise ValueError(f"sigmas: expected a 1-d sequence of floats, got {sigmas!r}")
        values = np.asarray(sigmas, dtype=np.float64) if len(sigmas) else np.zeros(0)
        if len(values) != steps:
            raise ValueError(f"sigmas: {len(values)} values for steps={steps}; pass exactly one sigma per step")
        if not (np.isfinite(values).all() and (values > 0).all() and (values <= 1).all()):
            raise ValueError(f"sigmas: every value must be in (0, 1], got {list(values)}")
    dynamic = bool(cfg.get("use_dynamic_shifting"))
    if mu is not None:
        if isinstance(mu, bool) or not isinstance(mu, (int, float, np.integer, np.floating)) or not math.isfinite(mu):
            raise ValueError(f"mu: expected a finite number, got {mu!r}")
        if not dynamic:
            raise ValueError("mu: the scheduler config has use_dynamic_shifting=false, so mu would be ignored; "
                             "pass mu=None (only dynamically shifted checkpoints such as FLUX.1-dev take mu)")
        mu = float(mu)
    elif dynamic:
        raise ValueError(f"mu: the scheduler config has use_dynamic_shifting=true, so sampler {name!r} needs mu; "
                         f"pass mu=flux_mu(image_seq_len, scheduler_config)")
    if dynamic and opts.get("shift") is not None:
        raise ValueError(f"sampler option 'shift' of {name!r} has no effect with use_dynamic_shifting=true "
                         f"(mu sets the shift); remove it")
    return (None if sigmas is None else values), mu


def _begin_index(name: str, steps: int, strength: Optional[float], order: int, flow: bool) -> int:
    if strength is None:
        return 0
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise ValueError(f"strength: must be a number in [0, 1], got {strength!r}")
    if flow:  # StableDiffusion3Img2ImgPipeline / FluxImg2ImgPipeline.get_timesteps
        t_start = int(max(steps - min(steps * strength, steps), 0))
    else:  # StableDiffusionImg2ImgPipeline.get_timesteps
        t_start = max(steps - min(int(steps * strength), steps), 0)
    if t_start >= steps:
        raise ValueError(f"strength={strength} with steps={steps} leaves no denoising step for sampler {name!r} "
                         f"(steps * strength < 1); raise `strength` or `steps`")
    return t_start * order


def get_sampler(name: str, scheduler_config: dict, steps: int, strength: Optional[float] = None,
                options: Optional[dict] = None, sigmas: Optional[Sequence[float]] = None,
                mu: Optional[float] = None) -> Sampler:
    """Build sampler ``name`` for ``steps`` steps from a checkpoint's scheduler config.

    ``strength`` (img2img) cuts the schedule like diffusers' img2img pipelines; ``options`` are the
    sampler's own options (``eta`` for ddim and tcd, ``shift`` for the flow samplers,
    ``timestep_spacing`` for the samplers whose diffusers scheduler reads it,
    ``original_inference_steps`` for lcm, ``timesteps`` for lcm, tcd, euler, heun, dpmpp_2m(_sde)
    and flow_euler: an explicit descending list of training timesteps, one per step, as the
    diffusers scheduler's ``set_timesteps(timesteps=...)`` takes it; not with ``sigmas``).
    ``sigmas`` and ``mu`` mirror the flow schedulers' ``set_timesteps(sigmas=..., mu=...)``:
    ``sigmas`` (one per step, flow_euler only) replaces the evenly spaced schedule before shifting,
    ``mu`` (flow_euler, flow_dpmpp_2m) is the dynamic shift and is required exactly when the
    config has ``use_dynamic_shifting`` true.
    """
    if name not in SPECS:
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLER_NAMES)}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps: must be an integer >= 1, got {steps!r}")
    steps = int(steps)
    spec = SPECS[name]
    opts = _check_options(name, spec, options)
    cfg = _read_config(name, spec.family, scheduler_config)
    if opts.get("timestep_spacing") is not None:
        cfg["timestep_spacing"] = opts["timestep_spacing"]
    sigmas, mu = _check_schedule_args(name, spec.family, cfg, steps, opts, sigmas, mu)
    _check_timesteps(name, cfg, steps, opts, sigmas)
    num_train = int(cfg["num_train_timesteps"])
    if steps > num_train:
        raise ValueError(f"steps: {steps} is more than the checkpoint's num_train_timesteps ({num_train})")
    order = 2 if spec.family in ("heun", "flow_heun") else 1
    flow = spec.family.startswith("flow")
    begin = _begin_index(name, steps, strength, order, flow)
    build = _BUILDERS[spec.family]
    if flow:
        plan, init_sigma, noiser = build(cfg, steps, spec, opts, name, sigmas=sigmas, mu=mu)
    else:
        plan, init_sigma, noiser = build(cfg, steps, spec, opts, name)
    plan.begin = begin
    return Sampler(name, plan, _LOOPS[spec.family], init_sigma, noiser)


# --- schedule builders: (cfg, steps, spec, options) -> (plan, init_noise_sigma, noiser) -------------


def _alpha_noiser(plan: Plan):
    def noiser(clean, noise, index):
        ac = plan.alphas_cumprod.to(device=clean.device, dtype=clean.dtype)[plan.timesteps[index]]
        return ac**0.5 * clean + (1 - ac) ** 0.5 * noise

    return noiser


def _build_ddim(cfg, steps, spec, opts, name):
    ac = S.alphas_cumprod(cfg, zero_snr=cfg["rescale_betas_zero_snr"])
    ts = S.ddim_timesteps(cfg["num_train_timesteps"], steps, cfg["timestep_spacing"], cfg["steps_offset"])
    extra = dict(eta=opts["eta"], step_ratio=cfg["num_train_timesteps"] // steps, clip_sample=cfg["clip_sample"],
                 clip_sample_range=cfg["clip_sample_range"],
                 final_alpha_cumprod=torch.tensor(1.0) if cfg["set_alpha_to_one"] else ac[0])
    plan = Plan(torch.from_numpy(ts.copy()), cfg["prediction_type"], alphas_cumprod=ac, extra=extra)
    return plan, 1.0, _alpha_noiser(plan)


def _build_plms(cfg, steps, spec, opts, name):
    ac = S.alphas_cumprod(cfg)
    ts = S.plms_timesteps(cfg["num_train_timesteps"], steps, cfg["timestep_spacing"], cfg["steps_offset"])
    extra = dict(step_ratio=cfg["num_train_timesteps"] // steps,
                 final_alpha_cumprod=torch.tensor(1.0) if cfg["set_alpha_to_one"] else ac[0])
    plan = Plan(torch.from_numpy(ts.copy()), cfg["prediction_type"], alphas_cumprod=ac, extra=extra)
    return plan, 1.0, _alpha_noiser(plan)


def _build_consistency(cfg, steps, spec, opts, name):
    """LCM / TCD: integer timesteps on the distillation grid (or the explicit ``timesteps`` option)."""
    ac = S.alphas_cumprod(cfg, zero_snr=cfg["rescale_betas_zero_snr"])
    if opts.get("timesteps") is not None:
        ts = np.asarray(opts["timesteps"], dtype=np.int64)
    else:
        original = opts.get("original_inference_steps") or int(cfg["original_inference_steps"])
        ts = consistency_timesteps(int(cfg["num_train_timesteps"]), steps, original, name)
    extra = {"eta": opts["eta"]} if spec.family == "tcd" else {
        "timestep_scaling": float(cfg["timestep_scaling"]), "clip_sample": cfg["clip_sample"],
        "clip_sample_range": cfg["clip_sample_range"]}
    plan = Plan(torch.from_numpy(ts), cfg["prediction_type"], alphas_cumprod=ac, extra=extra)
    return plan, 1.0, _alpha_noiser(plan)


def _karras_range(cfg, interp: np.ndarray) -> tuple[float, float]:
    lo, hi = cfg.get("sigma_min"), cfg.get("sigma_max")
    return (lo if lo is not None else interp[-1].item()), (hi if hi is not None else interp[0].item())


def _build_sigma(cfg, steps, spec, opts, name):
    """Euler, Euler ancestral, Heun, LMS: sigmas interpolated at the spaced timesteps (+ Karras)."""
    family = spec.family
    ac = S.alphas_cumprod(cfg, zero_snr=cfg.get("rescale_betas_zero_snr", False), clamp_last=True)
    if opts.get("timesteps") is not None:  # set_timesteps(timesteps=[...]): as given, spacing ignored
        ts = np.asarray(opts["timesteps"], dtype=np.float32)
    else:
        ts = S.spaced_timesteps(cfg["num_train_timesteps"], steps, cfg["timestep_spacing"], cfg["steps_offset"])
    train = S.train_sigmas(ac)
    log_sigmas = np.log(train)
    sigmas = S.interp_sigmas(ts.astype(np.float32), train)
    if spec.karras:
        sigmas = S.karras_sigmas(*_karras_range(cfg, sigmas), steps)
        ts = np.array([S.sigma_to_t(s, log_sigmas) for s in sigmas])
    last = 0.0
    if cfg.get("final_sigmas_type", "zero") == "sigma_min":
        last = ((1 - ac[0]) / ac[0]) ** 0.5
    elif cfg.get("final_sigmas_type", "zero") != "zero":
        raise ValueError(f"scheduler config: final_sigmas_type {cfg['final_sigmas_type']!r} is not supported")
    sigmas = torch.from_numpy(np.concatenate([sigmas, [last]]).astype(np.float32))
    timesteps = torch.from_numpy(ts.astype(np.float32))
    if family == "heun":
        sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
        timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
    extra = {k: cfg[k] for k in ("clip_sample", "clip_sample_range") if k in cfg}
    plan = Plan(timesteps, cfg["prediction_type"], sigmas=sigmas, extra=extra)
    max_sigma = sigmas.max()
    init = max_sigma if cfg["timestep_spacing"] in ("linspace", "trailing") else (max_sigma**2 + 1) ** 0.5

    def noiser(clean, noise, index):
        return clean + noise * sigmas.to(device=clean.device, dtype=clean.dtype)[index]

    return plan, init, noiser


def _build_multistep(cfg, steps, spec, opts, name):
    """DPM-Solver++ and UniPC: timesteps over steps + 1 points, sigmas in VP form."""
    ac = S.alphas_cumprod(cfg, zero_snr=cfg["rescale_betas_zero_snr"], clamp_last=True)
    if opts.get("timesteps") is not None:  # DPM-Solver's set_timesteps(timesteps=[...]): int64, as given
        ts = np.asarray(opts["timesteps"], dtype=np.int64)
    else:
        ts = S.spaced_timesteps(cfg["num_train_timesteps"], steps, cfg["timestep_spacing"], cfg["steps_offset"],
                                extra=1).astype(np.int64)
    train = S.train_sigmas(ac)
    if spec.karras:
        sigmas = S.karras_sigmas(train[0].item(), train[-1].item(), steps)
        ts = np.array([S.sigma_to_t(s, np.log(train)) for s in sigmas])
        if cfg["beta_schedule"] != "squaredcos_cap_v2":
            ts = ts.round()
    else:
        sigmas = S.interp_sigmas(ts, train)
    if cfg["final_sigmas_type"] == "sigma_min":
        last = ((1 - ac[0]) / ac[0]) ** 0.5
    elif cfg["final_sigmas_type"] == "zero":
        last = 0
    else:
        raise ValueError(f"scheduler config: final_sigmas_type {cfg['final_sigmas_type']!r} is not supported")
    sigmas = torch.from_numpy(np.concatenate([sigmas, [last]]).astype(np.float32))
    timesteps = torch.from_numpy(np.asarray(ts)).to(torch.int64)
    if spec.family == "dpm":
        solver_type = cfg["solver_type"] if cfg["solver_type"] in ("midpoint", "heun") else "midpoint"
        extra = dict(sde="sde" in name, lower_order_final=cfg["lower_order_final"],
                     euler_at_final=cfg["euler_at_final"], final_sigmas_type=cfg["final_sigmas_type"],
                     solver_type=solver_type)
    else:
        extra = dict(solver_order=int(cfg["solver_order"]), lower_order_final=cfg["lower_order_final"],
                     disable_corrector=list(cfg["disable_corrector"] or []))
    plan = Plan(timesteps, cfg["prediction_type"], sigmas=sigmas, extra=extra)

    def noiser(clean, noise, index):
        sigma = sigmas.to(device=clean.device, dtype=clean.dtype)[index]
        alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha_t * clean + sigma * alpha_t * noise

    return plan, 1.0, noiser


def _flow_shift(cfg, opts) -> float:
    return opts["shift"] if opts.get("shift") is not None else float(cfg["shift"])


def _flow_noiser(plan: Plan):
    """scale_noise of FlowMatchEuler (and add_noise of DPM-Solver with flow sigmas: the same bits)."""

    def noiser(clean, noise, index):
        sigma = plan.sigmas.to(device=clean.device, dtype=clean.dtype)[index]
        return sigma * noise + (1.0 - sigma) * clean

    return noiser


def _build_flow(cfg, steps, spec, opts, name, sigmas=None, mu=None):
    """FlowMatchEulerDiscreteScheduler.set_timesteps(steps, sigmas=sigmas, mu=mu)."""
    dynamic = bool(cfg["use_dynamic_shifting"])
    sig, timesteps = S.flow_sigmas(int(cfg["num_train_timesteps"]), steps, _flow_shift(cfg, opts), sigmas=sigmas,
                                   mu=mu if dynamic else None, time_shift_type=cfg["time_shift_type"],
                                   timesteps=opts.get("timesteps"))
    plan = Plan(timesteps, "flow", sigmas=sig)
    return plan, 1.0, _flow_noiser(plan)


def _build_flow_heun(cfg, steps, spec, opts, name, sigmas=None, mu=None):
    """FlowMatchHeunDiscreteScheduler.set_timesteps(steps): Euler's sigmas, inner ones doubled."""
    sig, timesteps = S.flow_sigmas(int(cfg["num_train_timesteps"]), steps, _flow_shift(cfg, opts))
    timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
    sig = torch.cat([sig[:1], sig[1:-1].repeat_interleave(2), sig[-1:]])
    plan = Plan(timesteps, "flow", sigmas=sig)

    def noiser(clean, noise, index):  # its scale_noise keeps sigma a float32 CPU scalar, whatever clean's dtype/device
        sigma = plan.sigmas[index]
        return sigma * noise + (1.0 - sigma) * clean

    return plan, 1.0, noiser


def _build_flow_dpm(cfg, steps, spec, opts, name, sigmas=None, mu=None):
    """DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift).set_timesteps(steps, mu=mu)."""
    flow_shift = np.exp(mu) if mu is not None else _flow_shift(cfg, opts)  # set_timesteps: flow_shift = exp(mu)
    sig, timesteps = S.dpm_flow_sigmas(int(cfg["num_train_timesteps"]), steps, flow_shift)
    solver_type = cfg["solver_type"] if cfg["solver_type"] in ("midpoint", "heun") else "midpoint"
    extra = dict(sde=False, lower_order_final=cfg["lower_order_final"], euler_at_final=cfg["euler_at_final"],
                 final_sigmas_type="zero", solver_type=solver_type)
    plan = Plan(timesteps, "flow", sigmas=sig, extra=extra)
    return plan, 1.0, _flow_noiser(plan)


_BUILDERS = {"ddim": _build_ddim, "plms": _build_plms, "euler": _build_sigma, "euler_a": _build_sigma,
             "heun": _build_sigma, "lms": _build_sigma, "dpm": _build_multistep, "unipc": _build_multistep,
             "flow": _build_flow, "flow_heun": _build_flow_heun, "flow_dpm": _build_flow_dpm,
             "lcm": _build_consistency, "tcd": _build_consistency}
