"""JobSpec: the YAML contract between the user, the CLI and the workers.

Unknown keys are refused (with the dotted key named and the closest known key suggested), every
field is documented, values have strict types (``steps: true`` or ``seed: "7"`` are errors, not 1
and 7), and ``spec.digest()`` hashes the fields that change what lands in the output, so a re-run on
an existing output can tell "resume" from "different job".

The YAML reader is strict too: duplicate keys are errors, aliases (``*name``) are refused (a few
lines of nested aliases expand into gigabytes: the "billion laughs"), and a spec file may be at
most 1 MiB (at most that much is read, so a FIFO or ``/dev/zero`` cannot make it read forever).
:func:`strict_yaml_load` and :func:`read_text_limited` give other YAML files (prompt templates)
the same rules.

Error messages never repeat the ``user:password@`` of a URL (``--set`` arguments included).

Relative paths in a spec (and in ``--set``) are used as they are, so they resolve against the
current directory, not the spec file's folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InputError

MAX_SIDE = 4096
MAX_SPEC_BYTES = 1 << 20  # a job spec is a few hundred bytes; anything near this is not one
DEFAULT_MAX_INIT_IMAGE_PIXELS = 40_000_000


class _Section(BaseModel):
    # hide_input_in_errors: str(ValidationError) never repeats a value (a URL with credentials);
    # _format_errors shows values itself, redacted
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, hide_input_in_errors=True)


class InputSpec(_Section):
    """Where the prompts are."""

    uri: str = Field(description="Parquet file, folder, glob (*.parquet), or s3://bucket/prefix")
    id_column: Optional[str] = Field(
        None, description="column with unique item ids; else ids derive from file path + row number"
    )
    prompt_column: str = Field("prompt", description="column holding the prompt text")
    passthrough: list[str] = Field(default_factory=list, description="input columns copied into the manifest and "
                                                                     "the exports (labels, captions)")
    max_init_image_pixels: int = Field(
        DEFAULT_MAX_INIT_IMAGE_PIXELS,
        description="largest init_image (width x height) a row may use; larger ones fail that item "
                    "before they are decoded (decompression bombs)",
    )

    @field_validator("max_init_image_pixels")
    @classmethod
    def _positive_pixels(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be a positive number of pixels (width x height), got {value}; the default is "
                             f"{DEFAULT_MAX_INIT_IMAGE_PIXELS} ({DEFAULT_MAX_INIT_IMAGE_PIXELS / 1e6:g} Mpx)")
        return value


class LoraSpec(_Section):
    """One LoRA fused into the model's weights."""

    uri: str = Field(description="a .safetensors LoRA (kohya / sd-scripts or diffusers / PEFT), local or s3://")
    scale: float = Field(1.0, ge=-10.0, le=10.0, allow_inf_nan=False, description="strength of the LoRA")


class ControlNetSpec(_Section):
    """One ControlNet loaded beside the model (rows then need a ``control_image``)."""

    uri: str = Field(description="a ControlNet folder (config.json + safetensors) or single .safetensors file, "
                                 "local, s3:// or builtin:")


class IPAdapterSpec(_Section):
    """An IP-Adapter loaded beside the model (rows then need an ``ip_adapter_image``)."""

    uri: str = Field(description="an IP-Adapter weight file (h94 layout: ip-adapter_sd15.safetensors, "
                                 "ip-adapter-plus_sdxl_vit-h.safetensors ...), local, s3:// or builtin:")
    image_encoder: Optional[str] = Field(None, description="its CLIP image encoder folder (default: found beside "
                                                           "the file, as diffusers' load_ip_adapter finds it)")


