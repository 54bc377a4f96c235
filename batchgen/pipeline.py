"""Prompts + seeds -> uint8 images: text encoding, classifier-free guidance, sampling, VAE decode.

The arithmetic follows diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline step for
step, so the same checkpoint, seed and settings give the same image. Every model call runs at a
fixed micro-batch shape (the last batch is padded), so an item's bytes never depend on its
batch-mates or its position.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from numbers import Real
from typing import Callable, Sequence

import numpy as np
import torch

from .checkpoints import CheckpointFolder, fingerprint, load_component, open_folder, resolve_model_uri
from .errors import CheckpointError
from .noise import check_seeds, item_generators, randn_items

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """None picks cuda + float16 when a GPU is present, else cpu + float32."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None or dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected auto or one of {', '.join(sorted(DTYPES))}, got {dtype!r}")
        dtype = DTYPES[dtype]
    return device, dtype


def _build_and_load(factory: Callable[[], torch.nn.Module], folder: CheckpointFolder, name: str,
                    variant, allow_pickle, convert=None) -> torch.nn.Module:
    """Build a module without materialising random weights (meta device), then load its weights."""
    with torch.device("meta"):
        module = factory()
    if next(module.buffers(), None) is not None:
        module = factory()  # buffers may be computed in __init__ and not saved: build them for real
    else:
        module = module.to_empty(device="cpu")
    load_component(folder, name, module, variant, allow_pickle, convert=convert)
    return module.eval().requires_grad_(False)


@dataclass
class _Request:
    """One validated generate() call; a batch of it renders at ``micro_batch`` items per model call."""

    prompts: list[str]
    negatives: list[str]
    seeds: list[int]
    sampler: str
    steps: int
    guidance_scale: float
    width: int
    height: int
    init_images: list[np.ndarray] | None
    strength: float | None
    options: dict


