"""Helpers that write job outputs in the runner's exact layout (PNG images + manifest.parquet)
from numpy images, so compare/export tests need neither Ray nor a model. Plain helpers (imported
as ``tests.fixtures_regression``), no pytest fixtures."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from batchgen.manifest import MANIFEST_SCHEMA



def noise_image(seed: int, h: int = 24, w: int = 24) -> np.ndarray:
    """A smooth-ish random RGB uint8 image (so SSIM is meaningful)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(h // 4 + 1, w // 4 + 1, 3)).astype(np.float64)
    img = np.kron(base, np.ones((4, 4, 1)))[:h, :w]
    return np.clip(img + rng.normal(0, 6, size=img.shape), 0, 255).astype(np.uint8)


def png_bytes(img: np.ndarray, text: str | None = None) -> bytes:
    from PIL import PngImagePlugin

    info = None
    if text is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("batchgen", text)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def write_job_output(root, items: list[dict], worker: str = "w0") -> Path:
    """Write ``root/images/<id>.png``, ``root/manifest.parquet`` (sorted) and ``job.json``.

    Each item: ``item_id`` and ``image`` (uint8 array; omit or ``None`` with ``status="failed"``),
    optional ``png_text`` (metadata, changes bytes not pixels) and any manifest column override.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for n, it in enumerate(sorted(items, key=lambda i: i["item_id"])):
        it = dict(it)
        img = it.pop("image", None)
        text = it.pop("png_text", None)
        row = {
            "item_id": it["item_id"], "source_file": "prompts.parquet", "source_row": n,
            "prompt": f"prompt for {it['item_id']}", "negative_prompt": "", "seed": 1000 + n,
            "sampler": "ddim", "steps": 4, "guidance_scale": 7.5, "width": 24, "height": 24,
            "batch_size": 2, "strength": None, "init_image": None, "model_uri": "builtin:tiny",
            "model_fingerprint": "f" * 64, "image_uri": None, "image_format": "png",
            "image_sha256": None, "image_bytes": None, "status": "ok", "error": None,
            "attempt": 1, "worker": worker, "render_ms": 12.5 + n, "encode_ms": 1.5,
            "batchgen_version": "0.1.0", "sampler_options": "{}",
        }
        row.update(it)
        if row["status"] == "ok":
            data = png_bytes(img, text)
            path = root / "images" / f"{row['item_id']}.png"
            path.write_bytes(data)
            row.update(image_uri=str(path), image_sha256=hashlib.sha256(data).hexdigest(),
                       image_bytes=len(data), height=img.shape[0], width=img.shape[1])
        elif row["error"] is None:
            row["error"] = "RuntimeError: boom"
        rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), root / "manifest.parquet")
    (root / "job.json").write_text(json.dumps({"name": "fixture"}))
    return root
