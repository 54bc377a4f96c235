"""Prompts + seeds -> uint8 images, for every model family, written once.

``Pipeline.generate`` validates a request against the settings table, splits it into micro-batches
of a fixed size (padding the last), draws every item's noise from its own CPU generator, and runs
the sampler loop and the VAE decode. What differs between families (text encoders, the denoiser
call, latent packing, VAE precision, schedule arguments) sits behind the family seam
(:mod:`batchgen.families`). The arithmetic follows diffusers' pipelines step for step, so the same
checkpoint, seed and settings give the same image; and since every model call runs at the same
micro-batch shape, an item's bytes never depend on its batch-mates or its position.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .builtin import resolve_model_uri
from .checkpoints import open_source
from .control import CONTROL_SETTINGS, attach_controlnets, check_control
from .families import family_for
from .families.base import Batch, Conditioning, Family, pad_rows
from .inpaint import MASK_SETTINGS
from .ip_adapter import attach_ip_adapter, check_ip_adapter
from .inpaint import start as inpaint_start
from .noise import check_seeds, item_generators, randn_items
from .outpaint import OUTPAINT_SETTINGS
from .settings import BY_NAME, GENERATE_ARGUMENTS, GROUP_SETTINGS, check_family, per_item_values

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_device_dtype(device=None, dtype=None, cuda_dtype: torch.dtype = torch.float16) -> tuple[torch.device, torch.dtype]:
    """None picks cuda (+ ``cuda_dtype``) when a GPU is present, else cpu + float32."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None or dtype == "auto":
        dtype = cuda_dtype if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected auto or one of {', '.join(sorted(DTYPES))}, got {dtype!r}")
        dtype = DTYPES[dtype]
    return device, dtype


@dataclass
class _Request:
    """One validated generate() call."""

    prompts: list[str]
    negatives: list[str]
    seeds: list[int]
    sampler: str
    options: dict
    settings: dict[str, Any]  # group settings: scalars
    items: dict[str, list]  # per-item family settings
    init_images: list[np.ndarray] | None
    labels: list[str] | None
    masks: list[np.ndarray] | None = None  # inpainting: (H, W) float32, 1 = repaint (batchgen.inpaint)
    control: Any = None  # batchgen.control.ControlRequest when ControlNets are loaded
    ip: Any = None  # batchgen.ip_adapter.IPRequest when an IP-Adapter is loaded
    overlays: list | None = None  # padding_mask_crop: per item a batchgen.mask_crop.Overlay or None


