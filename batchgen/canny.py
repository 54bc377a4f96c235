"""The built-in Canny preprocessor: a control image derived from a source image on the worker.

A job row with ``control_preprocess: canny`` names a source image in ``control_image``; the
worker resizes it to the item's width x height (Lanczos, as control images are resized) and runs
OpenCV's Canny edge detector with the row's ``canny_low`` / ``canny_high`` thresholds (defaults
100 / 200, the values of diffusers' ControlNet examples) on the RGB pixels, the way those examples
call ``cv2.Canny(np.array(image), low, high)``. The edges (255 on an edge, 0 elsewhere) become a
3-channel image. Canny is deterministic, so a rerender derives the same control image from the
same source bytes and thresholds (both recorded in the manifest).
"""

from __future__ import annotations

import numpy as np

PREPROCESSORS = ("canny",)
DEFAULT_LOW, DEFAULT_HIGH = 100, 200
MAX_THRESHOLD = 10000


def canny_control(image, width: int, height: int, low: int = DEFAULT_LOW, high: int = DEFAULT_HIGH) -> np.ndarray:
    """A PIL image -> the HxWx3 uint8 Canny edge map of it at ``width`` x ``height``."""
    import cv2
    from PIL import Image

    if not 0 <= low <= high <= MAX_THRESHOLD:
        raise ValueError(f"canny thresholds: expected 0 <= canny_low <= canny_high <= {MAX_THRESHOLD}, got "
                         f"{low}, {high}")
    rgb = image.convert("RGB")
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), resample=Image.LANCZOS)
    edges = cv2.Canny(np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8)), float(low), float(high))
    return np.repeat(edges[:, :, None], 3, axis=2)


__all__ = ["PREPROCESSORS", "DEFAULT_LOW", "DEFAULT_HIGH", "canny_control"]
