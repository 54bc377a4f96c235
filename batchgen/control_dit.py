"""ControlNet for the transformer families (SD3 / SD3.5 and FLUX.1): control images as VAE latents.

Equal to diffusers' ``StableDiffusion3ControlNetPipeline`` (``SD3ControlNetModel`` /
``SD3MultiControlNetModel``) and ``FluxControlNetPipeline`` (``FluxControlNetModel`` /
``FluxMultiControlNetModel``), item by item. What :mod:`batchgen.control` does for the UNet
families holds here too (request checks, per-item scales and guidance windows counted in model
calls, a ControlNet no row keeps is not run, residuals per row scaled in float32); what differs:

- the control image is prepared as the pipelines' ``VaeImageProcessor`` prepares a PIL image
  (resized to width x height with Lanczos, RGB, scaled to [-1, 1]) and **VAE-encoded** with a
  posterior *sample*; the ControlNet sees those latents, not pixels;
- **SD3 randomness.** diffusers draws that sample with ``latent_dist.sample()`` from the *global*
  torch RNG, and under classifier-free guidance for both halves of the duplicated batch (one draw
  of shape (2B, C, h, w): the negative rows, then the positive rows). batchgen never touches the
  global RNG. Each item draws its sample from its own generator seeded with the item's seed
  (``torch.Generator().manual_seed(seed)``, separate from the item's noise generator, which it
  therefore leaves untouched), in diffusers' order for one item: per ControlNet in order, with
  guidance one (2, C, h, w) draw whose first row serves the negative half and the second the
  positive half (several ControlNets continue the same generator, as diffusers' global RNG
  continues). The item is VAE-encoded as diffusers encodes a one-item batch (one row per guidance
  half: the encoder's rounding depends on the batch size). So an item's
  bytes never depend on its batch-mates, and a one-item diffusers call preceded by
  ``torch.manual_seed(seed)`` renders the same image (tests/test_controlnet_dit.py);
- SD3 ControlNets with ``force_zeros_for_pooled_projection`` (InstantX, the default) get zeros for
  the pooled text and control latents *not* shifted by the VAE's ``shift_factor`` (only scaled),
  as diffusers does; others get the prompts' pooled vectors and shifted latents. With several
  ControlNets the *first* one's setting applies to all of them (diffusers reads
  ``controlnet.nets[0].config``). The ControlNet
  gets the same (doubled, under guidance) rows as the transformer, and its residuals are added
  after the transformer's blocks (:class:`batchgen.models.mmdit.SD3Transformer2DModel`);
- **FLUX** encodes the control image with the items' own noise generators, as FluxControlNetPipeline
  does with a generator list: per item, one posterior sample per ControlNet in order, all before
  the initial noise. The latents are shifted, scaled and packed like the image latents. Under true
  CFG the ControlNet runs once on the positive rows (diffusers computes its residuals from the
  positive prompt and hands the same residuals to both transformer calls), so the residuals are
  repeated for the negative rows. The ControlNet's guidance input is the transformer's.
- FLUX img2img with a ControlNet is FluxControlNetImg2ImgPipeline: per item the control image's
  draw, then the init image's, then the noise (the pipeline's order), default scale 1.0. SD3 has
  no ControlNet img2img pipeline in diffusers: with ``init_images`` the request is refused
  (:func:`batchgen.control.check_control`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

import numpy as np

from .control import ControlBatch, ControlRequest, scale_table


class LatentControlBatch(ControlBatch):
    """The control side of one micro-batch of an SD3 or FLUX model: per ControlNet the control
    latents of every row the ControlNet sees, and the (calls, nets, rows) scale table."""

    def __init__(self, images: list[torch.Tensor], scales: torch.Tensor, family: str, rows: int):
        super().__init__(images, scales)
        self.family = family
        self.rows = rows  # items per guidance half (the micro-batch size)

    @classmethod
    def build(cls, req: ControlRequest, family, indices: list[int], size: int, calls: int, guided: bool,
              generators: Sequence[torch.Generator], seeds: Sequence[int]) -> "LatentControlBatch":
        k = len(req.pixels[indices[0]])
        stack = family.parts["controlnet"]
        if family.name == "sd3":
            # one control generator per item, which the ControlNets draw from in order
            control_generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
            images = [_sd3_latents(family, stack.nets[0], [req.pixels[i][j] for i in indices], control_generators,
                                   size, guided) for j in range(k)]
            return cls(images, scale_table(req, indices, size, calls, guided), "sd3", size)
        # FLUX: per ControlNet, every item's sample from its own generator (net 0 for all items, then net 1 ...)
        images = []
        for j in range(k):
            pixels = [_pixels(req.pixels[i][j]) for i in indices]
            latents = family.pack(family.encode_pixels(pixels, generators), {})
            images.append(_pad(latents, size))
        return cls(images, scale_table(req, indices, size, calls, False), "flux", size)

    def residuals(self, stack, x: torch.Tensor, t: torch.Tensor, cond) -> dict[str, Any]:
        scales, row_scales = self.next_call(x.device)
        run = [j for j in range(len(stack.nets)) if bool(scales[j].any())]
        if not run:
            return {}
        if self.family == "sd3":
            return self._sd3(stack, run, x, t, cond, row_scales)
        return self._flux(stack, run, x, t, cond, row_scales)

    @staticmethod
    def _merged(total, counts: list[int]):
        """diffusers' Multi-ControlNet sums every ControlNet's residual list with ``zip`` (a
        ControlNet without residuals of a kind leaves the sum as it is), so the sum is as long as
        the shortest list of *all* ControlNets, also those whose scale is 0 in this call and which
        are therefore not run here: cut to that length (the cut entries' values are unchanged, as
        adding a zero-scaled residual changes none)."""
        if total is None or counts[0] == 0:
            return None
        length = min(c for c in counts if c > 0)
        return total[:length]

    def _sd3(self, stack, run, x, t, cond, row_scales) -> dict[str, Any]:
        total = None
        zeros = stack.nets[0].config["force_zeros_for_pooled_projection"]  # the first ControlNet's, for all
        pooled = torch.zeros_like(cond.pooled) if zeros else cond.pooled
        for j in run:
            out = stack.nets[j](x, self.images[j], row_scales[j], cond.context, pooled, t)
            total = out if total is None else [a + b for a, b in zip(total, out)]
        return {"block_controlnet_hidden_states": self._merged(total, [n.config["num_layers"] for n in stack.nets])}

    def _flux(self, stack, run, x, t, cond, row_scales) -> dict[str, Any]:
        n = self.rows
        rows = x.shape[0]
        pos = slice(rows - n, rows)  # true CFG: [negative rows, positive rows]
        guidance = cond.extra.get("guidance")
        guidance = None if guidance is None else guidance[pos]
        timestep = t.expand(n).to(x.dtype) / 1000
        double = single = None
        for j in run:
            d, s = stack.nets[j](x[pos], self.images[j], row_scales[j], cond.context[pos], cond.pooled[pos], timestep,
                                 cond.extra["img_ids"], cond.extra["txt_ids"], guidance)
            double = d if double is None else _add(double, d)
            single = s if single is None else _add(single, s)
        double = self._merged(double, [net.config["num_layers"] for net in stack.nets])
        single = self._merged(single, [net.config["num_single_layers"] for net in stack.nets])
        if rows != n:
            double = None if double is None else [torch.cat([r] * (rows // n)) for r in double]
            single = None if single is None else [torch.cat([r] * (rows // n)) for r in single]
        return {"controlnet_block_samples": double, "controlnet_single_block_samples": single}


def _add(a, b):
    if a is None or b is None:
        return a
    return [x + y for x, y in zip(a, b)]


def _pixels(image) -> torch.Tensor:
    """HxWx3 uint8 -> (1, 3, H, W) in [-1, 1], laid out contiguously as the pipelines'
    ``prepare_image`` (``repeat_interleave``) hands it to the VAE."""
    pixels = torch.from_numpy(image.astype(np.float32) / 255.0)[None].permute(0, 3, 1, 2).contiguous()
    return 2.0 * pixels - 1.0


def _pad(latents: torch.Tensor, size: int) -> torch.Tensor:
    pad = size - latents.shape[0]
    return latents if pad <= 0 else torch.cat([latents, latents.new_zeros((pad, *latents.shape[1:]))])


def _sd3_latents(family, net, images, generators: Sequence[torch.Generator], size: int, guided: bool) -> torch.Tensor:
    """The control latents of one SD3 ControlNet for the items ``images`` (rows: the negative half,
    then the positive half under guidance; padding rows zero). See the module doc for the draws."""
    vae = family.vae
    shift = 0.0 if net.config["force_zeros_for_pooled_projection"] else vae.shift_factor
    halves = 2 if guided else 1
    per_item = []
    for image, generator in zip(images, generators):
        # one row per guidance half, as diffusers encodes a one-item batch (the VAE's convolutions
        # round differently at another batch size)
        posterior = vae.encode(torch.cat([_pixels(image)] * halves).to(family.device, family.vae_dtype))
        noise = torch.randn(tuple(posterior.mean.shape), generator=generator, dtype=torch.float32)
        sample = posterior.mean + posterior.std * noise.to(posterior.mean.device, posterior.mean.dtype)
        per_item.append(((sample - shift) * vae.scaling_factor).to(family.dtype))
    halves_rows = [_pad(torch.cat([item[h:h + 1] for item in per_item]), size) for h in range(halves)]
    return torch.cat(halves_rows)