class Pipeline:
    """A loaded checkpoint of any family. Create with :func:`load_pipeline`."""

    def __init__(self, family: Family, model_info: dict, storage_config=None):
        self.family = family
        self.device = family.device
        self.dtype = family.dtype
        self.model_info = model_info
        self.model_info.setdefault("loras", [])
        self.fingerprint = model_info["fingerprint"]
        self.storage_config = storage_config
        self._lora_fuser = None

    def __getattr__(self, name: str):
        """Components by name (``pipe.unet``, ``pipe.transformer``, ``pipe.text_encoder_2`` ...)."""
        parts = self.__dict__.get("family").parts if "family" in self.__dict__ else {}
        if name in parts:
            return parts[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or component {name!r}")

    def set_loras(self, loras) -> list[dict]:
        """Make ``loras`` (``[{"uri": ..., "scale": ...}]``; [] or None: none) the fused LoRA set.

        Swaps sets without reloading the base model: only the parameters the old or new set touch
        are restored / re-fused, and an unchanged set is a no-op; no LoRA gives back the base
        weights bit for bit. ``model_info["loras"]`` lists each LoRA's uri, sha256, scale and
        format (``fingerprint`` stays the base model's). See :mod:`batchgen.checkpoints.lora`.
        """
        from .checkpoints.lora import LoraFuser, lora_components

        if loras and self.family.fp8:
            raise ValueError(f"loras: this model stores {', '.join(self.family.fp8)} in float8 (fp8=...); LoRAs are "
                             f"fused into full-precision weights: load it without fp8 to use LoRAs")
        if self._lora_fuser is None:
            if not loras:
                return []
            self._lora_fuser = LoraFuser(lora_components(self.family.parts), self.storage_config)
        self.model_info["loras"] = self._lora_fuser.set(loras)
        return self.model_info["loras"]

    @property
    def scheduler_config(self) -> dict:
        return self.family.scheduler_config

    @property
    def default_size(self) -> tuple[int, int]:
        """(width, height) the model was trained at: sample_size x the VAE factor, as diffusers picks."""
        return self.family.default_size()

    # ----------------------------------------------------------------------------------- public
    def warmup(self, micro_batch: int, **kwargs) -> float:
        """Render one throw-away micro-batch at the given shape (compiles a compiled pipeline for
        it); returns the seconds it took."""
        import time

        start = time.perf_counter()
        kwargs.setdefault("steps", 1)
        nets = len(getattr(self.family.parts.get("controlnet"), "nets", ()))
        if nets and kwargs.get("control_images") is None:  # a gray control image per item and ControlNet
            w, h = kwargs.get("width") or self.default_size[0], kwargs.get("height") or self.default_size[1]
            gray = np.full((h, w, 3), 128, dtype=np.uint8)
            kwargs["control_images"] = [[gray] * nets] * micro_batch
        if "ip_adapter" in self.family.parts and kwargs.get("ip_adapter_images") is None:
            kwargs["ip_adapter_images"] = [np.full((64, 64, 3), 128, dtype=np.uint8)] * micro_batch
        self.generate([""] * micro_batch, list(range(micro_batch)), micro_batch=micro_batch, progress=False,
                      **kwargs)
        return time.perf_counter() - start

    def generate(self, prompts, seeds, negative_prompts=None, sampler: str | None = None, steps: int | None = None,
                 guidance_scale: float | None = None, width: int | None = None, height: int | None = None,
                 init_images=None, strength: float | None = None, micro_batch: int | None = None,
                 sampler_options: dict | None = None,
                 progress: Callable[[int, int], None] | bool | None = None, item_ids=None, mask_images=None,
                 control_images=None, ip_adapter_images=None, **settings) -> list[np.ndarray]:
        """Render ``prompts`` with ``seeds``; returns one HxWx3 uint8 array per prompt.

        None picks the family's default (sampler, steps, guidance, size). ``micro_batch=B`` runs
        every model call at exactly B items (padding the last batch), so an item's bytes do not
        depend on its batch-mates; None renders all prompts in one batch. ``settings`` are the
        family's own knobs from :data:`batchgen.settings.SETTINGS` (e.g. SDXL's
        ``original_width``), each one value or one per prompt. ``progress``: a callable
        ``progress(done_items, total_items)`` called after each micro-batch, True/False for a
        progress bar on stderr (None: a bar when stderr is a terminal). ``item_ids`` name the items
        in warnings.

        ``init_images`` (one per prompt) start img2img at ``strength`` (default 0.8). With
        ``mask_images`` too (one per prompt, white = repaint) the items are inpainted
        (:mod:`batchgen.inpaint`; ``strength`` default 1.0); the ``outpaint_*`` settings instead
        make the masks (:mod:`batchgen.outpaint`). ``padding_mask_crop=P`` renders an item from
        the mask's region grown by P pixels and pastes it back: that item's image has its init
        image's size (:mod:`batchgen.mask_crop`).

        With ControlNets loaded (``load_pipeline(..., controlnets=[...])``), ``control_images`` gives
        one image per prompt (several ControlNets: a list of one per ControlNet), and the settings
        ``controlnet_conditioning_scale``, ``control_guidance_start`` and ``control_guidance_end``
        take one value, one per prompt, and per ControlNet (see :mod:`batchgen.control`).

        With an IP-Adapter loaded (``load_pipeline(..., ip_adapter=...)``), ``ip_adapter_images`` gives
        one reference image per prompt and the setting ``ip_adapter_scale`` one value or one per
        prompt (default 1; 0: the image does not steer that item). See :mod:`batchgen.ip_adapter`.
        """
        req = self.validate(prompts, seeds, negative_prompts, sampler, steps, guidance_scale, width, height,
                            init_images, strength, sampler_options, item_ids, mask_images=mask_images,
                            control_images=control_images, ip_adapter_images=ip_adapter_images, **settings)
        total = len(req.prompts)
        size = total if micro_batch is None else micro_batch
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"micro_batch: expected a positive integer or None, got {micro_batch!r}")
        report, close = _progress(progress, total)
        images: list[np.ndarray | None] = [None] * total
        done = 0
        try:
            for settings, members in self._partitions(req):
                texts = _TextCache(self.family, req, members, size, settings)
                for start in range(0, len(members), size):
                    indices = members[start:start + size]
                    for i, image in zip(indices, self._render_batch(req, indices, size, settings, texts)):
                        images[i] = image if req.overlays is None or req.overlays[i] is None else \
                            req.overlays[i].apply(image)
                    done += len(indices)
                    report(done, total)
        finally:
            close()
        return images

    def _partitions(self, req: _Request) -> list[tuple[dict, list[int]]]:
        """Items that may share micro-batches: all of them, unless the family's prompts vary in
        length (A1111 syntax), in which case one partition per token-chunk count."""
        fam = self.family
        keys = [fam.prompt_chunks(p, n, req.settings) for p, n in zip(req.prompts, req.negatives)]
        if all(k is None for k in keys):
            return [(req.settings, list(range(len(req.prompts))))]
        groups: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        return [({**req.settings, "prompt_chunks": key}, members) for key, members in sorted(groups.items())]

    # ------------------------------------------------------------------------------- validation
    def validate(self, prompts, seeds, negative_prompts=None, sampler=None, steps=None, guidance_scale=None,
                 width=None, height=None, init_images=None, strength=None, sampler_options=None, item_ids=None,
                 mask_images=None, control_images=None, ip_adapter_images=None, **extra) -> _Request:
        """Check a generate() request and resolve it (family defaults filled in) without rendering:
        every error generate() would raise before its first model call is raised here. Works on a
        pipeline built on the meta device (the job's pre-flight)."""
        from .sampling import explicit_steps, get_sampler

        fam = self.family
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
        if fam.no_negative_prompt and any(negatives):
            first = next(i for i, p in enumerate(negatives) if p)
            raise ValueError(f"negative_prompts[{first}]: {fam.no_negative_prompt}; leave negative prompts empty")
        labels = None
        if item_ids is not None:
            labels = [str(i) for i in item_ids]
            if len(labels) != n:
                raise ValueError(f"item_ids: expected {n} ids (one per prompt), got {len(labels)}")

        check_family(fam.name, [k for k, v in extra.items() if v is not None])
        control_settings = {name: extra.pop(name) for name in CONTROL_SETTINGS if name in extra}
        ip_scale = extra.pop("ip_adapter_scale", None)
        for name in extra:
            if name in GENERATE_ARGUMENTS:
                raise ValueError(f"{name}: pass it as generate()'s own argument")
        defaults = fam.defaults()
        default_w, default_h = fam.default_size()
        if steps is None:  # an explicit timestep list (sampler_options.timesteps) sets the step count
            steps = explicit_steps(sampler_options, defaults["steps"])
        named = {"width": default_w if width is None else width, "height": default_h if height is None else height,
                 "steps": defaults["steps"] if steps is None else steps,
                 "guidance_scale": defaults["guidance_scale"] if guidance_scale is None else guidance_scale}
        group = {k: BY_NAME[k].check(v, k) for k, v in named.items()}
        images = masks = overlays = None
        inpaint = {k: extra.pop(k) for k in (*MASK_SETTINGS, *OUTPAINT_SETTINGS) if k in extra}
        inpaint = {k: v for k, v in inpaint.items() if v is not None}
        if mask_images is not None or inpaint:
            images, masks, overlays = self._inpaint_inputs(init_images, mask_images, strength, inpaint, n, group)
        elif init_images is not None:
            group["strength"] = BY_NAME["strength"].check(0.8 if strength is None else strength, "strength")
            images = list(init_images)
            if len(images) != n:
                raise ValueError(f"init_images: expected {n} images (one per prompt), got {len(images)}")
            images = [_to_rgb_array(img, group["width"], group["height"], f"init_images[{i}]")
                      for i, img in enumerate(images)]
        items: dict[str, list] = {}
        for name, value in extra.items():
            setting = BY_NAME[name]
            if setting.group:
                if isinstance(value, (list, tuple)):
                    raise ValueError(f"{name}: one value per call (items with different {name} never share a "
                                     f"model call), got a list")
                group[name] = setting.check(value, name)
            else:
                items[name] = per_item_values(name, value, n)
        group = fam.resolve(group)
        items = fam.resolve_items(items, group, n)
        fam.check(group, items, prompts)
        if masks is None and fam.inpainting_model():
            raise ValueError("mask_images: this is an inpainting model (its denoiser takes a mask and a masked image); "
                             "pass init_images and mask_images (diffusers' inpainting pipelines require them too)")
        control = check_control(fam, control_images, control_settings, n, group["width"], group["height"],
                                img2img=images is not None, inpaint=masks is not None)
        ip = check_ip_adapter(fam, ip_adapter_images, ip_scale, n)
        options = dict(sampler_options or {})
        name = sampler or fam.default_sampler
        # Fail on a bad sampler name, option or step count before any work is done.
        get_sampler(name, fam.scheduler_config, group["steps"], strength=group.get("strength"), options=options,
                    **fam.schedule(group, name))
        return _Request(prompts, negatives, seeds, name, options, group, items, images, labels, masks, control, ip,
                        overlays if overlays and any(o is not None for o in overlays) else None)

    def _inpaint_inputs(self, init_images, mask_images, strength, settings: dict, n: int, group: dict):
        """Inpainting's validation: the model can inpaint, settings per item, masks prepared."""
        from .inpaint import prepare_inpaint_inputs

        fam = self.family
        arg = "mask_images" if mask_images is not None else next(iter(settings))
        if mask_images is None and not set(settings) & set(OUTPAINT_SETTINGS):
            raise ValueError(f"{arg}: applies to inpainting items only; pass mask_images (or outpaint_* settings)")
        if fam.inpaint_kind() is None:
            raise ValueError(f"{arg}: this {fam.name} model cannot inpaint (batchgen inpaints with SD 1.x/2.x and "
                             f"SDXL models, ordinary or 9-channel inpainting UNets, and FLUX.1 Fill); use one of those")
        group["strength"] = BY_NAME["strength"].check(1.0 if strength is None else strength, "strength")
        items = {k: per_item_values(k, v, n) for k, v in settings.items()}
        outpaint = [any(v[i] is not None for k, v in items.items() if k in OUTPAINT_SETTINGS) for i in range(n)]
        if mask_images is None and not all(outpaint):
            raise ValueError(f"{arg}[{outpaint.index(False)}]: no outpaint_* value for this item; items with and "
                             f"without outpainting cannot share a generate() call (render them separately)")
        return prepare_inpaint_inputs(init_images, mask_images, n, group["width"], group["height"], items,
                                      _to_rgb_array)

    # -------------------------------------------------------------------------------- rendering
    @torch.inference_mode()
    def _render_batch(self, req: _Request, indices: list[int], size: int, settings: dict,
                      texts: "_TextCache") -> list[np.ndarray]:
        """Render the items ``indices`` as one model batch of exactly ``size`` (padded)."""
        from .sampling import get_sampler

        fam = self.family
        real = len(indices)
        pad = size - real
        batch = _batch(req, indices, size, settings, fam.guided(settings))
        generators = item_generators([req.seeds[i] for i in indices] + [0] * pad)
        sampler = get_sampler(req.sampler, fam.scheduler_config, settings["steps"], strength=settings.get("strength"),
                              options=req.options, **fam.schedule(settings, req.sampler))
        cond = texts.conditioning(indices)
        if req.control is not None:
            cond = req.control.bind(cond, indices, size, sampler.plan.calls, batch.guided, fam.device, fam.dtype,
                                    generators[:real], [req.seeds[i] for i in indices])
        if req.ip is not None:
            cond = req.ip.bind(cond, fam, indices, size, batch.guided)
        shape = fam.noise_shape(settings["width"], settings["height"])
        model, after_step = fam.denoiser(cond, batch), None
        # Each generator's draw order is diffusers': img2img's VAE posterior sample, then the noise.
        if req.masks is not None:
            start = inpaint_start(fam, sampler, settings, [req.init_images[i] for i in indices],
                                  [req.masks[i] for i in indices], generators, shape)
            latents, model, after_step = start.latents, start.model(model), start.blend
        elif req.init_images is not None:
            clean = pad_rows(fam.encode_images([req.init_images[i] for i in indices], generators[:real]), size)
            noise = randn_items(generators, shape, fam.device, fam.dtype)
            latents = sampler.noised_latents(fam.pack(clean, settings), fam.pack(noise, settings))
        else:
            latents = sampler.initial_latents(fam.pack(randn_items(generators, shape, fam.device, fam.dtype), settings))
        latents = sampler.sample(model, latents, generators, after_step=after_step)
        decoded = fam.decode(fam.unpack(latents, settings))
        return _to_uint8(decoded)[:real]


