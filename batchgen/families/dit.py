"""DiT: class-conditional image generation (ImageNet-style classes), no text encoder.

Equal to diffusers' ``DiTPipeline``:

- a prompt names a class: one of the comma-separated names of the checkpoint's ``id2label``
  (``model_index.json``, where DiTPipeline reads it as an ``__init__`` argument), matched exactly
  after stripping whitespace, or an integer class id written as text (``"207"``). Every prompt is
  checked before any work; an unknown name is an error listing close matches. A checkpoint without
  ``id2label`` takes integer ids ``0 .. num_embeds_ada_norm - 1`` only;
- the image size is fixed: the latent is ``transformer.config.sample_size`` square, so width and
  height must both be ``sample_size * 8``; there is no img2img (DiTPipeline has none);
- classifier-free guidance uses the model's own "null" class (the extra last row of its class
  table) for the unconditional half, not a negative prompt: DiT has no text, so a non-empty
  negative prompt is refused (see ``no_negative_prompt``). As in DiTPipeline the class rows come
  first and the null rows second, guidance is applied to the noise channels only
  (``uncond + scale * (cond - uncond)``), and the learned-variance half of the output
  (``out_channels == 2 * in_channels``) is dropped before the sampler step, which therefore sees the
  guided noise prediction alone. DiTPipeline steps the doubled batch and keeps its first half; both
  halves are the same numbers, so stepping one half is the same result at half the sampler work;
- decoding is ``vae.decode((1 / scaling_factor) * latents)``, diffusers' exact expression.

diffusers hard-codes the null class id as 1000 (ImageNet's class count); here it is the checkpoint's
``num_embeds_ada_norm``, which is 1000 for every published DiT and the row the model was trained
with as "no class" for any other count.

:meth:`DiT.class_labels` maps prompts to ``(class_id, class_name)`` for the manifest and exports.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import CheckpointError
from ..models.dit import class_id
from .base import SCHEDULER, VAE, Batch, Component, Conditioning, Family, Model


class DiT(Family):
    name = "dit"
    pipeline_classes = ("DiTPipeline",)
    components = {
        "transformer": Component(("DiTTransformer2DModel", "Transformer2DModel")),
        "vae": VAE,
        "scheduler": SCHEDULER,
    }
    default_sampler = "ddim"
    default_steps = 50  # DiTPipeline's defaults
    default_guidance = 4.0
    denoiser_name = "transformer"
    no_negative_prompt = ("a DiT model is class-conditional: guidance contrasts the class with the model's null "
                          "class, there is no negative prompt")

    def __init__(self, parts, folder):
        super().__init__(parts, folder)
        self.transformer = parts["transformer"]
        cfg = self.transformer.config
        self.num_classes = int(cfg["num_embeds_ada_norm"])
        self.null_class = self.num_classes
        self.in_channels = int(cfg["in_channels"])
        out = int(cfg["out_channels"])
        if out not in (self.in_channels, 2 * self.in_channels):
            raise CheckpointError(f"{folder.root}/transformer/config.json: out_channels {out} must be in_channels "
                                  f"({self.in_channels}) or twice it (learned sigma)")
        self.learned_sigma = out == 2 * self.in_channels
        if self.latent_channels != self.in_channels:
            raise CheckpointError(f"{folder.root}/vae/config.json: latent_channels {self.latent_channels} differs "
                                  f"from the transformer's in_channels {self.in_channels}")
        self.id2label = self._read_id2label(folder)

    def _read_id2label(self, folder) -> dict[int, str]:
        raw = folder.model_index.get("id2label")
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise CheckpointError(f"{folder.root}/model_index.json: id2label must be an object of "
                                  f"class id -> names, got {type(raw).__name__}")
        table = {}
        for key, value in raw.items():
            try:
                cid = int(key)
            except (TypeError, ValueError):
                raise CheckpointError(f"{folder.root}/model_index.json: id2label key {key!r} is not an integer "
                                      f"class id") from None
            if not isinstance(value, str) or not 0 <= cid < self.num_classes:
                raise CheckpointError(f"{folder.root}/model_index.json: id2label[{key!r}] must be a class name for "
                                      f"an id in [0, {self.num_classes}) (num_embeds_ada_norm), got {value!r}")
            table[cid] = value
        return table

    # --------------------------------------------------------------------------------- classes
    def class_labels(self, prompts: Sequence[str]) -> list[tuple[int, str]]:
        """``(class_id, class_name)`` per prompt; ``class_name`` is the id's full ``id2label`` entry
        (e.g. ``"tench, Tinca tinca"``), or ``str(class_id)`` when the checkpoint has no id2label.
        ValueError naming the prompt (with close matches) for a prompt that is no class."""
        out = []
        for i, prompt in enumerate(prompts):
            cid = self._class_id(prompt, i)
            out.append((cid, self.id2label.get(cid, str(cid)).strip()))
        return out

    def check_prompt(self, prompt: str) -> str | None:
        try:
            self._class_id(prompt, 0)
        except ValueError as exc:
            return str(exc).removeprefix("prompts[0]: ")
        return None

    def item_labels(self, prompts: Sequence[str]) -> dict[str, list]:
        """Manifest columns for the items: their class id and name."""
        labels = self.class_labels(prompts)
        return {"class_id": [c for c, _ in labels], "class_name": [n for _, n in labels]}

    def _class_id(self, prompt: str, index: int) -> int:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompts[{index}]: {prompt!r} is not a class; a DiT prompt is a class name from the "
                             f"checkpoint's id2label or an integer class id")
        if self.id2label:
            try:
                return class_id(prompt, self.id2label)
            except ValueError as exc:
                raise ValueError(f"prompts[{index}]: {exc}") from None
        text = prompt.strip()
        if text.lstrip("+-").isdigit() and 0 <= int(text) < self.num_classes:
            return int(text)
        raise ValueError(f"prompts[{index}]: {prompt!r} is not a class id in [0, {self.num_classes - 1}] (this "
                         f"checkpoint has no id2label in model_index.json, so prompts must be integer class ids)")

    # ---------------------------------------------------------------------------- per request
    def check(self, settings: dict[str, Any], items: dict[str, list], prompts: list[str]) -> None:
        side_w, side_h = self.default_size()
        for key, fixed in (("width", side_w), ("height", side_h)):
            if settings[key] != fixed:
                raise ValueError(f"{key}: {settings[key]} is not this DiT model's fixed size; it renders "
                                 f"{side_w}x{side_h} only (transformer sample_size "
                                 f"{self.transformer.config['sample_size']} x VAE factor {self.vae_scale_factor}); "
                                 f"leave width/height unset or pass {fixed}")
        if settings.get("strength") is not None:
            raise ValueError("init_images: DiT models have no img2img (diffusers' DiTPipeline has none); "
                             "render without init images")
        for i, prompt in enumerate(prompts):
            self._class_id(prompt, i)

    # --------------------------------------------------------------------------- the denoiser
    def encode_prompts(self, batch: Batch) -> Conditioning:
        """Class ids (padding items, whose prompt is "", get the null class); guided: class rows,
        then null rows (DiTPipeline's order)."""
        ids = [self._class_id(p, i) if p else self.null_class for i, p in enumerate(batch.prompts)]
        labels = torch.tensor(ids, dtype=torch.int64, device=self.device)
        if batch.guided:
            labels = torch.cat([labels, torch.full_like(labels, self.null_class)])
        return Conditioning(extra={"class_labels": labels})

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The full transformer output (noise prediction, then the learned variance if any)."""
        return self.transformer(x, t, cond.extra["class_labels"])

    def denoiser(self, cond: Conditioning, batch: Batch) -> Model:
        c = self.in_channels
        if not batch.guided:
            return lambda x, t: self.predict(x, t, cond)[:, :c]
        scale = batch.settings["guidance_scale"]

        def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            eps = self.predict(torch.cat([x, x]), t, cond)[:, :c]
            cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
            return uncond_eps + scale * (cond_eps - uncond_eps)

        return guided

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(1 / self.vae.scaling_factor * latents.to(self.vae_dtype))
