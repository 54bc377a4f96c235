"""ControlNet conditioning: loading ControlNets into a pipeline, checking a request's control
images / scales / windows, and the residuals each model call adds to the UNet.

Equal to diffusers' ``StableDiffusion(XL)ControlNet(Img2Img)Pipeline`` with a ``ControlNetModel``
or a ``MultiControlNetModel`` (several ControlNets, residuals summed in order), item by item:

- control images are prepared as diffusers' control image processor prepares a PIL image: resized
  to width x height (Lanczos, in the image's own mode), converted to RGB, scaled to [0, 1], not
  normalised; with classifier-free guidance each image serves both halves of the batch;
- every item has its own conditioning scale and guidance window per ControlNet. diffusers keeps a
  ControlNet at model call ``i`` of ``N`` (its ``controlnet_keep``) unless ``i / N < start`` or
  ``(i + 1) / N > end``, where ``N`` counts the calls of the (img2img-cut) timestep list: samplers
  that call the model twice per step (Heun) or repeat a step (PLMS) count every call, exactly as
  diffusers' loop over ``scheduler.timesteps`` does. A :class:`ControlBatch` counts the calls of
  its micro-batch, so this holds for every sampler in the registry;
- a row's residuals are multiplied by its own scale x keep (a dropped ControlNet adds exact
  zeros, as diffusers' ``scale * 0.0`` does); a ControlNet no row of the micro-batch keeps is not
  run at all, which changes no byte. An item's bytes therefore never depend on its batch-mates.

Guess mode (and shuffle-style ControlNets, which need it) is not implemented.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .settings import BY_NAME, one_per_prompt

# The settings-table entries (batchgen.settings) this module reads: per item, and per ControlNet.
CONTROL_SETTINGS = ("controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end")
DEFAULTS = {"controlnet_conditioning_scale": 1.0, "control_guidance_start": 0.0, "control_guidance_end": 1.0}
IMG2IMG_SCALE = 0.8  # StableDiffusion(XL)ControlNetImg2ImgPipeline's default conditioning scale
# StableDiffusionControlNetInpaintPipeline's default scale is 0.5; the SDXL one keeps 1.0
INPAINT_SCALE = {"sd": 0.5}
CONTROL_FAMILIES = ("sd", "sdxl", "sd3", "flux")
DIT_CONTROL_FAMILIES = ("sd3", "flux")  # transformer ControlNets on VAE latents (batchgen.control_dit)


# ---- loading -------------------------------------------------------------------------------------


def attach_controlnets(family, uris: Sequence, resolve: Callable[[str], Any], dtype: torch.dtype | None = None,
                       allow_pickle: bool = False) -> list[dict]:
    """Load the ControlNets ``uris`` (local, file://, s3://, builtin:) for ``family``'s UNet and
    put them in ``family.parts["controlnet"]`` (so moving, fp8 and compiling the family include
    them); returns their ``model_info`` entries (uri, sha256, format, base)."""
    from .checkpoints.controlnet import describe, load_controlnet, open_controlnet
    from .errors import CheckpointError
    from .models.controlnet import MultiControlNet

    if isinstance(uris, (str, bytes)) or not isinstance(uris, Sequence):
        raise ValueError(f"controlnets: expected a list of ControlNet URIs or paths, got {uris!r}")
    if not uris:
        return []
    if family.name not in CONTROL_FAMILIES:
        raise CheckpointError(f"controlnets: this is a {family.name} model; batchgen loads ControlNets for SD 1.x/2.x, "
                              f"SDXL, SD3/SD3.5 and FLUX.1 models")
    nets, info = [], []
    for i, uri in enumerate(uris):
        if not isinstance(uri, (str, bytes)) and not hasattr(uri, "__fspath__"):
            raise ValueError(f"controlnets[{i}]: expected a URI or path, got {type(uri).__name__}")
        source = open_controlnet(resolve(str(uri)), allow_pickle=allow_pickle)
        if family.name in DIT_CONTROL_FAMILIES:
            from .checkpoints.controlnet_dit import load_dit_controlnet

            net, base = load_dit_controlnet(source, family, dtype=dtype)
        else:
            net, config = load_controlnet(source, family.unet.config, family.latent_channels, dtype=dtype)
            base = describe(config)
        nets.append(net)
        info.append({"uri": str(uri), "sha256": source.sha256, "format": source.layout, "base": base})
    family.parts["controlnet"] = MultiControlNet(nets)
    return info


def controlnet_count(family) -> int:
    stack = family.parts.get("controlnet")
    return 0 if stack is None else len(stack.nets)


# ---- a request -----------------------------------------------------------------------------------


def control_pixels(image, width: int, height: int, where: str) -> np.ndarray:
    """A PIL image or HxW(x3/x4) uint8 array -> the HxWx3 uint8 pixels diffusers' control image
    processor sees: resized (Lanczos) in the image's own mode, then converted to RGB."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ValueError(f"{where}: expected an HxW, HxWx3 or HxWx4 uint8 array, got shape {image.shape} "
                             f"dtype {image.dtype}")
        image = Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"{where}: expected a PIL image or uint8 array, got {type(image).__name__}")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _per_item_per_net(name: str, value, n: int, k: int) -> list[list[float]]:
    """A scale / window argument -> n lists of k checked floats.

    One number: every item and ControlNet. With several ControlNets a flat list of k numbers is one
    per ControlNet (diffusers' meaning), for every item. Otherwise a list of n per-item values, each
    a number or (several ControlNets) a list of k numbers.
    """
    setting = BY_NAME[name]

    def one(v, where: str) -> list[float]:
        if isinstance(v, (list, tuple)):
            if len(v) != k:
                raise ValueError(f"{where}: expected {k} values (one per ControlNet), got {len(v)}")
            return [setting.check(x, f"{where}[{j}]") for j, x in enumerate(v)]
        return [setting.check(v, where)] * k

    if not isinstance(value, (list, tuple)):
        return [one(value, name)] * n
    flat = not any(isinstance(v, (list, tuple)) for v in value)
    if k > 1 and flat and len(value) == k:
        return [one(list(value), name)] * n
    if len(value) != n:
        per_net = f", or {k} values (one per ControlNet)" if k > 1 else ""
        raise ValueError(f"{name}: expected one value, {n} values (one per prompt){per_net}; got {len(value)}")
    return [one(v, f"{name}[{i}]") for i, v in enumerate(value)]