class Pipeline:
    """A loaded SD 1.x / 2.x checkpoint. Create with :func:`load_pipeline`."""

    def __init__(self, *, unet, vae, prompt_encoder, scheduler_config: dict, device, dtype, model_info: dict):
        self.unet = unet
        self.vae = vae
        self.prompt_encoder = prompt_encoder
        self.scheduler_config = scheduler_config
        self.device = device
        self.dtype = dtype
        self.model_info = model_info
        self.fingerprint = model_info["fingerprint"]
        self.vae_scale_factor = 2 ** (len(vae.config["block_out_channels"]) - 1)
        self.latent_channels = int(unet.config["in_channels"])

    # ----------------------------------------------------------------------------------- public
    def generate(self, prompts, seeds, negative_prompts=None, sampler: str = "ddim", steps: int = 30,
                 guidance_scale: float = 7.5, width: int = 512, height: int = 512, init_images=None,
                 strength: float = 0.8, micro_batch: int | None = None, sampler_options: dict | None = None,
                 progress: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
        """Render ``prompts`` with ``seeds``; returns one HxWx3 uint8 array per prompt.

        ``micro_batch=B`` runs every model call at exactly B items (padding the last batch), so an
        item's bytes do not depend on its batch-mates; None renders all prompts in one batch.
        ``progress(done_items, total_items)`` is called after each micro-batch.
        """
        req = self._validate(prompts, seeds, negative_prompts, sampler, steps, guidance_scale, width, height,
                             init_images, strength, sampler_options)
        total = len(req.prompts)
        size = total if micro_batch is None else micro_batch
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"micro_batch: expected a positive integer or None, got {micro_batch!r}")
        images: list[np.ndarray] = []
        for start in range(0, total, size):
            stop = min(start + size, total)
            images.extend(self._render_batch(req, start, stop, size))
            if progress is not None:
                progress(stop, total)
        return images

    # ------------------------------------------------------------------------------- validation
    def _validate(self, prompts, seeds, negative_prompts, sampler, steps, guidance_scale, width, height,
                  init_images, strength, sampler_options) -> _Request:
        from .sampling import get_sampler

        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise ValueError(f"prompts[{i}]: expected a string, got {type(p).__name__}")
        n = len(prompts)
        if n == 0:
            raise ValueError("prompts: expected at least one prompt")
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            seeds = [seeds]
        seeds = check_seeds(seeds, n)
        if negative_prompts is None:
            negatives = [""] * n
        elif isinstance(negative_prompts, str):
            negatives = [negative_prompts] * n
        else:
            negatives = list(negative_prompts)
            if len(negatives) != n:
                raise ValueError(f"negative_prompts: expected {n} entries (one per prompt), got {len(negatives)}")
            for i, p in enumerate(negatives):
                if not isinstance(p, str):
                    raise ValueError(f"negative_prompts[{i}]: expected a string, got {type(p).__name__}")
        for name, value in (("width", width), ("height", height)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 8 or value % self.vae_scale_factor:
                raise ValueError(f"{name}: expected a positive multiple of {max(8, self.vae_scale_factor)}, got {value!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected an integer >= 1, got {steps!r}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, Real) or not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale: expected a finite number, got {guidance_scale!r}")
        images = None
        if init_images is not None:
            if isinstance(strength, bool) or not isinstance(strength, Real) or not 0 < strength <= 1:
                raise ValueError(f"strength: expected a number in (0, 1], got {strength!r}")
            images = list(init_images)
            if len(images) != n:
                raise ValueError(f"init_images: expected {n} images (one per prompt), got {len(images)}")
            images = [_to_rgb_array(img, width, height, f"init_images[{i}]") for i, img in enumerate(images)]
        options = dict(sampler_options or {})
        # Fail on a bad sampler name, option or step count before any work is done.
        get_sampler(sampler, self.scheduler_config, steps, strength=strength if images else None, options=options)
        return _Request(prompts, negatives, seeds, sampler, steps, float(guidance_scale), width, height, images,
                        float(strength) if images else None, options)

    # -------------------------------------------------------------------------------- rendering
    @torch.inference_mode()
    def _render_batch(self, req: _Request, start: int, stop: int, size: int) -> list[np.ndarray]:
        from .sampling import get_sampler

        real = stop - start
        pad = size - real
        prompts = req.prompts[start:stop] + [""] * pad
        negatives = req.negatives[start:stop] + [""] * pad
        generators = item_generators(req.seeds[start:stop] + [0] * pad)
        sampler = get_sampler(req.sampler, self.scheduler_config, req.steps, strength=req.strength,
                              options=req.options)
        guided = req.guidance_scale > 1.0
        context = self.prompt_encoder(prompts, self.device, self.dtype)
        if guided:
            context = torch.cat([self.prompt_encoder(negatives, self.device, self.dtype), context])
        shape = (self.latent_channels, req.height // self.vae_scale_factor, req.width // self.vae_scale_factor)

        if req.init_images is not None:
            clean = self._encode_images(req.init_images[start:stop], generators[:real], shape)
            if pad:
                clean = torch.cat([clean, clean.new_zeros((pad, *shape))])
            noise = randn_items(generators, shape, self.device, self.dtype)
            latents = sampler.noised_latents(clean, noise)
        else:
            latents = sampler.initial_latents(randn_items(generators, shape, self.device, self.dtype))

        scale = req.guidance_scale

        def model(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if not guided:
                return self.unet(x_in, t, context)
            uncond, cond = self.unet(torch.cat([x_in, x_in]), t, context).chunk(2)
            return uncond + scale * (cond - uncond)

        latents = sampler.sample(model, latents, generators)
        decoded = self.vae.decode(latents / self.vae.scaling_factor)
        return _to_uint8(decoded)[:real]

    def _encode_images(self, images: Sequence[np.ndarray], generators, shape) -> torch.Tensor:
        """VAE-encode init images one at a time (as diffusers does with per-item generators)."""
        latents = []
        for image, gen in zip(images, generators):
            pixels = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
            pixels = (2.0 * pixels - 1.0).to(self.device, self.dtype)
            latents.append(self.vae.encode(pixels).sample([gen]))
        out = self.vae.scaling_factor * torch.cat(latents)
        if tuple(out.shape[1:]) != tuple(shape):
            raise CheckpointError(f"VAE latent shape {tuple(out.shape[1:])} does not match the UNet's {shape}")
        return out


def _to_uint8(decoded: torch.Tensor) -> list[np.ndarray]:
    """VAE output in [-1, 1] -> uint8 HxWx3, rounded exactly as diffusers' image processor does."""
    images = (decoded / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    images = (images * 255).round().astype(np.uint8)
    return [np.ascontiguousarray(img) for img in images]


def _to_rgb_array(image, width: int, height: int, where: str) -> np.ndarray:
    """A PIL image or HxWx3/HxWx4 uint8 array -> HxWx3 uint8 of (height, width) (Lanczos resize)."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"{where}: expected an HxWx3 uint8 array, got shape {image.shape} dtype {image.dtype}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"{where}: expected a PIL image or uint8 array, got {type(image).__name__}")
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def load_pipeline(path, device=None, dtype=None, variant: str | None = None, allow_pickle: bool = False,
                  storage_config=None) -> Pipeline:
    """Load a diffusers-layout checkpoint (local folder, file://, s3://, ``builtin:tiny``)."""
    from .models import AutoencoderKL, UNet2DConditionModel, convert_legacy_vae_keys
    from .models.text import PromptEncoder, build_text_encoder, load_tokenizer

    device, dtype = default_device_dtype(device, dtype)
    local = resolve_model_uri(path, storage_config)
    folder = open_folder(local)
    unet_config = folder.read_json("unet/config.json")
    vae_config = folder.read_json("vae/config.json")
    scheduler_config = folder.read_json("scheduler/scheduler_config.json")
    unet = _build_and_load(lambda: UNet2DConditionModel(unet_config), folder, "unet", variant, allow_pickle)
    vae = _build_and_load(lambda: AutoencoderKL(vae_config), folder, "vae", variant, allow_pickle,
                          convert=convert_legacy_vae_keys)
    text_dir = folder.component_dir("text_encoder")
    text_encoder = build_text_encoder(text_dir / "config.json")
    folder.loaded_files.append(text_dir / "config.json")
    load_component(folder, "text_encoder", text_encoder, variant, allow_pickle)
    text_encoder = text_encoder.eval().requires_grad_(False)
    tokenizer_dir = folder.component_dir("tokenizer")
    tokenizer = load_tokenizer(tokenizer_dir)
    folder.loaded_files.extend(p for p in sorted(tokenizer_dir.iterdir()) if p.is_file())

    unet.to(device=device, dtype=dtype)
    vae.to(device=device, dtype=dtype)
    text_encoder.to(device=device, dtype=dtype)
    info = {
        "uri": str(path),
        "fingerprint": fingerprint(folder.root, folder.loaded_files),
        "architecture": "sd2" if unet_config.get("use_linear_projection", False) else "sd1",
        "prediction_type": scheduler_config.get("prediction_type", "epsilon"),
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
    }
    log.info("loaded %s (%s, fingerprint %s) on %s/%s", path, info["architecture"], info["fingerprint"][:12],
             device, info["dtype"])
    return Pipeline(unet=unet, vae=vae, prompt_encoder=PromptEncoder(tokenizer, text_encoder),
                    scheduler_config=scheduler_config, device=device, dtype=dtype, model_info=info)


__all__ = ["Pipeline", "load_pipeline", "default_device_dtype"]
