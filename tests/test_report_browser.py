"""The compare report opened in a real headless Chromium: changed items listed, images loaded.

Needs the Debian ``chromium`` package (``.ci/run`` installs it); skipped with a reason otherwise.
``BATCHGEN_CHROMIUM`` may name another Chromium/Chrome binary.
"""

import os
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from batchgen.cli import main
from tests.fixtures_regression import noise_image, write_job_output


def _chromium() -> str | None:
    for cand in (os.environ.get("BATCHGEN_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _run_chromium(binary, tmp_path, *args) -> subprocess.CompletedProcess:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
           "--virtual-time-budget=10000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


class _Dom(HTMLParser):
    """Collects <body> attributes, changed-item blocks and every <img>'s attributes."""

    def __init__(self):
        super().__init__()
        self.body, self.changed, self.imgs = {}, [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        elif tag == "div" and "changed" in (a.get("class") or "").split():
            self.changed.append(a.get("data-item"))
        elif tag == "img":
            self.imgs.append(a)


@pytest.fixture
def report_dir(tmp_path):
    items = [dict(item_id=f"case-{k}", image=noise_image(k, 48, 48)) for k in range(5)]
    cand = [dict(i) for i in items]
    cand[1].update(image=noise_image(101, 48, 48), sampler="euler")
    shifted = np.roll(items[3]["image"], 2, axis=1)
    cand[3].update(image=shifted)
    cand[4].update(image=noise_image(4, 40, 48))  # other size: listed without a heatmap
    base = write_job_output(tmp_path / "base", items)
    run = write_job_output(tmp_path / "cand", cand)
    rep = tmp_path / "report"
    assert main(["compare", str(base), str(run), "--report", str(rep)]) == 1
    return rep


def test_report_in_headless_chromium(report_dir, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no headless browser: install the Debian packages chromium and chromium-driver "
                    "(.ci/run does) or set BATCHGEN_CHROMIUM")
    url = (report_dir / "index.html").as_uri()
    res = _run_chromium(binary, tmp_path, "--dump-dom", url)
    assert res.returncode == 0, res.stderr[-2000:]
    dom = _Dom()
    dom.feed(res.stdout)
    assert sorted(dom.changed) == ["case-1", "case-3", "case-4"]
    # 2 items x (baseline, candidate, heatmap) + the resized item's baseline and candidate.
    assert len(dom.imgs) == 8
    assert dom.body.get("data-ready") == "yes"
    assert dom.body.get("data-images-loaded") == "8" and dom.body.get("data-images-failed") == "0"
    assert all(img.get("data-loaded") == "1" for img in dom.imgs), dom.imgs
    assert {img["class"] for img in dom.imgs} == {"baseline", "candidate", "diff"}

    shot = report_dir / "screenshot.png"
    res = _run_chromium(binary, tmp_path, f"--screenshot={shot}", "--window-size=1280,1600",
                        "--hide-scrollbars", url)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 1600)
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 5  # something was drawn, not a blank page
