"""FLUX.1 (schnell and dev): CLIP-L pooled vector + T5 sequence, a rectified-flow transformer over
2x2-packed 16-channel latents.

Equal to diffusers' ``FluxPipeline`` / ``FluxImg2ImgPipeline``:

- **prompt**: the CLIP-L ``pooler_output`` (one vector per prompt) and the T5 last hidden state at
  ``max_sequence_length`` tokens (a per-job group setting; schnell 256, dev 512 by default, at most
  the T5 tokenizer's ``model_max_length``); text position ids are zeros, image position ids
  ``(0, row, col)`` of the packed tokens;
- **latents**: noise is drawn per item in the unpacked ``(16, H/8, W/8)`` shape diffusers draws it
  in, then packed into ``(H/16 * W/16, 64)`` tokens (pack/unpack hooks); the VAE decodes
  ``latents / scaling_factor + shift_factor``;
- **schedule**: ``flow_euler`` gets diffusers' explicit ``sigmas = linspace(1, 1/steps, steps)``;
  a dynamically shifted checkpoint (dev) also gets ``mu`` from the packed image sequence length,
  the line diffusers' ``calculate_shift`` draws; schnell's config shifts statically (shift 1.0);
- **guidance**: dev is guidance-distilled: ``guidance_scale`` (default 3.5) is an *input* of the
  transformer, one model call per step. schnell has no guidance input: a non-zero
  ``guidance_scale`` is ignored with one warning per loaded model. diffusers' optional true CFG
  (``true_cfg_scale`` > 1) runs the negative prompt as extra rows of the same call
  (``neg + scale * (pos - neg)``; diffusers makes two calls, which may differ in the last bits);
- **img2img**: FluxImg2ImgPipeline's cut ``t_start = int(steps - steps * strength)`` on the same
  sigmas (the flow samplers' strength handling) and ``scale_noise`` of the encoded image;
- **FLUX.1 Fill** (``FluxFillPipeline``): the transformer takes the packed latents, the packed
  masked-image latents and the mask packed as FluxFillPipeline packs it (each 8x8 pixel block as
  64 channels, then 2x2 patches: 4 x 64), 64 + 64 + 256 = 384 input channels at full size;
  inpainting only (:mod:`batchgen.inpaint`, kind "fill"); defaults 50 steps, guidance 30.

Which variant a folder holds is read from the transformer config (``guidance_embeds``; Fill by
its input channels, which must agree with a ``FluxFillPipeline`` model_index). Memory
plans: the two text encoders may live on the CPU (``text_encoders``), and the transformer's block
Linears may be stored in float8 (``fp8_keep`` lists what stays in bf16); see load_pipeline.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from ..control import controlnet_residuals
from ..control_dit import LatentControlBatch
from ..errors import CheckpointError
from ..models.flux import latent_image_ids, pack_latents, unpack_latents
from ..models.fp8 import FLUX_TRANSFORMER_KEEP
from ..models.text import ClipEncoder, T5Encoder
from ..sampling import SPECS, flux_mu
from .base import CLIP_TOKENIZER, SCHEDULER, T5_TOKENIZER, VAE, Batch, Component, Conditioning, Family

log = logging.getLogger(__name__)

SEQUENCE_DEFAULTS = {"flux-schnell": 256, "flux-dev": 512, "flux-fill": 512}
# FluxPipeline's 28 (schnell is distilled for 1-4); FluxFillPipeline's 50 steps and guidance 30.
STEP_DEFAULTS = {"flux-schnell": 4, "flux-dev": 28, "flux-fill": 50}
GUIDANCE_DEFAULTS = {"flux-schnell": 0.0, "flux-dev": 3.5, "flux-fill": 30.0}
DECODE_PIXELS = 1024 * 1024  # most pixels one VAE decode call renders (see Flux.decode)


class Flux(Family):
    name = "flux"
    pipeline_classes = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxFillPipeline")
    components = {
        "transformer": Component(("FluxTransformer2DModel",)),
        "vae": VAE,
        "text_encoder": Component(("CLIPTextModel",)),
        "tokenizer": CLIP_TOKENIZER,
        "text_encoder_2": Component(("T5EncoderModel",)),
        "tokenizer_2": T5_TOKENIZER,
        "scheduler": SCHEDULER,
    }
    default_sampler = "flow_euler"
    cuda_dtype = torch.bfloat16
    denoiser_name = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2")
    fp8_keep = {"transformer": FLUX_TRANSFORMER_KEEP}  # embedders and output head stay in the run dtype

    def __init__(self, parts, folder):
        super().__init__(parts, folder)
        self.transformer = parts["transformer"]
        self.clip = ClipEncoder(parts["tokenizer"], parts["text_encoder"])
        self.t5 = T5Encoder(parts["tokenizer_2"], parts["text_encoder_2"])
        self._warned_guidance = False
        self.fill = self._is_fill()

    def _is_fill(self) -> bool:
        """FLUX.1 Fill (True) or an ordinary FLUX.1 transformer (False), from its input channels;
        any other transformer, or a FluxFillPipeline folder without a Fill transformer, is refused."""
        config = self.transformer.config
        channels, latent = int(config["in_channels"]), 4 * self.latent_channels
        fill = 2 * latent + 4 * self.vae_scale_factor**2
        where = f"{self.folder.where}: transformer"
        if channels == fill:
            if int(config["out_channels"]) != latent:
                raise CheckpointError(f"{where} takes {channels} input channels (FLUX.1 Fill) but has out_channels "
                                      f"{config['out_channels']}; a FLUX.1 Fill transformer predicts the {latent} "
                                      f"packed latent channels (set out_channels: {latent} in its config.json)")
            return True
        if channels != latent:
            raise CheckpointError(f"{where} takes {channels} input channels: neither FLUX.1 ({latent}, the packed "
                                  f"latents) nor FLUX.1 Fill ({fill}: latents, masked-image latents and mask); "
                                  f"FLUX.1 Canny/Depth ({2 * latent}, FluxControlPipeline) are not supported")
        if self.folder.pipeline_class == "FluxFillPipeline":
            raise CheckpointError(f"{self.folder.where}: model_index.json names FluxFillPipeline but the transformer "
                                  f"takes {channels} input channels (an ordinary FLUX.1 transformer; FLUX.1 Fill's "
                                  f"takes {fill}); use the FLUX.1 Fill transformer, or name FluxPipeline")
        return False

    # ------------------------------------------------------------------------------- describing
    @property
    def distilled_guidance(self) -> bool:
        """dev: the transformer takes the guidance scale as an input (config ``guidance_embeds``)."""
        return bool(self.transformer.config["guidance_embeds"])

    def variant(self) -> str:
        if self.fill:
            return "flux-fill"
        return "flux-dev" if self.distilled_guidance else "flux-schnell"

    def info(self) -> dict[str, Any]:
        return {**super().info(), "prediction_type": "flow"}

    def defaults(self) -> dict[str, Any]:
        return {"steps": STEP_DEFAULTS[self.variant()], "guidance_scale": GUIDANCE_DEFAULTS[self.variant()]}

    def default_size(self) -> tuple[int, int]:
        """FluxPipeline's ``default_sample_size`` (128) x the VAE factor: 1024 x 1024, or the VAE
        config's smaller ``sample_size`` (1024 for FLUX.1's VAE; a tiny test model's is 256, the
        same scale as every other family's tiny models, whose default comes from their config)."""
        side = 128 * self.vae_scale_factor
        vae_side = self.vae.config.get("sample_size")  # diffusers' default when a config omits it is 32: ignored
        if type(vae_side) is int and 256 <= vae_side < side and vae_side % (2 * self.vae_scale_factor) == 0:
            side = vae_side
        return side, side

    @property
    def max_tokens(self) -> int:
        """The T5 tokenizer's ``model_max_length`` (512 for FLUX.1's), capped at diffusers' 512."""
        limit = getattr(self.t5.tokenizer, "model_max_length", 512) or 512
        return int(min(limit, 512))

    # ---------------------------------------------------------------------------- per request
    def resolve(self, group: dict[str, Any]) -> dict[str, Any]:
        given = group.get("max_sequence_length")
        group = super().resolve(group)
        if given is None:
            group["max_sequence_length"] = min(SEQUENCE_DEFAULTS[self.variant()], self.max_tokens)
        return group

    def check(self, settings: dict[str, Any], items: dict[str, list], prompts: list[str]) -> None:
        m = 2 * self.vae_scale_factor
        for key in ("width", "height"):
            if settings[key] % m:
                raise ValueError(f"{key}: {settings[key]} is not a multiple of {m} (FLUX packs 2x2 latent patches of "
                                 f"a {self.vae_scale_factor}x VAE); use e.g. {settings[key] // m * m or m}")
        if self.fill and settings["true_cfg_scale"] > 1.0:
            raise ValueError(f"true_cfg_scale: {settings['true_cfg_scale']} asks for true CFG, which FLUX.1 Fill "
                             f"(diffusers' FluxFillPipeline) does not have; leave it at 1.0 and steer with "
                             f"guidance_scale (the Fill model's default is 30)")
        length = settings["max_sequence_length"]
        if length > self.max_tokens:
            raise ValueError(f"max_sequence_length: {length} is more than this model's T5 tokenizer takes "
                             f"({self.max_tokens}, tokenizer_2 model_max_length); use at most {self.max_tokens}")
        if not self.distilled_guidance and settings["guidance_scale"] != 0 and not self._warned_guidance:
            self._warned_guidance = True
            log.warning("guidance_scale=%s is ignored: FLUX.1-schnell has no guidance input (the transformer config "
                        "has guidance_embeds: false); use true_cfg_scale with a negative prompt for classifier-free "
                        "guidance (this warning is shown once per loaded model)", settings["guidance_scale"])

    def guided(self, settings: dict[str, Any]) -> bool:
        """True CFG (diffusers' ``true_cfg_scale > 1``): negative-prompt rows in every model call."""
        return settings["true_cfg_scale"] > 1.0

    def schedule(self, settings: dict[str, Any], sampler: str) -> dict[str, Any]:
        """FluxPipeline's ``set_timesteps`` arguments: ``sigmas`` for FlowMatchEuler (``flow_euler``),
        ``mu`` when the scheduler config shifts dynamically (from the packed image token count)."""
        steps = settings["steps"]
        out: dict[str, Any] = {}
        if SPECS[sampler].family == "flow" and not self.scheduler_config.get("use_flow_sigmas"):
            out["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        if self.scheduler_config.get("use_dynamic_shifting"):
            out["mu"] = flux_mu(self.image_tokens(settings["width"], settings["height"]), self.scheduler_config)
        return out

    def image_tokens(self, width: int, height: int) -> int:
        """Packed latent tokens of a ``width x height`` image: ``(H // 16) * (W // 16)`` for the 8x VAE."""
        f = self.vae_scale_factor
        return (int(height) // f // 2) * (int(width) // f // 2)

    # ---------------------------------------------------------------------------- the latents
    def pack(self, latents: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
        return pack_latents(latents)

    def unpack(self, latents: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
        return unpack_latents(latents, settings["height"], settings["width"], self.vae_scale_factor)

    def inpaint_kind(self) -> str | None:
        return "fill" if self.fill else None

    def inpaint_condition(self, mask: torch.Tensor, masked_latents: torch.Tensor,
                          settings: dict[str, Any]) -> torch.Tensor:
        """FluxFillPipeline's condition tokens: the masked-image latents packed 2x2, then the pixel
        mask (B, 1, H, W) with each f x f block as f*f channels ((dy, dx) order) packed 2x2."""
        f = self.vae_scale_factor
        b, _, height, width = mask.shape
        h, w = height // f, width // f
        blocks = mask[:, 0].reshape(b, h, f, w, f).permute(0, 2, 4, 1, 3).reshape(b, f * f, h, w)
        return torch.cat([pack_latents(masked_latents), pack_latents(blocks).to(self.device, self.dtype)], dim=2)

    def with_inpaint_condition(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Packed tokens: the condition's channels follow the latents' in every token."""
        return torch.cat([x, condition], dim=2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The base decode, at most :data:`DECODE_PIXELS` per VAE call: at 1024x1024 one image at a
        time, so the decoder's activations (~2.6 GiB per megapixel in bf16) do not grow with the
        micro-batch; small images decode in one call. The split depends only on the image size, so
        an item's bytes still do not depend on its batch-mates."""
        per_call = max(1, DECODE_PIXELS // (latents.shape[-2] * latents.shape[-1] * self.vae_scale_factor**2))
        if latents.shape[0] <= per_call:
            return super().decode(latents)
        decode = super().decode
        return torch.cat([decode(chunk) for chunk in latents.split(per_call)])

    # --------------------------------------------------------------------------- the denoiser
    def encode_prompts(self, batch: Batch) -> Conditioning:
        """Rows: [negatives..., prompts...] under true CFG, else the prompts. Text encoders run on
        ``text_device``; their outputs move to the model device and dtype."""
        length = batch.settings["max_sequence_length"]
        texts, labels = batch.prompts, batch.labels
        if batch.guided:
            texts = batch.negatives + batch.prompts
            labels = None if labels is None else [None] * len(batch.negatives) + labels
        _, pooled = self.clip(texts, self.text_device, pooled="pooler", labels=labels)
        context = self.t5(texts, self.text_device, length, labels=labels)
        context = context.to(device=self.device, dtype=self.dtype)
        pooled = pooled.to(device=self.device, dtype=self.dtype)
        rows = context.shape[0]
        w, h, f = batch.settings["width"], batch.settings["height"], self.vae_scale_factor
        extra = {
            "txt_ids": torch.zeros(length, 3, device=self.device, dtype=self.dtype),
            "img_ids": latent_image_ids(2 * (h // (2 * f)), 2 * (w // (2 * f)), self.device, self.dtype),
        }
        if self.distilled_guidance:
            extra["guidance"] = torch.full((rows,), float(batch.settings["guidance_scale"]), device=self.device,
                                           dtype=torch.float32)
        return Conditioning(context=context, pooled=pooled, extra=extra, shared=("txt_ids", "img_ids"))

    def control_batch(self, req, indices, size, calls, guided, generators, seeds):
        """The ControlNet inputs of one micro-batch: control images as VAE latents (batchgen.control_dit)."""
        return LatentControlBatch.build(req, self, indices, size, calls, guided, generators, seeds)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """FluxPipeline's transformer call: ``timestep = t.expand(rows).to(dtype) / 1000`` (the module
        multiplies by 1000 again), guidance the raw scale."""
        timestep = t.expand(x.shape[0]).to(x.dtype) / 1000
        return self.transformer(x, cond.context, cond.pooled, timestep, cond.extra["img_ids"], cond.extra["txt_ids"],
                                guidance=cond.extra.get("guidance"),
                                **controlnet_residuals(self.parts.get("controlnet"), x, t, cond))

    def denoiser(self, cond: Conditioning, batch: Batch):
        """One call per step; under true CFG one call over [negative rows, positive rows] and
        diffusers' ``neg + true_cfg_scale * (pos - neg)``."""
        predict = self._graph_safe(self.predict)
        if not batch.guided:
            return lambda x, t: predict(x, t, cond)
        scale = batch.settings["true_cfg_scale"]

        def true_cfg(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            negative, positive = predict(torch.cat([x, x]), t, cond).chunk(2)
            return negative + scale * (positive - negative)

        return true_cfg
