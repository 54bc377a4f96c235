"""Tiny FLUX.1 checkpoints: ``flux-schnell`` (no guidance input, static shift), ``flux-dev``
(guidance-distilled, dynamic shifting) and ``flux-fill`` (FLUX.1 Fill: dev's, with a transformer
taking latents + masked-image latents + packed mask, 64 + 64 + 256 input channels, 64 out), in the
layouts diffusers' ``FluxPipeline`` / ``FluxFillPipeline`` load. Every tensor but the Fill
transformer's ``x_embedder.weight`` equals ``flux-dev``'s of the same seed.

Components as the published black-forest-labs folders have them, at toy width: the FLUX_TINY_*
transformer, a 16-channel 8x VAE with FLUX's scaling/shift factors, a tiny CLIP-L-style
``CLIPTextModel`` (its pooled output is the transformer's pooled input) and a tiny
``T5EncoderModel`` (its hidden size is the transformer's joint_attention_dim), both with our own
tokenizers; the scheduler configs are the real schnell / dev ones.
"""

from __future__ import annotations

import copy
import json

from .common import FolderWriter, clip_text_config, clip_tokenizer_files, t5_config, t5_tokenizer_files

# The published scheduler/scheduler_config.json of FLUX.1-schnell and FLUX.1-dev.
SCHEDULERS = {
    "flux-schnell": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
                     "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15,
                     "base_image_seq_len": 256, "max_image_seq_len": 4096},
    "flux-dev": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                 "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                 "base_image_seq_len": 256, "max_image_seq_len": 4096},
}
SCHEDULERS["flux-fill"] = SCHEDULERS["flux-dev"]  # FLUX.1-Fill-dev publishes dev's scheduler config


def build(out: FolderWriter, variant: str) -> None:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from ..models.flux import FLUX_TINY_DEV, FLUX_TINY_SCHNELL, FluxTransformer2DModel
    from ..models.vae import FLUX_VAE_CONFIG, VAE_TINY_16CH, AutoencoderKL

    transformer_config = copy.deepcopy(FLUX_TINY_SCHNELL if variant == "flux-schnell" else FLUX_TINY_DEV)
    if variant == "flux-fill":  # FLUX.1-Fill-dev's transformer config: 384 in, 64 out (16 latent channels, 8x VAE)
        transformer_config.update(in_channels=384, out_channels=64)
    vae_config = {**copy.deepcopy(VAE_TINY_16CH), "scaling_factor": FLUX_VAE_CONFIG["scaling_factor"],
                  "shift_factor": FLUX_VAE_CONFIG["shift_factor"]}
    clip_tok = clip_tokenizer_files()
    t5_tok = t5_tokenizer_files()
    clip_config = clip_text_config(json.loads(clip_tok["vocab.json"]),
                                   hidden=transformer_config["pooled_projection_dim"])
    t5_vocab = len(json.loads(t5_tok["tokenizer.json"])["model"]["vocab"])
    t5 = t5_config(t5_vocab, d_model=transformer_config["joint_attention_dim"])

    if variant != "flux-fill":  # FluxPipeline's optional IP-Adapter parts; FluxFillPipeline has none
        for name in ("image_encoder", "feature_extractor"):
            out.entry(name, None, None)
    out.scheduler(copy.deepcopy(SCHEDULERS[variant]))
    out.tokenizer("tokenizer", "CLIPTokenizer", clip_tok)
    out.tokenizer("tokenizer_2", "T5TokenizerFast", t5_tok)
    with torch.device("cpu"):
        out.model("text_encoder", "transformers", "CLIPTextModel", clip_config,
                  CLIPTextModel(CLIPTextConfig(**clip_config)))
        out.model("text_encoder_2", "transformers", "T5EncoderModel", t5, T5EncoderModel(T5Config(**t5)))
        out.model("transformer", "diffusers", "FluxTransformer2DModel", transformer_config,
                  FluxTransformer2DModel(transformer_config))
        out.model("vae", "diffusers", "AutoencoderKL", vae_config, AutoencoderKL(vae_config))
    out.finish()
