"""`batchgen compare BASELINE CANDIDATE`: item-by-item regression compare of two job outputs.

The two outputs' ``manifest.parquet`` files are joined on ``item_id`` (a merge over the sorted
manifests). Each item lands in one class:

- ``identical``: the stored image files have the same sha256 (the images are not even read);
- ``within_tolerance``: the bytes differ but the pixels pass every threshold (default thresholds:
  max pixel difference 0, so only pixel-identical images pass, e.g. when only metadata changed);
- ``changed``: some threshold fails, the sizes differ, or an image cannot be read;
- ``missing``: ok in the baseline but absent or failed in the candidate (or failed in both);
- ``new``: only in the candidate (or failed in the baseline only).

For every joined item the manifest columns whose values differ are listed as its differing
settings (timings, worker, attempt, image_uri and batchgen_version are ignored unless asked).
The two job.json files are compared too: every output-affecting spec setting that differs is
named, with how many input rows override it (``overridden_by_input``), even when no image
changed; a pass then says so instead of a plain PASS.
Images are read two at a time per worker and dropped after scoring, so memory does not grow with
the job; the report re-reads only the worst items it shows. Exit code 0 only when every item is
identical or within tolerance and none is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

from .errors import InputError, StorageError
from .outputs import (REQUIRED_COLUMNS, Output, decode_image, image_location, iter_rows,  # noqa: F401
                      open_output, read_manifest)

log = logging.getLogger(__name__)

CLASSES = ("identical", "within_tolerance", "changed", "missing", "new")
# Provenance and bookkeeping, not render settings: a nightly run from another checkout or bucket
# has other input paths and workers for the same items.
DEFAULT_IGNORED_SETTINGS = ("render_ms", "encode_ms", "worker", "attempt", "image_uri", "batchgen_version",
                            "source_file", "source_row")
# Columns that are results rather than settings; compared through the image itself.
RESULT_COLUMNS = ("item_id", "image_sha256", "image_bytes", "status", "error")
# job.json spec settings (digest_fields) that differ between two outputs of one job by nature:
# where the input lives (a nightly run reads it from another checkout or bucket).
IGNORED_JOB_SETTINGS = ("input.uri",)


@dataclasses.dataclass
class Thresholds:
    """Pass criteria for items whose bytes differ; ``None`` disables a criterion."""

    max_pixel_diff: int | None = 0
    min_psnr: float | None = None
    min_ssim: float | None = None

    def __post_init__(self):
        if self.max_pixel_diff is not None and not 0 <= int(self.max_pixel_diff) <= 255:
            raise ValueError(f"max_pixel_diff must be in 0..255, got {self.max_pixel_diff}")
        if self.min_ssim is not None and not -1.0 <= float(self.min_ssim) <= 1.0:
            raise ValueError(f"min_ssim must be in -1..1, got {self.min_ssim}")

    def failures(self, m: dict) -> list[str]:
        """The thresholds that metrics ``m`` (from :func:`batchgen.metrics.image_metrics`) fail."""
        out = []
        if self.max_pixel_diff is not None and m["max_abs_diff"] > self.max_pixel_diff:
            out.append(f"max pixel diff {m['max_abs_diff']} > {self.max_pixel_diff}")
        if self.min_psnr is not None and m["psnr"] is not None and m["psnr"] < self.min_psnr:
            out.append(f"PSNR {m['psnr']:.2f} dB < {self.min_psnr}")
        if self.min_ssim is not None and m["ssim"] < self.min_ssim:
            out.append(f"SSIM {m['ssim']:.5f} < {self.min_ssim}")
        return out


@dataclasses.dataclass
class ItemResult:
    """One item's verdict. ``settings`` maps a differing column to ``[baseline, candidate]``."""

    item_id: str
    status: str
    prompt: str | None = None
    max_abs_diff: int | None = None
    psnr: float | None = None
    ssim: float | None = None
    note: str = ""
    settings: dict = dataclasses.field(default_factory=dict)
    baseline_image: str | None = None
    candidate_image: str | None = None
    baseline_size: list | None = None
    candidate_size: list | None = None

    def badness(self) -> tuple:
        """Sort key, worst first: changed without metrics, then by SSIM, PSNR, max diff."""
        rank = {"changed": 0, "missing": 1, "new": 2, "within_tolerance": 3, "identical": 4}[self.status]
        no_metrics = 0 if self.ssim is None else 1
        ssim = self.ssim if self.ssim is not None else -2.0
        psnr = self.psnr if self.psnr is not None else float("inf")
        return (rank, no_metrics, ssim, psnr, -(self.max_abs_diff or 0), self.item_id)


