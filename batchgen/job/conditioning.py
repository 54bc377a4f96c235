"""Conditioned items in a job: ControlNets and an IP-Adapter in the model block, and the per-row
conditioning files (``init_image``, ``mask_image``, ``control_image``, ``ip_adapter_image``), from
the pre-flight to the worker.

Why here: ``generate()`` takes images, a job takes URIs. Between the two sit the checks that
make a conditioned job safe to run and to resume:

- **pre-flight** (:func:`check_controlnets`, :class:`ConditionFiles`): every ControlNet of
  ``model.controlnets`` opens and fits the base model (no weights loaded: config and header
  only, built on the meta device beside the skeleton pipeline, so the settings groups are
  validated with them); ``model.ip_adapter`` likewise (:func:`check_ip_adapter`: its keys and
  shapes against the UNet, its image encoder found and fitting); every control image, reference
  image, mask (and the init image of a masked row) exists,
  has a decodable header within ``input.max_init_image_pixels``, and a mask has its init image's
  aspect ratio. Errors name the file, row and column; nothing is written. The sha256 of each
  file goes into job.json; a resume refuses a file whose bytes changed (:func:`check_changed`).
- **workers** (:func:`load_conditions`): fetch each row's files, compute their sha256, refuse one
  that differs from the pre-flight's digest (the item fails, naming the file), decode, and
  derive control images (``control_preprocess: canny``, :mod:`batchgen.canny`). ``rerender``
  runs the same function with the manifest's recorded digests, so it sees the same pixels.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointError, InputError, StorageError

# The row columns holding URIs of files the job reads, and the manifest column of their sha256.
FILE_COLUMNS = {"init_image": "init_image_sha256", "mask_image": "mask_image_sha256",
                "control_image": "control_image_sha256", "ip_adapter_image": "ip_adapter_image_sha256"}


class FileChanged(InputError):
    """A file the job uses holds other bytes on a worker than the pre-flight digested."""


class _TooLarge(Exception):
    pass


# ---- reading one image ---------------------------------------------------------------------------


def open_header(data: bytes):
    """``PIL.Image.open(data)`` (lazy: reads the header only) without Pillow's own pixel check.

    Pillow checks ``PIL.Image.MAX_IMAGE_PIXELS`` there, a process-wide setting: turning it off
    for one call would turn it off for every thread. The caller checks ``img.size`` against its
    own limit instead, before anything is decoded (Pillow checks nothing when decoding). This is
    Image.open's format probing, through the plugin registry ``register_open`` fills."""
    from PIL import Image, UnidentifiedImageError

    fp = io.BytesIO(data)
    prefix = data[:16]
    tried: set[str] = set()
    for load_plugins in (Image.preinit, Image.init):
        load_plugins()
        for fmt in list(Image.ID):
            if fmt in tried:
                continue
            tried.add(fmt)
            factory, accept = Image.OPEN[fmt]
            accepted = accept(prefix) if accept else True
            if not accepted or isinstance(accepted, str):  # a str: "this format, but unsupported"
                continue
            fp.seek(0)
            try:
                return factory(fp, "")
            except (SyntaxError, IndexError, TypeError, struct.error):  # what Image.open skips too
                continue
    raise UnidentifiedImageError("cannot identify image file")


def _limit(max_pixels) -> int:
    from ..spec import DEFAULT_MAX_INIT_IMAGE_PIXELS

    limit = DEFAULT_MAX_INIT_IMAGE_PIXELS if max_pixels is None else max_pixels
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        try:
            import numpy as np

            ok = isinstance(limit, np.integer) and limit >= 1
        except ImportError:  # pragma: no cover
            ok = False
        if not ok:
            raise ValueError(f"max_init_image_pixels must be a whole number of pixels >= 1, got {max_pixels!r}")
    return int(limit)


