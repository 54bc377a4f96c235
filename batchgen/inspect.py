"""`batchgen inspect MODEL`: what a checkpoint is, without loading its weights.

For a diffusers folder or a single file (with the same component overrides load_pipeline takes):
the detected family and variant, every component with its class, parameter count and stored
dtypes, the fingerprint (the one load_pipeline reports, so a job's manifest can be checked against
a file before rendering), the scheduler and prediction type, the family's default size / sampler /
steps / guidance, and for each ``--lora`` how many of its modules match this model.

Why nothing is loaded: the family is built exactly as for rendering (same source, same
``Family.load``) but every model module is created on the meta device, so a 12B-parameter model
is inspected in seconds and in little memory. The key conversion and the strict key / shape check
still run, on meta tensors made from the safetensors headers, so a file inspect accepts loads
(which makes :func:`inspect_model` a complete pre-flight check of a model). Stored dtypes and
element counts come from the headers; parameter counts from the modules' shapes; LoRA matching
only needs names and shapes. The fingerprint does read every file once (sha256).
"""

from __future__ import annotations

import json
from typing import Any

import torch

__all__ = ["inspect_model", "skeleton", "configure", "run"]


class _MetaSource:
    """A model source whose model components are built on the meta device (no weights read)."""

    def __init__(self, source):
        self.source = source

    def __getattr__(self, name: str):
        return getattr(self.__dict__["source"], name)

    def load_model(self, name: str, variant: str | None = None, allow_pickle: bool = False, **options):
        return self.source.build_model(name, variant, allow_pickle)


def skeleton(local_path, *, vae=None, text_encoders=None, tokenizers=None, prediction_type: str | None = None,
             variant: str | None = None, allow_pickle: bool = False, storage_config=None):
    """(A :class:`~batchgen.pipeline.Pipeline` whose modules live on the meta device, its source)
    for a local model path (folder or single file, with overrides). Nothing is loaded, yet every
    key and shape is checked, and the pipeline validates requests exactly as the real one does:
    the job's pre-flight checks each settings group with it."""
    from .builtin import resolve_model_uri
    from .checkpoints import open_source
    from .families import family_for
    from .pipeline import Pipeline

    source = open_source(local_path, vae=vae, text_encoders=text_encoders, tokenizers=tokenizers,
                         prediction_type=prediction_type, allow_pickle=allow_pickle, storage_config=storage_config,
                         resolve=lambda uri: resolve_model_uri(uri, storage_config))
    family = family_for(source).load(_MetaSource(source), variant, allow_pickle)
    return Pipeline(family, {"fingerprint": None, **family.info()}), source


def _dtype_name(stored: str) -> str:
    names = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
             "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
    return names.get(stored, stored.lower())


def inspect_model(uri, loras=(), *, vae=None, text_encoders=None, tokenizers=None, prediction_type: str | None = None,
                  variant: str | None = None, allow_pickle: bool = False, storage_config=None,
                  fingerprint: bool = True) -> dict[str, Any]:
    """A JSON-ready description of a model (see the module docstring); ``loras`` are LoRA URIs.

    ``fingerprint=False`` skips hashing the files (a pre-flight that only validates: everything
    else reads headers and configs only, so it also works on header-only copies of remote files).
    """
    from .builtin import resolve_model_uri
    from .checkpoints import inspect_lora
    from .checkpoints.lora import lora_components

    local = resolve_model_uri(uri, storage_config)
    pipe, source = skeleton(local, vae=vae, text_encoders=text_encoders, tokenizers=tokenizers,
                            prediction_type=prediction_type, variant=variant, allow_pickle=allow_pickle,
                            storage_config=storage_config)
    family = pipe.family
    components: dict[str, Any] = {}
    listed = source.components()
    for name, part in family.parts.items():
        if part is None:
            continue
        cls = listed.get(name, (None, type(part).__name__))[1]
        if isinstance(part, torch.nn.Module):
            stored = source.stored_dtypes(name, variant)
            components[name] = {"class": cls, "parameters": sum(p.numel() for p in part.parameters()),
                                "stored_dtypes": {_dtype_name(k): v for k, v in sorted(stored.items())},
                                "stored_elements": sum(stored.values())}
        elif isinstance(part, dict):
            components[name] = {"class": part.get("_class_name", cls)}
        else:
            components[name] = {"class": cls, "vocab_size": len(part),
                                "max_length": int(getattr(part, "model_max_length", 0) or 0)}
    width, height = family.default_size()
    defaults = family.defaults()
    info = family.info()
    out: dict[str, Any] = {
        "uri": str(uri),
        "format": source.describe().get("format", "diffusers"),
        **info,
        "scheduler": family.scheduler_config.get("_class_name"),
        "scheduler_config": family.scheduler_config,
        "fingerprint": source.fingerprint() if fingerprint else None,
        "parameters": sum(c.get("parameters", 0) for c in components.values()),
        "components": components,
        "defaults": {"width": width, "height": height, "sampler": family.default_sampler,
                     "steps": defaults.get("steps"), "guidance_scale": defaults.get("guidance_scale")},
    }
    described = source.describe()
    for key in ("single_file", "overrides", "prediction_type_override"):
        if key in described:
            out[key] = described[key]
    if loras:
        modules = lora_components(family.parts)
        out["loras"] = [inspect_lora(lora, modules, storage_config) for lora in loras]
    return out


