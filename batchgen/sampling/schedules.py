"""Noise schedules and timestep spacings as plain functions.

Each function reproduces the arithmetic (and the float32/float64 mix) of the matching diffusers
scheduler, so that a sampler built from them takes the same steps as diffusers does.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def betas(num_train: int, beta_start: float, beta_end: float, schedule: str) -> torch.Tensor:
    """Training betas (float32), as diffusers builds them from the scheduler config."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train, dtype=torch.float32)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train, dtype=torch.float32) ** 2
    if schedule == "squaredcos_cap_v2":
        return cosine_betas(num_train)
    raise ValueError(f"scheduler config: beta_schedule {schedule!r} is not supported; use one of {BETA_SCHEDULES}")


def cosine_betas(num_train: int, max_beta: float = 0.999) -> torch.Tensor:
    """The "squaredcos_cap_v2" schedule (alpha_bar = cos^2 of a shifted ramp)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    out = [min(1 - alpha_bar((i + 1) / num_train) / alpha_bar(i / num_train), max_beta) for i in range(num_train)]
    return torch.tensor(out, dtype=torch.float32)


def rescale_zero_terminal_snr(b: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2023, algorithm 1)."""
    alphas_bar_sqrt = torch.cumprod(1.0 - b, dim=0).sqrt()
    first = alphas_bar_sqrt[0].clone()
    last = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def alphas_cumprod(cfg: dict, zero_snr: bool = False, clamp_last: bool = False) -> torch.Tensor:
    """Cumulative alphas (float32) from a (defaults-filled) scheduler config.

    ``zero_snr``: apply ``rescale_betas_zero_snr`` (only for schedulers that read it);
    ``clamp_last``: set the last value to 2**-24 when rescaled (the sigma-based schedulers do).
    """
    if cfg.get("trained_betas") is not None:
        b = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
    else:
        b = betas(int(cfg["num_train_timesteps"]), cfg["beta_start"], cfg["beta_end"], cfg["beta_schedule"])
    if zero_snr:
        b = rescale_zero_terminal_snr(b)
    ac = torch.cumprod(1.0 - b, dim=0)
    if zero_snr and clamp_last:
        ac[-1] = 2**-24
    return ac


def check_spacing(spacing: str) -> str:
    if spacing not in SPACINGS:
        raise ValueError(f"scheduler config: timestep_spacing {spacing!r} is not supported; use one of {SPACINGS}")
    return spacing


def spaced_timesteps(num_train: int, steps: int, spacing: str, offset: int = 0, extra: int = 0) -> np.ndarray:
    """Descending inference timesteps (float64 before any cast), as diffusers spaces them.

    ``extra=1`` is the multistep solvers' variant (DPM-Solver, UniPC): ``leading`` and
    ``linspace`` lay out ``steps + 1`` points and drop the last one.
    """
    check_spacing(spacing)
    if spacing == "linspace":
        if extra:
            return np.linspace(0, num_train - 1, steps + 1).round()[::-1][:-1].copy()
        return np.linspace(0, num_train - 1, steps, dtype=np.float32)[::-1].astype(np.float64)
    if spacing == "leading":
        ratio = num_train // (steps + extra)
        return (np.arange(0, steps + extra) * ratio).round()[::-1][: steps].copy() + offset
    ratio = num_train / steps
    return np.round(np.arange(num_train, 0, -ratio)) - 1


def ddim_timesteps(num_train: int, steps: int, spacing: str, offset: int = 0) -> np.ndarray:
    """DDIM/PNDM integer timesteps, descending (int64)."""
    check_spacing(spacing)
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, steps).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, steps) * (num_train // steps)).round()[::-1].copy().astype(np.int64) + offset
    return np.round(np.arange(num_train, 0, -num_train / steps)).astype(np.int64) - 1


def plms_timesteps(num_train: int, steps: int, spacing: str, offset: int = 0) -> np.ndarray:
    """PNDM(skip_prk_steps=True) timesteps: the second one is repeated (steps + 1 calls)."""
    check_spacing(spacing)
    if spacing == "linspace":
        ts = np.linspace(0, num_train - 1, steps).round().astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, steps) * (num_train // steps)).round() + offset
    else:
        ts = np.round(np.arange(num_train, 0, -num_train / steps))[::-1].astype(np.int64) - 1
    return np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].astype(np.int64)


def train_sigmas(ac: torch.Tensor) -> np.ndarray:
    """Karras sigmas of the training schedule, sqrt((1 - a) / a), computed in float32."""
    return np.array(((1 - ac) / ac) ** 0.5)


