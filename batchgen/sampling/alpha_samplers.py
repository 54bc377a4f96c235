"""Samplers over the training alphas (DDIM, PLMS): integer timesteps, unscaled model input."""

from __future__ import annotations

from typing import Sequence

import torch

from .common import Callback, Model, Plan, StepHook, after, call_model, progress, step_noise


def _alphas(plan: Plan, t: int, prev_t: int) -> tuple[torch.Tensor, torch.Tensor]:
    ac = plan.alphas_cumprod
    return ac[t], ac[prev_t] if prev_t >= 0 else plan.extra["final_alpha_cumprod"]


def sample_ddim(model: Model, x: torch.Tensor, plan: Plan, generators: Sequence, callback: Callback = None,
                after_step: StepHook = None):
    """DDIM; with ``eta > 0`` each step adds per-item noise of its posterior std times eta."""
    eta = float(plan.extra.get("eta", 0.0))
    ratio = plan.extra["step_ratio"]
    clip = plan.extra.get("clip_sample_range") if plan.extra.get("clip_sample") else None
    total = plan.calls
    for n, t in enumerate(plan.timesteps[plan.begin :].tolist()):
        out = call_model(model, x, t)
        a_t, a_prev = _alphas(plan, t, t - ratio)
        b_t = 1 - a_t
        if plan.prediction_type == "epsilon":
            x0, eps = (x - b_t ** (0.5) * out) / a_t ** (0.5), out
        elif plan.prediction_type == "v_prediction":
            x0 = (a_t**0.5) * x - (b_t**0.5) * out
            eps = (a_t**0.5) * out + (b_t**0.5) * x
        else:
            raise ValueError(f"ddim: prediction_type {plan.prediction_type!r} is not supported")
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        variance = ((1 - a_prev) / b_t) * (1 - a_t / a_prev)
        std = eta * variance ** (0.5)
        prev = a_prev ** (0.5) * x0 + (1 - a_prev - std**2) ** (0.5) * eps
        if eta > 0:
            prev = prev + std * step_noise(generators, out, out.dtype)
        x = after(after_step, plan.begin + n + 1, prev)
        progress(callback, n, total)
    return x


def _plms_update(plan: Plan, x: torch.Tensor, t: int, prev_t: int, eps: torch.Tensor) -> torch.Tensor:
    """PNDM's transfer from t to prev_t given a (combined) noise prediction (or v)."""
    a_t, a_prev = _alphas(plan, t, prev_t)
    b_t, b_prev = 1 - a_t, 1 - a_prev
    if plan.prediction_type == "v_prediction":
        eps = (a_t**0.5) * eps + (b_t**0.5) * x
    elif plan.prediction_type != "epsilon":
        raise ValueError(f"plms: prediction_type {plan.prediction_type!r} is not supported")
    denom = a_t * b_prev ** (0.5) + (a_t * b_t * a_prev) ** (0.5)
    return (a_prev / a_t) ** (0.5) * x - (a_prev - a_t) * eps / denom


def sample_plms(model: Model, x: torch.Tensor, plan: Plan, generators: Sequence, callback: Callback = None,
                after_step: StepHook = None):
    """Pseudo linear multistep (PNDM without Runge-Kutta warmup): Adams-Bashforth up to order 4.

    The first step is taken twice (Euler, then the average of both predictions), as diffusers does.
    """
    ratio = plan.extra["step_ratio"]
    ets: list[torch.Tensor] = []
    cur_sample = None
    total = plan.calls
    for counter, t in enumerate(plan.timesteps[plan.begin :].tolist()):
        out = call_model(model, x, t)
        prev_t = t - ratio
        if counter != 1:
            ets = ets[-3:] + [out]
        else:
            prev_t, t = t, t + ratio
        if len(ets) == 1 and counter == 0:
            eps, cur_sample = out, x
        elif len(ets) == 1 and counter == 1:
            eps, x, cur_sample = (out + ets[-1]) / 2, cur_sample, None
        elif len(ets) == 2:
            eps = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            eps = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            eps = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        x = after(after_step, plan.begin + counter + 1, _plms_update(plan, x, t, prev_t, eps))
        progress(callback, counter, total)
    return x