def configure(parser) -> None:
    parser.add_argument("model", help="a diffusers folder, a single-file .safetensors, builtin:NAME or s3:// URI")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE",
                        help="a LoRA file to match against the model (repeatable)")
    parser.add_argument("--vae", help="VAE override (file or folder), as load_pipeline(vae=...)")
    parser.add_argument("--text-encoder", action="append", default=[], metavar="NAME=PATH",
                        help="text encoder override, e.g. text_encoder_2=/models/t5xxl.safetensors (repeatable)")
    parser.add_argument("--tokenizer", action="append", default=[], metavar="NAME=FOLDER",
                        help="tokenizer override, e.g. tokenizer_2=/models/FLUX.1-dev/tokenizer_2 (repeatable)")
    parser.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                        help="for checkpoints that do not say (SD 2.x 768-v, v-prediction SDXL finetunes)")
    parser.add_argument("--allow-pickle", action="store_true", help="read .ckpt / pickle files (can run code)")
    parser.add_argument("--json", action="store_true", help="print the description as JSON")
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{what}: expected NAME=PATH, got {value!r}")
        out[name] = path
    return out


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def format_text(info: dict[str, Any]) -> str:
    lines = [f"model        {info['uri']}",
             f"format       {info['format']}" + (f" ({info['single_file']['variant']}, {info['single_file']['configs']} "
                                                 "configs)" if "single_file" in info else ""),
             f"family       {info['family']} / {info['variant']} ({info['pipeline_class']})",
             f"scheduler    {info['scheduler']}, prediction {info['prediction_type']}",
             f"fingerprint  {info['fingerprint'] or '-'}",
             f"parameters   {_count(info['parameters'])}"]
    d = info["defaults"]
    lines.append(f"defaults     {d['width']}x{d['height']}, sampler {d['sampler']}, {d['steps']} steps, "
                 f"guidance {d['guidance_scale']}")
    if info.get("overrides"):
        lines.append("overrides    " + ", ".join(f"{k}={v}" for k, v in info["overrides"].items()))
    lines.append("components")
    for name, comp in info["components"].items():
        if "parameters" in comp:
            dtypes = ", ".join(f"{k} {_count(v)}" for k, v in comp["stored_dtypes"].items()) or "-"
            lines.append(f"  {name:<15} {comp['class']:<30} {_count(comp['parameters']):>8} params  stored: {dtypes}")
        elif "vocab_size" in comp:
            lines.append(f"  {name:<15} {comp['class']:<30} vocab {comp['vocab_size']}, max length {comp['max_length']}")
        else:
            lines.append(f"  {name:<15} {comp['class']}")
    for lora in info.get("loras", []):
        lines.append(f"lora         {lora['uri']}")
        lines.append(f"  format {lora['format']} ({lora['layout']} names), {lora['modules']} modules, ranks "
                     f"{lora['ranks']}, components {', '.join(lora['components'])}")
        lines.append(f"  matched {lora['matched']} of {lora['modules']} modules ({lora['matched_parameters']} "
                     f"parameters); unmatched {len(lora['unmatched'])}"
                     + (f": {lora['unmatched'][:5]}" if lora["unmatched"] else "")
                     + f"; wrong shape {len(lora.get('mismatched', []))}")
        for wrong in lora.get("mismatched", [])[:5]:
            got = "x".join(map(str, wrong["got"])) if wrong["got"] else wrong.get("error", "?")
            lines.append(f"    {wrong['key']} -> {wrong['parameter']}: expected "
                         f"{'x'.join(map(str, wrong['expected']))}, got {got}")
    return "\n".join(lines)


def run(args) -> int:
    from .storage import StorageConfig

    info = inspect_model(args.model, args.lora, vae=args.vae,
                         text_encoders=_pairs(args.text_encoder, "--text-encoder") or None,
                         tokenizers=_pairs(args.tokenizer, "--tokenizer") or None,
                         prediction_type=args.prediction_type, allow_pickle=args.allow_pickle,
                         storage_config=StorageConfig(endpoint_url=args.endpoint_url))
    print(json.dumps(info, indent=2, sort_keys=False, default=str) if args.json else format_text(info))
    return 0