def image_header(data: bytes, uri: str, max_pixels, column: str):
    """The lazily opened image of ``data`` (header read, nothing decoded); ValueError naming
    ``column`` and ``uri`` when it is no image or larger than ``max_pixels``."""
    limit = _limit(max_pixels)
    try:
        img = open_header(data)
        width, height = img.size
        if width * height > limit:
            raise _TooLarge(f"{column} {uri}: {width}x{height} pixels ({width * height / 1e6:.1f} Mpx) is more "
                            f"than input.max_init_image_pixels ({limit / 1e6:g} Mpx); not decoded")
        return img
    except _TooLarge as exc:
        raise ValueError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any decoder error is the item's failure
        raise ValueError(f"{column} {uri}: not a readable image ({exc})") from None


def read_image(uri: str, storage_cfg, max_pixels=None, column: str = "init_image", expected: str | None = None):
    """(the decoded PIL image in its own mode, sha256 of the file's bytes). Refused before
    decoding when larger than ``max_pixels``; FileChanged when ``expected`` (a sha256) is given
    and the bytes differ. Thread-safe: no process-wide state is changed."""
    from ..storage import Location

    _limit(max_pixels)
    data = Location.parse(uri, storage_cfg).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    if expected is not None and sha != expected:
        raise FileChanged(f"{column} {uri} changed since the pre-flight (sha256 {expected[:12]} then, "
                          f"{sha[:12]} now); restore the file and run the same command again to resume, or start "
                          f"over with --overwrite")
    img = image_header(data, uri, max_pixels, column)
    try:
        img.load()
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{column} {uri}: not a readable image ({exc})") from None
    return img, sha


def check_ip_adapter(spec, model, cfg) -> dict[str, str]:
    """Check ``model.ip_adapter`` (the weight file's keys and shapes against the base model's UNet,
    its image encoder's width) without loading weights, attach it (meta device, with its image
    processor) to the pre-flight's skeleton pipeline, and return {uri: sha256} of the weight file
    and of the image encoder folder (as the workers' ``model_info["ip_adapter"]`` names them)."""
    ip = spec.model.ip_adapter
    if ip is None:
        return {}
    if model is None:
        raise InputError("model.ip_adapter: builtin:null renders seeded noise and takes no IP-Adapter")
    from ..builtin import resolve_model_uri
    from ..checkpoints.ip_adapter import (build_ip_adapter, check_encoder_fits, find_image_encoder, image_processor,
                                          open_image_encoder, open_ip_adapter)
    from ..ip_adapter import IP_FAMILIES, IPAdapter

    fam = model.pipeline.family
    if fam.name not in IP_FAMILIES or not hasattr(fam, "unet"):
        raise CheckpointError(f"model.ip_adapter: the model {spec.model.uri} is a {fam.name} model; batchgen loads "
                              f"IP-Adapters for SD 1.x/2.x and SDXL models")
    resolve = lambda uri: resolve_model_uri(uri, cfg)  # noqa: E731
    allow = spec.model.allow_pickle
    try:
        source = open_ip_adapter(resolve(ip.uri), allow_pickle=allow)
        module = build_ip_adapter(source, fam.unet)
        if ip.image_encoder is not None:
            where, folder = ip.image_encoder, open_image_encoder(resolve(ip.image_encoder), allow_pickle=allow)
            check_encoder_fits(source, folder)
        else:
            where, folder = find_image_encoder(ip.uri, source, resolve, allow_pickle=allow)
        fam.parts["ip_adapter"] = IPAdapter(module, None, image_processor(folder))
    except (CheckpointError, StorageError, OSError) as exc:
        raise CheckpointError(f"model.ip_adapter {ip.uri!r}: {exc}") from None
    return {ip.uri: source.sha256, where: folder.sha256}


def control_uris(value: str | None) -> list[str]:
    """A row's canonical ``control_image`` (one URI or a JSON list) as a list of URIs."""
    if value is None:
        return []
    return json.loads(value) if value.startswith("[") else [value]


# ---- the worker side -----------------------------------------------------------------------------


@dataclass
class RowInputs:
    """One row's conditioning, ready for generate(), and the sha256 of every file read."""

    init: Any = None
    mask: Any = None
    control: Any = None  # one image, or a list with several ControlNets
    reference: Any = None  # the IP-Adapter's reference image
    sha: dict[str, str | None] = field(default_factory=dict)


