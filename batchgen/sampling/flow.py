"""Flow-matching samplers: x moves along the predicted velocity v = noise - x0 from sigma_i to sigma_{i+1}.

Rectified-flow checkpoints (SD3, SD3.5, FLUX.1) predict a velocity; x_sigma = (1 - sigma) x0 +
sigma * noise. Euler takes one model call per step (FlowMatchEulerDiscreteScheduler); Heun adds a
trapezoidal correction at the target sigma (FlowMatchHeunDiscreteScheduler), so it makes two calls
per step except the last, which ends at sigma 0 and stays first order. DPM-Solver++(2M) on flow
sigmas lives in multistep.py with the other DPM-Solver variants.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .common import Callback, Model, Plan, StepHook, after, call_model, progress


def sample_flow_euler(model: Model, x: torch.Tensor, plan: Plan, generators: Sequence, callback: Callback = None,
                      after_step: StepHook = None):
    """Euler steps of the rectified-flow ODE (FlowMatchEulerDiscreteScheduler, deterministic)."""
    sigmas, total = plan.sigmas, plan.calls
    for n, i in enumerate(range(plan.begin, len(plan.timesteps))):
        out = call_model(model, x, plan.timesteps[i])
        sample = x.to(torch.float32)
        x = after(after_step, i + 1, (sample + (sigmas[i + 1] - sigmas[i]) * out).to(out.dtype))
        progress(callback, n, total)
    return x


def sample_flow_heun(model: Model, x: torch.Tensor, plan: Plan, generators: Sequence, callback: Callback = None,
                     after_step: StepHook = None):
    """Heun's method on the rectified-flow ODE (FlowMatchHeunDiscreteScheduler, no churn).

    ``plan.timesteps``/``plan.sigmas`` hold every sigma but the first and the last twice, so call
    ``i`` alternates between an Euler predictor from ``sigmas[i]`` to ``sigmas[i + 1]`` and the
    corrector at ``sigmas[i]`` (the predictor's target). ``plan.begin`` is even: img2img starts on a
    predictor. The derivative is formed as diffusers forms it, through the denoised estimate.
    """
    sigmas, total = plan.sigmas, plan.calls
    derivative = dt = start = None
    for n, i in enumerate(range(plan.begin, len(plan.timesteps))):
        out = call_model(model, x, plan.timesteps[i])
        sample = x.to(torch.float32)
        if dt is None:  # predictor: Euler from sigmas[i] to sigmas[i + 1]
            sigma = sigmas[i]
            denoised = sample - out * sigma
            derivative = (sample - denoised) / sigma
            dt = sigmas[i + 1] - sigma
            start = sample
            x = after(after_step, i + 1, (sample + derivative * dt).to(out.dtype))
        else:  # corrector: average the slopes at both ends, step again from the predictor's start
            sigma_next = sigmas[i]
            denoised = sample - out * sigma_next
            slope = (sample - denoised) / sigma_next
            x = after(after_step, i + 1, (start + 0.5 * (derivative + slope) * dt).to(out.dtype))
            derivative = dt = start = None
        progress(callback, n, total)
    return x
