"""Prompt-template expansion at scale: time and peak RSS of ``batchgen prompts`` for N rows.

Builds a realistic template in a temp folder (1,000 classes from a CSV, a 200-line wildcard file
whose lines use another wildcard, inline and weighted choices, a negative prompt, label columns)
and expands it to Parquet in each mode: sampled (``count`` rows per class) and combinatorial
(capped with ``limit``). Targets for 1,000,000 rows: < 30 s and < 500 MB peak RSS.

    python benchmarks/prompts_expand.py [--rows 1000000] [--mode sampled|combinatorial|both]

Each mode runs in a fresh subprocess so its peak RSS is its own. The CPU seconds are the steadier
figure on a shared machine (wall time includes waiting for a core).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLASSES = 1000


def write_template(root: Path, rows: int, mode: str) -> Path:
    with open(root / "classes.csv", "w") as fh:
        fh.write("name,id\n")
        for i in range(CLASSES):
            fh.write(f"object number {i},{i}\n")
    wild = root / "wildcards"
    wild.mkdir(exist_ok=True)
    (wild / "artist.txt").write_text("".join(f"artist {i}\n" for i in range(50)))
    (wild / "style.txt").write_text("# styles\n" + "".join(
        f"{{oil|acrylic|2::digital}} style {i} by __artist__\n" for i in range(200)))
    count = max(1, rows // CLASSES)
    body = {
        "seed": 1234,
        "mode": mode,
        "count": count if mode == "sampled" else None,
        "per": "class" if mode == "sampled" else None,
        "limit": rows if mode == "combinatorial" else None,
        "negative_prompt": "{blurry|low quality|3::}, watermark",
        "variables": {"class": {"file": "classes.csv"},
                      "color": {"values": ["red", "green", "blue", "black", "white"], "weights": [1, 1, 1, 2, 2]}},
        "columns": {"label": "class.id", "class_name": "class.name", "color": "color"},
        "templates": [{"name": "photo",
                       "prompt": "a {photo|close-up photo|2::wide shot} of a {color} {class.name}, "
                                 "{in a {dense|sparse} forest|on a beach|in a city}, __style__, {highly detailed|}"}],
    }
    body = {k: v for k, v in body.items() if v is not None}
    path = root / "template.yaml"
    path.write_text(json.dumps(body, indent=1))  # JSON is YAML
    return path


def child(template: Path, out: Path) -> None:
    from batchgen.prompts import expand_to_parquet, load_template

    start = time.perf_counter()
    cpu0 = time.process_time()
    tpl = load_template(template)
    rows = expand_to_parquet(tpl, str(out))
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"rows": rows, "seconds": round(elapsed, 2), "rows_per_s": round(rows / elapsed),
                      "cpu_seconds": round(cpu, 2), "peak_rss_mb": round(rss, 1),
                      "file_mb": round(out.stat().st_size / 2**20, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--mode", choices=("sampled", "combinatorial", "both"), default="both")
    parser.add_argument("--child", nargs=2, metavar=("TEMPLATE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]))
        return
    modes = ("sampled", "combinatorial") if args.mode == "both" else (args.mode,)
    with tempfile.TemporaryDirectory(prefix="bench-prompts-") as tmp:
        for mode in modes:
            root = Path(tmp) / mode
            root.mkdir()
            template = write_template(root, args.rows, mode)
            env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
            res = subprocess.run([sys.executable, __file__, "--child", str(template), str(root / "p.parquet")],
                                 env=env, capture_output=True, text=True)
            if res.returncode != 0:
                sys.exit(res.stderr)
            stats = json.loads(res.stdout.strip().splitlines()[-1])
            ok = stats["seconds"] < 30 and stats["peak_rss_mb"] < 500
            print(f"{mode:14s} {stats['rows']:>9,d} rows  {stats['seconds']:6.1f} s "
                  f"({stats['cpu_seconds']:.1f} s CPU)  "
                  f"{stats['rows_per_s']:>9,d} rows/s  peak RSS {stats['peak_rss_mb']:6.1f} MB  "
                  f"file {stats['file_mb']} MB  {'OK' if ok else 'OVER TARGET'} (< 30 s, < 500 MB)")


if __name__ == "__main__":
    main()
