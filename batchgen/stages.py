"""The named callables of the job's Ray Data stages (see runner.py for the chain).

- :class:`ReadRows`: one read task (a row group of an input file, optionally one settings group)
  -> normalized rows, minus the items already committed (resume), with their attempt number.
- :class:`GeneratorActor`: loads the pipeline once; renders each homogeneous settings group at
  the job's fixed micro-batch; per-item failures (unreadable init image) become failed rows.
- :class:`EncodeAndStore`: CPU stage; encodes each image with its parameters embedded, writes
  ``images/<item_id>.<ext>`` and returns manifest rows.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)

_REF_CACHE: dict[str, Any] = {}


def _cached_get(ref):
    """ray.get with a per-process cache (the resume set is fetched once per worker)."""
    import ray

    key = ref.hex()
    if key not in _REF_CACHE:
        _REF_CACHE.clear()
        _REF_CACHE[key] = ray.get(ref)
    return _REF_CACHE[key]


class ReadRows:
    """Read task -> validated rows not yet committed, each with its ``attempt`` number."""

    def __init__(self, settings: dict, storage_cfg, committed_ref):
        self.settings = settings
        self.storage_cfg = storage_cfg
        self.committed_ref = committed_ref

    def __call__(self, tasks: pa.Table) -> pa.Table:
        from .dataset import InputFile, read_row_group

        done, attempts = _cached_get(self.committed_ref)
        out = []
        for t in tasks.to_pylist():
            f = InputFile(t["file"], t["rel"])
            rows = read_row_group(f, t["row_group"], t["first_row"], self.settings, self.storage_cfg)
            if t["group"] is not None:
                rows = rows.filter(pc.equal(rows.column("group"), t["group"]))
            if len(done):
                rows = rows.filter(pc.invert(pc.is_in(rows.column("item_id"), value_set=done)))
            prior = [attempts.get(i, 0) for i in rows.column("item_id").to_pylist()] if attempts else [0] * rows.num_rows
            out.append(rows.append_column("attempt", pa.array([p + 1 for p in prior], pa.int32())))
        return pa.concat_tables(out) if out else pa.table({})


class NullRenderer:
    """Seeded random images instead of a model: for control-plane tests and benchmarks only."""

    model_info = {"uri": "null:", "fingerprint": "0" * 64}

    def generate(self, prompts, seeds, negative_prompts=None, width=64, height=64, **_):
        return [np.random.default_rng(int(s)).integers(0, 256, (height, width, 3), dtype=np.uint8) for s in seeds]


def _load_renderer(model_uri: str, dtype: str, storage_cfg, hooks: dict, torch_threads: int = 1,
                   device: str | None = None):
    """The job's renderer: the pipeline with ``torch_threads`` intra-op threads (CPU bytes depend
    on the thread count, so the job fixes it and records it per item)."""
    if hooks.get("renderer") == "null":
        return NullRenderer()
    import torch

    from . import load_pipeline

    torch.set_num_threads(int(torch_threads))
    # load_pipeline resolves builtin:, local and s3:// URIs (cached once per node) and dtype "auto".
    return load_pipeline(model_uri, device=device, dtype=dtype, storage_config=storage_cfg)


def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def render_env(renderer) -> dict[str, Any]:
    """Everything besides the model and the item's settings that can change an item's bytes:
    device kind and name, dtype, torch intra-op threads, CPU kernel level, torch / CUDA / cuDNN
    versions and the deterministic / TF32 switches. Recorded per manifest row and in job.json;
    ``batchgen rerender`` reproduces it and names what it cannot."""
    if isinstance(renderer, NullRenderer):
        return {"renderer": "null"}
    import torch

    device = torch.device(getattr(renderer, "device", "cpu"))
    dtype = str(getattr(renderer, "dtype", torch.float32)).removeprefix("torch.")
    env: dict[str, Any] = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cpu":
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    if device.type == "cuda":
        env.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   cudnn_deterministic=torch.backends.cudnn.deterministic,
                   cudnn_benchmark=torch.backends.cudnn.benchmark,
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    return env


def apply_render_env(env: dict) -> None:
    """Set what a recorded render_env fixes in this process (thread count, deterministic switches)."""
    import torch

    if env.get("torch_threads"):
        torch.set_num_threads(int(env["torch_threads"]))
    if "deterministic_algorithms" in env:
        torch.use_deterministic_algorithms(bool(env["deterministic_algorithms"]))
    if env.get("float32_matmul_precision"):
        torch.set_float32_matmul_precision(env["float32_matmul_precision"])
    if env.get("device") == "cuda" and torch.cuda.is_available():
        for name in ("cudnn_deterministic", "cudnn_benchmark", "tf32_cudnn"):
            if name in env:
                setattr(torch.backends.cudnn, {"cudnn_deterministic": "deterministic", "cudnn_benchmark": "benchmark",
                                               "tf32_cudnn": "allow_tf32"}[name], bool(env[name]))
        if "tf32_matmul" in env:
            torch.backends.cuda.matmul.allow_tf32 = bool(env["tf32_matmul"])


def env_differences(recorded: dict, current: dict) -> dict[str, tuple]:
    """Keys whose values differ between a recorded and the current render_env."""
    return {k: (recorded.get(k), current.get(k)) for k in sorted(set(recorded) | set(current))
            if recorded.get(k) != current.get(k)}


def _maybe_die(hooks: dict, calls: int) -> None:
    """Fault-test hook: exit the actor process on its Nth call, once per flag file."""
    die = hooks.get("die_once")
    if not die or calls != int(die.get("on_call", 1)):
        return
    try:
        fd = os.open(die["flag"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    log.warning("fault hook: generator actor %d exits now", os.getpid())
    os._exit(1)


def read_init_image(uri: str, storage_cfg, max_pixels: int | None = None):
    """An init image as RGB; larger than ``max_pixels`` (width x height) is refused from its
    header, before anything is decoded (a 20 KB PNG can decode to gigabytes)."""
    import warnings

    from PIL import Image

    from .spec import DEFAULT_MAX_INIT_IMAGE_PIXELS
    from .storage import Location

    limit = int(max_pixels or DEFAULT_MAX_INIT_IMAGE_PIXELS)
    data = Location.parse(uri, storage_cfg).read_bytes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # our limit below, not PIL's
            try:
                img = Image.open(io.BytesIO(data))  # reads the header only
            finally:
                Image.MAX_IMAGE_PIXELS = saved
            width, height = img.size
            if width * height > limit:
                raise _TooLarge(f"init_image {uri}: {width}x{height} pixels ({width * height / 1e6:.1f} Mpx) is more "
                                f"than input.max_init_image_pixels ({limit / 1e6:g} Mpx); not decoded")
            return img.convert("RGB")
    except _TooLarge as exc:
        raise ValueError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any decoder error is the item's failure
        raise ValueError(f"init_image {uri}: not a readable image ({exc})") from None


class _TooLarge(Exception):
    pass


_read_init_image = read_init_image  # the name rerender used


def _quiet_libraries() -> None:
    """Actor-side noise off unless the run is verbose: transformers' tokenizer warnings."""
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except Exception:  # noqa: BLE001 - optional quietening
        pass


