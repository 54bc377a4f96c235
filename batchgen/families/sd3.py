"""Stable Diffusion 3 / 3.5: an MMDiT denoiser, three text encoders, a 16-channel VAE, flow matching.

Equal to diffusers' ``StableDiffusion3Pipeline`` / ``StableDiffusion3Img2ImgPipeline``:

- the prompt runs through CLIP-L and CLIP-G (both ``CLIPTextModelWithProjection``); their
  penultimate hidden states are concatenated along the width, zero-padded to T5's width and put in
  front of T5's sequence (77 + ``max_sequence_length`` tokens); the pooled vector is both CLIPs'
  projections side by side;
- a checkpoint without T5 (``text_encoder_3`` / ``tokenizer_3`` null in ``model_index.json``) gets
  zeros in T5's place, exactly as diffusers does: ``max_sequence_length`` rows of
  ``transformer.config.joint_attention_dim`` zeros, so the sequence keeps its shape and the MMDiT
  sees the same token count with or without T5;
- the denoiser predicts a flow velocity, so only the ``flow_*`` samplers run it (any other name is
  refused by ``get_sampler`` with the sampler and the flow-matching scheduler named); the schedule
  uses the checkpoint's ``shift``, or for a ``use_dynamic_shifting`` config the resolution-dependent
  ``mu`` computed as the SD3 pipeline does, from the number of image patches and the scheduler
  config's ``base/max_image_seq_len`` and ``base/max_shift``. A key missing from the checkpoint's
  JSON takes FlowMatchEulerDiscreteScheduler's default (256, 4096, 0.5, 1.15): diffusers loads the
  scheduler first, which fills them in, so the pipeline's own fallback (``max_shift`` 1.16) is
  only reached when another scheduler class is swapped in with ``from_config`` (which drops the
  keys FlowMatchEuler filled in); batchgen uses the checkpoint's values for every flow sampler;
- classifier-free guidance is diffusers' ``uncond + scale * (cond - uncond)`` with the negative
  prompt (``""`` when none), over a doubled batch, unconditional rows first;
- latents are ``(latent - shift_factor) * scaling_factor`` (the base class applies the shift), and
  img2img cuts the schedule as the SD3 img2img pipeline does (the flow samplers implement it).

SD 3.5 checkpoints (RMS QK-norm, SD3.5-Medium's extra self-attention layers) differ only in the
transformer config, which :mod:`batchgen.models.mmdit` reads.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..control import controlnet_residuals
from ..control_dit import LatentControlBatch
from ..errors import CheckpointError
from ..models.text import ClipEncoder, T5Encoder
from ..sampling import flux_mu
from .base import CLIP_TOKENIZER, SCHEDULER, T5_TOKENIZER, VAE, Batch, Component, Conditioning, Family

DEFAULT_MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline.__call__'s default


class StableDiffusion3(Family):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")
    components = {
        "transformer": Component(("SD3Transformer2DModel",)),
        "vae": VAE,
        "text_encoder": Component(("CLIPTextModelWithProjection",)),
        "tokenizer": CLIP_TOKENIZER,
        "text_encoder_2": Component(("CLIPTextModelWithProjection",)),
        "tokenizer_2": CLIP_TOKENIZER,
        "text_encoder_3": Component(("T5EncoderModel",), required=False),
        "tokenizer_3": Component(T5_TOKENIZER.classes, required=False, kind="tokenizer"),
        "scheduler": SCHEDULER,
    }
    default_sampler = "flow_euler"
    default_steps = 28  # StableDiffusion3Pipeline's defaults
    default_guidance = 7.0
    cuda_dtype = torch.bfloat16  # SD3/3.5 weights are published for bf16; fp16 overflows in T5
    denoiser_name = "transformer"

    def __init__(self, parts, folder):
        super().__init__(parts, folder)
        self.transformer = parts["transformer"]
        self.clip_l = ClipEncoder(parts["tokenizer"], parts["text_encoder"])
        self.clip_g = ClipEncoder(parts["tokenizer_2"], parts["text_encoder_2"])
        has_t5, has_tok = parts.get("text_encoder_3") is not None, parts.get("tokenizer_3") is not None
        if has_t5 != has_tok:
            given, missing = ("text_encoder_3", "tokenizer_3") if has_t5 else ("tokenizer_3", "text_encoder_3")
            raise CheckpointError(f"{folder.root}/model_index.json: component '{given}' is set but '{missing}' is "
                                  f"null; an SD3 checkpoint has both (T5) or neither (no T5: zeros in its place)")
        self.t5 = T5Encoder(parts["tokenizer_3"], parts["text_encoder_3"]) if has_t5 else None
        self._check_widths(folder)

    def _check_widths(self, folder) -> None:
        """The text widths must fit the transformer (diffusers would fail at the first step, or for a
        CLIP wider than T5 silently cut the CLIP features)."""
        cfg = self.transformer.config
        joint, pooled = int(cfg["joint_attention_dim"]), int(cfg["pooled_projection_dim"])
        where = f"{folder.root}/transformer/config.json"
        if self.t5 is not None and self.t5.width != joint:
            raise CheckpointError(f"{folder.root}/text_encoder_3/config.json: d_model {self.t5.width} differs from "
                                  f"joint_attention_dim {joint} in {where}; the T5 states feed the transformer")
        clip = self.clip_l.width + self.clip_g.width
        if clip > joint:
            raise CheckpointError(f"{folder.root}/text_encoder*/config.json: CLIP hidden sizes {self.clip_l.width} + "
                                  f"{self.clip_g.width} exceed joint_attention_dim {joint} in {where} (the CLIP "
                                  f"states are zero-padded to T5's width)")
        projections = [int(e.encoder.config.projection_dim) for e in (self.clip_l, self.clip_g)]
        if sum(projections) != pooled:
            raise CheckpointError(f"{folder.root}/text_encoder*/config.json: CLIP projection_dim {projections[0]} + "
                                  f"{projections[1]} must equal pooled_projection_dim {pooled} in {where}")

    # --------------------------------------------------------------------------------- model
    def variant(self) -> str:
        cfg = self.transformer.config
        return "sd35" if cfg.get("qk_norm") or cfg.get("dual_attention_layers") else "sd3"

    def info(self) -> dict[str, Any]:
        return {**super().info(), "prediction_type": "flow", "t5": self.t5 is not None}

    @property
    def patch_size(self) -> int:
        return int(self.transformer.config["patch_size"])

    # ---------------------------------------------------------------------------- per request
    def resolve(self, group: dict[str, Any]) -> dict[str, Any]:
        group = super().resolve(group)
        if group.get("max_sequence_length") is None:
            group["max_sequence_length"] = DEFAULT_MAX_SEQUENCE_LENGTH
        return group

    def check(self, settings: dict[str, Any], items: dict[str, list], prompts: list[str]) -> None:
        """Sizes must be multiples of vae_scale_factor * patch_size (diffusers' check) and fit the
        transformer's position table."""
        m = self.vae_scale_factor * self.patch_size
        limit = int(self.transformer.config["pos_embed_max_size"]) * m
        for key in ("width", "height"):
            value = settings[key]
            if value % m:
                raise ValueError(f"{key}: {value} is not a multiple of {m} (VAE factor {self.vae_scale_factor} x "
                                 f"patch size {self.patch_size} of this {self.name} model); use {value - value % m} "
                                 f"or {value - value % m + m}")
            if value > limit:
                raise ValueError(f"{key}: {value} is larger than this {self.name} model's position table allows "
                                 f"({limit} px: pos_embed_max_size {limit // m} patches)")

    def schedule(self, settings: dict[str, Any], sampler: str) -> dict[str, Any]:
        """``mu`` for a dynamically shifted scheduler config, from the number of image tokens."""
        if not self.scheduler_config.get("use_dynamic_shifting"):
            return {}
        f, p = self.vae_scale_factor, self.patch_size
        seq_len = (settings["height"] // f // p) * (settings["width"] // f // p)
        return {"mu": flux_mu(seq_len, self.scheduler_config)}  # missing keys: FlowMatchEuler's defaults

    # --------------------------------------------------------------------------- the prompts
    def _embed(self, prompts: list[str], max_length: int, labels=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, 77 + max_length, joint_attention_dim), pooled (B, pooled_projection_dim))."""
        clip_l, pooled_l = self.clip_l(prompts, self.device, hidden="penultimate", pooled="output0", labels=labels)
        clip_g, pooled_g = self.clip_g(prompts, self.device, hidden="penultimate", pooled="output0", labels=labels)
        clip = torch.cat([clip_l, clip_g], dim=-1)
        if self.t5 is None:  # diffusers: zeros of (B, max_sequence_length, joint_attention_dim), CLIP's dtype
            t5 = torch.zeros((len(prompts), max_length, int(self.transformer.config["joint_attention_dim"])),
                             device=self.device, dtype=clip.dtype)
        else:
            t5 = self.t5(prompts, self.device, max_length, labels=labels)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        context = torch.cat([clip, t5.to(clip.dtype)], dim=-2)
        return context.to(self.dtype), torch.cat([pooled_l, pooled_g], dim=-1).to(self.dtype)

    def encode_prompts(self, batch: Batch) -> Conditioning:
        max_length = batch.settings["max_sequence_length"]
        context, pooled = self._embed(batch.prompts, max_length, batch.labels)
        if batch.guided:
            neg_context, neg_pooled = self._embed(batch.negatives, max_length)
            context, pooled = torch.cat([neg_context, context]), torch.cat([neg_pooled, pooled])
        return Conditioning(context=context, pooled=pooled)

    def control_batch(self, req, indices, size, calls, guided, generators, seeds):
        """The ControlNet inputs of one micro-batch: control images as VAE latents (batchgen.control_dit)."""
        return LatentControlBatch.build(req, self, indices, size, calls, guided, generators, seeds)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.transformer(x, cond.context, cond.pooled, t,
                                **controlnet_residuals(self.parts.get("controlnet"), x, t, cond))
