"""The named callables of the job's Ray Data stages (see run.py for the chain).

- :class:`ReadRows`: one read task (a row group of an input file, optionally one settings group)
  -> normalized rows, minus the items already committed (resume), with their attempt number.
- :class:`GeneratorActor`: loads the pipeline once; renders each homogeneous settings group at
  the job's fixed micro-batch; per-item failures (unreadable init image) become failed rows.
- :class:`EncodeAndStore`: CPU stage; encodes each image with its parameters embedded, writes
  ``images/<item_id>.<ext>`` and returns manifest rows (as small Parquet blocks: :mod:`.wire`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import struct
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..nullmodel import NullRenderer, is_null_model
from ..columns import CONDITION_SHA
from .conditioning import FileChanged, _TooLarge, load_conditions, open_header, read_image, verify_digests  # noqa: F401
from .wire import to_wire

log = logging.getLogger(__name__)

_REF_CACHE: dict[str, Any] = {}
CONDITION_SHA_COLUMNS = tuple(name for name, _ in CONDITION_SHA)


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
        from ..dataset import InputFile, read_row_group

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


def load_renderer(model: dict | str, dtype: str | None = None, storage_cfg=None, torch_threads: int = 1, *,
                  device: str | None = None, compile: str = "none", deterministic: bool = False):
    """The job's renderer: the pipeline of the spec's ``model`` block (a dict; a bare URI also
    works), with ``torch_threads`` intra-op threads (CPU bytes depend on the thread count, so the
    job fixes it and records it per item) and the deterministic switches when asked.

    Public: the generator actors and ``batchgen rerender`` load a job's model through it, so an
    item re-rendered alone gets exactly the pipeline its job used. ``dtype`` None takes the
    block's; ``device`` None picks as :func:`batchgen.load_pipeline` does. Note that it sets
    torch's process-wide thread count (and the deterministic switches): callers outside a worker
    restore them (see :func:`batchgen.jobcli.rerender_item`). ``builtin:null`` gives the
    :class:`~batchgen.nullmodel.NullRenderer` (seeded noise, no weights, no torch)."""
    model = {"uri": model} if isinstance(model, str) else dict(model)
    if is_null_model(model["uri"]):
        return NullRenderer()
    import torch

    from .. import load_pipeline

    torch.set_num_threads(int(torch_threads))
    if deterministic:
        set_deterministic()
    options = {k: model.get(k) for k in ("variant", "vae", "text_encoders", "tokenizers", "prediction_type",
                                         "allow_pickle", "text_encoder_device")}
    options = {k: v for k, v in options.items() if v not in (None, False)}
    controlnets = [c["uri"] if isinstance(c, dict) else c for c in model.get("controlnets") or []]
    if controlnets:
        options["controlnets"] = controlnets
    fp8 = tuple(model.get("fp8") or ())
    # load_pipeline resolves builtin:, local and s3:// URIs (cached once per node) and dtype "auto".
    return load_pipeline(model["uri"], device=device, dtype=dtype or model.get("dtype"), storage_config=storage_cfg,
                         compile=compile, fp8=fp8, loras=model.get("loras") or None, **options)


def set_deterministic() -> None:
    """compute.deterministic: torch's deterministic algorithms (cuBLAS's workspace setting first,
    before any cuBLAS handle exists), no TF32, no cuDNN autotuning. Recorded in render_env."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")




