"""Pre-flight model validation on the driver: a bad checkpoint fails before anything is written.

The job's actors load the model with :func:`batchgen.load_pipeline`; when that fails there, the job
has already started Ray, written ``job.json`` and the user reads hundreds of lines of
``ActorDiedError``. :func:`validate_model` checks what can be checked without loading weights:

- the diffusers layout (``model_index.json`` and the component folders, via
  :func:`checkpoints.open_folder`), and that its pipeline class is a family batchgen renders;
- every component the family reads is listed with a class it accepts, its JSON config parses, the
  tokenizers' files are there;
- which weight files each component would load (:func:`checkpoints.find_weight_files`, so pickle
  weights are refused exactly as the loader refuses them) and that each one is a safetensors file
  that opens and holds tensors: locally with ``safetensors.safe_open``, on S3 by reading only the
  header with two ranged GETs (nothing is downloaded).

It returns the scheduler config so the pre-flight can build every sampler schedule the job needs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError, StorageError

MAX_HEADER_BYTES = 100 * 2**20
SMALL_FILE_BYTES = 4 * 2**20


@dataclass
class ModelCheck:
    """What the pre-flight learned about the model."""

    uri: str
    scheduler_config: dict
    weight_files: dict[str, list[str]] = field(default_factory=dict)  # component -> files (relative)
    family: str = ""  # the model family (sd, sdxl, sd3, flux, dit)


def validate_model(uri: str, storage_cfg=None) -> ModelCheck:
    """Validate the checkpoint at ``uri`` (``builtin:``, local, ``file://``, ``s3://``); raises
    CheckpointError naming the file and what is wrong."""
    from .checkpoints import resolve_model_uri

    text = str(uri)
    if text.startswith("s3://"):
        return _validate_s3(text, storage_cfg)
    if text.startswith("builtin:"):
        from .tiny import BUILTINS

        name = text[len("builtin:"):]
        if name not in BUILTINS:
            raise CheckpointError(f"model.uri {text!r}: unknown built-in model; known: "
                                  + ", ".join(f"builtin:{n}" for n in BUILTINS))
    elif "://" in text and not text.startswith("file://"):
        raise CheckpointError(f"model.uri {text!r}: unsupported scheme (use builtin:, a local folder, file:// or s3://)")
    root = resolve_model_uri(text, storage_cfg)
    if not root.exists():
        raise CheckpointError(f"model.uri {text!r}: no such model folder ({root})")
    return _validate_folder(text, root, lambda path: _check_local_safetensors(path))


def _validate_folder(uri: str, root: Path, check_weights, display_root: str | None = None) -> ModelCheck:
    from .checkpoints import MODEL_CLASSES, WEIGHT_BASENAMES, find_weight_files, open_folder
    from .families import family_for

    shown = display_root or str(root)

    def rel(path: Path) -> str:
        return path.relative_to(root).as_posix()

    try:
        folder = open_folder(root)
        family = family_for(folder)
        listed = folder.components()
        files: dict[str, list[str]] = {}
        scheduler = None
        for name, comp in family.components.items():
            if name not in listed:
                if comp.required:
                    raise CheckpointError(f"{root}/model_index.json: a {family.name} model needs component '{name}' "
                                          f"({' or '.join(comp.classes)}); it is missing or null")
                continue
            library, cls = listed[name]
            if comp.classes and cls not in comp.classes:
                raise CheckpointError(f"{root}/model_index.json: component '{name}' has class {cls!r}; a "
                                      f"{family.name} model expects {' or '.join(comp.classes)}")
            if comp.kind == "scheduler":
                scheduler = folder.read_json(f"{name}/scheduler_config.json")
            elif comp.kind == "tokenizer":
                _check_tokenizer_files(folder.component_dir(name), cls)
            else:
                config = folder.read_json(f"{name}/config.json")
                if cls in MODEL_CLASSES and cls.startswith(("CLIP", "T5")):
                    _check_text_config(root / name / "config.json", cls, config)
                if library not in WEIGHT_BASENAMES:
                    raise CheckpointError(f"{root}/model_index.json: component '{name}' comes from library "
                                          f"{library!r}; batchgen loads {', '.join(sorted(WEIGHT_BASENAMES))} components")
                weights = find_weight_files(folder.component_dir(name), WEIGHT_BASENAMES[library], None)
                for path in weights.files:
                    check_weights(path)
                files[name] = [rel(p) for p in weights.files]
    except CheckpointError as exc:
        message = str(exc)
        if display_root:
            message = message.replace(str(root), shown)
        raise CheckpointError(f"model.uri {uri!r}: {message}") from None
    if not isinstance(scheduler, dict):
        raise CheckpointError(f"model.uri {uri!r}: {shown}/scheduler/scheduler_config.json is not a JSON object")
    return ModelCheck(uri, scheduler, files, family.name)


def _check_tokenizer_files(folder: Path, cls: str) -> None:
    """The files a CLIP (vocab.json + merges.txt) or T5 (tokenizer.json / spiece.model) tokenizer needs."""
    if cls.startswith("CLIP"):
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise CheckpointError(f"{folder}: missing component file '{name}'")
        try:
            json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{folder}/vocab.json: not valid JSON ({exc})") from None
    elif not any((folder / n).is_file() for n in ("tokenizer.json", "spiece.model")):
        raise CheckpointError(f"{folder}: missing component file 'tokenizer.json' or 'spiece.model' (a T5 tokenizer)")


def _check_text_config(path: Path, cls: str, config: dict) -> None:
    expected = ("t5", "umt5") if cls.startswith("T5") else (None, "clip_text_model", "clip")
    if config.get("model_type") not in expected:
        raise CheckpointError(f"{path}: model_type '{config.get('model_type')}' is not a "
                              f"{'T5' if cls.startswith('T5') else 'CLIP text'} model")


def _check_local_safetensors(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            keys = list(fh.keys())
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    if not keys:
        raise CheckpointError(f"{path}: the safetensors file holds no tensors")


def check_safetensors_header(read_range, size: int, where: str) -> int:
    """Validate a safetensors header through ``read_range(start, stop) -> bytes``; returns the
    number of tensors. The data section must be as long as the header says (a truncated upload
    fails here, not in the actor)."""
    if size < 8:
        raise CheckpointError(f"{where}: {size} bytes is too small to be a safetensors file")
    n = int.from_bytes(read_range(0, 8), "little")
    if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
        raise CheckpointError(f"{where}: not a safetensors file (header length {n} for a {size}-byte file)")
    try:
        header = json.loads(read_range(8, 8 + n).decode("utf-8"))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{where}: not a safetensors file (unreadable header: {exc})") from None
    if not tensors:
        raise CheckpointError(f"{where}: the safetensors file holds no tensors")
    if 8 + n + end > size:
        raise CheckpointError(f"{where}: truncated safetensors file: its tensors need {8 + n + end} bytes, "
                              f"the file has {size}")
    return len(tensors)


def _validate_s3(uri: str, storage_cfg) -> ModelCheck:
    """An S3 checkpoint, validated from its listing, its small files and its weight headers."""
    from .storage import Location

    base = Location.parse(uri, storage_cfg)
    entries = base._list_objects(recursive=True)
    if not entries:
        base._check_bucket()
        raise CheckpointError(f"model.uri {uri!r}: no such model folder (no objects under {base.uri}/)")
    prefix = f"{base.key}/" if base.key else ""
    sizes: dict[str, int] = {}
    skeleton = Path(tempfile.mkdtemp(prefix="batchgen-modelcheck-"))
    client = base._client()
    try:
        for e in entries:
            rel = e["Key"][len(prefix):]
            if any(part in ("", ".", "..") for part in rel.split("/")):
                continue
            local = skeleton.joinpath(*rel.split("/"))
            local.parent.mkdir(parents=True, exist_ok=True)
            sizes[str(local)] = int(e.get("Size", 0))
            small = rel.endswith((".json", ".txt")) and int(e.get("Size", 0)) <= SMALL_FILE_BYTES
            if small:
                try:
                    local.write_bytes(client.get_object(Bucket=base.bucket, Key=e["Key"])["Body"].read())
                except Exception as exc:  # noqa: BLE001
                    raise base._error(exc, "read") from None
            else:
                local.touch()  # a placeholder: find_weight_files only needs to see that it exists

        def check(path: Path) -> None:
            key = prefix + path.relative_to(skeleton).as_posix()
            where = f"s3://{base.bucket}/{key}"

            def read_range(start: int, stop: int) -> bytes:
                try:
                    resp = client.get_object(Bucket=base.bucket, Key=key, Range=f"bytes={start}-{stop - 1}")
                    return resp["Body"].read()
                except Exception as exc:  # noqa: BLE001
                    raise StorageError(f"cannot read {where}: {exc}") from None

            check_safetensors_header(read_range, sizes.get(str(path), 0), where)

        return _validate_folder(uri, skeleton, check, display_root=base.uri)
    finally:
        shutil.rmtree(skeleton, ignore_errors=True)
