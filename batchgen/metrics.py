"""Image difference metrics for regression compares: max abs diff, PSNR, SSIM.

All functions take two uint8 images of the same shape, ``HxW`` or ``HxWxC`` (numpy arrays), and
compute in float64 with numpy (no torch, no model downloads).

- ``max_abs_diff``: the largest ``|a - b|`` over all pixels and channels (0..255).
- ``psnr``: ``10 * log10(255**2 / MSE)`` with the MSE over all pixels and channels; ``inf`` for
  identical images.
- ``ssim``: mean SSIM of Wang, Bovik, Sheikh & Simoncelli (2004), "Image quality assessment: from
  error visibility to structural similarity", exactly as their reference implementation
  (``ssim_index.m``): an 11x11 Gaussian window with sigma 1.5 (normalised to sum 1), K1 = 0.01,
  K2 = 0.03, L = 255, so C1 = (K1*L)**2 and C2 = (K2*L)**2; local means, variances and covariance
  are Gaussian-weighted (population, not sample, statistics); the SSIM map is taken over the
  "valid" region only (no padding: ``(H-10) x (W-10)`` positions) and averaged. Colour images are
  scored per channel and the channel scores averaged. Images smaller than 11 pixels on a side are
  scored with one window covering the whole image (the Gaussian cropped to the image and
  renormalised), so tiny images still get a value.
"""

from __future__ import annotations

import math

import numpy as np

WINDOW_SIZE = 11
SIGMA = 1.5
K1 = 0.01
K2 = 0.03
DATA_RANGE = 255.0


def _check_pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape, got {a.shape} and {b.shape}")
    if a.ndim not in (2, 3) or a.size == 0:
        raise ValueError(f"images must be HxW or HxWxC and non-empty, got shape {a.shape}")
    return a, b


def max_abs_diff(a, b) -> int:
    """Largest absolute difference between two images, over all pixels and channels."""
    a, b = _check_pair(a, b)
    return int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())


def mse(a, b) -> float:
    """Mean squared error over all pixels and channels."""
    a, b = _check_pair(a, b)
    d = a.astype(np.float64) - b.astype(np.float64)
    return float(np.mean(d * d))


def psnr(a, b, data_range: float = DATA_RANGE) -> float:
    """Peak signal-to-noise ratio in dB (``inf`` when the images are identical)."""
    m = mse(a, b)
    if m == 0.0:
        return math.inf
    return float(10.0 * math.log10(data_range * data_range / m))


def gaussian_window(size: int = WINDOW_SIZE, sigma: float = SIGMA) -> np.ndarray:
    """1-D Gaussian of ``size`` taps centred on the middle tap, normalised to sum 1.

    The 2-D window is its outer product with itself (equal to MATLAB's
    ``fspecial('gaussian', size, sigma)``).
    """
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def ssim(a, b, data_range: float = DATA_RANGE) -> float:
    """Mean SSIM (Wang et al. 2004), averaged over channels; see the module docstring."""
    a, b = _check_pair(a, b)
    if a.ndim == 2:
        a = a[:, :, None]
        b = b[:, :, None]
    h, w, _ = a.shape
    gh = _cropped_window(min(WINDOW_SIZE, h))
    gw = _cropped_window(min(WINDOW_SIZE, w))
    x = a.astype(np.float64)
    y = b.astype(np.float64)

    def blur(t):  # separable Gaussian along axes 1 and 2, "valid" region only (no padding)
        rows = t.shape[1] - len(gh) + 1
        acc = t[:, :rows] * gh[0]
        for k in range(1, len(gh)):
            acc += t[:, k:k + rows] * gh[k]
        cols = acc.shape[2] - len(gw) + 1
        out = acc[:, :, :cols] * gw[0]
        for k in range(1, len(gw)):
            out += acc[:, :, k:k + cols] * gw[k]
        return out

    c1 = (K1 * data_range) ** 2
    c2 = (K2 * data_range) ** 2
    # One pass over the five local statistics, each HxWxC: x, y, x*x, y*y, x*y.
    mu_x, mu_y, exx, eyy, exy = blur(np.stack([x, y, x * x, y * y, x * y]))
    sxx = exx - mu_x * mu_x
    syy = eyy - mu_y * mu_y
    sxy = exy - mu_x * mu_y
    num = (2.0 * mu_x * mu_y + c1) * (2.0 * sxy + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2)
    per_channel = (num / den).mean(axis=(0, 1))
    return float(per_channel.mean())


def _cropped_window(size: int) -> np.ndarray:
    if size == WINDOW_SIZE:
        return gaussian_window()
    # A side shorter than the window: the central ``size`` taps of the full window, renormalised.
    full = gaussian_window()
    start = (WINDOW_SIZE - size) // 2
    g = full[start : start + size]
    return g / g.sum()


def image_metrics(a, b) -> dict:
    """``{"max_abs_diff", "psnr", "ssim"}`` for two same-shape uint8 images (psnr None if identical)."""
    d = max_abs_diff(a, b)
    if d == 0:  # pixel-identical: skip the filtering
        return {"max_abs_diff": 0, "psnr": None, "ssim": 1.0}
    return {"max_abs_diff": d, "psnr": psnr(a, b), "ssim": ssim(a, b)}