def pixels_to_bytes(arr: np.ndarray) -> bytes:
    """A rendered HxWx3 uint8 image as it travels from the generator to the encoder: its height and
    width (two little-endian uint32) then the raw pixels. The size rides along because it is not
    always the row's width x height (``padding_mask_crop`` gives the init image's size)."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return struct.pack("<II", arr.shape[0], arr.shape[1]) + arr.tobytes()


def bytes_to_pixels(data: bytes) -> np.ndarray:
    height, width = struct.unpack_from("<II", data)
    return np.frombuffer(data, np.uint8, offset=8).reshape(height, width, 3)


def generate_kwargs(rows: list[dict], family: str | None) -> dict[str, Any]:
    """The generate() arguments for one settings group's rows (normalized input rows): group
    settings from the first row, per-item settings as lists, settings the rows leave null (family
    defaults) left out. The pre-flight validates every group with exactly this."""
    from ..control import DEFAULTS as CONTROL_DEFAULTS
    from ..control import default_scale
    from ..outpaint import OUTPAINT_SETTINGS
    from ..settings import GENERATE_ARGUMENTS, ROW_SETTINGS

    first = rows[0]
    kwargs: dict[str, Any] = {
        "negative_prompts": [r["negative_prompt"] for r in rows],
        "steps": first["steps"], "guidance_scale": first["guidance_scale"],
        "width": first["width"], "height": first["height"],
    }
    if first.get("strength") is not None:
        kwargs["strength"] = first["strength"]
    for setting in ROW_SETTINGS:
        if setting.name in GENERATE_ARGUMENTS:
            continue
        if setting.families is not None and (family is None or family not in setting.families):
            continue
        values = [r.get(setting.name) for r in rows]
        if all(v is None for v in values):
            continue
        if setting.name in CONTROL_DEFAULTS:  # generate() takes no None inside a list of ControlNet values
            default = CONTROL_DEFAULTS[setting.name]
            if setting.name == "controlnet_conditioning_scale":
                inpaint = first.get("mask_image") is not None or any(first.get(k) is not None
                                                                     for k in OUTPAINT_SETTINGS)
                default = default_scale(family, first.get("init_image") is not None, inpaint)
            values = [default if v is None else v for v in values]
        kwargs[setting.name] = values[0] if setting.group else values
    return kwargs


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


def read_init_image(uri: str, storage_cfg, max_pixels: int | None = None):
    """An init image as RGB; larger than ``max_pixels`` (width x height; None: the default
    limit) is refused from its header, before anything is decoded (a 20 KB PNG can decode to
    gigabytes). Thread-safe: no process-wide state (``PIL.Image.MAX_IMAGE_PIXELS``, warning
    filters) is changed; the limit is this call's own."""
    return read_image(uri, storage_cfg, max_pixels, "init_image")[0].convert("RGB")


