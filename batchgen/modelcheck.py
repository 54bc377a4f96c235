"""Pre-flight model validation on the driver: a bad checkpoint fails before anything is written.

The job's actors load the model with :func:`batchgen.load_pipeline`; when that fails there, the job
has already started Ray, written ``job.json`` and the user reads hundreds of lines of
``ActorDiedError``. :func:`validate_model` checks everything that can be checked without reading
weights, for every kind of model the actors accept (``builtin:``, a diffusers folder or a single
``.safetensors`` file, local or on S3, with component overrides):

- every weight file the model would load opens and holds tensors (locally with
  ``safetensors.safe_open``; on S3 from its header, read with two ranged GETs, which also catches
  a truncated upload), and pickle weights are refused unless allowed;
- the model is then built as the actors build it, on the meta device (:func:`batchgen.inspect.skeleton`):
  its family, every component's class and config, the tokenizers, and every weight key and shape.
  On S3 the skeleton is built from a local copy of the small files plus header-only copies of the
  weight files: nothing large is downloaded.

The result carries that skeleton pipeline: the pre-flight validates every settings group of the
input with it (``Pipeline._validate``: sizes, family settings, sampler and schedule), and takes the
family's defaults (sampler, steps, guidance, size) from it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import CheckpointError, StorageError

MAX_HEADER_BYTES = 100 * 2**20
SMALL_FILE_BYTES = 4 * 2**20


@dataclass
class ModelCheck:
    """What the pre-flight learned about the model."""

    uri: str
    scheduler_config: dict
    family: str
    pipeline: Any  # a Pipeline on the meta device: validates requests, knows the family's defaults
    weight_files: dict[str, list[str]] = field(default_factory=dict)  # component -> files (relative)
    storage_config: Any = None

    def defaults(self) -> dict[str, Any]:
        """The family's defaults for the settings the job left to it."""
        fam = self.pipeline.family
        width, height = fam.default_size()
        return {"sampler": fam.default_sampler, "width": width, "height": height, **fam.defaults()}

    def check_prompt(self, prompt: str) -> str | None:
        """Why the model cannot render ``prompt`` (DiT: not a class name), or None."""
        return self.pipeline.family.check_prompt(prompt)


def validate_model(model, storage_cfg=None) -> ModelCheck:
    """Validate the model of a job spec's ``model`` block (or a bare URI); raises CheckpointError
    naming the file and what is wrong."""
    from .inspect import skeleton
    from .spec import ModelSpec

    spec = ModelSpec(uri=model) if isinstance(model, str) else model
    text = str(spec.uri)
    with _local_view(text, storage_cfg, spec.allow_pickle) as (local, files, shown):
        try:
            pipe, _ = skeleton(local, vae=spec.vae, text_encoders=spec.text_encoders, tokenizers=spec.tokenizers,
                               prediction_type=spec.prediction_type, variant=spec.variant,
                               allow_pickle=spec.allow_pickle, storage_config=storage_cfg)
        except CheckpointError as exc:
            message = str(exc).replace(str(local), shown) if shown else str(exc)
            raise CheckpointError(f"model.uri {text!r}: {message}") from None
    return ModelCheck(text, pipe.family.scheduler_config, pipe.family.name, pipe, files, storage_cfg)


@contextlib.contextmanager
def _local_view(uri: str, storage_cfg, allow_pickle: bool) -> Iterator[tuple[Path, dict, str | None]]:
    """(a local path to build the model from, its weight files, the name to show instead of the
    local path): the model itself for local ones; header-only copies for S3."""
    from .builtin import BUILTINS, resolve_model_uri

    if uri.startswith("s3://"):
        with _s3_view(uri, storage_cfg, allow_pickle) as view:
            yield view
        return
    if uri.startswith("builtin:"):
        name = uri[len("builtin:"):]
        if name not in BUILTINS:
            raise CheckpointError(f"model.uri {uri!r}: unknown built-in model; known: "
                                  + ", ".join(f"builtin:{n}" for n in BUILTINS))
    elif "://" in uri and not uri.startswith("file://"):
        raise CheckpointError(f"model.uri {uri!r}: unsupported scheme (use builtin:, a local folder or file, "
                              "file:// or s3://)")
    root = resolve_model_uri(uri, storage_cfg)
    if not root.exists():
        raise CheckpointError(f"model.uri {uri!r}: no such model folder or file ({root})")
    if root.is_file():
        _check_single_file(uri, root, allow_pickle, _check_local_safetensors)
        yield root, {"": [root.name]}, None
    else:
        yield root, _check_folder(uri, root, _check_local_safetensors, allow_pickle), None


def _check_single_file(uri: str, path: Path, allow_pickle: bool, check) -> None:
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        if not allow_pickle:
            raise CheckpointError(f"model.uri {uri!r}: {path.name} is a pickle checkpoint (it can run code when "
                                  "loaded); convert it to safetensors, or set model.allow_pickle: true if you "
                                  "trust the file")
        return
    check(path)


