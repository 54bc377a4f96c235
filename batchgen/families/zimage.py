"""Z-Image (Z-Image-Turbo): a Qwen3 text encoder's hidden states and a single-stream DiT over
16-channel latents (the FLUX.1 VAE).

Equal to diffusers' ``ZImagePipeline`` / ``ZImageImg2ImgPipeline``:

- **prompt**: each prompt is wrapped in the tokenizer's chat template (one user message,
  generation prompt, ``enable_thinking=True``), tokenized to ``max_sequence_length`` (default 512)
  with padding, and run through the ``Qwen3Model``; the embeddings are its **second-to-last**
  hidden state, of which the transformer uses only the prompt's real tokens (no padding);
- **latents**: noise per item in ``(16, H/8, W/8)``; the transformer patchifies 2x2 itself, so no
  pack hooks; the VAE decodes ``latents / scaling_factor + shift_factor``; sizes are multiples of 16;
- **schedule**: ``flow_euler`` gets ZImagePipeline's ``sigmas = linspace(1, 1/steps, steps)`` (as
  float32, torch's linspace) and ``mu`` from the image token count (used only by a dynamically
  shifted scheduler config; Z-Image-Turbo's shifts statically by 3);
- **model call**: ``t = (1000 - timestep) / 1000`` and the output negated (the model predicts the
  flow the other way round);
- **guidance**: ZImagePipeline runs CFG whenever ``guidance_scale > 0``, as
  ``pos + scale * (pos - neg)`` over one call on ``[prompts, negatives]`` (so 1.0 is *not* off).
  Z-Image-Turbo is distilled for ``guidance_scale=0`` and 9 steps (its model card): the defaults;
  the base model wants CFG (e.g. 50 steps, guidance 4: pass them). ``cfg_normalization`` and
  ``cfg_truncation`` are left at diffusers' defaults (off);
- **img2img**: ZImageImg2ImgPipeline's ``t_start = int(steps - steps * strength)`` cut on the same
  sigmas and ``scale_noise`` of the encoded image (the flow samplers' strength handling).

Batch invariance: a prompt keeps only its real tokens, padded inside the model to a multiple of 32,
so rows of one call can differ in caption length (diffusers then masks attention). An item's shapes
must not depend on its batch-mates, so items are grouped by padded caption length (and, under CFG,
the negative prompt's) through :meth:`ZImage.prompt_chunks`: all rows of a micro-batch then have
the same shapes, whatever else is in it; padding rows repeat the first item.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from ..models.text import _label
from ..models.zimage import SEQ_MULTIPLE, padded_length
from ..sampling import SPECS, flux_mu
from .base import SCHEDULER, VAE, Batch, Component, Conditioning, Family

log = logging.getLogger(__name__)

DEFAULT_STEPS = 9  # Z-Image-Turbo's model card (guidance 0)
DEFAULT_GUIDANCE = 0.0
DEFAULT_SEQUENCE = 512  # ZImagePipeline's max_sequence_length
HIDDEN_LAYER = -2  # the text encoder's second-to-last hidden state


class ZImage(Family):
    name = "zimage"
    pipeline_classes = ("ZImagePipeline", "ZImageImg2ImgPipeline")
    components = {
        "transformer": Component(("ZImageTransformer2DModel",)),
        "vae": VAE,
        "text_encoder": Component(("Qwen3Model",)),
        "tokenizer": Component(("Qwen2Tokenizer", "Qwen2TokenizerFast"), kind="tokenizer"),
        "scheduler": SCHEDULER,
    }
    default_sampler = "flow_euler"
    default_steps = DEFAULT_STEPS
    default_guidance = DEFAULT_GUIDANCE
    size_multiple = 16
    cuda_dtype = torch.bfloat16
    denoiser_name = "transformer"
    text_encoders = ("text_encoder",)

    def __init__(self, parts, folder):
        super().__init__(parts, folder)
        self.transformer = parts["transformer"]
        self.text_encoder = parts["text_encoder"]
        self.tokenizer = parts["tokenizer"]

    def info(self) -> dict[str, Any]:
        return {**super().info(), "prediction_type": "flow"}

    def default_size(self) -> tuple[int, int]:
        """ZImagePipeline's 1024 x 1024 (tiny test models: their VAE's smaller sample_size, as FLUX)."""
        from .flux import Flux

        return Flux.default_size(self)

    # ---------------------------------------------------------------------------- per request
    def resolve(self, group: dict[str, Any]) -> dict[str, Any]:
        given = group.get("max_sequence_length")
        group = super().resolve(group)
        if given is None:
            group["max_sequence_length"] = DEFAULT_SEQUENCE
        return group

    def check(self, settings: dict[str, Any], items: dict[str, list], prompts: list[str]) -> None:
        m = 2 * self.vae_scale_factor
        for key in ("width", "height"):
            if settings[key] % m:
                raise ValueError(f"{key}: {settings[key]} is not a multiple of {m} (Z-Image patches 2x2 latents of "
                                 f"a {self.vae_scale_factor}x VAE); use e.g. {settings[key] // m * m or m}")
        if settings["guidance_scale"] < 0:
            raise ValueError(f"guidance_scale: {settings['guidance_scale']} is negative; Z-Image runs CFG for any "
                             f"value > 0 (0: off, Z-Image-Turbo's default)")

    def guided(self, settings: dict[str, Any]) -> bool:
        """ZImagePipeline's ``do_classifier_free_guidance``: ``guidance_scale > 0``."""
        return settings["guidance_scale"] > 0

    def prompt_chunks(self, prompt: str, negative: str, settings: dict[str, Any]) -> int:
        """The item's padded caption length in units of 32 tokens (and the negative prompt's under
        CFG): items with different values never share a micro-batch (see the module docstring)."""
        length = settings.get("max_sequence_length") or DEFAULT_SEQUENCE
        key = self._tokens(prompt, length) // SEQ_MULTIPLE
        if self.guided(settings):
            key = key * 1000 + self._tokens(negative, length) // SEQ_MULTIPLE
        return key

    def _tokens(self, prompt: str, length: int) -> int:
        ids = self.tokenizer(self._template(prompt), truncation=True, max_length=length)["input_ids"]
        return padded_length(len(ids))

    def _template(self, prompt: str) -> str:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=True)

    def schedule(self, settings: dict[str, Any], sampler: str) -> dict[str, Any]:
        """ZImagePipeline's ``set_timesteps`` arguments: ``sigmas`` for ``flow_euler`` (float32
        linspace, as the pipeline builds them) and ``mu`` for a dynamically shifted config."""
        steps = settings["steps"]
        out: dict[str, Any] = {}
        if SPECS[sampler].family == "flow" and not self.scheduler_config.get("use_flow_sigmas"):
            out["sigmas"] = np.array(torch.linspace(1.0, 1 / steps, steps).tolist())
        if self.scheduler_config.get("use_dynamic_shifting"):
            f = 2 * self.vae_scale_factor
            out["mu"] = flux_mu((settings["height"] // f) * (settings["width"] // f), self.scheduler_config)
        return out

    # --------------------------------------------------------------------------- the denoiser
    def encode_prompts(self, batch: Batch) -> Conditioning:
        """Rows: [prompts..., negatives...] under CFG (ZImagePipeline's call order), else the prompts.
        ``context`` is the padded hidden state (rows, max_sequence_length, dim); ``extra["lengths"]``
        each row's real token count."""
        length = batch.settings["max_sequence_length"]
        texts, labels = batch.prompts, batch.labels
        if batch.guided:
            texts = batch.prompts + batch.negatives
            labels = None if labels is None else labels + [None] * len(batch.negatives)
        templated = [self._template(t) for t in texts]
        tokens = self.tokenizer(templated, padding="max_length", max_length=length, truncation=True,
                                return_tensors="pt")
        self._warn_truncated(templated, length, labels)
        mask = tokens.attention_mask.to(self.text_device).bool()
        out = self.text_encoder(input_ids=tokens.input_ids.to(self.text_device), attention_mask=mask,
                                output_hidden_states=True)
        context = out.hidden_states[HIDDEN_LAYER].to(device=self.device, dtype=self.dtype)
        lengths = mask.sum(dim=1).to(self.device)
        return Conditioning(context=context, extra={"lengths": lengths})

    def _warn_truncated(self, templated: list[str], length: int, labels) -> None:
        for i, ids in enumerate(self.tokenizer(templated, truncation=False)["input_ids"]):
            if len(ids) > length:
                log.warning("%s: prompt is %d Qwen3 tokens with the chat template, longer than max_sequence_length "
                            "%d; truncated (as ZImagePipeline truncates it)", _label(labels, i), len(ids), length)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The transformer call at ZImagePipeline's ``(1000 - t) / 1000``, output negated."""
        timestep = (1000 - t.expand(x.shape[0])) / 1000
        out = self.transformer(x.to(self.dtype), timestep, cond.context, cond.extra["lengths"].tolist())
        return -out

    def denoiser(self, cond: Conditioning, batch: Batch):
        """One call per step; under CFG one call over [prompt rows, negative rows] and ZImagePipeline's
        ``pos + scale * (pos - neg)`` (negating the output commutes with it exactly)."""
        predict = self._graph_safe(self.predict)
        if not batch.guided:
            return lambda x, t: predict(x, t, cond)
        scale = batch.settings["guidance_scale"]

        def cfg(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            positive, negative = predict(torch.cat([x, x]), t, cond).chunk(2)
            return positive + scale * (positive - negative)

        return cfg
