"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a conditional UNet, a 4-channel VAE.

Equal to diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline``: the prompt
is the CLIP encoder's last hidden state (SD 2.x checkpoints ship the OpenCLIP encoder already cut
to the penultimate layer), guidance is classifier-free with the negative prompt, the VAE decodes
``latents / scaling_factor`` in the run dtype (diffusers' SD pipelines ignore ``force_upcast``).
Inpainting (``StableDiffusionInpaintPipeline``, :mod:`batchgen.inpaint`): 9-channel inpainting
UNets and ordinary ones (``inpaints``).
"""

from __future__ import annotations

import torch

from ..control import controlnet_residuals
from ..models.text import ClipEncoder
from .base import CLIP_TOKENIZER, SCHEDULER, VAE, Batch, Component, Conditioning, Family


class StableDiffusion(Family):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
    components = {
        "unet": Component(("UNet2DConditionModel",)),
        "vae": VAE,
        "text_encoder": Component(("CLIPTextModel",)),
        "tokenizer": CLIP_TOKENIZER,
        "scheduler": SCHEDULER,
    }
    default_sampler = "ddim"
    channels_last = True
    inpaints = True

    def __init__(self, parts, folder):
        super().__init__(parts, folder)
        self.unet = parts["unet"]
        self.text = ClipEncoder(parts["tokenizer"], parts["text_encoder"])

    def variant(self) -> str:
        return "sd2" if self.unet.config.get("use_linear_projection", False) else "sd1"

    def prompt_chunks(self, prompt, negative, settings):
        if settings.get("prompt_syntax") != "a1111":
            return None
        return max(self.text.chunks(prompt), self.text.chunks(negative))

    def _encode(self, prompts, batch, labels=None) -> torch.Tensor:
        if batch.settings.get("prompt_syntax") == "a1111":
            return self.text.weighted(prompts, self.device, batch.settings["prompt_chunks"])[0]
        return self.text(prompts, self.device, labels=labels)[0]

    def encode_prompts(self, batch: Batch) -> Conditioning:
        context = self._encode(batch.prompts, batch, batch.labels).to(self.dtype)
        if batch.guided:
            context = torch.cat([self._encode(batch.negatives, batch).to(self.dtype), context])
        return Conditioning(context=context)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.unet(x, t, cond.context, ip_adapter=cond.ip,
                         **controlnet_residuals(self.parts.get("controlnet"), x, t, cond))
