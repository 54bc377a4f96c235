"""Few-step samplers of consistency-distilled models: LCM and TCD, over the training alphas.

Latent Consistency Models (LCM, LCM-LoRA, DMD2's LCM-style schedule) and Trajectory Consistency
Distillation (TCD, Hyper-SD's TCD variant) predict the clean image in one model call; a step jumps
to it and re-noises to the next timestep. They equal diffusers' ``LCMScheduler`` and
``TCDScheduler`` as the Stable Diffusion pipelines drive them (``set_timesteps(steps)`` or
``set_timesteps(timesteps=...)``, then ``step`` with the item generators):

- timesteps: ``original_inference_steps`` (the distillation grid, 50 by default) evenly spaced
  training timesteps ``k - 1, 2k - 1, ...`` (``k = num_train // original``), descending, of which
  ``steps`` are taken at evenly spaced indices; or an explicit list. Both schedulers read but do
  not use ``timestep_spacing``;
- LCM: ``denoised = c_out * x0 + c_skip * x`` with the boundary-condition scalings at
  ``t * timestep_scaling``, then fresh per-item noise to the next timestep (none after the last);
- TCD: x0 and eps re-noised to ``s = floor((1 - eta) * t_prev)``, then per-item noise from ``s``
  to ``t_prev`` when ``eta > 0`` (eta is TCD's gamma: 0 deterministic, 1 fully stochastic).

Every draw comes from the item's own generator, so an item's bytes never depend on its batch-mates.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .common import Callback, Model, Plan, StepHook, after, call_model, progress, step_noise

SIGMA_DATA = 0.5  # LCM's boundary condition (diffusers' get_scalings_for_boundary_condition_discrete)


def consistency_timesteps(num_train: int, steps: int, original_steps: int, name: str) -> np.ndarray:
    """The LCM/TCD timesteps of ``set_timesteps(steps)`` (strength 1, as the SD pipelines call it)."""
    if original_steps > num_train:
        raise ValueError(f"sampler {name!r}: original_inference_steps={original_steps} is more than the checkpoint's "
                         f"num_train_timesteps ({num_train})")
    if steps > original_steps:
        raise ValueError(f"steps: {steps} is more than original_inference_steps={original_steps} of sampler {name!r} "
                         f"(its timesteps are a subset of that grid); use at most {original_steps} steps")
    k = num_train // original_steps
    grid = (np.arange(1, original_steps + 1) * k - 1)[::-1].copy()
    indices = np.floor(np.linspace(0, len(grid), num=steps, endpoint=False)).astype(np.int64)
    return grid[indices].astype(np.int64)


def _x0_eps(out: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor, prediction_type: str, name: str):
    b_t = 1 - a_t
    if prediction_type == "epsilon":
        return (x - b_t.sqrt() * out) / a_t.sqrt(), out
    if prediction_type == "v_prediction":
        return a_t.sqrt() * x - b_t.sqrt() * out, (a_t**0.5) * out + (b_t**0.5) * x
    raise ValueError(f"{name}: prediction_type {prediction_type!r} is not supported (epsilon, v_prediction)")


def sample_lcm(model: Model, x: torch.Tensor, plan: Plan, generators: Sequence, callback: Callback = None,
               after_step: StepHook = None):
    """LCM multistep sampling: the consistency function's x0, re-noised to the next timestep."""
    ac, ts = plan.alphas_cumprod, plan.timesteps
    scaling = plan.extra["timestep_scaling"]
    clip = plan.extra["clip_sample_range"] if plan.extra["clip_sample"] else None
    last, total = len(ts) - 1, plan.calls
    for n, i in enumerate(range(plan.begin, len(ts))):
        t = ts[i]
        out = call_model(model, x, t)
        prev_t = ts[i + 1] if i < last else t
        a_t, a_prev = ac[t], ac[prev_t]
        x0, _ = _x0_eps(out, x, a_t, plan.prediction_type, "lcm")
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        scaled = t * scaling
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
        denoised = c_out * x0 + c_skip * x
        if i != last:
            noise = step_noise(generators, out, denoised.dtype)
            x = a_prev.sqrt() * denoised + (1 - a_prev).sqrt() * noise
        else:
            x = denoised
        x = after(after_step, i + 1, x)
        progress(callback, n, total)
    return x


def sample_tcd(model: Model, x: torch.Tensor, plan: Plan, generators: Sequence, callback: Callback = None,
               after_step: StepHook = None):
    """TCD: x0 and eps re-noised to the intermediate timestep s, then (eta > 0) noised on to t_prev."""
    ac, ts = plan.alphas_cumprod, plan.timesteps
    eta = float(plan.extra["eta"])
    last, total = len(ts) - 1, plan.calls
    for n, i in enumerate(range(plan.begin, len(ts))):
        t = ts[i]
        out = call_model(model, x, t)
        prev_t = ts[i + 1] if i < last else torch.tensor(0)
        s = torch.floor((1 - eta) * prev_t).to(torch.long)
        a_t, a_prev, a_s = ac[t], ac[prev_t], ac[s]
        x0, eps = _x0_eps(out, x, a_t, plan.prediction_type, "tcd")
        noised = a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps
        if eta > 0 and i != last:
            noise = step_noise(generators, out, noised.dtype)
            x = (a_prev / a_s).sqrt() * noised + (1 - a_prev / a_s).sqrt() * noise
        else:
            x = noised
        x = after(after_step, i + 1, x)
        progress(callback, n, total)
    return x
