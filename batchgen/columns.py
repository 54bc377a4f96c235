"""The columns of normalized rows and of the manifest, and the names batchgen reserves.

Shared by :mod:`batchgen.dataset` (which builds rows and refuses a passthrough column that takes
a reserved name) and :mod:`batchgen.manifest` (which writes rows as manifest parts): both import
them from here, so neither imports the other.
"""

from __future__ import annotations

import pyarrow as pa

# Columns every normalized row has, before the settings columns (from the settings table), the
# LoRA set, the settings-group key and the job's passthrough columns.
ROW_HEAD = [("item_id", pa.string()), ("source_file", pa.string()), ("source_row", pa.int64()),
            ("image_index", pa.int32()), ("prompt", pa.string())]


# Conditioning columns of an input row beside the settings table (the job reads these files and
# derives control images; generate() takes images, not URIs): see batchgen.job.conditioning.
# ``control_image`` is one URI, or a JSON list of URIs with several ControlNets.
CONDITION_ROW = [("control_image", pa.string()), ("mask_image", pa.string()), ("control_preprocess", pa.string()),
                 ("canny_low", pa.int32()), ("canny_high", pa.int32()), ("ip_adapter_image", pa.string())]
# The sha256 of each conditioning file as the worker read it (several control images: a JSON list).
CONDITION_SHA = [("init_image_sha256", pa.string()), ("control_image_sha256", pa.string()),
                 ("mask_image_sha256", pa.string()), ("ip_adapter_image_sha256", pa.string())]


def setting_type(setting) -> pa.DataType:
    """The Arrow type a setting has in rows and the manifest."""
    if setting.type == "str":
        return pa.string()
    if setting.type == "float":
        return pa.float64()
    return pa.int64() if setting.name == "seed" else pa.int32()


def manifest_schema(passthrough: pa.Schema | list | None = None) -> pa.Schema:
    """The manifest's columns: the item, every per-item setting (from the settings table), how it
    was rendered (sampler, LoRAs with their sha256, model), labels (DiT class, CLIP score), the
    stored image and its provenance, then the job's ``input.passthrough`` columns."""
    from .settings import ROW_SETTINGS

    fields = list(ROW_HEAD) + [(s.name, setting_type(s)) for s in ROW_SETTINGS]
    fields += CONDITION_ROW + CONDITION_SHA
    fields += [
        ("sampler", pa.string()),
        ("sampler_options", pa.string()),
        ("batch_size", pa.int32()),
        ("loras", pa.string()),  # JSON [{uri, scale, sha256}] of the LoRAs fused for this item
        ("model_uri", pa.string()),
        ("model_family", pa.string()),
        ("model_fingerprint", pa.string()),
        ("class_id", pa.int64()),  # DiT: the class rendered (the prompt names it)
        ("class_name", pa.string()),
        ("clip_score", pa.float64()),  # scoring.clip: 100 * max(cos(image, prompt), 0)
        ("image_uri", pa.string()),
        ("image_format", pa.string()),
        ("image_sha256", pa.string()),
        ("image_bytes", pa.int64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("attempt", pa.int32()),
        ("worker", pa.string()),
        ("render_ms", pa.float64()),
        ("encode_ms", pa.float64()),
        ("batchgen_version", pa.string()),
        ("render_env", pa.string()),
    ]
    base = {name for name, _ in fields}
    extra = [f for f in (passthrough or []) if (f.name if isinstance(f, pa.Field) else f[0]) not in base]
    return pa.schema(fields + extra)


MANIFEST_SCHEMA = manifest_schema()
# Label columns an input may fill through input.passthrough (a DiT model fills them itself).
LABEL_COLUMNS = {"class_id": pa.int64(), "class_name": pa.string()}

# The one list of names batchgen uses beside an input's own columns: an input.passthrough column
# may take none of them (the label columns above aside). The manifest's columns; what the stages
# carry between them (the rendered pixels, the applied LoRA set, compile warm-up time, the
# settings-group key, images per row) and what consolidation adds (the part file path and rank
# columns); and the fields the exports add beside the manifest columns (export.py uses this list).
STAGE_COLUMNS = ("image", "applied_loras", "warmup_ms", "group", "n", "path", "_ok", "_part")
EXPORT_FIELDS = {"webdataset": ("key",), "parquet": ("image", "text")}


def reserved_names() -> dict[str, str]:
    """{name: what batchgen uses it for} of every reserved name (see STAGE_COLUMNS)."""
    out = {name: "a manifest column" for name in MANIFEST_SCHEMA.names if name not in LABEL_COLUMNS}
    for name in STAGE_COLUMNS:
        out.setdefault(name, "a column of the render stages")
    for fmt, names in EXPORT_FIELDS.items():
        for name in names:
            out.setdefault(name, f"a field of the {fmt} export")
    return out


RESERVED_NAMES: frozenset[str] = frozenset(reserved_names())


def reserved_name_error(name: str) -> str | None:
    """Why ``name`` cannot be a passthrough column (it names the reserved list), or None."""
    use = reserved_names().get(name)
    if use is None:
        return None
    return (f"{name!r} is {use}; list only other columns (reserved names: {', '.join(sorted(RESERVED_NAMES))}; "
            f"rename the input column)")