class ModelSpec(_Section):
    """Which checkpoint renders the images, and how it is loaded. The whole block is part of the
    resume digest: any change is a different job."""

    uri: str = Field("builtin:tiny", description="builtin:NAME, a diffusers folder or a single .safetensors "
                                                 "checkpoint (local, file:// or s3://)")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto = the family's GPU dtype (float16; bfloat16 for SD3/FLUX) on a GPU, float32 on CPU"
    )
    variant: Optional[str] = Field(None, description="weight file variant of a diffusers folder, e.g. fp16")
    loras: list[LoraSpec] = Field(default_factory=list, description="LoRAs fused into the weights (a row's "
                                                                     "`loras` column replaces them for that row)")
    vae: Optional[str] = Field(None, description="a VAE file or folder replacing the checkpoint's")
    text_encoders: Optional[dict[str, str] | str] = Field(
        None, description="text encoder files/folders by component (text_encoder, text_encoder_2, ...), or one "
                          "diffusers folder to take them from")
    tokenizers: Optional[dict[str, str] | str] = Field(
        None, description="tokenizer folders by component (T5 tokenizers are never downloaded), or one diffusers folder")
    prediction_type: Optional[Literal["epsilon", "v_prediction"]] = Field(
        None, description="for checkpoints that do not say (SD 2.x 768-v, v-pred SDXL finetunes)")
    allow_pickle: bool = Field(False, description="load .ckpt / .bin pickle weights (they can run code)")
    text_encoder_device: Optional[Literal["cpu"]] = Field(
        None, description="cpu: keep the text encoders in host memory (FLUX on 24 GB GPUs)")
    fp8: list[str] = Field(default_factory=list, description="components stored in float8 e4m3 (e.g. "
                                                             "[transformer]); upcast at each matmul")
    controlnets: list[ControlNetSpec] = Field(
        default_factory=list, description="ControlNets (SD 1.x/2.x, SDXL, SD3/SD3.5, FLUX.1); every row then needs a control_image "
                                          "(a JSON list of URIs, one per ControlNet, when there are several)")
    ip_adapter: Optional[IPAdapterSpec] = Field(
        None, description="an IP-Adapter (SD 1.x, SDXL); every row then needs an ip_adapter_image")

    def load_options(self) -> dict[str, Any]:
        """The keyword arguments of load_pipeline this block stands for (besides uri and dtype)."""
        return {"variant": self.variant, "allow_pickle": self.allow_pickle, "vae": self.vae,
                "text_encoders": self.text_encoders, "tokenizers": self.tokenizers,
                "prediction_type": self.prediction_type, "text_encoder_device": self.text_encoder_device,
                "fp8": tuple(self.fp8), "loras": [lora.model_dump() for lora in self.loras],
                "controlnets": [c.uri for c in self.controlnets],
                "ip_adapter": self.ip_adapter.uri if self.ip_adapter else None,
                "ip_adapter_image_encoder": self.ip_adapter.image_encoder if self.ip_adapter else None}


class _SamplingBase(_Section):
    """Job-wide sampling settings; per-row columns of the same name override them. Every field
    but the first four comes from the settings table (:mod:`batchgen.settings`); None means the
    model family's default."""

    @field_validator("*", check_fields=False)
    @classmethod
    def _table_rules(cls, value, info):
        from .settings import BY_NAME

        setting = BY_NAME.get(info.field_name)
        if setting is not None and value is not None:
            try:
                return setting.check(value, info.field_name)
            except ValueError as exc:  # the error's key already names the field
                raise ValueError(str(exc).removeprefix(f"{info.field_name}: ")) from None
        return value

    @field_validator("sampler", check_fields=False)
    @classmethod
    def _canonical_sampler(cls, value: str) -> str:
        from .samplernames import canonical_sampler

        return canonical_sampler(value)

    @field_validator("sampler_options", check_fields=False)
    @classmethod
    def _finite_json(cls, value: dict) -> dict:
        def check(v: Any, where: str) -> None:
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{where} is {v}: numbers must be finite")
            if isinstance(v, dict):
                for k, item in v.items():
                    if not isinstance(k, str):
                        raise ValueError(f"{where}: keys must be strings, got {k!r}")
                    check(item, f"{where}.{k}")
            elif isinstance(v, list):
                for i, item in enumerate(v):
                    check(item, f"{where}[{i}]")
            elif not (v is None or isinstance(v, (str, int, float, bool))):
                raise ValueError(f"{where}: {type(v).__name__} is not a JSON value")

        for key, item in value.items():
            check(item, key)
        return value

    def family_values(self, family: str) -> dict[str, Any]:
        """The table settings as the job sends them to a ``family`` model: settings of other
        families are left out (an explicitly set one is an error naming it)."""
        from .settings import SPEC_SETTINGS

        out = {}
        for setting in SPEC_SETTINGS:
            if setting.families is not None and family not in setting.families:
                if setting.name in self.model_fields_set and getattr(self, setting.name) != setting.default:
                    raise InputError(f"sampling.{setting.name} applies to {', '.join(setting.families)} models; "
                                     f"this model is {family}")
                continue
            out[setting.name] = getattr(self, setting.name)
        return out