@dataclass
class ControlRequest:
    """The validated control side of one generate() call."""

    pixels: list[list[np.ndarray]]  # [item][net] HxWx3 uint8, resized
    scales: list[list[float]]  # [item][net]
    starts: list[list[float]]
    ends: list[list[float]]

    family: Any = None  # SD3 / FLUX: the family, whose control_batch() builds from VAE latents (control_dit.py)

    def bind(self, cond, indices: list[int], size: int, calls: int, guided: bool, device, dtype,
             generators: Sequence[torch.Generator] = (), seeds: Sequence[int] = ()):
        """``cond`` with the :class:`ControlBatch` of the micro-batch ``indices`` (padded to
        ``size``) for a sampler that calls the model ``calls`` times. ``generators`` (the items'
        noise generators, before the noise is drawn) and ``seeds``: for the families whose control
        images are VAE-encoded (:mod:`batchgen.control_dit`)."""
        if self.family is not None:
            batch = self.family.control_batch(self, indices, size, calls, guided, generators, seeds)
        else:
            batch = ControlBatch.build(self, indices, size, calls, guided, device, dtype)
        return dataclasses.replace(cond, control=batch)


def default_scale(family: str | None, img2img: bool, inpaint: bool) -> float:
    """diffusers' default ``controlnet_conditioning_scale`` for a call of this kind."""
    if inpaint:
        return INPAINT_SCALE.get(family, DEFAULTS["controlnet_conditioning_scale"])
    return IMG2IMG_SCALE if img2img else DEFAULTS["controlnet_conditioning_scale"]