def _check_folder(uri: str, root: Path, check_weights, allow_pickle: bool,
                  display_root: str | None = None) -> dict[str, list[str]]:
    """Every weight file of a diffusers folder opens (``check_weights``); pickle refused."""
    from .checkpoints import WEIGHT_BASENAMES, find_weight_files, open_folder

    files: dict[str, list[str]] = {}
    try:
        folder = open_folder(root)
        for name, (library, _cls) in folder.components().items():
            if library not in WEIGHT_BASENAMES or not (root / name / "config.json").is_file():
                continue  # tokenizers and schedulers have no weights; unknown libraries fail in the skeleton
            weights = find_weight_files(folder.component_dir(name), WEIGHT_BASENAMES[library], None, allow_pickle)
            if not weights.pickle:
                for path in weights.files:
                    check_weights(path)
            files[name] = [p.relative_to(root).as_posix() for p in weights.files]
    except CheckpointError as exc:
        message = str(exc).replace(str(root), display_root) if display_root else str(exc)
        raise CheckpointError(f"model.uri {uri!r}: {message}") from None
    return files


def _check_local_safetensors(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            keys = list(fh.keys())
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    if not keys:
        raise CheckpointError(f"{path}: the safetensors file holds no tensors")


def check_safetensors_header(read_range, size: int, where: str) -> bytes:
    """Validate a safetensors header through ``read_range(start, stop) -> bytes``; returns the
    header bytes (length prefix included). The data section must be as long as the header says (a
    truncated upload fails here, not in the actor)."""
    if size < 8:
        raise CheckpointError(f"{where}: {size} bytes is too small to be a safetensors file")
    prefix = read_range(0, 8)
    n = int.from_bytes(prefix, "little")
    if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
        raise CheckpointError(f"{where}: not a safetensors file (header length {n} for a {size}-byte file)")
    raw = read_range(8, 8 + n)
    try:
        header = json.loads(raw.decode("utf-8"))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{where}: not a safetensors file (unreadable header: {exc})") from None
    if not tensors:
        raise CheckpointError(f"{where}: the safetensors file holds no tensors")
    if 8 + n + end > size:
        raise CheckpointError(f"{where}: truncated safetensors file: its tensors need {8 + n + end} bytes, "
                              f"the file has {size}")
    return prefix + raw


@contextlib.contextmanager
def _s3_view(uri: str, storage_cfg, allow_pickle: bool) -> Iterator[tuple[Path, dict, str]]:
    """A local stand-in for an S3 model: its small files, and header-only copies of its weight
    files (safetensors' length prefix and header: enough to check every key and shape)."""
    from .storage import Location

    base = Location.parse(uri, storage_cfg)
    client = base._client()
    view = Path(tempfile.mkdtemp(prefix="batchgen-modelcheck-"))

    def header_copy(key: str, size: int, local: Path) -> None:
        where = f"s3://{base.bucket}/{key}"

        def read_range(start: int, stop: int) -> bytes:
            try:
                return client.get_object(Bucket=base.bucket, Key=key, Range=f"bytes={start}-{stop - 1}")["Body"].read()
            except Exception as exc:  # noqa: BLE001
                raise StorageError(f"cannot read {where}: {exc}") from None

        local.write_bytes(check_safetensors_header(read_range, size, where))

    try:
        entries = base._list_objects(recursive=True)
        if not entries and base.key and base.is_file():  # a single-file checkpoint
            head = client.head_object(Bucket=base.bucket, Key=base.key)
            local = view / base.name
            if local.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):  # no header to read: the whole file
                _check_single_file(uri, local, allow_pickle, lambda p: None)
                yield base.local_cache_copy(), {"": [base.name]}, None
                return
            header_copy(base.key, int(head.get("ContentLength", 0)), local)
            yield local, {"": [base.name]}, base.uri
            return
        if not entries:
            base._check_bucket()
            raise CheckpointError(f"model.uri {uri!r}: no such model folder (no objects under {base.uri}/)")
        prefix = f"{base.key}/" if base.key else ""
        for e in entries:
            rel = e["Key"][len(prefix):]
            if any(part in ("", ".", "..") for part in rel.split("/")):
                continue
            local = view.joinpath(*rel.split("/"))
            local.parent.mkdir(parents=True, exist_ok=True)
            size = int(e.get("Size", 0))
            if rel.endswith(".safetensors"):
                header_copy(e["Key"], size, local)
            elif size <= SMALL_FILE_BYTES:
                try:
                    local.write_bytes(client.get_object(Bucket=base.bucket, Key=e["Key"])["Body"].read())
                except Exception as exc:  # noqa: BLE001
                    raise base._error(exc, "read") from None
            else:
                local.touch()  # e.g. a pickle .bin: its name is all find_weight_files looks at
        files = _check_folder(uri, view, lambda path: None, allow_pickle, display_root=base.uri)
        yield view, files, base.uri
    finally:
        shutil.rmtree(view, ignore_errors=True)
