"""SD3 / SD3.5 and FLUX.1 ControlNet checkpoints -> a loaded ``SD3ControlNetModel`` /
``FluxControlNetModel``.

Two layouts: a diffusers folder (``config.json`` with ``_class_name`` SD3ControlNetModel or
FluxControlNetModel + ``diffusion_pytorch_model.safetensors``), and a single ``.safetensors`` file
with diffusers' key names (how these ControlNets are shared), which carries no config. A single
file's config is read off its tensor shapes (layers, widths, the text and pooled widths, SD3.5's
QK-norm and dual-attention layers, FLUX's guidance embedder and union mode count). What shapes
cannot tell is taken from the transformer the ControlNet is loaded for, which it copies by
construction: SD3's ``sample_size`` and head width when the checkpoint has no QK-norm to read it
from, FLUX's ``axes_dims_rope``. One thing neither tells: an SD3 ControlNet's
``force_zeros_for_pooled_projection``; a single file takes diffusers' default (true, the InstantX
ControlNets), a folder states it in its config.

A ControlNet of another family, or one whose widths do not fit the transformer, is refused at
load with an error naming the file.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from ..errors import CheckpointError
from .controlnet import FAMILY_OF_CLASS, ControlNetFile, read_controlnet_weights
from .folder import load_weights_into
from .single_file import _indices, read_header

CLASS_OF_FAMILY = {"sd3": "SD3ControlNetModel", "flux": "FluxControlNetModel"}


def _shape_reader(shapes: Mapping[str, tuple[int, ...]], where: str):
    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"{where}: missing weight key '{key}' (cannot read the ControlNet's layout)")
        return tuple(shapes[key])
    return shape


def sd3_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], transformer_config: dict, where: str) -> dict:
    """An SD3ControlNetModel config for diffusers-named tensors of these shapes."""
    shape = _shape_reader(shapes, where)
    keys = set(shapes)
    layers = _indices(keys, "transformer_blocks")
    proj = shape("pos_embed_input.proj.weight")
    dim = proj[0]
    head_dim = (shape("transformer_blocks.0.attn.norm_q.weight")[0] if "transformer_blocks.0.attn.norm_q.weight" in keys
                else int(transformer_config["attention_head_dim"]))
    table = shape("pos_embed.pos_embed")
    config = {
        "_class_name": "SD3ControlNetModel",
        "sample_size": transformer_config["sample_size"],
        "patch_size": proj[2],
        "in_channels": shape("pos_embed.proj.weight")[1],
        "num_layers": len(layers),
        "attention_head_dim": head_dim,
        "num_attention_heads": dim // head_dim,
        "joint_attention_dim": shape("context_embedder.weight")[1],
        "caption_projection_dim": shape("context_embedder.weight")[0],
        "pooled_projection_dim": shape("time_text_embed.text_embedder.linear_1.weight")[1],
        "out_channels": transformer_config.get("out_channels"),
        "pos_embed_max_size": math.isqrt(table[1]),
        "extra_conditioning_channels": proj[1] - shape("pos_embed.proj.weight")[1],
        "dual_attention_layers": [i for i in layers if f"transformer_blocks.{i}.attn2.to_q.weight" in keys],
        "qk_norm": "rms_norm" if "transformer_blocks.0.attn.norm_q.weight" in keys else None,
    }
    return config


def flux_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], transformer_config: dict, where: str) -> dict:
    """A FluxControlNetModel config for diffusers-named tensors of these shapes."""
    shape = _shape_reader(shapes, where)
    keys = set(shapes)
    x = shape("x_embedder.weight")
    dim = x[0]
    head_dim = shape("transformer_blocks.0.attn.norm_q.weight")[0] if "transformer_blocks.0.attn.norm_q.weight" in keys \
        else shape("single_transformer_blocks.0.attn.norm_q.weight")[0]
    config = {
        "_class_name": "FluxControlNetModel",
        "patch_size": 1,
        "in_channels": x[1],
        "num_layers": len(_indices(keys, "transformer_blocks")),
        "num_single_layers": len(_indices(keys, "single_transformer_blocks")),
        "attention_head_dim": head_dim,
        "num_attention_heads": dim // head_dim,
        "joint_attention_dim": shape("context_embedder.weight")[1],
        "pooled_projection_dim": shape("time_text_embed.text_embedder.linear_1.weight")[1],
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in keys,
        "axes_dims_rope": list(transformer_config["axes_dims_rope"]),
    }
    if "controlnet_mode_embedder.weight" in keys:
        config["num_mode"] = shape("controlnet_mode_embedder.weight")[0]
    if any(k.startswith("input_hint_block.") for k in keys):
        config["conditioning_embedding_channels"] = shape("controlnet_x_embedder.weight")[1]
    return config


def _fits(resolved: dict, transformer: dict, keys: tuple[str, ...], inner: tuple[int, int], family: str,
          where: str) -> None:
    problems = [f"{key} {resolved.get(key)!r} (the model's transformer has {transformer.get(key)!r})"
                for key in keys if resolved.get(key) != transformer.get(key)]
    if inner[0] != inner[1]:
        problems.append(f"width {inner[0]} (num_attention_heads x attention_head_dim; the model's transformer has "
                        f"{inner[1]})")
    if problems:
        raise CheckpointError(f"{where}: this {FAMILY_OF_CLASS[CLASS_OF_FAMILY[family]]} ControlNet does not fit the "
                              f"model: {'; '.join(problems)}; use a ControlNet trained for this base model")


def dit_controlnet_config(source: ControlNetFile, family) -> dict:
    """The resolved config of the ControlNet at ``source`` for ``family`` (an SD3 or FLUX model),
    checked to fit its transformer; no weights are read."""
    from ..models.controlnet_flux import resolve_flux_controlnet_config
    from ..models.controlnet_sd3 import resolve_sd3_controlnet_config

    where = str(source.path)
    wanted = CLASS_OF_FAMILY[family.name]
    if source.model_class != wanted:
        raise CheckpointError(f"{where}: this is a {FAMILY_OF_CLASS[source.model_class]} ControlNet "
                              f"({source.model_class}); the model is {FAMILY_OF_CLASS[wanted]} ({family.name}): use "
                              f"a {wanted} trained for this base model")
    transformer = family.transformer.config
    if source.layout == "diffusers":
        config = source.config
    else:
        shapes = {k: tuple(v[1]) for k, v in read_header(source.path).items()}
        reader = sd3_config_from_shapes if family.name == "sd3" else flux_config_from_shapes
        config = reader(shapes, transformer, where)
    resolve = resolve_sd3_controlnet_config if family.name == "sd3" else resolve_flux_controlnet_config
    try:
        resolved = resolve(config)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    if resolved.get("num_mode") is not None:
        raise CheckpointError(f"{where}: config key 'num_mode': {resolved['num_mode']} (a union ControlNet, which "
                              f"needs a control mode per item) is not supported yet: batchgen has no control_mode "
                              f"setting; use a single-purpose FLUX ControlNet")
    inner = (resolved["num_attention_heads"] * resolved["attention_head_dim"],
             transformer["num_attention_heads"] * transformer["attention_head_dim"])
    if family.name == "sd3":
        keys = ("patch_size", "in_channels", "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim")
    else:
        keys = ("in_channels", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds")
    _fits(resolved, transformer, keys, inner, family.name, where)
    return config


def dit_controlnet_class(family):
    """The ControlNet module class of ``family`` (an SD3 or FLUX model)."""
    from ..models.controlnet_flux import FluxControlNetModel
    from ..models.controlnet_sd3 import SD3ControlNetModel

    return SD3ControlNetModel if family.name == "sd3" else FluxControlNetModel


def load_dit_controlnet(source: ControlNetFile, family, dtype: torch.dtype | None = None):
    """Build and strictly load the ControlNet at ``source`` for ``family``; returns (module, what
    it is for in words, for ``model_info``)."""
    from .components import ModelClass

    where = str(source.path)
    config = dit_controlnet_config(source, family)
    cls = dit_controlnet_class(family)
    module = ModelClass(cls).checked_build(config, where)
    if next(module.buffers(), None) is not None:  # buffers are computed at build: build for real
        module = ModelClass(cls).checked_build(config, where, meta=False)
        module = module if dtype is None else module.to(dtype)
    else:
        module = (module if dtype is None else module.to(dtype)).to_empty(device="cpu")
    state, where = read_controlnet_weights(source)
    load_weights_into(module, state, where)
    return module.eval().requires_grad_(False), FAMILY_OF_CLASS[source.model_class]


__all__ = ["dit_controlnet_class", "dit_controlnet_config", "load_dit_controlnet", "sd3_config_from_shapes", "flux_config_from_shapes"]