def check_control(family, control_images, settings: dict, n: int, width: int, height: int,
                  img2img: bool = False, inpaint: bool = False) -> ControlRequest | None:
    """Validate ``generate()``'s control arguments (``settings``: the given entries of
    :data:`CONTROL_SETTINGS`); None when neither ControlNets nor control arguments are present.
    The default scale is diffusers': 1.0, 0.8 for SD/SDXL img2img (``img2img``; FLUX keeps 1.0),
    0.5 for SD 1.x/2.x inpainting (``inpaint``: a mask)."""
    k = controlnet_count(family)
    given = {name: v for name, v in settings.items() if v is not None}
    if k == 0:
        if control_images is not None:
            raise ValueError("control_images: no ControlNet is loaded; load the model with "
                             "load_pipeline(..., controlnets=[...]) to use control images")
        if given:
            raise ValueError(f"{next(iter(given))}: no ControlNet is loaded; pass it only with "
                             f"load_pipeline(..., controlnets=[...]) and control_images")
        return None
    nets = f"{k} ControlNet{'s' if k > 1 else ''}"
    if control_images is None:
        raise ValueError(f"control_images: this pipeline has {nets} loaded; pass one control image per prompt"
                         + (f" (a list of {k} images per prompt)" if k > 1 else ""))
    control_images = one_per_prompt("control_images", control_images, n, "entries")
    pixels = []
    for i, entry in enumerate(control_images):
        if entry is None:
            raise ValueError(f"control_images[{i}]: missing; every prompt needs a control image when ControlNets "
                             f"are loaded")
        if k > 1:
            if not isinstance(entry, (list, tuple)) or len(entry) != k:
                got = f"{len(entry)} entries" if isinstance(entry, (list, tuple)) else type(entry).__name__
                raise ValueError(f"control_images[{i}]: expected a list of {k} images (one per ControlNet), got {got}")
            pixels.append([control_pixels(img, width, height, f"control_images[{i}][{j}]")
                           for j, img in enumerate(entry)])
        else:
            if isinstance(entry, (list, tuple)):
                if len(entry) != 1:
                    raise ValueError(f"control_images[{i}]: one ControlNet is loaded, so one image per prompt; "
                                     f"got a list of {len(entry)}")
                entry = entry[0]
            pixels.append([control_pixels(entry, width, height, f"control_images[{i}]")])
    dit = family.name in DIT_CONTROL_FAMILIES
    if dit and inpaint:
        raise ValueError(f"control_images: ControlNet together with inpainting/outpainting (mask_images, outpaint_*) "
                         f"is not supported for {family.name} models; render the items with one or the other")
    # FluxControlNetImg2ImgPipeline keeps 1.0; the UNet families' img2img pipelines default to 0.8
    scale = default_scale(family.name, img2img and not dit, inpaint)
    defaults = {**DEFAULTS, "controlnet_conditioning_scale": scale}
    values = {name: _per_item_per_net(name, given.get(name, defaults[name]), n, k) for name in CONTROL_SETTINGS}
    starts, ends = values["control_guidance_start"], values["control_guidance_end"]
    for i in range(n):
        for j in range(k):
            if starts[i][j] >= ends[i][j]:
                where = f"[{i}]" + (f"[{j}]" if k > 1 else "")
                raise ValueError(f"control_guidance_start{where}: {starts[i][j]} is not below control_guidance_end "
                                 f"{ends[i][j]}; the window [start, end] must be non-empty")
    if family.name == "sd3" and img2img:
        raise ValueError("control_images: ControlNet with init_images (img2img) is not supported for sd3 models "
                         "(diffusers has no SD3 ControlNet img2img pipeline); render text-to-image with control "
                         "images, or img2img without them")
    return ControlRequest(pixels, values["controlnet_conditioning_scale"], starts, ends,
                          family=family if dit else None)


def keeps(calls: int, start: float, end: float) -> np.ndarray:
    """diffusers' ``controlnet_keep`` of each of ``calls`` model calls: ``1.0 - float(i / calls <
    start or (i + 1) / calls > end)``, the same float64 divisions."""
    i = np.arange(calls, dtype=np.float64)
    return 1.0 - ((i / calls < start) | ((i + 1) / calls > end)).astype(np.float64)


# ---- a micro-batch -------------------------------------------------------------------------------