def load_conditions(row: dict, storage_cfg, max_pixels, expected: dict[str, str] | None = None,
                    nets: int = 1) -> RowInputs:
    """Fetch and prepare the conditioning files of one normalized row (or manifest row).
    ``expected``: uri -> sha256 the bytes must have (the pre-flight's, or a manifest's)."""
    from ..canny import canny_control

    expected = expected or {}
    out = RowInputs(sha={c: None for c in FILE_COLUMNS.values()})
    if row.get("init_image"):
        img, out.sha["init_image_sha256"] = read_image(row["init_image"], storage_cfg, max_pixels, "init_image",
                                                       expected.get(row["init_image"]))
        out.init = img.convert("RGB")
    if row.get("mask_image"):
        out.mask, out.sha["mask_image_sha256"] = read_image(row["mask_image"], storage_cfg, max_pixels,
                                                            "mask_image", expected.get(row["mask_image"]))
    if row.get("ip_adapter_image"):
        out.reference, out.sha["ip_adapter_image_sha256"] = read_image(
            row["ip_adapter_image"], storage_cfg, max_pixels, "ip_adapter_image", expected.get(row["ip_adapter_image"]))
    uris = control_uris(row.get("control_image"))
    if uris:
        images, shas = [], []
        for uri in uris:
            img, sha = read_image(uri, storage_cfg, max_pixels, "control_image", expected.get(uri))
            if row.get("control_preprocess") == "canny":
                img = canny_control(img, row["width"], row["height"], row["canny_low"], row["canny_high"])
            images.append(img)
            shas.append(sha)
        out.control = images if len(uris) > 1 or nets > 1 else images[0]
        out.sha["control_image_sha256"] = json.dumps(shas, separators=(",", ":")) if len(uris) > 1 else shas[0]
    return out


def condition_kwargs(first: dict, inputs: list[RowInputs]) -> dict[str, list]:
    """generate()'s image arguments for rows conditioned like ``first`` (a settings group's rows
    all are): ``init_images`` (None without), ``mask_images``, ``control_images``,
    ``ip_adapter_images``."""
    kwargs: dict[str, Any] = {"init_images": [x.init for x in inputs] if first.get("init_image") is not None else None}
    for column, argument, attr in (("mask_image", "mask_images", "mask"), ("control_image", "control_images", "control"),
                                   ("ip_adapter_image", "ip_adapter_images", "reference")):
        if first.get(column) is not None:
            kwargs[argument] = [getattr(x, attr) for x in inputs]
    return kwargs


def recorded_digests(row: dict) -> dict[str, str]:
    """uri -> sha256 of the conditioning files a manifest row records (what rerender must read)."""
    out = {}
    for column, sha_column in FILE_COLUMNS.items():
        uris, shas = row.get(column), row.get(sha_column)
        if not uris or not shas:
            continue
        if column == "control_image":
            uri_list = control_uris(uris)
            sha_list = json.loads(shas) if shas.startswith("[") else [shas]
            out.update(zip(uri_list, sha_list))
        else:
            out[uris] = shas
    return out


def conditioning_pngs(row: dict, storage_cfg, max_pixels=None) -> dict[str, bytes]:
    """The images an item was conditioned on, as PNG files of the item's size, for exports:
    ``control.png`` (several ControlNets: ``control.0.png``, ``control.1.png`` ...) as the
    ControlNet saw it (a Canny map derived again), ``mask.png`` as the model used it (blurred,
    resized, binarized: 255 = repainted), ``reference.png`` (the IP-Adapter's reference image, at
    its own size). The files must still hold the bytes the manifest
    recorded (FileChanged naming the file otherwise)."""
    import numpy as np
    from PIL import Image

    from ..control import control_pixels
    from ..inpaint import prepare_mask

    got = load_conditions(row, storage_cfg, max_pixels, recorded_digests(row))
    width, height = row["width"], row["height"]
    out = {}

    def png(array, mode=None) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(array, mode).save(buf, format="PNG")
        return buf.getvalue()

    if got.control is not None:
        images = got.control if isinstance(got.control, list) else [got.control]
        for j, img in enumerate(images):
            name = "control.png" if len(images) == 1 else f"control.{j}.png"
            out[name] = png(control_pixels(img, width, height, f"control_image of {row['item_id']}"))
    if got.mask is not None:
        mask = prepare_mask(got.mask, width, height, row.get("mask_blur"), f"mask_image of {row['item_id']}")
        out["mask.png"] = png((mask * 255).astype(np.uint8))
    if got.reference is not None:  # as given: the image encoder crops and resizes it itself
        out["reference.png"] = png(np.asarray(got.reference.convert("RGB")))
    return out


