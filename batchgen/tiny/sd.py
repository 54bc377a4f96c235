"""Tiny SD 1.x (epsilon, conv projections) and SD 2.x (v-prediction, linear projections, upcast
attention) checkpoints, and an SD 1.x inpainting checkpoint (``sd1-inpaint``: a 9-channel UNet;
every other weight, and every UNet weight but ``conv_in``, equal to ``sd1``'s of the same seed)."""

from __future__ import annotations

import copy
import json

from .common import FolderWriter, clip_text_config, clip_tokenizer_files


def scheduler_config(variant: str) -> dict:
    common = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "clip_sample": False,
        "trained_betas": None,
        "timestep_spacing": "leading",
    }
    if variant in ("sd1", "sd1-inpaint"):
        return {"_class_name": "PNDMScheduler", **common, "skip_prk_steps": True, "prediction_type": "epsilon"}
    return {"_class_name": "DDIMScheduler", **common, "prediction_type": "v_prediction"}


def build(out: FolderWriter, variant: str) -> None:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..models import UNET_SD1_TINY, UNET_SD2_TINY, VAE_TINY, AutoencoderKL, UNet2DConditionModel

    for name in ("feature_extractor", "safety_checker", "image_encoder"):
        out.entry(name, None, None)
    out.index["requires_safety_checker"] = False
    out.scheduler(scheduler_config(variant))
    tok = clip_tokenizer_files()
    out.tokenizer("tokenizer", "CLIPTokenizer", tok)
    sd1 = variant in ("sd1", "sd1-inpaint")
    te_config = clip_text_config(json.loads(tok["vocab.json"]), act="quick_gelu" if sd1 else "gelu")
    unet_config = copy.deepcopy(UNET_SD1_TINY if sd1 else UNET_SD2_TINY)
    if variant == "sd1-inpaint":
        unet_config["in_channels"] = 9  # latents + mask + masked-image latents
    vae_config = copy.deepcopy(VAE_TINY)
    with torch.device("cpu"):
        out.model("text_encoder", "transformers", "CLIPTextModel", te_config, CLIPTextModel(CLIPTextConfig(**te_config)))
        out.model("unet", "diffusers", "UNet2DConditionModel", unet_config, UNet2DConditionModel(unet_config))
        out.model("vae", "diffusers", "AutoencoderKL", vae_config, AutoencoderKL(vae_config))
    out.finish()
