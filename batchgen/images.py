"""PNG / JPEG / WebP encoding with the generation parameters embedded, byte-for-byte deterministic.

- PNG: text chunk ``parameters`` (the A1111-style human line that other tools show) and a
  ``batchgen`` chunk with the parameters as JSON.
- JPEG and WebP: the same JSON in the EXIF ``UserComment`` tag (charset prefix ``ASCII``; the JSON
  is pure ASCII because non-ASCII characters are escaped).
- WebP: ``quality == 100`` means lossless (exact pixels); below 100 it is lossy at that quality.
- JPEG: 4:4:4 chroma when ``quality >= 90``, else 4:2:0.

Same array + same parameters -> identical bytes: fixed compression settings, no timestamps, JSON
with sorted keys. :func:`read_generation_parameters` reads the dict back from any of the three.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

FORMATS = ("png", "jpeg", "webp")
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
"""File extension per format (``images/<item_id>.<ext>``)."""

_ALIASES = {"jpg": "jpeg"}
_PNG_COMPRESS_LEVEL = 6
_WEBP_METHOD = 4
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
_ASCII_PREFIX = b"ASCII\x00\x00\x00"
_UNICODE_PREFIX = b"UNICODE\x00"


def normalize_format(fmt: str) -> str:
    """``"PNG"``/``"jpg"``... -> one of :data:`FORMATS`; anything else is a ValueError naming it."""
    if not isinstance(fmt, str) or _ALIASES.get(fmt.lower(), fmt.lower()) not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}; got {fmt!r}")
    return _ALIASES.get(fmt.lower(), fmt.lower())


def parameters_json(parameters: dict) -> str:
    """The canonical JSON text of a parameters dict: sorted keys, ASCII, no spaces."""
    if not isinstance(parameters, dict):
        raise ValueError(f"parameters must be a dict, got {type(parameters).__name__}")
    try:
        return json.dumps(parameters, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"parameters must be JSON-serializable (str keys, finite numbers): {exc}") from None


def _json_default(value: Any):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"value {value!r} of type {type(value).__name__} is not JSON-serializable")


def parameters_text(parameters: dict) -> str:
    """The A1111-style human text: prompt, ``Negative prompt:`` line, then ``Key: value, ...``."""
    p = parameters
    lines = [str(p.get("prompt", ""))]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    fields: list[tuple[str, Any]] = [
        ("Steps", p.get("steps")),
        ("Sampler", p.get("sampler")),
        ("CFG scale", p.get("guidance_scale", p.get("cfg_scale"))),
        ("Seed", p.get("seed")),
        ("Size", f"{p['width']}x{p['height']}" if "width" in p and "height" in p else None),
        ("Model hash", str(p.get("model_fingerprint") or p.get("fingerprint") or "")[:10] or None),
        ("Denoising strength", p.get("strength") if p.get("init_image") else None),
        ("Batch size", p.get("batch_size")),
    ]
    rest = ", ".join(f"{name}: {value}" for name, value in fields if value is not None)
    if rest:
        lines.append(rest)
    return "\n".join(lines)


def encode_image(array, fmt: str = "png", quality: int = 95, parameters: dict | None = None) -> bytes:
    """Encode an ``HxWx3`` uint8 array as PNG/JPEG/WebP with ``parameters`` embedded (see module doc)."""
    from PIL import Image

    fmt = normalize_format(fmt)
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an int in 1..100, got {quality!r}")
    quality = int(quality)
    arr = np.asarray(array)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"array must be an HxWx3 uint8 image, got shape {arr.shape} dtype {arr.dtype}")
    params = {} if parameters is None else parameters
    text_json = parameters_json(params)
    image = Image.fromarray(np.ascontiguousarray(arr))  # uint8 HxWx3 -> RGB
    buf = io.BytesIO()
    if fmt == "png":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("parameters", parameters_text(params))
        info.add_text("batchgen", text_json)
        image.save(buf, format="PNG", pnginfo=info, compress_level=_PNG_COMPRESS_LEVEL, optimize=False)
    else:
        exif = Image.Exif()
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _ASCII_PREFIX + text_json.encode("ascii")
        exif_bytes = exif.tobytes()
        if fmt == "jpeg":
            image.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False,
                       subsampling=0 if quality >= 90 else 2, exif=exif_bytes)
        else:
            lossless = quality == 100
            image.save(buf, format="WEBP", lossless=lossless, quality=80 if lossless else quality,
                       method=_WEBP_METHOD, exact=lossless, exif=exif_bytes)
    return buf.getvalue()


def read_generation_parameters(data: bytes) -> dict:
    """The parameters dict embedded by :func:`encode_image` (``{}`` if the image has none).

    Not an image, or an unreadable embedded JSON -> ValueError.
    """
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"data must be bytes, got {type(data).__name__}")
    try:
        image = Image.open(io.BytesIO(bytes(data)))
    except UnidentifiedImageError:
        raise ValueError("data is not a PNG, JPEG or WebP image") from None
    with image:
        if image.format == "PNG":
            text = image.info.get("batchgen")
        else:
            comment = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
            text = _decode_user_comment(comment)
        fmt = image.format
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the batchgen parameters embedded in this {fmt} image are not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"the batchgen parameters embedded in this {fmt} image are not a JSON object")
    return value


def _decode_user_comment(comment) -> str | None:
    if comment is None:
        return None
    if isinstance(comment, str):
        return comment
    raw = bytes(comment)
    if raw.startswith(_ASCII_PREFIX):
        return raw[len(_ASCII_PREFIX):].decode("ascii", errors="replace").rstrip("\x00")
    if raw.startswith(_UNICODE_PREFIX):
        body = raw[len(_UNICODE_PREFIX):]
        return body.decode("utf-16-be" if not body.startswith(b"\xff\xfe") else "utf-16", errors="replace")
    return raw.decode("utf-8", errors="replace").rstrip("\x00")
