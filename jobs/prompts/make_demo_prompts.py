"""Write jobs/prompts/demo.parquet, the demo job's prompt set (run from the repo root).

Columns: id, prompt, and per-row overrides on a few rows (negative_prompt, seed, width/height) to
show that rows of different settings are grouped into separate model calls.
"""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SUBJECTS = ["a lighthouse at dawn", "a red bicycle", "a cat on a chair", "a castle in the fog",
            "a boat on a lake", "a city street at night", "a dragon over mountains", "a robot in a garden",
            "an old book on a table", "a forest river", "a train on a bridge", "a field of flowers"]


def main() -> None:
    n = len(SUBJECTS)
    table = pa.table({
        "id": [f"demo-{i:03d}" for i in range(n)],
        "prompt": [f"{s}, highly detailed" for s in SUBJECTS],
        "negative_prompt": [None] * (n - 2) + ["blurry", "dark"],
        "seed": pa.array([None] * (n - 1) + [42], pa.int64()),
        "width": pa.array([None] * (n - 4) + [96] * 4, pa.int32()),
    })
    out = Path(__file__).with_name("demo.parquet")
    pq.write_table(table, out)
    print(f"wrote {out} ({n} prompts)")


if __name__ == "__main__":
    main()
