"""IP-Adapter conditioning: loading an IP-Adapter (+ its CLIP image encoder) into a pipeline,
checking a request's reference images and scales, and the image keys / values each micro-batch
hands the UNet's cross-attention layers.

Equal to diffusers' ``load_ip_adapter`` + ``ip_adapter_image`` (``StableDiffusion(XL)Pipeline``,
their img2img, inpainting and ControlNet pipelines), item by item:

- a reference image is preprocessed by the CLIP image processor (resize, center crop, normalise)
  and encoded alone-per-row: the plain adapter reads the encoder's ``image_embeds``, Plus its
  penultimate hidden states;
- the negative side (classifier-free guidance) is diffusers': zero embeddings for the plain
  adapter, the encoding of an all-zero pixel tensor for Plus; rows are [negatives; positives];
- ``ip_adapter_scale`` is per item (diffusers' ``set_ip_adapter_scale`` is one value per call; an
  item here equals diffusers run with that item's scale): each row's image attention is multiplied
  by its own scale. A scale of 0 adds exact zeros, as diffusers' skipped layer does, and a
  micro-batch whose items all have scale 0 skips the image attention entirely (same bytes);
- the image tokens and each layer's ``to_k_ip`` / ``to_v_ip`` projections do not change between
  model calls, so they are computed once per micro-batch (diffusers recomputes them every step:
  the same values). Encoders, projections and attention all work row by row, and every call
  runs at the fixed micro-batch shape (padding rows: a zero image at scale 0), so an item's bytes
  never depend on its batch-mates' reference images or scales.

The component lives in ``family.parts["ip_adapter"]``, so moving the family, fp8 and compile see it
(only the denoiser is compiled; the image encoder runs once per micro-batch).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .settings import BY_NAME, one_per_prompt

IP_SETTINGS = ("ip_adapter_scale",)
DEFAULT_SCALE = 1.0  # load_ip_adapter's scale until set_ip_adapter_scale is called
IP_FAMILIES = ("sd", "sdxl")


class IPAdapter(nn.Module):
    """An IP-Adapter with its image encoder and image processor (``family.parts["ip_adapter"]``)."""

    def __init__(self, adapter: nn.Module, image_encoder: nn.Module, processor):
        super().__init__()
        self.adapter = adapter
        self.image_encoder = image_encoder
        self.processor = processor

    @property
    def kind(self) -> str:
        return self.adapter.kind

    def pixels(self, image, where: str) -> torch.Tensor:
        """A PIL image or HxW(x3/x4) uint8 array -> the encoder's input (1, 3, S, S) float32, as
        diffusers' feature extractor makes it from a PIL image."""
        from PIL import Image

        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
                raise ValueError(f"{where}: expected an HxW, HxWx3 or HxWx4 uint8 array, got shape {image.shape} "
                                 f"dtype {image.dtype}")
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise ValueError(f"{where}: expected a PIL image or uint8 array, got {type(image).__name__}")
        return self.processor(image, return_tensors="pt").pixel_values.to(torch.float32)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.kind == "plain":
            return self.image_encoder(pixels).image_embeds
        return self.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]

    def tokens(self, pixels: torch.Tensor, negative: torch.Tensor | None) -> torch.Tensor:
        """Image tokens (rows, T, C) of ``pixels`` (B, 3, S, S) on the encoder's device and dtype;
        with ``negative`` (the unconditional encoding, B rows) the rows are [negative; positive]."""
        states = self._encode(pixels)
        if negative is not None:
            states = torch.cat([negative, states])
        return self.adapter.image_proj(states)

    def negative(self, pixels: torch.Tensor) -> torch.Tensor:
        """The unconditional encoding diffusers uses: zero embeddings (plain), or the encoding of
        an all-zero pixel tensor (Plus), for a batch shaped as ``pixels``."""
        if self.kind == "plain":
            width = int(self.image_encoder.config.projection_dim)
            return pixels.new_zeros((pixels.shape[0], width))
        return self._encode(torch.zeros_like(pixels))


# ---- loading -------------------------------------------------------------------------------------