def _sampling_spec() -> type[BaseModel]:
    """SamplingSpec: four job-level fields plus one field per settings-table entry."""
    from pydantic import create_model

    from .settings import SPEC_SETTINGS

    fields: dict[str, Any] = {
        "sampler": (str, Field("auto", description="sampler name (README: samplers; A1111 names are aliases); "
                                                   "auto = the model family's default")),
        "sampler_options": (dict[str, Any], Field(default_factory=dict,
                                                  description="extra sampler keyword options (JSON-serializable)")),
        "seed": (int, Field(0, ge=0, lt=2**63, description="job seed; rows without seed get derive(seed, item_id)")),
        "images_per_prompt": (int, Field(1, ge=1, le=10000, description="images per input row (a row's `n` "
                                                                        "column overrides it); items <id>-<k>, "
                                                                        "seeds seed + k")),
    }
    types = {"str": str, "int": int, "float": float}
    for setting in SPEC_SETTINGS:
        typ = types[setting.type]
        if setting.default is None:
            typ = Optional[typ]
        families = f" ({', '.join(setting.families)} models)" if setting.families else ""
        fields[setting.name] = (typ, Field(setting.default, description=setting.doc + families))
    return create_model("SamplingSpec", __base__=_SamplingBase, **fields)


SamplingSpec = _sampling_spec()


class ScoringClipSpec(_Section):
    """CLIP score of every rendered image against its prompt (torchmetrics' CLIPScore scale)."""

    model: str = Field(description="a transformers CLIPModel folder (local or s3://) with its processor files")
    batch_size: int = Field(16, ge=1, le=1024, description="images per CLIP call")


class ScoringSpec(_Section):
    """Optional quality scores written to the manifest (and usable by `export --where`)."""

    clip: Optional[ScoringClipSpec] = Field(None, description="clip_score column")


class OutputSpec(_Section):
    """Where images and the manifest go."""

    uri: str = Field(description="local folder or s3://bucket/prefix")
    format: Literal["png", "jpeg", "webp"] = Field("png", description="image file format")
    quality: int = Field(95, ge=1, le=100, description="jpeg/webp quality (ignored for png)")


class ComputeSpec(_Section):
    """How the work is spread over Ray."""

    batch_size: int = Field(4, ge=1, le=256, description="fixed micro-batch per model call")
    gpus_per_worker: float = Field(1, ge=0, allow_inf_nan=False,
                                   description="GPUs per generator actor; 0 = CPU workers")
    min_workers: int = Field(1, ge=1, description="smallest generator actor pool")
    max_workers: int = Field(4, ge=1, description="largest generator actor pool")
    batches_per_call: int = Field(
        4, ge=1, le=64, description="micro-batches handed to an actor per call (Ray Data batch)"
    )
    torch_threads: int = Field(
        1, ge=1, le=256, description="torch intra-op threads per generator actor (CPU bytes depend on it; "
                                     "recorded per item and reproduced by rerender)"
    )
    compile: Literal["none", "default", "max"] = Field(
        "none", description="torch.compile the denoiser and VAE decoder (max: + CUDA graphs); compiled images "
                            "differ from eager ones in the last bits")
    deterministic: bool = Field(False, description="torch deterministic algorithms, no TF32, no cuDNN benchmark "
                                                   "(recorded per item)")
    start_timeout_s: float = Field(
        600.0, gt=0, allow_inf_nan=False,
        description="fail when min_workers generator actors have not started (resources, model load) "
                    "within this many seconds",
    )

    @model_validator(mode="after")
    def _pool_order(self) -> "ComputeSpec":
        if self.max_workers < self.min_workers:
            raise ValueError(f"max_workers ({self.max_workers}) < min_workers ({self.min_workers})")
        return self


class StorageSpec(_Section):
    """S3-compatible storage settings (credentials come only from the standard AWS chain)."""

    endpoint_url: Optional[str] = Field(None, description="S3 endpoint; default AWS_ENDPOINT_URL")

    @field_validator("endpoint_url")
    @classmethod
    def _no_credentials(cls, value: Optional[str]) -> Optional[str]:
        from .storage import check_endpoint_url

        if value is None:
            return value
        try:  # any '@' is refused there, never echoed (it would be written to job.json and logs)
            check_endpoint_url(value, "endpoint_url")
        except ValueError as exc:
            raise ValueError(str(exc).removeprefix("endpoint_url ")) from None
        return value