class GeneratorActor:
    """Holds one loaded pipeline; renders homogeneous groups at the fixed micro-batch."""

    def __init__(self, model_uri: str, dtype: str, storage_cfg, batch_size: int, sampler: str,
                 sampler_options: dict, hooks: dict | None = None, torch_threads: int = 1,
                 max_init_pixels: int | None = None, quiet: bool = False):
        self.hooks = hooks or {}
        self.batch_size = batch_size
        self.sampler = sampler
        self.sampler_options = sampler_options
        self.storage_cfg = storage_cfg
        self.max_init_pixels = max_init_pixels
        if quiet:
            _quiet_libraries()
        self.renderer = _load_renderer(model_uri, dtype, storage_cfg, self.hooks, torch_threads)
        self.fingerprint = self.renderer.model_info["fingerprint"]
        self.render_env = json.dumps(render_env(self.renderer), sort_keys=True)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.calls = 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.calls += 1
        _maybe_die(self.hooks, self.calls)
        sleep = self.hooks.get("sleep_per_call_s")
        if isinstance(sleep, list):  # per call: [call 1, call 2, ...], the last one repeats
            sleep = sleep[min(self.calls, len(sleep)) - 1] if sleep else 0
        if sleep:
            time.sleep(float(sleep))
        rows = batch.to_pylist()
        images: list[bytes | None] = [None] * len(rows)
        errors: list[str | None] = [None] * len(rows)
        render_ms = [0.0] * len(rows)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(r["group"], []).append(i)
        for members in groups.values():
            self._render_group(rows, members, images, errors, render_ms)
        status = ["ok" if e is None else "failed" for e in errors]
        return (batch.append_column("image", pa.array(images, pa.binary()))
                .append_column("status", pa.array(status, pa.string()))
                .append_column("error", pa.array(errors, pa.string()))
                .append_column("render_ms", pa.array(render_ms, pa.float64()))
                .append_column("worker", pa.array([self.worker] * len(rows), pa.string()))
                .append_column("model_fingerprint", pa.array([self.fingerprint] * len(rows), pa.string()))
                .append_column("render_env", pa.array([self.render_env] * len(rows), pa.string())))

    def _render_group(self, rows, members, images, errors, render_ms) -> None:
        first = rows[members[0]]
        init_images = None
        if first["init_image"] is not None:
            init_images, ok = [], []
            for i in members:
                try:
                    init_images.append(read_init_image(rows[i]["init_image"], self.storage_cfg, self.max_init_pixels))
                    ok.append(i)
                except Exception as exc:  # noqa: BLE001 - becomes the item's failed row
                    errors[i] = f"{type(exc).__name__}: {exc}"
            members = ok
            if not members:
                return
        start = time.perf_counter()
        try:
            arrays = self.renderer.generate(
                [rows[i]["prompt"] for i in members], [rows[i]["seed"] for i in members],
                negative_prompts=[rows[i]["negative_prompt"] for i in members], sampler=self.sampler,
                steps=first["steps"], guidance_scale=first["guidance_scale"], width=first["width"],
                height=first["height"], init_images=init_images,
                strength=first["strength"] if first["strength"] is not None else 0.8,
                micro_batch=self.batch_size, sampler_options=self.sampler_options or None,
                item_ids=[rows[i]["item_id"] for i in members], progress=False,
            )
        except Exception as exc:  # noqa: BLE001 - the group's items fail, the job goes on
            log.exception("render failed for %d items", len(members))
            for i in members:
                errors[i] = f"render failed: {type(exc).__name__}: {exc}"
            return
        per_item = (time.perf_counter() - start) * 1000.0 / len(members)
        for i, arr in zip(members, arrays):
            images[i] = np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
            render_ms[i] = per_item


