"""Outpainting: extend an image past its borders by inpainting a padded canvas.

``outpaint_image(image, left, top, right, bottom)`` returns the canvas (the image with that many
pixels added on each side) and its mask (white = the added border, to be painted; black = the
original pixels, kept). generate() does this itself when an item has ``outpaint_*`` settings and
no mask, so a caller never draws masks for outpainting.

The added border is filled by repeating the image's edge pixels outward (``np.pad`` mode
"edge"). With strength 1.0 the fill only matters through the masked-image latents of an
inpainting model (where diffusers zeroes it anyway) and the blend of an ordinary model keeps
only the original region; with strength < 1 the fill is where the new region starts from, and
stretched edge colours are a closer start than black or noise. Set width/height to the canvas
size (or its aspect ratio): the canvas is resized to them like any init image.
"""

from __future__ import annotations

import numpy as np

# The per-item settings (entries of batchgen.settings) that ask generate() to outpaint.
OUTPAINT_SETTINGS = ("outpaint_left", "outpaint_top", "outpaint_right", "outpaint_bottom")


def outpaint_image(image, left: int = 0, top: int = 0, right: int = 0, bottom: int = 0):
    """A PIL image (or HxWx3 uint8 array) + border widths in pixels -> (canvas PIL RGB image,
    mask PIL "L" image of the canvas size, 255 on the border and 0 on the original)."""
    from PIL import Image

    for name, value in (("left", left), ("top", top), ("right", right), ("bottom", bottom)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"outpaint_{name}: expected a whole number of pixels >= 0, got {value!r}")
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"image: expected an RGB image or HxWx3 uint8 array, got shape {pixels.shape}")
    canvas = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(canvas.shape[:2], 255, dtype=np.uint8)
    mask[top:top + pixels.shape[0], left:left + pixels.shape[1]] = 0
    return Image.fromarray(canvas), Image.fromarray(mask)


__all__ = ["OUTPAINT_SETTINGS", "outpaint_image"]
