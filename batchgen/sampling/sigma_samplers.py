"""Samplers over Karras noise levels: x = x0 + sigma * eps, model input scaled by 1/sqrt(sigma^2+1).

Euler, Euler ancestral, Heun and LMS, each a loop over ``plan.sigmas`` that takes the same steps
as diffusers' Euler/EulerAncestral/Heun/LMS discrete schedulers.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .common import Callback, Model, Plan, StepHook, after, call_model, karras_x0, progress, step_noise


def scale_input(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x / ((sigma**2 + 1) ** 0.5)


def sample_euler(model: Model, x: torch.Tensor, plan: Plan, generators: Sequence, callback: Callback = None,
                 after_step: StepHook = None):
    """Euler (first order) steps from sigma_i to sigma_{i+1}."""
    sigmas, total = plan.sigmas, plan.calls
    for n, i in enumerate(range(plan.begin, len(plan.timesteps))):
        sigma = sigmas[i]
        out = call_model(model, scale_input(x, sigma), plan.timesteps[i])
        sample = x.to(torch.float32)
        x0 = karras_x0(out, sample, sigma, plan.prediction_type)
        derivative = (sample - x0) / sigma
        x = after(after_step, i + 1, (sample + derivative * (sigmas[i + 1] - sigma)).to(out.dtype))
        progress(callback, n, total)
    return x


def sample_euler_ancestral(model: Model, x: torch.Tensor, plan: Plan, generators: Sequence, callback: Callback = None,
                           after_step: StepHook = None):
    """Euler step down to sigma_down, then fresh per-item noise of size sigma_up."""
    sigmas, total = plan.sigmas, plan.calls
    for n, i in enumerate(range(plan.begin, len(plan.timesteps))):
        sigma = sigmas[i]
        out = call_model(model, scale_input(x, sigma), plan.timesteps[i])
        sample = x.to(torch.float32)
        x0 = karras_x0(out, sample, sigma, plan.prediction_type)
        sigma_to = sigmas[i + 1]
        sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        derivative = (sample - x0) / sigma
        prev = sample + derivative * (sigma_down - sigma)
        prev = prev + step_noise(generators, out, out.dtype) * sigma_up
        x = after(after_step, i + 1, prev.to(out.dtype))
        progress(callback, n, total)
    return x


def sample_heun(model: Model, x: torch.Tensor, plan: Plan, generators: Sequence, callback: Callback = None,
                after_step: StepHook = None):
    """Heun's second-order method; the last step (to sigma 0) is a plain Euler step.

    ``plan.sigmas``/``plan.timesteps`` are interleaved like diffusers' (each inner level twice).
    """
    sigmas, ts, total = plan.sigmas, plan.timesteps, plan.calls
    clip = plan.extra.get("clip_sample_range") if plan.extra.get("clip_sample") else None
    i, n = plan.begin, 0

    def x0_of(out, sample, sigma):
        x0 = out if plan.prediction_type == "sample" else karras_x0(out, sample, sigma, plan.prediction_type)
        return x0.clamp(-clip, clip) if clip is not None else x0

    while i < len(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        out = call_model(model, scale_input(x, sigma), ts[i])
        derivative = (x - x0_of(out, x, sigma)) / sigma
        dt = sigma_next - sigma
        x_pred = x + derivative * dt
        progress(callback, n, total)
        i, n = i + 1, n + 1
        x_pred = after(after_step, i, x_pred)
        if i == len(ts):
            return x_pred
        out = call_model(model, scale_input(x_pred, sigmas[i]), ts[i])
        derivative_2 = (x_pred - x0_of(out, x_pred, sigma_next)) / sigma_next
        x = after(after_step, i + 1, x + (derivative + derivative_2) / 2 * dt)
        progress(callback, n, total)
        i, n = i + 1, n + 1
    return x


_GAUSS_NODES, _GAUSS_WEIGHTS = np.polynomial.legendre.leggauss(4)  # exact for degree <= 7


def lms_coefficient(sigmas: np.ndarray, order: int, t: int, current: int) -> float:
    """Integral from sigma_t to sigma_{t+1} of the Lagrange basis polynomial ``current``."""
    lo, hi = float(sigmas[t]), float(sigmas[t + 1])
    taus = (hi - lo) / 2 * _GAUSS_NODES + (hi + lo) / 2
    prod = np.ones_like(taus)
    for k in range(order):
        if k != current:
            prod *= (taus - sigmas[t - k]) / (sigmas[t - current] - sigmas[t - k])
    return float((hi - lo) / 2 * np.dot(_GAUSS_WEIGHTS, prod))


def sample_lms(model: Model, x: torch.Tensor, plan: Plan, generators: Sequence, callback: Callback = None,
               after_step: StepHook = None):
    """Linear multistep (up to order 4) over the derivatives of previous steps."""
    sigmas, total = plan.sigmas, plan.calls
    sig64 = sigmas.numpy().astype(np.float64)
    derivatives: list[torch.Tensor] = []
    for n, i in enumerate(range(plan.begin, len(plan.timesteps))):
        sigma = sigmas[i]
        out = call_model(model, scale_input(x, sigma), plan.timesteps[i])
        x0 = out if plan.prediction_type == "sample" else karras_x0(out, x, sigma, plan.prediction_type)
        derivatives.append((x - x0) / sigma)
        if len(derivatives) > 4:
            derivatives.pop(0)
        order = min(i + 1, 4)  # diffusers counts from the absolute step index (img2img too)
        coeffs = [lms_coefficient(sig64, order, i, k) for k in range(order)]
        x = after(after_step, i + 1, x + sum(c * d for c, d in zip(coeffs, reversed(derivatives))))
        progress(callback, n, total)
    return x