class EncodeAndStore:
    """CPU stage: encode (parameters embedded), write ``images/<id>.<ext>``, emit manifest rows."""

    def __init__(self, out_uri: str, storage_cfg, fmt: str, quality: int, model_uri: str, sampler: str,
                 sampler_options: dict, batch_size: int, hooks: dict | None = None):
        self.skip_store = (hooks or {}).get("store") == "skip"  # control-plane benchmark only
        self.out_uri = out_uri
        self.storage_cfg = storage_cfg
        self.fmt = fmt
        self.quality = quality
        self.model_uri = model_uri
        self.sampler = sampler
        self.sampler_options = json.dumps(sampler_options or {}, sort_keys=True)
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        from . import __version__
        from .images import EXTENSIONS, encode_image
        from .manifest import image_parameters, to_manifest_table
        from .storage import Location

        images_dir = Location.parse(self.out_uri, self.storage_cfg).join("images")
        ext = EXTENSIONS[self.fmt]
        n = batch.num_rows
        cols: dict[str, list] = {k: [] for k in ("image_uri", "image_sha256", "image_bytes", "encode_ms")}
        status = batch.column("status").to_pylist()
        error = batch.column("error").to_pylist()
        rows = batch.drop_columns(["image"]).to_pylist()
        images = batch.column("image").to_pylist()
        for i, row in enumerate(rows):
            row.update(sampler=self.sampler, batch_size=self.batch_size, sampler_options=self.sampler_options)
            loc = images_dir.join(f"{row['item_id']}.{ext}")
            start = time.perf_counter()
            sha = size = None
            if status[i] == "ok":
                try:
                    arr = np.frombuffer(images[i], np.uint8).reshape(row["height"], row["width"], 3)
                    if self.skip_store:
                        data = arr.tobytes()
                    else:
                        data = encode_image(arr, self.fmt, self.quality, image_parameters(row))
                        loc.write_bytes(data)
                    sha, size = hashlib.sha256(data).hexdigest(), len(data)
                except Exception as exc:  # noqa: BLE001 - e.g. storage failure: a failed row
                    status[i], error[i] = "failed", f"store failed: {type(exc).__name__}: {exc}"
            cols["image_uri"].append(loc.uri if status[i] == "ok" else None)
            cols["image_sha256"].append(sha)
            cols["image_bytes"].append(size)
            cols["encode_ms"].append((time.perf_counter() - start) * 1000.0)
        columns = {name: batch.column(name) for name in batch.column_names if name != "image"}
        columns.update(cols)
        columns.update(
            status=status, error=error,
            sampler=[self.sampler] * n, batch_size=[self.batch_size] * n,
            model_uri=[self.model_uri] * n, image_format=[self.fmt] * n,
            batchgen_version=[__version__] * n, sampler_options=[self.sampler_options] * n,
        )
        return to_manifest_table(columns)