def _batch(req: _Request, indices: list[int], size: int, settings: dict, guided: bool) -> Batch:
    """The items ``indices`` of a request as a batch of exactly ``size`` (padding: empty prompts,
    the first item's per-item settings)."""
    pad = size - len(indices)

    def take(values: list, fill) -> list:
        return [values[i] for i in indices] + [fill] * pad

    return Batch(
        prompts=take(req.prompts, ""),
        negatives=take(req.negatives, ""),
        settings=settings,
        items={k: take(v, v[indices[0]]) for k, v in req.items.items()},
        labels=None if req.labels is None else take(req.labels, None),
        guided=guided,
    )


class _TextCache:
    """Each distinct prompt of a generate() call is encoded once, however many items share it (many
    seeds or images per prompt).

    Items share an encoding when prompt, negative prompt and per-item settings are equal. The text
    encoders still always run at the micro-batch shape: the distinct prompts are encoded ``size`` at
    a time in order of first use, so a batch that needs new ones also encodes the next ones coming
    (one encoder call serves several micro-batches when prompts repeat; with no repeats the calls
    are exactly those without sharing). At a fixed shape an item's encoding does not depend on
    its batch-mates or position, so sharing changes no byte. An encoding is dropped after the
    last micro-batch that uses it: memory stays within about two micro-batches of encodings.
    """

    def __init__(self, family: Family, req: _Request, members: list[int], size: int, settings: dict):
        self.family, self.req, self.size, self.settings = family, req, size, settings
        self.keys = {i: (req.prompts[i], req.negatives[i], *(v[i] for v in req.items.values())) for i in members}
        self.first: dict[tuple, int] = {}  # key -> its first item, in order of first use
        self.last: dict[tuple, int] = {}  # key -> the micro-batch that uses it last
        for n, i in enumerate(members):
            self.first.setdefault(self.keys[i], i)
            self.last[self.keys[i]] = n // size
        self.order = list(self.first)
        self.next = 0  # order[next:] are not encoded yet
        self.done: dict[tuple, Conditioning] = {}  # key -> the conditioning of that one item
        self.batches = 0

    def conditioning(self, indices: list[int]) -> Conditioning:
        """The conditioning of the micro-batch ``indices``, padded to the micro-batch size."""
        keys = [self.keys[i] for i in indices]
        if any(k not in self.done for k in keys):
            self._encode()
        pieces = [self.done[k] for k in keys]
        pieces += pieces[:1] * (self.size - len(pieces))  # padding rows repeat the first item
        for k in set(keys):
            if self.last[k] == self.batches:
                del self.done[k]
        self.batches += 1
        return Conditioning.join(pieces)

    def _encode(self) -> None:
        """Encode the next ``size`` distinct prompts (order of first use) as one padded batch."""
        keys = self.order[self.next:self.next + self.size]
        self.next += len(keys)
        firsts = [self.first[k] for k in keys]
        batch = _batch(self.req, firsts, self.size, self.settings, self.family.guided(self.settings))
        cond = self.family.encode_prompts(batch)
        self.done.update(zip(keys, cond.items(self.size)))