_open_header = open_header  # the names other modules used
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

    def __init__(self, model: dict, storage_cfg, batch_size: int, sampler: str, sampler_options: dict,
                 torch_threads: int = 1, max_init_pixels: int | None = None,
                 quiet: bool = False, compile: str = "none", deterministic: bool = False, scoring: dict | None = None,
                 lora_sha256: dict[str, str] | None = None, controlnet_sha256: dict[str, str] | None = None,
                 condition_sha256: dict[str, str] | None = None, model_fingerprint: str | None = None):
        self.lora_sha256 = dict(lora_sha256 or {})  # the pre-flight's digests (job.json's lora_sha256)
        self.condition_sha256 = dict(condition_sha256 or {})  # conditioning file uri -> sha256 (pre-flight)
        self.batch_size = batch_size
        self.sampler = sampler
        self.sampler_options = sampler_options
        self.storage_cfg = storage_cfg
        self.max_init_pixels = max_init_pixels
        self.compile = compile
        if quiet:
            _quiet_libraries()
        self.renderer = load_renderer(model, None, storage_cfg, torch_threads, compile=compile,
                                      deterministic=deterministic)
        self.family = getattr(getattr(self.renderer, "family", None), "name", None)
        self.nets = len(self.renderer.model_info.get("controlnets") or [])
        self.load_error = None  # a model or ControlNet whose bytes changed: every item fails, naming it
        try:
            verify_digests(self.renderer.model_info.get("controlnets"), dict(controlnet_sha256 or {}), "ControlNet")
            verify_digests([{"uri": model["uri"], "sha256": self.renderer.model_info["fingerprint"]}],
                           {model["uri"]: model_fingerprint} if model_fingerprint else {}, "model")
        except FileChanged as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
        self.job_loras = json.dumps([{"uri": x["uri"], "scale": float(x.get("scale", 1.0))}
                                     for x in (model.get("loras") or [])], separators=(",", ":"))
        self.fingerprint = self.renderer.model_info["fingerprint"]
        self.render_env = json.dumps(render_env(self.renderer), sort_keys=True)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.scorer = None
        if scoring and not isinstance(self.renderer, NullRenderer):
            from ..scoring import ClipScorer

            self.scorer = ClipScorer.load(scoring["model"], device=self.renderer.device,
                                          batch_size=int(scoring.get("batch_size", 16)), storage_config=storage_cfg)
        self.warmed: set[str] = set()
        self.calls = 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.calls += 1
        rows = batch.to_pylist()
        n = len(rows)
        out: dict[str, list] = {
            "image": [None] * n, "error": [None] * n, "render_ms": [0.0] * n, "warmup_ms": [0.0] * n,
            "applied_loras": [None] * n, "clip_score": [None] * n,
            **{c: [None] * n for c in CONDITION_SHA_COLUMNS},
            # labels passed through from the input, unless the model names them itself (DiT)
            "class_id": [r.get("class_id") for r in rows], "class_name": [r.get("class_name") for r in rows],
        }
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(r["group"], []).append(i)
        for members in groups.values():
            if self.load_error is not None:
                for i in members:
                    out["error"][i] = self.load_error
                continue
            self._render_group(rows, members, out)
        status = ["ok" if e is None else "failed" for e in out["error"]]
        types = {"image": pa.binary(), "error": pa.string(), "render_ms": pa.float64(), "warmup_ms": pa.float64(),
                 "applied_loras": pa.string(), "class_id": pa.int64(), "class_name": pa.string(),
                 "clip_score": pa.float64(), **{c: pa.string() for c in CONDITION_SHA_COLUMNS}}
        result = batch.drop_columns([c for c in batch.column_names if c in types or c == "status"])
        for name, typ in types.items():
            result = result.append_column(name, pa.array(out[name], typ))
        return (result.append_column("status", pa.array(status, pa.string()))
                .append_column("worker", pa.array([self.worker] * n, pa.string()))
                .append_column("model_family", pa.array([self.family] * n, pa.string()))
                .append_column("model_fingerprint", pa.array([self.fingerprint] * n, pa.string()))
                .append_column("render_env", pa.array([self.render_env] * n, pa.string())))

    def _render_group(self, rows, members, out) -> None:
        errors = out["error"]
        first = rows[members[0]]
        inputs, ok = [], []
        for i in members:  # the conditioning files: fetched, digested, verified, decoded
            try:
                inputs.append(load_conditions(rows[i], self.storage_cfg, self.max_init_pixels, self.condition_sha256,
                                              self.nets))
                ok.append(i)
            except Exception as exc:  # noqa: BLE001 - becomes the item's failed row
                errors[i] = f"{type(exc).__name__}: {exc}"
        members = ok
        if not members:
            return
        for i, got in zip(members, inputs):
            for column, sha in got.sha.items():
                out[column][i] = sha
        init_images = [x.init for x in inputs] if first["init_image"] is not None else None
        conditions = {}
        if first.get("mask_image") is not None:
            conditions["mask_images"] = [x.mask for x in inputs]
        if first.get("control_image") is not None:
            conditions["control_images"] = [x.control for x in inputs]
        group_rows = [rows[i] for i in members]
        prompts = [r["prompt"] for r in group_rows]
        try:
            applied = self._set_loras(first.get("loras") or "[]")
            kwargs = dict(generate_kwargs(group_rows, self.family), sampler=self.sampler,
                          sampler_options=self.sampler_options or None, micro_batch=self.batch_size,
                          init_images=init_images, **conditions)
            warmup = self._warm_up(first["group"], kwargs)
            start = time.perf_counter()
            arrays = self.renderer.generate(prompts, [r["seed"] for r in group_rows],
                                            item_ids=[r["item_id"] for r in group_rows], progress=False, **kwargs)
            per_item = (time.perf_counter() - start) * 1000.0 / len(members)
            labels = self.renderer.family.item_labels(prompts) if self.family else {}
            scores = self.scorer.score(arrays, prompts).tolist() if self.scorer is not None else None
        except Exception as exc:  # noqa: BLE001 - the group's items fail, the job goes on
            log.exception("render failed for %d items", len(members))
            for i in members:
                errors[i] = f"render failed: {type(exc).__name__}: {exc}"
            return
        for k, (i, arr) in enumerate(zip(members, arrays)):
            out["image"][i] = pixels_to_bytes(arr)
            out["render_ms"][i] = per_item
            out["applied_loras"][i] = applied
            for name, values in labels.items():
                out[name][i] = values[k]
            if scores is not None:
                out["clip_score"][i] = float(scores[k])
        if warmup:
            out["warmup_ms"][members[0]] = warmup

    def _set_loras(self, loras: str) -> str:
        """Fuse the group's LoRA set (canonical JSON; swaps only what changes); returns the applied
        set with each file's sha256, as the manifest records it."""
        if isinstance(self.renderer, NullRenderer):
            return loras
        wanted = json.loads(loras)
        info = self.renderer.set_loras(wanted) if wanted or self.renderer.model_info.get("loras") else []
        check_lora_digests(info, self.lora_sha256)
        return json.dumps([{"uri": x["uri"], "scale": x["scale"], "sha256": x["sha256"]} for x in info],
                          separators=(",", ":"))

    def _warm_up(self, group: str, kwargs: dict) -> float:
        """A compiled pipeline compiles on the first call of each shape: do it on a throw-away
        micro-batch and report how long it took (the job's summary lists it)."""
        if self.compile == "none" or isinstance(self.renderer, NullRenderer) or group in self.warmed:
            return 0.0
        self.warmed.add(group)
        images = ("init_images", "mask_images", "control_images")
        options = {k: v for k, v in kwargs.items() if k not in ("negative_prompts", "micro_batch", *images)}
        options = {k: (v[0] if isinstance(v, list) else v) for k, v in options.items()}
        for name in images:
            if kwargs.get(name):
                options[name] = kwargs[name][:1] * self.batch_size
        return self.renderer.warmup(self.batch_size, **options) * 1000.0


