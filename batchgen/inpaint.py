"""Inpainting: a mask per item says what to repaint (white) and what to keep (black).

Equal to diffusers' ``StableDiffusionInpaintPipeline``, ``StableDiffusionXLInpaintPipeline`` and
``FluxFillPipeline``. A model inpaints in one of three ways (its family's ``inpaint_kind``):

- **concat** (inpainting models: the SD/SDXL 9-channel UNets): every model call gets the latents
  concatenated with the mask at latent resolution and the latents of the masked image (the init
  image with the repainted region set to 0, i.e. mid-gray);
- **fill** (FLUX.1 Fill): the same idea in FLUX's packed tokens (the family's
  ``inpaint_condition``: masked-image latents packed 2x2, the pixel mask cut into 8x8 blocks as 64
  channels, then packed 2x2), prepared as FluxFillPipeline prepares it: the init image is encoded
  and noised even at strength 1.0 (``scale_noise`` at sigma 1 gives the noise itself), and the
  masked images (``init * (1 - mask)``) go through the VAE as one batch (the padded micro-batch,
  so an item's latents do not depend on its batch-mates);
- **blend** (ordinary 4-channel models): after each step the kept region of the latents is
  replaced by the init image's latents noised to the next step's level with the item's own
  starting noise; after the last step by the clean latents.

Masks are prepared as diffusers' mask processor does: (optionally blurred, as
``mask_processor.blur``), resized to width x height (Lanczos), made grayscale and binarized at 0.5.
``strength`` 1.0 starts from pure noise (diffusers' ``is_strength_max``); below 1 from the init
latents noised to the first step, like img2img.

Every draw comes from the item's own generator, in diffusers' order: the init image's VAE
posterior sample (blend and fill, or strength < 1), the starting noise, then the masked image's
posterior sample (always drawn, even by blend models, which do not use it: the sampler's later
draws stay where diffusers has them). Nothing here depends on an item's batch-mates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

    from .families.base import Family
    from .sampling import Sampler

# generate() settings (entries of batchgen.settings) that only apply to inpainting items.
MASK_SETTINGS = ("mask_blur", "padding_mask_crop")


def mask_to_pil(mask, where: str):
    """A mask as given (PIL image, HxW / HxWx1 / HxWx3 / HxWx4 uint8 array) -> a PIL image."""
    from PIL import Image

    if isinstance(mask, np.ndarray):
        if mask.dtype != np.uint8 or mask.ndim not in (2, 3) or (mask.ndim == 3 and mask.shape[2] not in (1, 3, 4)):
            raise ValueError(f"{where}: expected an HxW (or HxWx1/3/4) uint8 array with white = repaint, got shape "
                             f"{mask.shape} dtype {mask.dtype}")
        mask = Image.fromarray(mask[..., 0] if mask.ndim == 3 and mask.shape[2] == 1 else mask)
    if not isinstance(mask, Image.Image):
        raise ValueError(f"{where}: expected a PIL image or uint8 array, got {type(mask).__name__}")
    if mask.width < 1 or mask.height < 1:
        raise ValueError(f"{where}: the mask is empty ({mask.width}x{mask.height} pixels)")
    if mask.mode not in ("L", "RGB", "RGBA", "LA"):
        mask = mask.convert("L")
    return mask


def prepare_mask(mask, width: int, height: int, blur: int | None = None, where: str = "mask") -> np.ndarray:
    """diffusers' mask processor: (blur,) resize to ``width`` x ``height`` (Lanczos), grayscale,
    binarize at 0.5. Returns an (height, width) float32 array of 0 (keep) and 1 (repaint)."""
    from PIL import Image, ImageFilter

    image = mask_to_pil(mask, where)
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    values = np.asarray(image.convert("L")).astype(np.float32) / 255.0
    return (values >= 0.5).astype(np.float32)


def check_mask_fits(mask_size: tuple[int, int], image_size: tuple[int, int], where: str, image_where: str) -> None:
    """A mask must cover its init image: same aspect ratio (both are resized to width x height, so
    a mask of another shape would be stretched against the image). Sizes may differ (a
    half-resolution mask is fine)."""
    (mw, mh), (iw, ih) = mask_size, image_size
    if abs(mw * ih - mh * iw) > max(iw, ih, mw, mh):  # more than a pixel of rounding apart
        raise ValueError(f"{where}: the mask is {mw}x{mh} but {image_where} is {iw}x{ih}; a mask must have its init "
                         f"image's aspect ratio (ideally its size) so its white region lines up with the image")


def prepare_inpaint_inputs(init_images, mask_images, n: int, width: int, height: int,
                           settings: dict[str, list], to_rgb: Callable):
    """Validate and prepare generate()'s ``init_images`` + ``mask_images`` (or outpainting
    settings): (init images as HxWx3 uint8 of width x height, masks as HxW float32 0/1, and per
    item the :class:`batchgen.mask_crop.Overlay` that pastes a ``padding_mask_crop`` render back
    into its original, else None). ``to_rgb(image, width, height, where)`` is the pipeline's
    init-image conversion."""
    from PIL import ImageFilter

    from .mask_crop import crop_item
    from .outpaint import OUTPAINT_SETTINGS, outpaint_image

    if init_images is None:
        arg = "mask_images" if mask_images is not None else next(k for k in settings if k in OUTPAINT_SETTINGS)
        raise ValueError(f"{arg}: inpainting needs init_images (the image to repaint), one per prompt")
    images = list(init_images)
    if len(images) != n:
        raise ValueError(f"init_images: expected {n} images (one per prompt), got {len(images)}")
    pads = {k: settings.pop(k) for k in OUTPAINT_SETTINGS if k in settings}
    blur = settings.pop("mask_blur", [None] * n)
    crop = settings.pop("padding_mask_crop", [None] * n)
    if mask_images is not None:
        if pads:
            raise ValueError(f"{next(iter(pads))}: outpainting makes its own masks; pass either mask_images or the "
                             f"outpaint_* settings, not both")
        masks = list(mask_images)
        if len(masks) != n:
            raise ValueError(f"mask_images: expected {n} masks (one per prompt), got {len(masks)}")
    else:
        masks = []
        for i in range(n):
            box = tuple(pads.get(k, [None] * n)[i] or 0 for k in OUTPAINT_SETTINGS)
            images[i], mask = outpaint_image(_as_pil_rgb(images[i], f"init_images[{i}]"), *box)
            masks.append(mask)
    out_images, out_masks, overlays = [], [], []
    for i, (image, mask) in enumerate(zip(images, masks)):
        where = f"mask_images[{i}]" if mask_images is not None else f"outpaint mask of item {i}"
        pil_mask = mask_to_pil(mask, where)
        check_mask_fits(pil_mask.size, _size(image), where, f"init_images[{i}]")
        if crop[i] is None:
            out_images.append(to_rgb(image, width, height, f"init_images[{i}]"))
            out_masks.append(prepare_mask(pil_mask, width, height, blur[i], where))
            overlays.append(None)
            continue
        if blur[i]:
            pil_mask = pil_mask.filter(ImageFilter.GaussianBlur(blur[i]))
        pixels, small, overlay = crop_item(_as_pil_rgb(image, f"init_images[{i}]"), pil_mask, width, height,
                                           crop[i], where)
        out_images.append(pixels)
        out_masks.append(small)
        overlays.append(overlay)
    return out_images, out_masks, overlays


def _size(image) -> tuple[int, int]:
    if isinstance(image, np.ndarray) and image.ndim >= 2:
        return int(image.shape[1]), int(image.shape[0])
    return tuple(getattr(image, "size", (0, 0)))


def _as_pil_rgb(image, where: str):
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"{where}: expected an HxWx3 uint8 array, got shape {image.shape} dtype {image.dtype}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"{where}: expected a PIL image or uint8 array, got {type(image).__name__}")
    return image.convert("RGB")


@dataclass
class InpaintStart:
    """One micro-batch's inpainting: the starting latents, the model wrapper (concat) and the step
    hook (blend) for the sampler."""

    latents: "torch.Tensor"
    condition: "torch.Tensor | None"  # concat: what every model call gets beside the latents
    blend: "Callable[[int, torch.Tensor], torch.Tensor] | None"
    family: "Family"

    def model(self, denoiser: Callable) -> Callable:
        if self.condition is None:
            return denoiser
        fam, condition = self.family, self.condition
        return lambda x, t: denoiser(fam.with_inpaint_condition(x, condition), t)


def masked_batch(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], size: int) -> "torch.Tensor":
    """FluxFillPipeline's masked images ``init * (1 - mask)`` in [-1, 1], (size, 3, H, W), padded
    with mid-gray rows (0 in [-1, 1], nothing masked). Built as diffusers' image processors build
    them (views of (B, H, W, C) arrays), so the one VAE call sees the same memory layout."""
    import torch

    pad = size - len(images)
    gray = np.full(images[0].shape, 0.5, np.float32)
    pixels = np.stack([image.astype(np.float32) / 255.0 for image in images] + [gray] * pad)
    mask = np.stack(list(masks) + [np.zeros_like(masks[0])] * pad)[..., None]
    pixels = 2.0 * torch.from_numpy(pixels.transpose(0, 3, 1, 2)) - 1.0
    return pixels * (1 - torch.from_numpy(mask.transpose(0, 3, 1, 2)))


def start(fam: "Family", sampler: "Sampler", settings: dict[str, Any], images: Sequence[np.ndarray],
          masks: Sequence[np.ndarray], generators: Sequence, shape: tuple[int, ...]) -> InpaintStart:
    """Draw and encode what an inpainting micro-batch starts from (``generators``: one per row of
    the padded batch; ``images``/``masks``: the real items')."""
    import torch

    from .families.base import image_pixels, pad_rows
    from .noise import randn_items

    real, size = len(images), len(generators)
    kind = fam.inpaint_kind()
    # FluxFillPipeline always starts from scale_noise of the encoded init image (at sigma 1: the noise).
    from_init = kind == "fill" or settings["strength"] < 1.0
    pixels = [image_pixels(image) for image in images]
    mask_px = [torch.from_numpy(m)[None, None] for m in masks]

    clean = pad_rows(fam.encode_pixels(pixels, generators[:real]), size) if kind == "blend" or from_init else None
    noise = randn_items(generators, shape, fam.device, fam.dtype)
    if kind == "fill":
        masked_latents = fam.encode_pixel_batch(masked_batch(images, masks, size), generators)
    elif kind == "concat":
        masked = [p * (m < 0.5) for p, m in zip(pixels, mask_px)]
        masked_latents = pad_rows(fam.encode_pixels(masked, generators[:real]), size)
    else:  # unused by blend models: draw what its posterior sample draws (latent-shaped), skip the encoder
        randn_items(generators[:real], shape)
        masked_latents = None
    mask = torch.cat(mask_px + [torch.zeros_like(mask_px[0])] * (size - real))
    packed_noise = fam.pack(noise, settings)
    if from_init:
        latents = sampler.noised_latents(fam.pack(clean, settings), packed_noise)
    else:
        latents = sampler.initial_latents(packed_noise)
    if masked_latents is not None:
        return InpaintStart(latents, fam.inpaint_condition(mask, masked_latents, settings), None, fam)
    keep_latents = fam.pack(clean, settings)
    small = fam.latent_mask(mask, settings)
    last = len(sampler.plan.timesteps)

    def blend(index: int, x: torch.Tensor) -> torch.Tensor:
        proper = keep_latents if index >= last else sampler.noised_at(keep_latents, packed_noise, index)
        return (1 - small) * proper + small * x

    return InpaintStart(latents, None, blend, fam)


__all__ = ["MASK_SETTINGS", "InpaintStart", "check_mask_fits", "mask_to_pil", "masked_batch",
           "prepare_inpaint_inputs", "prepare_mask", "start"]
