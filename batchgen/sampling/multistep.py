"""Multistep exponential-integrator samplers in log-SNR time: DPM-Solver++ (2M, 2M SDE) and UniPC.

DPM-Solver++(2M) also runs on flow-matching sigmas (``flow_dpmpp_2m``): only alpha_t/sigma_t and
the data prediction change, the log-SNR update is the same.

Both work on data predictions (x0) at the variance-preserving noise levels ``plan.sigmas`` and
reuse the previous steps' predictions; orders are lowered at the start and, for few steps, at
the end exactly as diffusers' DPMSolverMultistep/UniPCMultistep schedulers do.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .common import (Callback, Model, Plan, StepHook, after, alpha_sigma, call_model, log_snr, progress, step_noise,
                     vp_x0)


def _dpm_first_order(x, m0, s, s_next, sde, noise, flow=False):
    alpha_t, sigma_t = alpha_sigma(s_next, flow)
    _, sigma_s = alpha_sigma(s, flow)
    h = log_snr(s_next, flow) - log_snr(s, flow)
    if not sde:
        return (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * m0
    return (
        (sigma_t / sigma_s * torch.exp(-h)) * x
        + (alpha_t * (1 - torch.exp(-2.0 * h))) * m0
        + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
    )


def _dpm_second_order(x, m0, m1, s_prev, s, s_next, sde, noise, solver_type, flow=False):
    alpha_t, sigma_t = alpha_sigma(s_next, flow)
    _, sigma_s0 = alpha_sigma(s, flow)
    lambda_t, lambda_s0, lambda_s1 = log_snr(s_next, flow), log_snr(s, flow), log_snr(s_prev, flow)
    h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
    r0 = h_0 / h
    d0, d1 = m0, (1.0 / r0) * (m0 - m1)
    if not sde:
        base = (sigma_t / sigma_s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * d0
        if solver_type == "midpoint":
            return base - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
        return base + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1
    base = (sigma_t / sigma_s0 * torch.exp(-h)) * x + (alpha_t * (1 - torch.exp(-2.0 * h))) * d0
    if solver_type == "midpoint":
        base = base + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * d1
    else:
        base = base + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * d1
    return base + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise


def sample_dpmpp_2m(model: Model, x: torch.Tensor, plan: Plan, generators: Sequence, callback: Callback = None,
                    after_step: StepHook = None):
    """DPM-Solver++(2M); ``plan.extra["sde"]`` switches to the SDE variant (per-item noise each step).

    A plan with prediction type "flow" runs it over flow sigmas (alpha_t = 1 - sigma), as
    DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction") does.
    """
    sigmas, n_all = plan.sigmas, len(plan.timesteps)
    flow = plan.prediction_type == "flow"
    sde = plan.extra.get("sde", False)
    lower_final_cfg = plan.extra.get("lower_order_final", True)
    euler_final = plan.extra.get("euler_at_final", False)
    zero_final = plan.extra.get("final_sigmas_type", "zero") == "zero"
    solver_type = plan.extra.get("solver_type", "midpoint")
    prev_m, lower_nums, total = None, 0, plan.calls
    for n, i in enumerate(range(plan.begin, n_all)):
        out = call_model(model, x, plan.timesteps[i])
        lower_final = i == n_all - 1 and (euler_final or (lower_final_cfg and n_all < 15) or zero_final)
        m0 = vp_x0(out, x, sigmas[i], plan.prediction_type)
        sample = x.to(torch.float32)
        noise = step_noise(generators, out, torch.float32) if sde else None
        if lower_nums < 1 or lower_final:
            x_next = _dpm_first_order(sample, m0, sigmas[i], sigmas[i + 1], sde, noise, flow)
        else:
            x_next = _dpm_second_order(sample, m0, prev_m, sigmas[i - 1], sigmas[i], sigmas[i + 1], sde, noise,
                                       solver_type, flow)
        lower_nums = min(lower_nums + 1, 2)
        prev_m, x = m0, after(after_step, i + 1, x_next.to(out.dtype))
        progress(callback, n, total)
    return x


def _uni_coefficients(rks: list, h: torch.Tensor, order: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(R, b, B_h) of UniPC's bh2 variant for data prediction (hh = -h)."""
    rks = torch.stack(rks + [torch.ones((), device=device)])
    hh = -h
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = torch.expm1(hh)
    factorial_i = 1
    R, b = [], []
    for i in range(1, order + 1):
        R.append(torch.pow(rks, i - 1))
        b.append(h_phi_k * factorial_i / b_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    return torch.stack(R), torch.stack(b), b_h


def _uni_history(sigmas, ms, base_index, first_offset, m0, lambda_s0, h, order, device):
    rks, d1s = [], []
    for k in range(1, order):
        rk = (log_snr(sigmas[base_index - k - first_offset].to(device)) - lambda_s0) / h
        rks.append(rk)
        d1s.append((ms[-(k + 1)] - m0) / rk)
    return rks, (torch.stack(d1s, dim=1) if d1s else None)


def _unipc_predict(x, ms, sigmas, i, order):
    device = x.device
    s_t, s_0 = sigmas[i + 1].to(device), sigmas[i].to(device)
    alpha_t, sigma_t = alpha_sigma(s_t)
    _, sigma_s0 = alpha_sigma(s_0)
    lambda_s0 = log_snr(s_0)
    h = log_snr(s_t) - lambda_s0
    m0 = ms[-1]
    rks, d1s = _uni_history(sigmas, ms, i, 0, m0, lambda_s0, h, order, device)
    R, b, b_h = _uni_coefficients(rks, h, order, device)
    x_t = sigma_t / sigma_s0 * x - alpha_t * torch.expm1(-h) * m0
    if d1s is not None:
        if order == 2:
            rhos = torch.ones(1, dtype=x.dtype, device=device) * 0.5
        else:
            rhos = torch.linalg.solve(R[:-1, :-1], b[:-1]).to(device).to(x.dtype)
        x_t = x_t - alpha_t * b_h * torch.einsum("k,bkc...->bc...", rhos, d1s)
    else:
        x_t = x_t - alpha_t * b_h * 0
    return x_t.to(x.dtype)


def _unipc_correct(m_now, last_sample, this_sample, ms, sigmas, i, order):
    device = this_sample.device
    s_t, s_0 = sigmas[i].to(device), sigmas[i - 1].to(device)
    alpha_t, sigma_t = alpha_sigma(s_t)
    _, sigma_s0 = alpha_sigma(s_0)
    lambda_s0 = log_snr(s_0)
    h = log_snr(s_t) - lambda_s0
    m0 = ms[-1]
    rks, d1s = _uni_history(sigmas, ms, i, 1, m0, lambda_s0, h, order, device)
    R, b, b_h = _uni_coefficients(rks, h, order, device)
    x = last_sample
    if order == 1:
        rhos = torch.ones(1, dtype=x.dtype, device=device) * 0.5
    else:
        rhos = torch.linalg.solve(R, b).to(device).to(x.dtype)
    x_t = sigma_t / sigma_s0 * x - alpha_t * torch.expm1(-h) * m0
    corr = torch.einsum("k,bkc...->bc...", rhos[:-1], d1s) if d1s is not None else 0
    x_t = x_t - alpha_t * b_h * (corr + rhos[-1] * (m_now - m0))
    return x_t.to(x.dtype)


def sample_unipc(model: Model, x: torch.Tensor, plan: Plan, generators: Sequence, callback: Callback = None,
                 after_step: StepHook = None):
    """UniPC (bh2, data prediction): predictor step, then a corrector using the next model call."""
    sigmas, n_all = plan.sigmas, len(plan.timesteps)
    solver_order = plan.extra.get("solver_order", 2)
    lower_final = plan.extra.get("lower_order_final", True)
    disabled = set(plan.extra.get("disable_corrector", ()))
    ms: list = [None] * solver_order
    last_sample, this_order, lower_nums, total = None, 1, 0, plan.calls
    for n, i in enumerate(range(plan.begin, n_all)):
        out = call_model(model, x, plan.timesteps[i])
        m_now = vp_x0(out, x, sigmas[i], plan.prediction_type)
        if i > 0 and (i - 1) not in disabled and last_sample is not None:
            x = _unipc_correct(m_now, last_sample, x, ms, sigmas, i, this_order)
        ms = ms[1:] + [m_now]
        order = min(solver_order, n_all - i) if lower_final else solver_order
        this_order = min(order, lower_nums + 1)
        last_sample = x
        x = after(after_step, i + 1, _unipc_predict(x, ms, sigmas, i, this_order))
        lower_nums = min(lower_nums + 1, solver_order)
        progress(callback, n, total)
    return x