def check_lora_digests(applied: list[dict], expected: dict[str, str]) -> None:
    """Every LoRA a worker fused must be the bytes the pre-flight read (``expected``: uri -> sha256,
    as job.json records it): a file replaced while the job runs would otherwise mix versions in
    one output. Raised before anything is rendered with it: the group's items fail, naming the file."""
    verify_digests(applied, expected, "LoRA")


class EncodeAndStore:
    """CPU stage: encode (parameters embedded), write ``images/<id>.<ext>``, emit manifest rows
    (the job's manifest schema: the fixed columns, then its passthrough columns)."""

    def __init__(self, out_uri: str, storage_cfg, fmt: str, quality: int, model_uri: str, sampler: str,
                 sampler_options: dict, batch_size: int, passthrough: dict[str, str] | None = None):
        from ..manifest import manifest_schema

        self.out_uri = out_uri
        self.storage_cfg = storage_cfg
        self.fmt = fmt
        self.quality = quality
        self.model_uri = model_uri
        self.sampler = sampler
        self.sampler_options = json.dumps(sampler_options or {}, sort_keys=True)
        self.batch_size = batch_size
        extra = [pa.field(name, pa.type_for_alias(typ)) for name, typ in (passthrough or {}).items()]
        self.schema = manifest_schema(extra)

    def __call__(self, batch: pa.Table):
        """Yields the manifest rows of ``batch`` in wire blocks (:func:`~batchgen.job.wire.to_wire`)."""
        from .. import __version__
        from ..images import EXTENSIONS
        from ..manifest import to_manifest_table
        from ..storage import Location

        images_dir = Location.parse(self.out_uri, self.storage_cfg).join("images")
        ext = EXTENSIONS[self.fmt]
        n = batch.num_rows
        cols: dict[str, list] = {k: [] for k in ("image_uri", "image_sha256", "image_bytes", "encode_ms")}
        status = batch.column("status").to_pylist()
        error = batch.column("error").to_pylist()
        rows = batch.drop_columns(["image"]).to_pylist()
        images = batch.column("image").to_pylist()
        for i, row in enumerate(rows):
            row.update(sampler=self.sampler, batch_size=self.batch_size, sampler_options=self.sampler_options,
                       loras=row.get("applied_loras"))
            loc = images_dir.join(f"{row['item_id']}.{ext}")
            start = time.perf_counter()
            sha = size = None
            if status[i] == "ok":
                try:
                    arr = bytes_to_pixels(images[i])
                    data = self.encode_and_put(arr, row, loc)
                    sha, size = hashlib.sha256(data).hexdigest(), len(data)
                except Exception as exc:  # noqa: BLE001 - e.g. storage failure: a failed row
                    status[i], error[i] = "failed", f"store failed: {type(exc).__name__}: {exc}"
            cols["image_uri"].append(loc.uri if status[i] == "ok" else None)
            cols["image_sha256"].append(sha)
            cols["image_bytes"].append(size)
            cols["encode_ms"].append((time.perf_counter() - start) * 1000.0)
        columns = {name: batch.column(name) for name in batch.column_names if name not in ("image", "loras")}
        columns.update(cols)
        columns.update(
            status=status, error=error, loras=batch.column("applied_loras"),
            sampler=[self.sampler] * n, batch_size=[self.batch_size] * n,
            model_uri=[self.model_uri] * n, image_format=[self.fmt] * n,
            batchgen_version=[__version__] * n, sampler_options=[self.sampler_options] * n,
        )
        # warmup_ms (compile time, for the summary) rides along; the driver drops it before committing
        table = to_manifest_table(columns, self.schema).append_column("warmup_ms", batch.column("warmup_ms"))
        yield from to_wire(table)  # small inline blocks: never through the object store to the driver

    def encode_and_put(self, arr: np.ndarray, row: dict, loc) -> bytes:
        """One item: encode the image with its parameters embedded and write it to ``loc``;
        returns the stored bytes (their size and sha256 go into the manifest row)."""
        from ..images import encode_image
        from ..manifest import image_parameters

        data = encode_image(arr, self.fmt, self.quality, image_parameters(row))
        loc.write_bytes(data)
        return data