@dataclasses.dataclass
class CompareResult:
    """Counts per class, the non-identical items (worst first) and the overall verdict."""

    baseline: str
    candidate: str
    thresholds: Thresholds
    counts: dict
    items: list
    settings_differ: dict
    # spec settings that differ between the two job.json files: {key: {baseline, candidate, overridden_by_input}}
    job_settings_differ: dict = dataclasses.field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.counts["changed"] == 0 and self.counts["missing"] == 0

    def to_json(self) -> dict:
        return {
            "baseline": self.baseline,
            "candidate": self.candidate,
            "thresholds": dataclasses.asdict(self.thresholds),
            "passed": self.passed,
            "counts": dict(self.counts),
            "settings_differ": dict(self.settings_differ),
            "job_settings_differ": dict(self.job_settings_differ),
            "items": [dataclasses.asdict(i) for i in self.items],
        }


# --- the compare ----------------------------------------------------------------------------


def join_sorted(base, cand) -> Iterator[tuple[str, dict | None, dict | None]]:
    """Merge two manifests sorted by item_id: ``(item_id, baseline row, candidate row)``."""
    bi, ci = iter_rows(base), iter_rows(cand)
    b, c = next(bi, None), next(ci, None)
    while b is not None or c is not None:
        if c is None or (b is not None and b["item_id"] < c["item_id"]):
            yield b["item_id"], b, None
            b = next(bi, None)
        elif b is None or c["item_id"] < b["item_id"]:
            yield c["item_id"], None, c
            c = next(ci, None)
        else:
            yield b["item_id"], b, c
            b, c = next(bi, None), next(ci, None)


def differing_settings(b: dict, c: dict, ignore) -> dict:
    """Columns (other than results and ``ignore``) whose values differ: ``{col: [b, c]}``."""
    skip = set(ignore) | set(RESULT_COLUMNS)
    out = {}
    for col in sorted(set(b) | set(c)):
        if col in skip:
            continue
        bv, cv = b.get(col), c.get(col)
        if bv != cv:
            out[col] = [bv, cv]
    return out


# Conditioning files an item was rendered from (a column of URIs -> the column of their sha256).
CONDITIONING_DIGESTS = {"control_image": "control_image_sha256", "mask_image": "mask_image_sha256",
                        "init_image": "init_image_sha256"}


def conditioning_note(b: dict, c: dict) -> str:
    """Names every conditioning file whose bytes differ between the two renders (its sha256
    changed), also when the generated pixels are equal: "" when none did."""
    notes = []
    for column, sha in CONDITIONING_DIGESTS.items():
        bs, cs = b.get(sha), c.get(sha)
        if bs and cs and bs != cs:
            notes.append(f"{column} {c.get(column) or b.get(column)} changed (sha256 {bs[:12]} -> {cs[:12]})")
    return "; ".join(notes)


def _job_settings(out) -> dict | None:
    """An output's recorded spec settings (job.json ``digest_fields``), or None when it has none."""
    try:
        job = out.job if out.has_job() else None
    except (InputError, StorageError):
        return None
    fields = job.get("digest_fields") if isinstance(job, dict) else None
    return fields if isinstance(fields, dict) else None


def _overrides(out) -> dict:
    try:
        value = out.job.get("overridden_by_input")
    except (InputError, StorageError, AttributeError):
        return {}
    return value if isinstance(value, dict) else {}


def job_differences(bout, cout, ignore=()) -> dict:
    """Spec settings that differ between the two outputs' job.json files (those that decide the
    images, ``input.uri`` and ``ignore`` aside): ``{key: {"baseline": value, "candidate": value,
    "overridden_by_input": {"baseline": {...} | None, "candidate": ...}}}``, where the override
    records say in how many input rows an input column replaced the setting."""
    b, c = _job_settings(bout), _job_settings(cout)
    if b is None or c is None:
        return {}
    skip = set(IGNORED_JOB_SETTINGS) | set(ignore)
    bo, co = _overrides(bout), _overrides(cout)
    out = {}
    for key in sorted(set(b) | set(c)):
        if key in skip or b.get(key) == c.get(key):
            continue
        parent = ".".join(key.split(".")[:2])  # overrides are recorded per setting: "sampling.steps"
        out[key] = {"baseline": b.get(key), "candidate": c.get(key),
                    "overridden_by_input": {"baseline": bo.get(parent), "candidate": co.get(parent)}}
    return out


def override_note(entry: dict) -> str:
    """How the inputs override a differing job setting, in words ("" when they do not)."""
    o = entry.get("overridden_by_input") or {}
    b, c = o.get("baseline"), o.get("candidate")

    def says(r):
        return f"input column {r.get('column')!r} overrides it in {r.get('rows')} of {r.get('of')} rows"

    if b and c and b.get("rows") == b.get("of") and c.get("rows") == c.get("of") and b.get("column") == c.get("column"):
        return f"{says(b)} of both outputs: the spec's value is used by no item"
    parts = [f"{name}: {says(r)}" for name, r in (("baseline", b), ("candidate", c)) if r]
    return "; ".join(parts)