# ---- the pre-flight ------------------------------------------------------------------------------


def check_controlnets(spec, model, cfg) -> dict[str, str]:
    """Check ``model.controlnets`` against the base model without loading weights, attach them
    (on the meta device) to the pre-flight's skeleton pipeline, and return {uri: sha256}."""
    uris = [c.uri for c in spec.model.controlnets]
    if not uris:
        return {}
    if model is None:
        raise InputError("model.controlnets: builtin:null renders seeded noise and takes no ControlNets")
    from ..builtin import resolve_model_uri
    from ..checkpoints.components import ModelClass
    from ..checkpoints.controlnet import controlnet_config, open_controlnet
    from ..checkpoints.controlnet_dit import dit_controlnet_class, dit_controlnet_config
    from ..control import CONTROL_FAMILIES, DIT_CONTROL_FAMILIES
    from ..models.controlnet import ControlNetModel, MultiControlNet

    fam = model.pipeline.family
    if fam.name not in CONTROL_FAMILIES:
        raise CheckpointError(f"model.controlnets: the model {spec.model.uri} is a {fam.name} model; batchgen "
                              f"loads ControlNets for SD 1.x/2.x, SDXL, SD3/SD3.5 and FLUX.1 models")
    nets, hashes = [], {}
    for i, uri in enumerate(uris):
        try:
            source = open_controlnet(resolve_model_uri(uri, cfg), allow_pickle=spec.model.allow_pickle)
            if fam.name in DIT_CONTROL_FAMILIES:
                config, cls = dit_controlnet_config(source, fam), dit_controlnet_class(fam)
            else:
                config, cls = controlnet_config(source, fam.unet.config, fam.latent_channels), ControlNetModel
            nets.append(ModelClass(cls).checked_build(config, str(source.path)))
            hashes[uri] = source.sha256
        except (CheckpointError, StorageError, OSError) as exc:
            raise CheckpointError(f"model.controlnets[{i}] {uri!r}: {exc}") from None
    fam.parts["controlnet"] = MultiControlNet(nets)
    return hashes


def verify_digests(info: list[dict], expected: dict[str, str], what: str) -> None:
    """A worker's loaded files (``[{"uri", "sha256"}]``: its LoRAs, ``model_info["controlnets"]``)
    must be the bytes the pre-flight digested; FileChanged naming the file otherwise."""
    for item in info or []:
        want = expected.get(item["uri"])
        if want is not None and item.get("sha256") != want:
            raise FileChanged(
                f"{what} {item['uri']} changed since the pre-flight (sha256 {want[:12]} in job.json, the worker "
                f"read {str(item.get('sha256'))[:12]}); restore the file and run the same command again to resume, "
                "or start over with --overwrite")


def check_changed(out, recorded: dict | None, current: dict[str, str], what: str) -> None:
    """A resume must read the same bytes as the run that started the job: a file replaced under
    the same URI (a ControlNet, a control image, a mask) would mix both versions in one output.
    Refused before anything is written, naming the file."""
    recorded = recorded or {}
    changed = [uri for uri, sha in current.items() if uri in recorded and recorded[uri] != sha]
    if changed:
        uri = changed[0]
        more = f"; {len(changed) - 1} more changed" if len(changed) > 1 else ""
        raise InputError(f"output {out.uri}: {what} {uri} changed since this job started (sha256 "
                         f"{recorded[uri][:12]} -> {current[uri][:12]}{more}); resuming would mix images of both "
                         f"versions: restore the file, write to another output.uri, or --overwrite")


