"""Max abs diff, PSNR and SSIM against values worked out by hand on small arrays."""

import math

import numpy as np
import pytest

from batchgen.metrics import gaussian_window, image_metrics, max_abs_diff, psnr, ssim

C1 = (0.01 * 255) ** 2  # 6.5025
C2 = (0.03 * 255) ** 2  # 58.5225


def test_max_abs_diff_and_psnr_by_hand():
    a = np.zeros((2, 2), np.uint8)
    b = a.copy()
    b[0, 1] = 10
    assert max_abs_diff(a, b) == 10
    assert max_abs_diff(b, a) == 10  # no uint8 wrap-around
    # MSE = 10**2 / 4 = 25 -> PSNR = 10 log10(255**2 / 25) = 10 log10(2601) = 34.1514 dB
    assert psnr(a, b) == pytest.approx(34.15140352195873, abs=1e-9)
    c = np.full((3, 3, 3), 200, np.uint8)
    d = c.copy()
    d[..., 0] = 0  # one channel of three off by 200: MSE = 40000 / 3
    assert psnr(c, d) == pytest.approx(10 * math.log10(65025 / (40000 / 3)), abs=1e-9)
    assert psnr(a, a) == math.inf
    assert max_abs_diff(np.array([[0]], np.uint8), np.array([[255]], np.uint8)) == 255


def test_ssim_constant_images_by_hand():
    # No variance: SSIM = (2*mu_x*mu_y + C1) / (mu_x^2 + mu_y^2 + C1) * (0 + C2) / (0 + C2).
    a = np.full((11, 11), 100, np.uint8)
    b = np.full((11, 11), 110, np.uint8)
    expected = (2 * 100 * 110 + C1) / (100**2 + 110**2 + C1)
    assert expected == pytest.approx(0.99547, abs=1e-5)
    assert ssim(a, b) == pytest.approx(expected, abs=1e-12)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)


def _ssim_brute(x, y):
    """Wang et al. with explicit loops: gaussian weights w, population statistics, valid windows."""
    w1 = [math.exp(-((i - 5) ** 2) / (2 * 1.5**2)) for i in range(11)]
    s = sum(w1)
    w = [[w1[i] * w1[j] / (s * s) for j in range(11)] for i in range(11)]
    x = x.astype(float)
    y = y.astype(float)
    vals = []
    for r in range(x.shape[0] - 10):
        for c in range(x.shape[1] - 10):
            px = x[r:r + 11, c:c + 11]
            py = y[r:r + 11, c:c + 11]
            mx = sum(w[i][j] * px[i, j] for i in range(11) for j in range(11))
            my = sum(w[i][j] * py[i, j] for i in range(11) for j in range(11))
            vx = sum(w[i][j] * (px[i, j] - mx) ** 2 for i in range(11) for j in range(11))
            vy = sum(w[i][j] * (py[i, j] - my) ** 2 for i in range(11) for j in range(11))
            cxy = sum(w[i][j] * (px[i, j] - mx) * (py[i, j] - my) for i in range(11) for j in range(11))
            vals.append((2 * mx * my + C1) * (2 * cxy + C2) / ((mx * mx + my * my + C1) * (vx + vy + C2)))
    return sum(vals) / len(vals)


def test_ssim_matches_loop_definition_on_small_arrays():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(13, 12), dtype=np.uint8)  # 3 x 2 valid windows
    y = np.clip(x.astype(int) + rng.integers(-40, 41, size=x.shape), 0, 255).astype(np.uint8)
    got = ssim(x, y)
    assert got == pytest.approx(_ssim_brute(x, y), abs=1e-12)
    assert 0.0 < got < 1.0
    # Colour: the mean of the per-channel scores.
    rgb_x = np.stack([x, y, x], axis=2)
    rgb_y = np.stack([y, y, 255 - x], axis=2)
    per_channel = [_ssim_brute(rgb_x[..., k], rgb_y[..., k]) for k in range(3)]
    assert ssim(rgb_x, rgb_y) == pytest.approx(sum(per_channel) / 3, abs=1e-12)
    # Anti-correlated content scores far below similar content.
    assert ssim(x, 255 - x) < 0.0 < got


def test_gaussian_window_and_small_images():
    g = gaussian_window()
    assert g.shape == (11,) and g.sum() == pytest.approx(1.0)
    assert g[5] == g.max() and g[0] == pytest.approx(g[10])
    assert g[5] / g[4] == pytest.approx(math.exp(1 / (2 * 1.5**2)))
    tiny = np.array([[0, 255], [255, 0]], np.uint8)
    assert ssim(tiny, tiny) == pytest.approx(1.0)
    assert ssim(tiny, 255 - tiny) < 0.0


def test_errors_and_image_metrics():
    with pytest.raises(ValueError, match="same shape"):
        ssim(np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match="HxW"):
        psnr(np.zeros((4,), np.uint8), np.zeros((4,), np.uint8))
    a = np.zeros((12, 12, 3), np.uint8)
    m = image_metrics(a, a)
    assert m == {"max_abs_diff": 0, "psnr": None, "ssim": pytest.approx(1.0)}