def _score_pair(job) -> ItemResult:
    """Read both images of a byte-different item and classify it (runs in a worker thread)."""
    from .metrics import image_metrics

    res, b_loc, c_loc, b_sha, c_sha, thresholds = job
    notes = [res.note] if res.note else []  # a changed conditioning file, named already
    try:
        b_bytes, c_bytes = b_loc.read_bytes(), c_loc.read_bytes()
        for name, data, sha in (("baseline", b_bytes, b_sha), ("candidate", c_bytes, c_sha)):
            if sha and hashlib.sha256(data).hexdigest() != sha:
                notes.append(f"{name} image bytes do not match the manifest sha256")
        a = decode_image(b_bytes, b_loc.uri)
        b = decode_image(c_bytes, c_loc.uri)
    except (InputError, StorageError) as exc:
        res.status, res.note = "changed", str(exc)
        return res
    res.baseline_size, res.candidate_size = [a.shape[1], a.shape[0]], [b.shape[1], b.shape[0]]
    if a.shape != b.shape:
        notes.append(f"size differs: baseline {a.shape[1]}x{a.shape[0]}, candidate {b.shape[1]}x{b.shape[0]}")
        res.status = "changed"
    else:
        m = image_metrics(a, b)
        res.max_abs_diff, res.psnr, res.ssim = m["max_abs_diff"], m["psnr"], m["ssim"]
        fails = thresholds.failures(m)
        res.status = "changed" if fails or len(notes) > bool(res.note) else "within_tolerance"
        notes.extend(fails)
        if m["max_abs_diff"] == 0 and len(notes) == bool(res.note) and not fails:
            notes.append("metadata only: every pixel is identical, the image files' embedded metadata differs")
    res.note = "; ".join(notes)
    return res