class JobSpec(_Section):
    """A whole job: input, model, sampling, output, compute, storage."""

    name: str = Field("job", description="job name (logs and summary)")
    input: InputSpec
    model: ModelSpec = Field(default_factory=ModelSpec)
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    output: OutputSpec
    compute: ComputeSpec = Field(default_factory=ComputeSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    scoring: ScoringSpec = Field(default_factory=ScoringSpec, description="optional quality scores (clip)")

    # Fields whose change changes an image, a manifest column or the set of items: compared on resume.
    DIGEST_FIELDS: ClassVar[tuple[str, ...]] = (
        "input.uri", "input.id_column", "input.prompt_column", "input.passthrough", "model", "sampling",
        "output.format", "output.quality", "compute.batch_size", "compute.compile", "compute.deterministic",
        "scoring",
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


# ----------------------------------------------------------------------------- strict YAML


class _Refused(Exception):
    """A YAML construct a job spec may not use (alias, duplicate key)."""


def strict_loader(what: str = "job spec"):
    """A SafeLoader subclass that refuses aliases and duplicate keys (raising ``_Refused`` with a
    message that starts ``line N:`` and calls the document a ``what``)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise _Refused(f"line {event.start_mark.line + 1}: YAML alias '*{event.anchor}' is not "
                               f"allowed in a {what} (aliases can expand a small file into gigabytes); "
                               "write the value out")
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict = {}
                for key_node, _ in node.value:
                    key = self.construct_object(key_node, deep=True)
                    try:
                        first = seen.get(key)
                    except TypeError:
                        raise _Refused(f"line {key_node.start_mark.line + 1}: a mapping key must be a "
                                       f"scalar") from None
                    line = key_node.start_mark.line + 1
                    if first is not None:
                        raise _Refused(f"line {line}: duplicate key {key!r} (first on line {first})")
                    seen[key] = line
            return super().construct_mapping(node, deep)

    return StrictLoader


def strict_yaml_load(text: str, source: str, what: str = "job spec") -> Any:
    """``text`` parsed by :func:`strict_loader`: an alias or a duplicate key is an InputError
    naming ``source`` and the line; a syntax error stays a ``yaml.YAMLError`` for the caller to
    word. Size limits are the caller's (:func:`read_text_limited`, :func:`parse_yaml`)."""
    import yaml

    try:
        return yaml.load(text, Loader=strict_loader(what))  # noqa: S506 - a SafeLoader subclass
    except _Refused as exc:
        raise InputError(f"{source}, {exc}") from None


def read_text_limited(path: str | Path, limit: int, what: str) -> str:
    """The UTF-8 text of ``path``, reading at most ``limit + 1`` bytes: a larger file, or a FIFO
    or device that never ends (``/dev/zero``), is an InputError naming the file, not an endless read."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limit:
            raise InputError(f"{path}: {size} bytes is too large for a {what} (limit {_bytes(limit)})")
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise InputError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise InputError(f"{path}: more than {limit} bytes is too large for a {what} (limit {_bytes(limit)})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc})") from None


def _bytes(n: int) -> str:
    return f"{n // 1024} KiB" if n >= 1024 else f"{n} bytes"


def parse_yaml(text: str, source: str) -> Any:
    """Parse a job spec document strictly (size limit, no aliases, no duplicate keys)."""
    import yaml

    from .storage import redact_text

    if len(text.encode("utf-8", "surrogatepass")) > MAX_SPEC_BYTES:
        raise InputError(f"{source}: {len(text)} characters is too large for a job spec "
                         f"(limit {MAX_SPEC_BYTES // 1024} KiB)")
    try:
        return strict_yaml_load(text, source)
    except yaml.YAMLError as exc:  # its snippet of the document may hold a URL with credentials
        raise InputError(f"{source}: not valid YAML: {redact_text(str(exc))}") from None


def _parse_value(text: str, item: str) -> Any:
    """A ``--set`` value as a YAML scalar or flow collection (plain text when it is not YAML)."""
    import yaml

    if len(text) > MAX_SPEC_BYTES:
        raise InputError(f"--set {_show_set(item)[:60]!r}...: value too large")
    try:
        return yaml.load(text, Loader=strict_loader())  # noqa: S506
    except _Refused as exc:
        raise InputError(f"--set {_show_set(item)!r}: {str(exc).split(': ', 1)[-1]}") from None
    except yaml.YAMLError:
        return text


def _show_set(item: str) -> str:
    """A ``--set`` argument as error messages show it: the value's URL user-info redacted."""
    from .storage import redact_userinfo

    key, sep, value = item.partition("=")
    return key + sep + redact_userinfo(value) if sep else redact_userinfo(item)


def apply_overrides(data: dict, overrides: list[str], origins: dict[str, str] | None = None) -> dict:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML) to a raw spec dict.

    ``origins`` (when given) receives ``{dotted key: the --set argument}`` so validation errors
    can name the ``--set`` that caused them instead of the file.
    """
    for item in overrides or []:
        if "=" not in item:
            raise InputError(f"--set {_show_set(item)!r}: expected dotted.key=value")
        key, _, raw = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise InputError(f"--set {_show_set(item)!r}: empty key")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise InputError(f"--set {_show_set(item)!r}: {'.'.join(parts[:i + 1])!r} is not a section")
            node = child
        node[parts[-1]] = _parse_value(raw, item)
        if origins is not None:
            origins[".".join(parts)] = item
    return data


# ----------------------------------------------------------------------------- errors


def _safe_repr(value: Any, limit: int = 80) -> str:
    """A short repr of a bad value, with any URL user:password@ removed."""
    from .storage import redact_text, redact_userinfo

    if isinstance(value, str):
        value = redact_userinfo(value)
    text = redact_text(repr(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: Any = JobSpec
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return None
        model = fields[part].annotation
    return model if isinstance(model, type) and hasattr(model, "model_fields") else None


def _origin(key: str, origins: dict[str, str]) -> str | None:
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        hit = origins.get(".".join(parts[:n]))
        if hit is not None:
            return hit
    return None


def _format_errors(exc: ValidationError, source: str, origins: dict[str, str] | None = None) -> str:
    from .samplernames import did_you_mean

    lines = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            hint = ""
            if parent is not None:
                prefix = ".".join(loc[:-1])
                names = [f"{prefix}.{n}" if prefix else n for n in parent.model_fields]
                hint = did_you_mean(key, names)
            what = f"unknown key {key!r}{hint}"
        elif err["type"] == "missing":
            what = f"missing key {key!r}"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            says_value = re.search(r"(^|[\s(])got\s", msg) is not None  # the message names the value already
            got = "" if says_value else f" (got {_safe_repr(err.get('input'))})"
            what = f"key {key!r}: {msg}{got}"
        origin = _origin(key, origins or {})
        lines.append(f"--set {_show_set(origin)!r}: {what}" if origin else f"{source}: {what}")
    return "invalid job spec: " + "; ".join(lines)


def spec_from_dict(data: Any, source: str = "job spec", origins: dict[str, str] | None = None) -> JobSpec:
    """Validate a raw dict into a JobSpec; errors name the source (file or --set) and the dotted key."""
    if not isinstance(data, dict):
        raise InputError(f"{source}: a job spec must be a YAML mapping, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise InputError(_format_errors(exc, source, origins)) from None


def read_spec_file(path: str | Path) -> Any:
    """The raw (unvalidated) document of a spec file, read strictly (at most MAX_SPEC_BYTES + 1 bytes)."""
    path = Path(path)
    return parse_yaml(read_text_limited(path, MAX_SPEC_BYTES, "job spec"), str(path))


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Read a YAML job spec from ``path``, apply ``--set`` overrides, validate."""
    data = read_spec_file(path)
    origins: dict[str, str] = {}
    if isinstance(data, dict):
        data = apply_overrides(data, overrides or [], origins)
    return spec_from_dict(data, str(path), origins)


def spec_overrides(args) -> list[str]:
    """The command line's spec overrides (``batchgen run`` and ``submit``): ``--set`` overrides plus the ones common flags stand for (``--endpoint-url``: storage.endpoint_url,
    checked like the spec's own: a URL with user:password@ is refused)."""
    extra = [f"storage.endpoint_url={args.endpoint_url}"] if getattr(args, "endpoint_url", None) else []
    return list(args.overrides) + extra