def interp_sigmas(timesteps: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Sigmas at (possibly fractional) timesteps by linear interpolation (float64)."""
    return np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) sigma ramp from sigma_max down to sigma_min (float64)."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigma, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of a sigma, by interpolation in log-sigma."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low = log_sigmas[low_idx]
    high = log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(np.shape(sigma))


def shift_sigmas(sigmas, shift: float):
    """The flow-matching resolution shift: s * x / (1 + (s - 1) * x)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


TIME_SHIFT_TYPES = ("exponential", "linear")


def time_shift(mu: float, sigmas, time_shift_type: str = "exponential", sigma: float = 1.0):
    """Resolution-dependent (dynamic) shift of flow sigmas ``t`` by ``mu`` (FLUX.1-dev).

    Written as FlowMatchEulerDiscreteScheduler writes it, so that float32 arrays stay float32 and
    float64 ones float64 (python scalars do not promote a numpy array).
    """
    t = sigmas
    if time_shift_type == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
    if time_shift_type == "linear":
        return mu / (mu + (1 / t - 1) ** sigma)
    raise ValueError(f"scheduler config: time_shift_type {time_shift_type!r} is not supported; "
                     f"use one of {TIME_SHIFT_TYPES}")


# diffusers' calculate_shift defaults (FluxPipeline reads the same keys with these defaults)
FLUX_MU_DEFAULTS = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}


def flux_mu(image_seq_len: int, scheduler_config: dict) -> float:
    """``mu`` for a dynamically shifted flow schedule: diffusers' ``calculate_shift``.

    A line through (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), read at
    ``image_seq_len``: the number of image tokens the transformer sees (FLUX: packed 2x2 latent
    patches, ``(height // 16) * (width // 16)`` for the 8x VAE). Keys missing from the config take
    the defaults FluxPipeline uses (256, 4096, 0.5, 1.15). Note StableDiffusion3Pipeline defaults a
    missing ``max_shift`` to 1.16 instead.
    """
    if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, (int, np.integer)) or image_seq_len < 1:
        raise ValueError(f"image_seq_len: expected an integer >= 1, got {image_seq_len!r}")
    if not isinstance(scheduler_config, dict):
        raise ValueError(f"scheduler_config: expected a dict, got {type(scheduler_config).__name__}")
    values = {}
    for key, default in FLUX_MU_DEFAULTS.items():
        value = scheduler_config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not math.isfinite(value):
            raise ValueError(f"scheduler config: {key}={value!r} is not a number; flux_mu needs it "
                             f"(remove the key to use diffusers' default {default})")
        values[key] = value
    base_seq_len, max_seq_len = values["base_image_seq_len"], values["max_image_seq_len"]
    if base_seq_len == max_seq_len:
        raise ValueError(f"scheduler config: base_image_seq_len and max_image_seq_len are both {base_seq_len}; "
                         f"flux_mu needs two different lengths")
    base_shift, max_shift = values["base_shift"], values["max_shift"]
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return float(image_seq_len * m + b)


def flow_sigmas(num_train: int, steps: int, shift: float, sigmas=None, mu=None,
                time_shift_type: str = "exponential", timesteps=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas with a trailing 0, timesteps) of FlowMatchEulerDiscreteScheduler.set_timesteps, float32.

    ``sigmas``: explicit sigmas (FluxPipeline passes ``linspace(1, 1/steps, steps)``), shifted in
    float32; otherwise ``steps`` points spaced evenly in t between the training schedule's ends,
    shifted in float64. ``mu`` (dynamic shifting): the time shift by ``mu`` replaces ``shift``,
    and the training schedule's ends are the unshifted 1 and 1/num_train. ``timesteps`` (not with
    ``sigmas``): an explicit list, returned as given (float32) while the sigmas ``timesteps /
    num_train`` are shifted, so with a shift other than 1 the two disagree, as in diffusers.
    """
    if timesteps is not None:
        given = np.asarray(timesteps).astype(np.float32)
        s = given / num_train
        s = shift_sigmas(s, shift) if mu is None else time_shift(mu, s, time_shift_type)
        return torch.cat([torch.from_numpy(np.asarray(s)).to(torch.float32), torch.zeros(1)]), torch.from_numpy(given)
    if sigmas is None:
        train = torch.from_numpy(np.linspace(1, num_train, num_train, dtype=np.float32)[::-1].copy()) / num_train
        if mu is None:
            train = shift_sigmas(train, shift)
        sigma_max, sigma_min = train[0].item(), train[-1].item()
        s = np.linspace(sigma_max * num_train, sigma_min * num_train, steps) / num_train
    else:
        s = np.array(sigmas).astype(np.float32)
    s = shift_sigmas(s, shift) if mu is None else time_shift(mu, s, time_shift_type)
    out = torch.from_numpy(np.asarray(s)).to(torch.float32)
    return torch.cat([out, torch.zeros(1)]), out * num_train


def dpm_flow_sigmas(num_train: int, steps: int, flow_shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 sigmas with a trailing 0, int64 timesteps) of DPMSolverMultistepScheduler(use_flow_sigmas=True).

    ``steps + 1`` points evenly spaced in alpha = 1 - sigma from 1 to 1/num_train, shifted by
    ``flow_shift`` in float64; the sigma-0 end is dropped, timesteps are sigma * num_train truncated.
    """
    alphas = np.linspace(1, 1 / num_train, steps + 1)
    s = np.flip(shift_sigmas(1.0 - alphas, flow_shift))[:-1].copy()
    timesteps = torch.from_numpy((s * num_train).copy()).to(torch.int64)
    return torch.from_numpy(np.concatenate([s, [0]]).astype(np.float32)), timesteps