def _inductor_cache() -> None:
    """Keep inductor's compiled kernels in batchgen's cache on the node's disk, so a restarted actor
    (or the next job) reuses them instead of compiling from scratch."""
    import os

    from .storage import cache_root

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))


def _progress(progress, total: int):
    """(report(done, total), close()) for generate's ``progress`` argument."""
    if callable(progress):
        return progress, lambda: None
    show = progress if isinstance(progress, bool) else sys.stderr.isatty()
    if not show or total <= 1:
        return (lambda done, total: None), lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", desc="generate", file=sys.stderr, leave=False)

    def report(done: int, _total: int) -> None:
        bar.update(done - bar.n)

    return report, bar.close


def _to_uint8(decoded: torch.Tensor) -> list[np.ndarray]:
    """VAE output in [-1, 1] -> uint8 HxWx3, rounded exactly as diffusers' image processor does."""
    images = (decoded / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    images = (images * 255).round().astype(np.uint8)
    return [np.ascontiguousarray(img) for img in images]


def _to_rgb_array(image, width: int, height: int, where: str) -> np.ndarray:
    """A PIL image or HxWx3/HxWx4 uint8 array -> HxWx3 uint8 of (height, width) (Lanczos resize)."""
    from PIL import Image

    from .inpaint import _as_pil_rgb

    image = _as_pil_rgb(image, where)
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


COMPILE_MODES = ("none", "default", "max")


def load_pipeline(path, device=None, dtype=None, variant: str | None = None, allow_pickle: bool = False,
                  storage_config=None, compile: str = "none", loras=None, text_encoder_device=None,
                  fp8=(), *, vae=None, text_encoders=None, tokenizers=None,
                  prediction_type: str | None = None, controlnets=None, ip_adapter=None,
                  ip_adapter_image_encoder=None) -> Pipeline:
    """Load a checkpoint of any known family: a diffusers folder or a single-file checkpoint
    (``.safetensors`` in the A1111 / ComfyUI layout), local, file://, s3:// or ``builtin:``.

    ``compile``: ``none`` (eager), ``default`` (torch.compile of the denoiser and the VAE decoder)
    or ``max`` (plus CUDA graphs on a GPU). Compiling happens on the first render of each shape;
    :meth:`Pipeline.warmup` does it up front. ``loras``: ``[{"uri": ..., "scale": ...}]`` LoRA
    files fused into the weights (see :meth:`Pipeline.set_loras`). ``controlnets``: ControlNet
    folders or single files (local, file://, s3://, builtin:), several for multi-ControlNet; they
    take ``generate(control_images=...)`` (see :mod:`batchgen.control`) and are listed in
    ``model_info["controlnets"]`` with their sha256. ``ip_adapter``: one IP-Adapter weight file (plain
    or Plus, h94 layout; local, file://, s3://, builtin:) for SD 1.x / SDXL, taking
    ``generate(ip_adapter_images=...)``; its CLIP image encoder is ``ip_adapter_image_encoder`` (a
    folder), else found beside the file as diffusers finds it (see :mod:`batchgen.ip_adapter`); both
    are in ``model_info["ip_adapter"]`` with their sha256.

    Component overrides (folders and single files alike; see :mod:`batchgen.checkpoints.sources`):
    ``vae`` a VAE file (LDM or diffusers keys) or folder; ``text_encoders`` ``{"text_encoder_2":
    FILE_OR_FOLDER, ...}`` (or one diffusers folder to take every text encoder from);
    ``tokenizers`` ``{"tokenizer_2": FOLDER, ...}`` (T5 tokenizers of single files must come from
    here). ``prediction_type``: ``epsilon`` / ``v_prediction`` for checkpoints that do not say
    (SD 2.x 768-v, v-prediction SDXL finetunes). Pickle files (``.ckpt``) need ``allow_pickle``.

    Weights are built directly in the run dtype (bf16 on a GPU for FLUX), never in float32 first.
    Memory plans for large models (README, "GPU memory"): ``text_encoder_device="cpu"`` keeps the
    text encoders on the host and runs them there (families that list ``text_encoders``: FLUX);
    ``fp8=("transformer",)`` stores the named components' Linear weights in float8 e4m3 and upcasts
    them at each matmul (half the bytes of bf16).
    """
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile: expected one of {', '.join(COMPILE_MODES)}, got {compile!r}")
    local = resolve_model_uri(path, storage_config)
    source = open_source(local, vae=vae, text_encoders=text_encoders, tokenizers=tokenizers,
                         prediction_type=prediction_type, allow_pickle=allow_pickle, storage_config=storage_config,
                         resolve=lambda uri: resolve_model_uri(uri, storage_config))
    family_cls = family_for(source)
    device, dtype = default_device_dtype(device, dtype, family_cls.cuda_dtype)
    family = family_cls.load(source, variant, allow_pickle, dtype=dtype)
    controls = attach_controlnets(family, controlnets or [], lambda uri: resolve_model_uri(uri, storage_config),
                                  dtype=dtype, allow_pickle=allow_pickle)
    ip_info = attach_ip_adapter(family, ip_adapter, ip_adapter_image_encoder,
                                lambda uri: resolve_model_uri(uri, storage_config), dtype=dtype,
                                allow_pickle=allow_pickle)
    family.quantize_fp8(fp8).to(device, dtype, text_device=text_encoder_device)
    if compile != "none":
        _inductor_cache()
        family.compile(compile)
    info = {
        "uri": str(path),
        "fingerprint": source.fingerprint(),
        **family.info(),
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "compile": compile,
        **source.describe(),
    }
    if controls:
        info["controlnets"] = controls
    if ip_info:
        info["ip_adapter"] = ip_info
    if family.text_device != device:
        info["text_encoder_device"] = str(family.text_device)
    log.info("loaded %s (%s, fingerprint %s) on %s/%s", path, info["variant"], info["fingerprint"][:12],
             device, info["dtype"])
    pipe = Pipeline(family, info, storage_config)
    if loras:
        pipe.set_loras(loras)
    return pipe


__all__ = ["Pipeline", "load_pipeline", "default_device_dtype", "GROUP_SETTINGS"]
