"""Input for jobs/controlnet_synthetic.yaml: one row per source image of SOURCE_DIR/<label>/*.png.

Each row: id, a prompt naming the label, control_image = the source image (the worker derives its
Canny edges: control_preprocess canny, thresholds canny_low / canny_high), and the label (class_name) and source
path passed through to the manifest and the exports.

    python jobs/controlnet/make_input.py SOURCE_DIR OUT.parquet [--low 100 --high 200]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def make_input(source_dir, out, low: int = 100, high: int = 200) -> int:
    rows = []
    for label_dir in sorted(p for p in Path(source_dir).iterdir() if p.is_dir()):
        for image in sorted(label_dir.glob("*.png")):
            rows.append({"id": f"{label_dir.name}-{image.stem}", "prompt": f"a photo of a {label_dir.name}",
                         "control_image": str(image.resolve()), "control_preprocess": "canny",
                         "canny_low": low, "canny_high": high, "class_name": label_dir.name, "source": image.name})
    if not rows:
        raise SystemExit(f"{source_dir}: no <label>/*.png source images")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out)
    return len(rows)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source_dir")
    p.add_argument("out")
    p.add_argument("--low", type=int, default=100)
    p.add_argument("--high", type=int, default=200)
    args = p.parse_args()
    print(f"{make_input(args.source_dir, args.out, args.low, args.high)} source images -> {args.out}")