def scale_table(req: ControlRequest, indices: list[int], size: int, calls: int, guided: bool) -> torch.Tensor:
    """(calls, nets, rows) float32: per model call, ControlNet and row, the row's scale x keep
    (padding rows 0; with ``guided`` the rows of both guidance halves)."""
    k = len(req.pixels[indices[0]])
    table = np.zeros((calls, k, size), dtype=np.float32)
    for row, i in enumerate(indices):
        for j in range(k):
            table[:, j, row] = req.scales[i][j] * keeps(calls, req.starts[i][j], req.ends[i][j])
    scales = torch.from_numpy(table)
    return torch.cat([scales, scales], dim=2) if guided else scales


class ControlBatch:
    """The control side of one micro-batch: images per ControlNet (rows as the model batch: both
    guidance halves), and per model call, ControlNet and row the scale x keep. Counts its calls:
    call ``i`` of the sampler is diffusers' loop index ``i``."""

    def __init__(self, images: list[torch.Tensor], scales: torch.Tensor):
        self.images = images  # per net: (rows, 3, H, W)
        self.scales = scales  # (calls, nets, rows) float32 on the CPU
        self._device_scales = None
        self.call = 0

    @classmethod
    def build(cls, req: ControlRequest, indices: list[int], size: int, calls: int, guided: bool, device,
              dtype) -> "ControlBatch":
        pad = size - len(indices)
        k = len(req.pixels[indices[0]])
        images = []
        for j in range(k):
            rows = [req.pixels[i][j] for i in indices]
            rows += [np.zeros_like(rows[0])] * pad
            # diffusers: pil_to_numpy (/255 in float32), numpy_to_pt, .to(device, dtype), torch.cat
            # for the guidance halves. diffusers hands over an NCHW view of NHWC data (channels-last
            # strides), which makes CPU convolutions of the whole ControlNet up to 20x slower; the
            # values are the same, so the images are laid out contiguously here.
            batch = np.stack([r.astype(np.float32) / 255.0 for r in rows]).transpose(0, 3, 1, 2)
            image = torch.from_numpy(np.ascontiguousarray(batch)).to(device=device, dtype=dtype)
            images.append(torch.cat([image] * 2) if guided else image)
        return cls(images, scale_table(req, indices, size, calls, guided))

    def next_call(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance to the next model call: its (nets, rows) scales on the CPU (which nets act) and
        on ``device`` (what multiplies the residuals)."""
        if self.call >= self.scales.shape[0]:
            raise RuntimeError(f"ControlNet: model call {self.call + 1} of a sampler planned for "
                               f"{self.scales.shape[0]} calls")
        scales, self.call = self.scales[self.call], self.call + 1
        if self._device_scales is None:
            self._device_scales = self.scales.to(device)
        return scales, self._device_scales[self.call - 1]

    def residuals(self, stack, x: torch.Tensor, t: torch.Tensor, cond) -> dict[str, Any]:
        """The UNet's extra keyword arguments for the next model call ({} when no ControlNet acts)."""
        scales, row_scales = self.next_call(x.device)
        down = mid = None
        for j, net in enumerate(stack.nets):
            if not bool(scales[j].any()):
                continue
            added = {}
            if net.uses_added_conditioning:
                added = {"text_embeds": cond.pooled, "time_ids": cond.extra["time_ids"]}
            # an inpainting UNet's input is the latents + mask + masked-image latents: a ControlNet
            # sees the latents only (diffusers' ControlNet inpaint pipelines do the same)
            d, m = net(x[:, :net.config["in_channels"]], t, cond.context, self.images[j], row_scales[j], **added)
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        if down is None:
            return {}
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def controlnet_residuals(stack, x: torch.Tensor, t: torch.Tensor, cond) -> dict[str, Any]:
    """What a family's ``predict`` passes to its UNet: the ControlNets' residuals for this call."""
    control = getattr(cond, "control", None)
    if control is None:
        return {}
    return control.residuals(stack, x, t, cond)


__all__ = ["CONTROL_SETTINGS", "attach_controlnets", "check_control", "default_scale", "controlnet_residuals", "ControlBatch",
           "ControlRequest", "control_pixels", "keeps"]