def attach_ip_adapter(family, uri, encoder_uri, resolve: Callable[[str], Any], dtype: torch.dtype | None = None,
                      allow_pickle: bool = False) -> dict | None:
    """Load the IP-Adapter ``uri`` (and its image encoder: ``encoder_uri``, else found beside it)
    into ``family.parts["ip_adapter"]``; returns its ``model_info`` entry (None: no adapter)."""
    from .checkpoints.ip_adapter import (
        check_encoder_fits,
        find_image_encoder,
        load_image_encoder,
        load_ip_adapter,
        open_image_encoder,
        open_ip_adapter,
    )
    from .errors import CheckpointError

    if uri is None:
        if encoder_uri is not None:
            raise ValueError("ip_adapter_image_encoder: given without ip_adapter; pass the IP-Adapter file too")
        return None
    if not isinstance(uri, (str, bytes)) and not hasattr(uri, "__fspath__"):
        raise ValueError(f"ip_adapter: expected a URI or path of one IP-Adapter file, got {type(uri).__name__}")
    if family.name not in IP_FAMILIES or not hasattr(family, "unet"):
        raise CheckpointError(f"ip_adapter: this is a {family.name} model; batchgen loads IP-Adapters for SD 1.x and "
                              f"SDXL models")
    source = open_ip_adapter(resolve(str(uri)), allow_pickle=allow_pickle)
    module = load_ip_adapter(source, family.unet, dtype=dtype)
    if encoder_uri is not None:
        folder = open_image_encoder(resolve(str(encoder_uri)), allow_pickle=allow_pickle)
        check_encoder_fits(source, folder)
        where = str(encoder_uri)
    else:
        where, folder = find_image_encoder(str(uri), source, resolve, allow_pickle=allow_pickle)
    encoder, processor = load_image_encoder(folder, dtype=dtype)
    family.parts["ip_adapter"] = IPAdapter(module, encoder, processor)
    return {"uri": str(uri), "sha256": source.sha256, "kind": source.kind,
            "image_encoder": {"uri": where, "sha256": folder.sha256}}


# ---- a request -----------------------------------------------------------------------------------


def _scales(value, n: int) -> list[float]:
    """``ip_adapter_scale``: one value or one per item; None (or a None entry) is the default 1."""
    setting = BY_NAME["ip_adapter_scale"]
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"ip_adapter_scale: expected one value or {n} values (one per prompt), got {len(value)}")
        return [DEFAULT_SCALE if v is None else setting.check(v, f"ip_adapter_scale[{i}]") for i, v in enumerate(value)]
    return [DEFAULT_SCALE if value is None else setting.check(value, "ip_adapter_scale")] * n


@dataclass
class IPRequest:
    """The validated IP-Adapter side of one generate() call."""

    pixels: list[torch.Tensor]  # per item (1, 3, S, S) float32, preprocessed
    scales: list[float]
    _negative: dict = dataclasses.field(default_factory=dict)  # Plus: the zero image's encoding per batch size

    def bind(self, cond, family, indices: list[int], size: int, guided: bool):
        """``cond`` with the micro-batch ``indices``' image keys / values and row scales (padded to
        ``size``; both guidance halves when ``guided``)."""
        pad = size - len(indices)
        scales = [self.scales[i] for i in indices] + [0.0] * pad
        if not any(scales):  # diffusers skips the image attention at scale 0: the same bytes
            return cond
        comp = family.parts["ip_adapter"]
        device, dtype = family.device, next(comp.image_encoder.parameters()).dtype
        rows = [self.pixels[i] for i in indices]
        pixels = torch.cat(rows + [torch.zeros_like(rows[0])] * pad).to(device=device, dtype=dtype)
        negative = None
        if guided:
            if size not in self._negative:
                self._negative[size] = comp.negative(pixels)
            negative = self._negative[size]
        tokens = comp.tokens(pixels, negative).to(family.dtype)
        row_scales = torch.tensor(scales * (2 if guided else 1), dtype=torch.float32, device=device)[:, None, None]
        return dataclasses.replace(cond, ip=(comp.adapter.keys_values(tokens), row_scales))


def check_ip_adapter(family, images, scale, n: int) -> IPRequest | None:
    """Validate ``generate()``'s ``ip_adapter_images`` / ``ip_adapter_scale``; None when neither an
    IP-Adapter nor IP-Adapter arguments are present."""
    comp = family.parts.get("ip_adapter")
    given_scale = scale is not None and not (isinstance(scale, (list, tuple)) and all(v is None for v in scale))
    if comp is None:
        if images is not None:
            raise ValueError("ip_adapter_images: no IP-Adapter is loaded; load the model with "
                             "load_pipeline(..., ip_adapter=...) to use reference images")
        if given_scale:
            raise ValueError("ip_adapter_scale: no IP-Adapter is loaded; pass it only with "
                             "load_pipeline(..., ip_adapter=...) and ip_adapter_images")
        return None
    if images is None:
        raise ValueError("ip_adapter_images: this pipeline has an IP-Adapter loaded; pass one reference image per "
                         "prompt (with ip_adapter_scale=0 for items it should not steer)")
    images = one_per_prompt("ip_adapter_images", images, n)
    pixels = []
    for i, image in enumerate(images):
        if image is None:
            raise ValueError(f"ip_adapter_images[{i}]: missing; every prompt needs a reference image when an "
                             f"IP-Adapter is loaded (ip_adapter_scale=0 makes it not steer)")
        pixels.append(comp.pixels(image, f"ip_adapter_images[{i}]"))
    return IPRequest(pixels, _scales(scale, n))


__all__ = ["IP_SETTINGS", "IPAdapter", "IPRequest", "attach_ip_adapter", "check_ip_adapter"]
