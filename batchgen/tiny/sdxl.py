"""Tiny SDXL base (two CLIP encoders, 6 time ids) and refiner (projection encoder only, aesthetic
score) checkpoints, loadable by diffusers' StableDiffusionXL(Img2Img)Pipeline, and an SDXL
inpainting checkpoint (``sdxl-inpaint``: the base with a 9-channel UNet, as
``StableDiffusionXLInpaintPipeline`` loads it)."""

from __future__ import annotations

import copy
import json

from .common import FolderWriter, clip_text_config, clip_tokenizer_files

SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "clip_sample": False,
    "trained_betas": None,
}


def build(out: FolderWriter, variant: str) -> None:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..models import VAE_TINY, AutoencoderKL, UNet2DConditionModel
    from ..models.unet import UNET_SDXL_REFINER_TINY, UNET_SDXL_TINY

    refiner = variant == "sdxl-refiner"
    for name in ("feature_extractor", "image_encoder"):
        out.entry(name, None, None)
    out.scheduler(dict(SCHEDULER))
    tok = clip_tokenizer_files()
    vocab = json.loads(tok["vocab.json"])
    unet_config = copy.deepcopy(UNET_SDXL_REFINER_TINY if refiner else UNET_SDXL_TINY)
    if variant == "sdxl-inpaint":
        unet_config["in_channels"] = 9  # latents + mask + masked-image latents
    vae_config = {**copy.deepcopy(VAE_TINY), "scaling_factor": 0.13025, "force_upcast": True}
    te2_config = clip_text_config(vocab, act="gelu", cls="CLIPTextModelWithProjection")
    with torch.device("cpu"):
        if refiner:
            out.entry("text_encoder", None, None)
            out.entry("tokenizer", None, None)
        else:
            te_config = clip_text_config(vocab, act="quick_gelu")
            out.tokenizer("tokenizer", "CLIPTokenizer", tok)
            out.model("text_encoder", "transformers", "CLIPTextModel", te_config,
                      CLIPTextModel(CLIPTextConfig(**te_config)))
        out.tokenizer("tokenizer_2", "CLIPTokenizer", tok)
        out.model("text_encoder_2", "transformers", "CLIPTextModelWithProjection", te2_config,
                  CLIPTextModelWithProjection(CLIPTextConfig(**te2_config)))
        out.model("unet", "diffusers", "UNet2DConditionModel", unet_config, UNet2DConditionModel(unet_config))
        out.model("vae", "diffusers", "AutoencoderKL", vae_config, AutoencoderKL(vae_config))
    if refiner:
        out.finish(requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    else:
        out.finish(force_zeros_for_empty_prompt=True)
