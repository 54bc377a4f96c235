"""Flow-matching Euler: x moves along the predicted velocity from sigma_i to sigma_{i+1}."""

from __future__ import annotations

from typing import Sequence

import torch

from .common import Callback, Model, Plan, call_model, progress


def sample_flow_euler(model: Model, x: torch.Tensor, plan: Plan, generators: Sequence, callback: Callback = None):
    """Euler steps of the rectified-flow ODE (FlowMatchEulerDiscreteScheduler, deterministic)."""
    sigmas, total = plan.sigmas, plan.calls
    for n, i in enumerate(range(plan.begin, len(plan.timesteps))):
        out = call_model(model, x, plan.timesteps[i])
        sample = x.to(torch.float32)
        x = (sample + (sigmas[i + 1] - sigmas[i]) * out).to(out.dtype)
        progress(callback, n, total)
    return x
