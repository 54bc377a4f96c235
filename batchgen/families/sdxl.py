"""SDXL (base, Turbo/Lightning-style finetunes) and the SDXL refiner.

Equal to diffusers' ``StableDiffusionXLPipeline`` / ``StableDiffusionXLImg2ImgPipeline``:

- two text encoders (the refiner has only the second): each one's penultimate hidden state,
  concatenated along the channels; the pooled vector is the projection encoder's ``text_embeds``;
- ``text_time`` micro-conditioning: per item (original height, width, crop top, left, target
  height, width) for the base, (original height, width, crop top, left, aesthetic score) for the
  refiner (``requires_aesthetics_score`` in model_index.json); the refiner's negative row uses
  ``negative_aesthetic_score`` and crop (0, 0), as diffusers' defaults do;
- ``force_zeros_for_empty_prompt``: diffusers zeroes the unconditional embeddings when no negative
  prompt is given. Here it applies per item: an empty negative prompt gets zero embeddings. With
  all negatives empty this is exactly diffusers' behaviour, and unlike a batch-wide rule it keeps
  an item's image independent of its batch-mates;
- the VAE decodes (and img2img encodes) in float32 when the run is float16 and the VAE config says
  ``force_upcast`` (the SDXL VAE overflows to NaN/black images in fp16 otherwise);
- inpainting (``StableDiffusionXLInpaintPipeline``, :mod:`batchgen.inpaint`): 9-channel inpainting
  UNets and ordinary ones. diffusers' default strength there is 0.9999; generate()'s is 1.0.
"""

from __future__ import annotations

import torch

from ..control import controlnet_residuals
from ..errors import CheckpointError
from ..models.text import ClipEncoder
from .base import CLIP_TOKENIZER, SCHEDULER, VAE, Batch, Component, Conditioning, Family


class StableDiffusionXL(Family):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                        "StableDiffusionXLInpaintPipeline")
    components = {
        "unet": Component(("UNet2DConditionModel",)),
        "vae": VAE,
        "text_encoder": Component(("CLIPTextModel",), required=False),
        "tokenizer": Component(CLIP_TOKENIZER.classes, required=False, kind="tokenizer"),
        "text_encoder_2": Component(("CLIPTextModelWithProjection",)),
        "tokenizer_2": CLIP_TOKENIZER,
        "scheduler": SCHEDULER,
    }
    default_sampler = "euler"
    default_guidance = 5.0
    upcast_vae = True
    channels_last = True
    inpaints = True

    def __init__(self, parts, folder):
        super().__init__(parts, folder)
        self.unet = parts["unet"]
        pairs = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")]
        for tok, enc in pairs:
            if (parts.get(tok) is None) != (parts.get(enc) is None):
                raise CheckpointError(f"{folder.root}/model_index.json: '{enc}' and '{tok}' must both be present or "
                                      "both null")
        self.encoders = [ClipEncoder(parts[tok], parts[enc]) for tok, enc in pairs if parts.get(enc) is not None]
        index = folder.model_index
        self.force_zeros = bool(index.get("force_zeros_for_empty_prompt", True))
        self.aesthetics = bool(index.get("requires_aesthetics_score", False))
        self._check_added_conditioning()

    def _check_added_conditioning(self) -> None:
        cfg = self.unet.config
        ids = 5 if self.aesthetics else 6
        pooled = int(self.parts["text_encoder_2"].config.projection_dim)
        want = cfg.get("projection_class_embeddings_input_dim")
        got = pooled + ids * int(cfg.get("addition_time_embed_dim") or 0)
        if cfg.get("addition_embed_type") != "text_time" or want != got:
            hint = ("requires_aesthetics_score is set in model_index.json (the refiner's 5 time ids)" if self.aesthetics
                    else "model_index.json lacks requires_aesthetics_score (a base model's 6 time ids)")
            raise CheckpointError(
                f"{self.folder.root}: the UNet's added conditioning takes {want} values but {hint} and the pooled "
                f"text vector give {got}; check requires_aesthetics_score and the unet/config.json")

    def variant(self) -> str:
        return "sdxl-refiner" if self.aesthetics else "sdxl-base"

    def resolve_items(self, items, group, n):
        items = super().resolve_items(items, group, n)
        for key, side in (("original_width", "width"), ("original_height", "height"),
                          ("target_width", "width"), ("target_height", "height")):
            items[key] = [group[side] if v is None else v for v in items[key]]
        return items

    # ------------------------------------------------------------------------------ prompts
    def prompt_chunks(self, prompt, negative, settings):
        if settings.get("prompt_syntax") != "a1111":
            return None
        return max(enc.chunks(text) for enc in self.encoders for text in (prompt, negative))

    def _encode(self, prompts: list[str], labels, settings=None) -> tuple[torch.Tensor, torch.Tensor]:
        states, pooled = [], None
        weighted = settings is not None and settings.get("prompt_syntax") == "a1111"
        for enc in self.encoders:
            wants_pooled = enc.encoder is self.parts["text_encoder_2"]
            kind = "output0" if wants_pooled else None
            if weighted:
                hidden, vector = enc.weighted(prompts, self.device, settings["prompt_chunks"], hidden="penultimate",
                                              pooled=kind)
            else:
                hidden, vector = enc(prompts, self.device, hidden="penultimate", pooled=kind, labels=labels)
            states.append(hidden)
            if vector is not None:
                pooled = vector
        return torch.concat(states, dim=-1).to(self.dtype), pooled.to(self.dtype)

    def _time_ids(self, batch: Batch, negative: bool) -> torch.Tensor:
        it = batch.items
        rows = []
        for i in range(batch.size):
            head = [it["original_height"][i], it["original_width"][i]]
            if self.aesthetics:
                crop = [0, 0] if negative else [it["crop_top"][i], it["crop_left"][i]]
                score = it["negative_aesthetic_score" if negative else "aesthetic_score"][i]
                rows.append(head + crop + [score])
            else:
                rows.append(head + [it["crop_top"][i], it["crop_left"][i], it["target_height"][i], it["target_width"][i]])
        return torch.tensor(rows, dtype=self.dtype, device=self.device)

    def encode_prompts(self, batch: Batch) -> Conditioning:
        context, pooled = self._encode(batch.prompts, batch.labels, batch.settings)
        time_ids = self._time_ids(batch, negative=False)
        if batch.guided:
            uncond, uncond_pooled = self._encode(batch.negatives, None, batch.settings)
            if self.force_zeros:
                empty = torch.tensor([n == "" for n in batch.negatives], device=self.device)
                uncond = torch.where(empty[:, None, None], 0.0, uncond)
                uncond_pooled = torch.where(empty[:, None], 0.0, uncond_pooled)
            context = torch.cat([uncond, context])
            pooled = torch.cat([uncond_pooled, pooled])
            time_ids = torch.cat([self._time_ids(batch, negative=True), time_ids])
        return Conditioning(context=context, pooled=pooled, extra={"time_ids": time_ids})

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.unet(x, t, cond.context, text_embeds=cond.pooled, time_ids=cond.extra["time_ids"],
                         ip_adapter=cond.ip, **controlnet_residuals(self.parts.get("controlnet"), x, t, cond))
