"""Inpainting only the masked area (``padding_mask_crop``), as diffusers' inpainting pipelines do it.

Why: a mask on a large photo covers a small region; resizing the whole photo to the model's size
spends its pixels on what is kept and paints the region at a fraction of its resolution. With
``padding_mask_crop=P`` an item's image and mask are cropped to the mask's bounding box grown by
``P`` pixels and widened to the render's aspect ratio, rendered at width x height, and the result
is pasted back into the original image through the mask: the output has the init image's size,
its kept pixels untouched (the webui's "inpaint only masked").

Every step is diffusers' (``VaeImageProcessor.get_crop_region``, ``resize_mode="fill"`` for the
image and mask, ``resize_mode="crop"`` and ``apply_overlay`` for the paste-back), done per item
(diffusers takes one image and one mask per call for this), with the mask as given (after
``mask_blur``, which diffusers' users apply beforehand with ``mask_processor.blur``). The crop and
the overlay are pixel work outside the model: they draw nothing and do not depend on batch-mates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def crop_region(mask: np.ndarray, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """diffusers' ``get_crop_region``: (x1, y1, x2, y2) of the nonzero pixels of ``mask`` (HxW
    uint8), grown by ``pad``, then widened (or heightened) to the ``width``/``height`` ratio and
    shifted back inside the image."""
    h, w = mask.shape
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    left, right = int(cols[0]), w - 1 - int(cols[-1])  # the empty columns on each side
    top, bottom = int(rows[0]), h - 1 - int(rows[-1])
    x1, y1, x2, y2 = max(left - pad, 0), max(top - pad, 0), min(w - right + pad, w), min(h - bottom + pad, h)
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        diff = int((x2 - x1) / ratio - (y2 - y1))
        y1, y2 = _widen(y1 - diff // 2, y2 + diff - diff // 2, h)
    else:
        diff = int((y2 - y1) * ratio - (x2 - x1))
        x1, x2 = _widen(x1 - diff // 2, x2 + diff - diff // 2, w)
    return x1, y1, x2, y2


def _widen(a: int, b: int, size: int) -> tuple[int, int]:
    if b >= size:
        a, b = a - (b - size), size
    if a < 0:
        a, b = 0, b - a
    return a, min(b, size)


def resize_fill(image, width: int, height: int):
    """diffusers' ``resize_mode="fill"``: fit inside width x height keeping the aspect ratio (Lanczos),
    centred on an RGB canvas, the empty bands filled by stretching the image's edge rows/columns."""
    from PIL import Image

    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        band = height // 2 - src_h // 2
        if band > 0:
            out.paste(resized.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
            out.paste(resized.resize((width, band), box=(0, resized.height, width, resized.height)),
                      box=(0, band + src_h))
    elif ratio > src_ratio:
        band = width // 2 - src_w // 2
        if band > 0:
            out.paste(resized.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
            out.paste(resized.resize((band, height), box=(resized.width, 0, resized.width, height)),
                      box=(band + src_w, 0))
    return out


def resize_crop(image, width: int, height: int):
    """diffusers' ``resize_mode="crop"``: cover width x height keeping the aspect ratio (Lanczos),
    centred, the excess cut."""
    from PIL import Image

    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return out


@dataclass
class Overlay:
    """What an item rendered from a crop needs to become a full-size image again."""

    original: object  # the init image as given (PIL)
    mask: object  # the mask as given, after mask_blur (PIL), at the original's size
    box: tuple[int, int, int, int]

    def apply(self, rendered: np.ndarray) -> np.ndarray:
        """diffusers' ``apply_overlay``: the render resized into the box of a transparent canvas of
        the original's size, the original's kept pixels composited over it through the
        inverted mask (soft where the mask is gray). HxWx3 uint8 of the original's size."""
        from PIL import Image, ImageOps

        width, height = self.original.size
        kept = Image.new("RGBa", (width, height))
        kept.paste(self.original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(self.mask.convert("L")))
        kept = kept.convert("RGBA")
        x1, y1, x2, y2 = self.box
        canvas = Image.new("RGBA", (width, height))
        canvas.paste(resize_crop(Image.fromarray(rendered), x2 - x1, y2 - y1), (x1, y1))
        out = canvas.convert("RGB").convert("RGBA")
        out.alpha_composite(kept)
        return np.asarray(out.convert("RGB"))


def crop_item(image, mask, width: int, height: int, pad: int, where: str) -> tuple[np.ndarray, np.ndarray, Overlay]:
    """One item's ``padding_mask_crop``: (init image HxWx3 uint8 and mask HxW float32 0/1 at
    width x height, both cut from the crop region; the overlay that pastes the render back).
    ``image`` and ``mask`` are PIL images of one size (``mask`` already blurred)."""
    gray = np.asarray(mask.convert("L"))
    if image.size != mask.size:
        raise ValueError(f"{where}: padding_mask_crop needs the mask at its init image's size ({image.width}x"
                         f"{image.height}), got {mask.width}x{mask.height}; the crop region is found on the mask")
    if not gray.any():
        raise ValueError(f"{where}: the mask is all black (nothing to repaint), so padding_mask_crop has no region "
                         f"to crop to")
    box = crop_region(gray, width, height, pad)
    pixels = np.asarray(resize_fill(image.crop(box), width, height).convert("RGB"))
    values = np.asarray(resize_fill(mask.crop(box), width, height).convert("L")).astype(np.float32) / 255.0
    return pixels, (values >= 0.5).astype(np.float32), Overlay(image, mask, box)


__all__ = ["Overlay", "crop_item", "crop_region", "resize_crop", "resize_fill"]