def compare_outputs(
    baseline: str,
    candidate: str,
    thresholds: Thresholds | None = None,
    *,
    storage_config=None,
    ignore_settings=DEFAULT_IGNORED_SETTINGS,
    progress_every: int = 500,
    workers: int = 4,
) -> CompareResult:
    """Compare two job outputs (local paths, file:// or s3:// URIs) item by item."""
    if progress_every < 1:
        raise ValueError(f"progress_every must be >= 1, got {progress_every}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    thresholds = thresholds or Thresholds()
    bout, cout = Output.open(baseline, storage_config), Output.open(candidate, storage_config)
    btab, ctab = bout.manifest, cout.manifest
    counts = {k: 0 for k in CLASSES}
    settings_differ: dict[str, int] = {}
    items: list[ItemResult] = []
    t0 = time.monotonic()
    seen = 0

    def record(res: ItemResult):
        nonlocal seen
        counts[res.status] += 1
        if res.status != "identical" or res.note:
            items.append(res)
        for col in res.settings:
            settings_differ[col] = settings_differ.get(col, 0) + 1
        seen += 1
        if seen % progress_every == 0:
            rate = seen / max(time.monotonic() - t0, 1e-9)
            log.info("compare: %d items (%.0f/s): %s", seen, rate, _counts_line(counts))

    pending: list = []
    with ThreadPoolExecutor(max_workers=workers) as pool:

        def flush():
            for res in pool.map(_score_pair, pending):
                record(res)
            pending.clear()

        for item_id, b, c in join_sorted(btab, ctab):
            b_ok = b is not None and b.get("status") == "ok"
            c_ok = c is not None and c.get("status") == "ok"
            res = ItemResult(item_id=item_id, status="identical", prompt=(b or c).get("prompt"))
            if b is not None and c is not None:
                res.settings = differing_settings(b, c, ignore_settings)
                res.note = conditioning_note(b, c)
            if b_ok and c_ok:
                if b.get("image_sha256") and b.get("image_sha256") == c.get("image_sha256"):
                    record(res)  # identical bytes: the images are not read
                    continue
                b_loc, c_loc = bout.image_location(b), cout.image_location(c)
                res.baseline_image, res.candidate_image = b_loc.uri, c_loc.uri
                job = (res, b_loc, c_loc, b.get("image_sha256"), c.get("image_sha256"), thresholds)
                pending.append(job)
                if len(pending) >= 4 * workers:
                    flush()
                continue
            if b_ok:
                res.status = "missing"
                res.baseline_image = bout.image_location(b).uri
                res.note = "not in candidate" if c is None else f"failed in candidate: {c.get('error')}"
            elif c_ok:
                res.status = "new"
                res.candidate_image = cout.image_location(c).uri
                res.note = "" if b is None else f"failed in baseline: {b.get('error')}"
            else:  # failed wherever it appears
                res.status = "missing"
                res.note = "failed in " + " and ".join(
                    n for n, r in (("baseline", b), ("candidate", c)) if r is not None)
            record(res)
        flush()
    items.sort(key=ItemResult.badness)
    log.info("compare: done, %d items in %.1f s: %s", seen, time.monotonic() - t0, _counts_line(counts))
    return CompareResult(bout.uri, cout.uri, thresholds, counts, items, settings_differ,
                         job_differences(bout, cout, ignore_settings))


def _counts_line(counts: dict) -> str:
    return ", ".join(f"{counts[k]} {k.replace('_', ' ')}" for k in CLASSES)


def format_summary(result: CompareResult, limit: int = 20) -> str:
    """Human-readable summary: counts, verdict and the worst ``limit`` items."""
    total = sum(result.counts.values())
    verdict = "PASS" if result.passed else "FAIL"
    job = result.job_settings_differ
    if job and result.passed:
        verdict += (f", but the job settings differ ({', '.join(job)}; see below): the images match although "
                    f"the specs do not")
    lines = [f"compare {result.baseline} -> {result.candidate}",
             f"{total} items: {_counts_line(result.counts)} -> {verdict}"]
    if job:
        lines.append("job settings that differ (job.json):")
        for key, entry in job.items():
            note = override_note(entry)
            lines.append(f"  {key}: {entry['baseline']!r} -> {entry['candidate']!r}" + (f" [{note}]" if note else ""))
    if result.settings_differ:
        lines.append("settings that differ: " + ", ".join(
            f"{k} ({n} items)" for k, n in sorted(result.settings_differ.items())))
    for it in result.items[:limit]:
        metrics = ""
        if it.ssim is not None:
            p = "inf" if it.psnr is None else f"{it.psnr:.2f}"
            metrics = f" max diff {it.max_abs_diff}, PSNR {p} dB, SSIM {it.ssim:.5f}"
        extra = f" [{it.note}]" if it.note else ""
        lines.append(f"  {it.status:16s} {it.item_id}{metrics}{extra}")
    if len(result.items) > limit:
        lines.append(f"  ... {len(result.items) - limit} more (see summary.json with --report)")
    return "\n".join(lines)


# --- CLI ------------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("baseline", help="baseline job output (folder, file:// or s3:// URI)")
    parser.add_argument("candidate", help="candidate job output (folder, file:// or s3:// URI)")
    parser.add_argument("--report", metavar="DIR", help="write index.html, images and summary.json here")
    parser.add_argument("--max-pixel-diff", type=int, default=0, metavar="N",
                        help="largest allowed |pixel difference| 0..255 (default 0: pixel-identical)")
    parser.add_argument("--min-psnr", type=float, default=None, metavar="X", help="lowest allowed PSNR in dB")
    parser.add_argument("--min-ssim", type=float, default=None, metavar="Y", help="lowest allowed SSIM")
    parser.add_argument("--ignore-setting", action="append", default=[], metavar="COLUMN",
                        help="manifest column not to report as a differing setting (repeatable)")
    parser.add_argument("--include-setting", action="append", default=[], metavar="COLUMN",
                        help="report this normally ignored column too, e.g. worker (repeatable)")
    parser.add_argument("--report-limit", type=int, default=200, metavar="N",
                        help="changed items shown with images in the report, worst first (default 200)")
    parser.add_argument("--progress-every", type=int, default=500, metavar="N",
                        help="log a progress line every N items (default 500)")
    parser.add_argument("--workers", type=int, default=4, help="threads reading and scoring images")
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (default AWS_ENDPOINT_URL)")


def run(args) -> int:
    from .storage import StorageConfig

    cfg = StorageConfig(endpoint_url=args.endpoint_url)
    ignore = (set(DEFAULT_IGNORED_SETTINGS) | set(args.ignore_setting)) - set(args.include_setting)
    result = compare_outputs(
        args.baseline, args.candidate,
        Thresholds(args.max_pixel_diff, args.min_psnr, args.min_ssim),
        storage_config=cfg, ignore_settings=sorted(ignore),
        progress_every=args.progress_every, workers=args.workers,
    )
    print(format_summary(result))
    if args.report:
        from .report import write_report

        where = write_report(result, args.report, storage_config=cfg, limit=args.report_limit)
        print(f"report: {where}")
    return 0 if result.passed else 1


configure_compare = configure
run_compare = run
# open_output, read_manifest, image_location and decode_image live in batchgen.outputs; they stay
# importable from here for older callers.
__all__ = ["Thresholds", "ItemResult", "CompareResult", "compare_outputs", "format_summary",
           "REQUIRED_COLUMNS", "open_output", "read_manifest", "image_location", "decode_image"]
