"""JobSpec: the YAML contract between the user, the CLI and the workers.

Unknown keys are refused (with the dotted key named), every field is documented, and
``spec.digest()`` hashes the fields that change what lands in the output, so a re-run on an
existing output can tell "resume" from "different job".
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InputError

MAX_SIDE = 4096


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputSpec(_Section):
    """Where the prompts are."""

    uri: str = Field(description="Parquet file, folder, glob (*.parquet), or s3://bucket/prefix")
    id_column: Optional[str] = Field(
        None, description="column with unique item ids; else ids derive from file path + row number"
    )
    prompt_column: str = Field("prompt", description="column holding the prompt text")


class ModelSpec(_Section):
    """Which checkpoint renders the images."""

    uri: str = Field("builtin:tiny", description="builtin:tiny, a local or s3:// diffusers folder")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto = float16 on GPU, float32 on CPU"
    )


class SamplingSpec(_Section):
    """Job-wide sampling settings; per-row columns of the same name override them."""

    sampler: str = Field("ddim", description="sampler name (see the samplers section)")
    steps: int = Field(30, ge=1, le=1000, description="denoising steps")
    guidance_scale: float = Field(7.5, ge=0.0, le=100.0, description="classifier-free guidance")
    width: int = Field(512, ge=8, le=MAX_SIDE, description="image width, a multiple of 8")
    height: int = Field(512, ge=8, le=MAX_SIDE, description="image height, a multiple of 8")
    negative_prompt: str = Field("", description="default negative prompt")
    seed: int = Field(0, ge=0, lt=2**63, description="job seed; rows without seed get derive(seed, item_id)")
    strength: float = Field(0.8, gt=0.0, le=1.0, description="img2img strength (rows with init_image)")
    sampler_options: dict[str, Any] = Field(
        default_factory=dict, description="extra sampler keyword options (JSON-serializable)"
    )

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8, got {value}")
        return value


class OutputSpec(_Section):
    """Where images and the manifest go."""

    uri: str = Field(description="local folder or s3://bucket/prefix")
    format: Literal["png", "jpeg", "webp"] = Field("png", description="image file format")
    quality: int = Field(95, ge=1, le=100, description="jpeg/webp quality (ignored for png)")


class ComputeSpec(_Section):
    """How the work is spread over Ray."""

    batch_size: int = Field(4, ge=1, le=256, description="fixed micro-batch per model call")
    gpus_per_worker: float = Field(1, ge=0, description="GPUs per generator actor; 0 = CPU workers")
    min_workers: int = Field(1, ge=1, description="smallest generator actor pool")
    max_workers: int = Field(4, ge=1, description="largest generator actor pool")
    batches_per_call: int = Field(
        4, ge=1, le=64, description="micro-batches handed to an actor per call (Ray Data batch)"
    )

    @model_validator(mode="after")
    def _pool_order(self) -> "ComputeSpec":
        if self.max_workers < self.min_workers:
            raise ValueError(f"max_workers ({self.max_workers}) < min_workers ({self.min_workers})")
        return self


class StorageSpec(_Section):
    """S3-compatible storage settings (credentials come only from the standard AWS chain)."""

    endpoint_url: Optional[str] = Field(None, description="S3 endpoint; default AWS_ENDPOINT_URL")


class JobSpec(_Section):
    """A whole job: input, model, sampling, output, compute, storage."""

    name: str = Field("job", description="job name (logs and summary)")
    input: InputSpec
    model: ModelSpec = Field(default_factory=ModelSpec)
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    output: OutputSpec
    compute: ComputeSpec = Field(default_factory=ComputeSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)

    # Fields whose change changes an image or the set of items: compared on resume.
    DIGEST_FIELDS: ClassVar[tuple[str, ...]] = (
        "input.uri", "input.id_column", "input.prompt_column", "model.uri", "model.dtype",
        "sampling", "output.format", "output.quality", "compute.batch_size",
    )

    def digest_fields(self) -> dict[str, Any]:
        """Flat {dotted key: value} of the output-affecting fields."""
        flat = _flatten(self.model_dump(mode="json"))
        keep = {}
        for key, value in flat.items():
            if any(key == f or key.startswith(f + ".") for f in self.DIGEST_FIELDS):
                keep[key] = value
        return keep

    def digest(self) -> str:
        """sha256 over the output-affecting fields (stable JSON)."""
        blob = json.dumps(self.digest_fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(data, dict) and (data or not prefix):
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
    else:
        out[prefix[:-1]] = data
    return out


def diff_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two ``digest_fields()`` dicts."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML scalars) to a raw spec dict."""
    for item in overrides or []:
        if "=" not in item:
            raise InputError(f"--set {item!r}: expected dotted.key=value")
        key, _, raw = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise InputError(f"--set {item!r}: empty key")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise InputError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _parse_value(raw)
    return data


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key {key!r}")
        elif err["type"] == "missing":
            lines.append(f"missing key {key!r}")
        else:
            lines.append(f"key {key!r}: {err['msg']} (got {err.get('input')!r})")
    return f"{source}: invalid job spec: " + "; ".join(lines)


def spec_from_dict(data: Any, source: str = "job spec") -> JobSpec:
    """Validate a raw dict into a JobSpec; errors name the source and the dotted key."""
    if not isinstance(data, dict):
        raise InputError(f"{source}: a job spec must be a YAML mapping, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise InputError(_format_errors(exc, source)) from None


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Read a YAML job spec from ``path``, apply ``--set`` overrides, validate."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"{path}: cannot read job spec: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML: {exc}") from None
    if isinstance(data, dict):
        data = apply_overrides(data, overrides or [])
    return spec_from_dict(data, str(path))