class ConditionFiles:
    """The pre-flight's view of the conditioning files: every row's references are collected
    while the input is scanned (:meth:`add`), then each distinct file is read once
    (:meth:`check`). Errors name the first row and column that uses the file."""

    def __init__(self):
        self.first: dict[str, tuple[str, int, str]] = {}  # uri -> (input file, row, column)
        self.pairs: dict[tuple[str, str, bool], tuple[str, int]] = {}  # (mask, init, crop) -> (input file, row)

    def add(self, rows, file_uri: str) -> None:
        cols = [c for c in ("control_image", "mask_image", "ip_adapter_image") if c in rows.column_names]
        if not cols:
            return
        crop = ["padding_mask_crop"] if "padding_mask_crop" in rows.column_names else []
        data = rows.select(["source_row", "init_image", *cols, *crop]).to_pylist()
        for r in data:
            for uri in control_uris(r.get("control_image")):
                self.first.setdefault(uri, (file_uri, r["source_row"], "control_image"))
            if r.get("ip_adapter_image"):
                self.first.setdefault(r["ip_adapter_image"], (file_uri, r["source_row"], "ip_adapter_image"))
            if r.get("mask_image"):
                self.first.setdefault(r["mask_image"], (file_uri, r["source_row"], "mask_image"))
                self.first.setdefault(r["init_image"], (file_uri, r["source_row"], "init_image"))
                self.pairs.setdefault((r["mask_image"], r["init_image"], r.get("padding_mask_crop") is not None),
                                      (file_uri, r["source_row"]))

    def __len__(self) -> int:
        return len(self.first)

    def check(self, storage_cfg, max_pixels, workers: int = 8) -> dict[str, str]:
        """Read every file (exists, header decodes, within the pixel limit; sizes for the mask
        checks); {uri: sha256}. InputError naming file, row and column on the first bad one."""
        from ..inpaint import check_mask_fits
        from ..storage import Location

        def one(uri: str):
            file_uri, row, column = self.first[uri]
            try:
                data = Location.parse(uri, storage_cfg).read_bytes()
                size = image_header(data, uri, max_pixels, column).size
            except (ValueError, StorageError, OSError) as exc:
                message = str(exc)
                if not message.startswith(f"{column} {uri}"):
                    message = f"{uri}: {message}"
                else:
                    message = message[len(column) + 1:]
                raise InputError(f"input file {file_uri}, row {row}, column {column!r}: {message}") from None
            return uri, hashlib.sha256(data).hexdigest(), size

        uris = sorted(self.first, key=lambda u: self.first[u][1:2] + (u,))
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(uris)))) as pool:
            results = list(pool.map(one, uris))
        sizes = {uri: size for uri, _, size in results}
        for (mask, init, crop), (file_uri, row) in sorted(self.pairs.items(), key=lambda kv: kv[1]):
            try:
                check_mask_fits(sizes[mask], sizes[init], f"mask {mask}", f"its init image {init}")
                if crop and sizes[mask] != sizes[init]:
                    raise ValueError(f"mask {mask} is {sizes[mask][0]}x{sizes[mask][1]} but its init image {init} is "
                                     f"{sizes[init][0]}x{sizes[init][1]}; padding_mask_crop finds its region on the "
                                     f"mask, so both must have one size")
            except ValueError as exc:
                raise InputError(f"input file {file_uri}, row {row}, column 'mask_image': {exc}") from None
        return {uri: sha for uri, sha, _ in results}


__all__ = ["FILE_COLUMNS", "FileChanged", "ConditionFiles", "RowInputs", "check_changed", "check_controlnets",
           "check_ip_adapter", "condition_kwargs", "conditioning_pngs",
           "control_uris", "image_header", "load_conditions", "open_header", "read_image", "recorded_digests",
           "verify_digests"]
