"""The family seam: what differs between model families, behind one small interface.

``Pipeline.generate`` (validation, per-item noise, fixed micro-batch padding, the sampler loop,
decoding) is written once; a :class:`Family` supplies the rest:

- which diffusers pipeline classes it renders (``model_index.json`` ``_class_name``), the
  components it needs and the classes each may have, and how to load them;
- how prompts become a :class:`Conditioning` (one typed object: sequence embeddings, pooled
  vectors, extra ids) and how the denoiser is called with it, guidance included;
- the latent format (channels, VAE scale and shift, 2x2 packing) and the VAE precision policy;
- its default sampler, steps and guidance, and the schedule arguments a sampler needs (FLUX's
  explicit sigmas and resolution-dependent shift).

Every random draw stays in the pipeline (per-item CPU generators); a family only does arithmetic.
Adding a family is a new file in this folder plus a line in ``FAMILIES`` (``__init__.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch

from ..checkpoints import CheckpointFolder
from ..errors import CheckpointError
from ..settings import family_settings

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Conditioning:
    """The prompt side of one micro-batch. Rows are items; when guided, the rows come in two halves
    of one row per item each (diffusers' ``torch.cat([negative, positive])``; DiT: classes, then the
    null class). ``shared`` names the ``extra`` tensors that are not per row (FLUX's position ids)."""

    context: torch.Tensor | None = None  # (rows, tokens, dim) sequence embeddings
    pooled: torch.Tensor | None = None  # (rows, dim) pooled text vectors
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # time ids, text ids, class labels ...
    shared: tuple[str, ...] = ()
    control: Any = None  # the micro-batch's ControlNet inputs (batchgen.control.ControlBatch), set per batch
    ip: Any = None  # the micro-batch's IP-Adapter image keys / values and row scales (batchgen.ip_adapter)

    def _per_row(self) -> dict[str, torch.Tensor]:
        fields = {"context": self.context, "pooled": self.pooled}
        fields.update((f"extra.{k}", v) for k, v in self.extra.items() if k not in self.shared)
        return {k: v for k, v in fields.items() if v is not None}

    def items(self, size: int) -> list["Conditioning"]:
        """Split the conditioning of ``size`` items into one per item (each keeps its row of every
        half); :meth:`join` puts such pieces back together in any order. Copies nothing."""
        rows = self._per_row()
        for name, value in rows.items():
            if value.shape[0] % size:
                raise ValueError(f"conditioning {name}: {value.shape[0]} rows is not a multiple of {size} items")
        halves = {name: value.unflatten(0, (value.shape[0] // size, size)) for name, value in rows.items()}
        return [self._with({name: v[:, i] for name, v in halves.items()}) for i in range(size)]

    @staticmethod
    def join(pieces: Sequence["Conditioning"]) -> "Conditioning":
        """Item pieces from :meth:`items` -> the conditioning of a batch of those items, in order."""
        first = pieces[0]
        rows = {name: torch.stack([p._per_row()[name] for p in pieces], dim=1).flatten(0, 1)
                for name in first._per_row()}
        return first._with(rows)

    def _with(self, rows: dict[str, torch.Tensor]) -> "Conditioning":
        extra = {k: rows.get(f"extra.{k}", v) for k, v in self.extra.items()}
        return Conditioning(rows.get("context"), rows.get("pooled"), extra, self.shared)


@dataclass
class Batch:
    """One padded micro-batch as a family sees it: every per-item value has ``size`` entries (the
    padding items get neutral values); group settings are scalars."""

    prompts: list[str]
    negatives: list[str]
    settings: dict[str, Any]  # group settings (width, height, steps, guidance_scale, strength, ...)
    items: dict[str, list]  # per-item settings (family-specific ones resolved to their defaults)
    labels: list[str] | None  # item ids for messages (None for padding)
    guided: bool

    @property
    def size(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True)
class Component:
    """A component a family reads from a diffusers folder: the classes it accepts."""

    classes: tuple[str, ...]  # empty: any class (schedulers)
    required: bool = True
    kind: str = "model"  # "model" | "tokenizer" | "scheduler"


class Family:
    """A loaded model of one family. Subclasses fill the class attributes and the hooks."""

    name: ClassVar[str]
    pipeline_classes: ClassVar[tuple[str, ...]]
    components: ClassVar[dict[str, Component]]
    default_sampler: ClassVar[str]
    default_steps: ClassVar[int] = 30
    default_guidance: ClassVar[float] = 7.5
    size_multiple: ClassVar[int] = 8  # width/height must be multiples of this
    upcast_vae: ClassVar[bool] = False  # decode/encode fp16 in float32 when the VAE asks (force_upcast)
    cuda_dtype: ClassVar[torch.dtype] = torch.float16  # dtype "auto" on a GPU
    denoiser_name: ClassVar[str] = "unet"  # the component whose config has sample_size
    channels_last: ClassVar[bool] = False  # compile="max" on a GPU stores the denoiser channels-last
    no_negative_prompt: ClassVar[str | None] = None  # why the family takes none (non-empty ones are refused)
    # Memory plans (load_pipeline's text_encoder_device / fp8): the text encoders a family lets live
    # on another device than the denoiser (its encode_prompts moves their outputs), and per
    # component the Linear layers fp8 storage keeps in the run dtype (qualified-name prefixes).
    text_encoders: ClassVar[tuple[str, ...]] = ()
    fp8_keep: ClassVar[dict[str, tuple[str, ...]]] = {}
    inpaints: ClassVar[bool] = False  # UNet inpainting by in_channels (see inpaint_kind)

    def __init__(self, parts: dict[str, Any], folder: CheckpointFolder):
        self.parts = parts
        self.folder = folder
        self.scheduler_config: dict = parts["scheduler"]
        self.vae = parts.get("vae")
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.vae_dtype = torch.float32
        self.text_device = torch.device("cpu")  # where self.text_encoders run (see to())
        self.text_dtype = torch.float32
        self.fp8: tuple[str, ...] = ()  # components whose Linear weights are stored in float8
        self.compiled = "none"

    # ------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, folder: CheckpointFolder, variant: str | None, allow_pickle: bool,
             dtype: torch.dtype | None = None) -> "Family":
        """Load every component this family reads; refuse missing or wrong-class ones by name.

        ``folder`` is a model source (:mod:`batchgen.checkpoints.sources`): a diffusers folder, a
        single file, either with component overrides. It yields components by name.

        ``dtype``: build the weights of every model but the VAE directly in this dtype (a bf16
        checkpoint then never passes through float32: half the host memory); None: float32.
        """
        listed = folder.components()
        parts: dict[str, Any] = {}
        for name, comp in cls.components.items():
            if name not in listed:
                if comp.required:
                    raise CheckpointError(
                        f"{folder.where}: a {cls.name} model needs component '{name}' "
                        f"({' or '.join(comp.classes)}); {folder.missing_hint(name)}")
                parts[name] = None
                continue
            got = listed[name][1]
            if comp.classes and got not in comp.classes:
                raise CheckpointError(
                    f"{folder.where}: component '{name}' has class {got!r}; a {cls.name} "
                    f"model expects {' or '.join(comp.classes)}")
            if comp.kind == "tokenizer":
                parts[name] = folder.load_tokenizer(name)
            elif comp.kind == "scheduler":
                parts[name] = folder.load_scheduler_config(name)
            else:
                parts[name] = folder.load_model(name, variant, allow_pickle, dtype=None if name == "vae" else dtype)
        return cls(parts, folder)

    @classmethod
    def from_parts(cls, parts: dict[str, Any], model_index: dict | None = None, root: str = "<in memory>") -> "Family":
        """A family from components already built in memory (benchmarks with random weights, tools):
        ``parts`` maps component names to modules / tokenizers / the scheduler config dict."""
        from pathlib import Path

        index = {"_class_name": cls.pipeline_classes[0], **(model_index or {})}
        for part in parts.values():
            if isinstance(part, torch.nn.Module):
                part.eval().requires_grad_(False)
        return cls(parts, CheckpointFolder(root=Path(root), model_index=index))

    def to(self, device: torch.device, dtype: torch.dtype, text_device: torch.device | None = None) -> "Family":
        """Move every module to ``device``; weights in ``dtype`` (the VAE per the upcast policy).

        ``text_device``: where the family's :attr:`text_encoders` live and run (None: ``device``);
        on the CPU they keep ``dtype`` unless it is float16 (slow on CPUs: float32 then).
        """
        text_device = device if text_device is None else torch.device(text_device)
        if text_device != device and not self.text_encoders:
            raise ValueError(f"text_encoder_device: {self.name} models keep their text encoders on the model "
                             f"device; pass text_encoder_device=None")
        self.device, self.dtype = device, dtype
        self.text_device = text_device
        self.text_dtype = torch.float32 if text_device.type == "cpu" and dtype == torch.float16 else dtype
        self.vae_dtype = dtype
        if self.upcast_vae and dtype == torch.float16 and self.vae is not None and self.vae.config.get("force_upcast"):
            self.vae_dtype = torch.float32
        for name, part in self.parts.items():
            if isinstance(part, torch.nn.Module):
                if name in self.text_encoders:
                    part.to(device=text_device, dtype=self.text_dtype)
                else:
                    part.to(device=device, dtype=self.vae_dtype if part is self.vae else dtype)
        return self

    def quantize_fp8(self, names) -> "Family":
        """Store the Linear weights of components ``names`` in float8 e4m3 (per-tensor scale), upcast
        to the run dtype at each matmul (:mod:`batchgen.models.fp8`). Call before :meth:`to`, while
        the weights are on the CPU, so the full-precision copy never reaches the GPU."""
        from ..models.fp8 import quantize_linears

        names = (names,) if isinstance(names, str) else tuple(names)
        for name in names:
            part = self.parts.get(name)
            if not isinstance(part, torch.nn.Module) or part is self.vae:
                known = [n for n, p in self.parts.items() if isinstance(p, torch.nn.Module) and p is not self.vae]
                raise ValueError(f"fp8: {name!r} is not a component whose weights can be stored in float8 "
                                 f"(this {self.name} model has: {', '.join(known)})")
            quantize_linears(part, keep=self.fp8_keep.get(name, ()))
        self.fp8 = tuple(dict.fromkeys(self.fp8 + names))
        return self

    def compile(self, mode: str) -> None:
        """torch.compile the denoiser and the VAE decoder in place (state-dict names unchanged).

        ``default``: inductor; ``max``: inductor + CUDA graphs on a GPU (the job's micro-batch
        shape is fixed, which is what graphs need). Compilation happens on the first call per shape.
        """
        options = {"dynamic": False}
        denoiser = self.parts[self.denoiser_name]
        if mode == "max":
            options["mode"] = "reduce-overhead" if self.device.type == "cuda" else "max-autotune-no-cudagraphs"
            if self.device.type == "cuda" and self.channels_last:
                # conv UNets: 5% faster compiled denoiser calls on an H100 (eager: 10% slower, so max only)
                denoiser.to(memory_format=torch.channels_last)
        denoiser.compile(**options)
        for net in getattr(self.parts.get("controlnet"), "nets", ()):
            net.compile(**options)
        if self.vae is not None:
            self.vae.decoder.compile(**options)
        self.compiled = mode

    def info(self) -> dict[str, Any]:
        """What the model is, for job.json and the manifest."""
        info = {"family": self.name, "variant": self.variant(), "pipeline_class": self.folder.pipeline_class,
                "prediction_type": self.scheduler_config.get("prediction_type", "epsilon")}
        if self.fp8:
            info["fp8"] = list(self.fp8)
        if self.inpainting_model():
            info["inpainting_model"] = True
        return info

    def variant(self) -> str:
        return self.name

    # --------------------------------------------------------------------------- per request
    def defaults(self) -> dict[str, Any]:
        """Family defaults of settings whose table default is None."""
        return {"steps": self.default_steps, "guidance_scale": self.default_guidance}

    def default_size(self) -> tuple[int, int]:
        """(width, height) by default: the denoiser's sample_size in pixels, as diffusers picks it."""
        side = int(self.parts[self.denoiser_name].config["sample_size"]) * self.vae_scale_factor
        return side, side

    def resolve(self, group: dict[str, Any]) -> dict[str, Any]:
        """Fill the family's group settings that were not given (table default, else family default)."""
        for setting in family_settings(self.name):
            if setting.group and not setting.img2img and setting.name not in group:
                group[setting.name] = setting.default
        return group

    def resolve_items(self, items: dict[str, list], group: dict[str, Any], n: int) -> dict[str, list]:
        """Fill the family's per-item settings that were not given with their table defaults."""
        for setting in family_settings(self.name):
            if setting.per_item and not setting.group and setting.families and setting.name not in items:
                items[setting.name] = [setting.default] * n
        return items

    def check(self, settings: dict[str, Any], items: dict[str, list], prompts: list[str]) -> None:
        """Family-specific validation of a request (sizes, settings, prompts); ValueError naming it."""
        m = max(self.size_multiple, self.vae_scale_factor)
        for key in ("width", "height"):
            if settings[key] % m:
                raise ValueError(f"{key}: {settings[key]} is not a multiple of {m} (required by this {self.name} model)")

    def check_prompt(self, prompt: str) -> str | None:
        """Why this model cannot render ``prompt`` (e.g. DiT: not a class name), or None. The job's
        pre-flight runs it over every input row."""
        return None

    def item_labels(self, prompts: Sequence[str]) -> dict[str, list]:
        """Extra manifest columns this family knows about its items (DiT: class_id, class_name)."""
        return {}

    def guided(self, settings: dict[str, Any]) -> bool:
        """Whether a batch runs classifier-free guidance (doubles the model batch)."""
        return settings["guidance_scale"] > 1.0

    def prompt_chunks(self, prompt: str, negative: str, settings: dict[str, Any]) -> int | None:
        """For families whose prompt length varies (A1111 syntax): the item's token-chunk count.
        Items with different counts never share a micro-batch (their embeddings differ in length),
        so an item's bytes do not depend on its batch-mates. None: fixed length."""
        return None

    def schedule(self, settings: dict[str, Any], sampler: str) -> dict[str, Any]:
        """Extra ``get_sampler`` arguments (``sigmas``, ``mu``) for this request and sampler name."""
        return {}

    # ---------------------------------------------------------------------------- the latents
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config["latent_channels"])

    def noise_shape(self, width: int, height: int) -> tuple[int, ...]:
        """The per-item latent shape diffusers draws its initial noise in."""
        f = self.vae_scale_factor
        return (self.latent_channels, height // f, width // f)

    def pack(self, latents: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
        """Latents (B, C, h, w) -> the layout the sampler and denoiser work in (identity by default)."""
        return latents

    def unpack(self, latents: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
        return latents

    def encode_images(self, images: Sequence[np.ndarray], generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Init images -> clean latents in model space, one item at a time (each item's posterior
        sample from its own generator, as diffusers does with a generator list)."""
        return self.encode_pixels([image_pixels(image) for image in images], generators)

    def encode_pixels(self, pixels: Sequence[torch.Tensor], generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Images in [-1, 1] (each (1, 3, H, W), see :func:`image_pixels`) -> latents in model space."""
        latents = []
        for item, gen in zip(pixels, generators):
            latents.append(self.vae.encode(item.to(self.device, self.vae_dtype)).sample([gen]))
        return self._model_space(torch.cat(latents))

    def encode_pixel_batch(self, pixels: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """A batch of images in [-1, 1] (B, 3, H, W) -> latents in model space in one VAE call (each
        row's posterior sample from its own generator): FluxFillPipeline encodes its masked images so."""
        return self._model_space(self.vae.encode(pixels.to(self.device, self.vae_dtype)).sample(generators))

    def _model_space(self, latents: torch.Tensor) -> torch.Tensor:
        out = latents.to(self.dtype)
        shift = self.vae.shift_factor
        return (out - shift) * self.vae.scaling_factor if shift else self.vae.scaling_factor * out

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> images in [-1, 1] (B, 3, H, W)."""
        z = latents.to(self.vae_dtype) / self.vae.scaling_factor
        if self.vae.shift_factor:
            z = z + self.vae.shift_factor
        return self.vae.decode(z)

    # ---------------------------------------------------------------------------- inpainting
    def inpaint_kind(self) -> str | None:
        """How this model inpaints (:mod:`batchgen.inpaint`): "concat" (an inpainting model: the
        denoiser takes latents + mask + masked-image latents), "fill" (the same, prepared as
        FluxFillPipeline does), "blend" (an ordinary model: the kept region is blended back after
        each step), None: not at all (yet). UNet families (``inpaints``): 4 input channels blend,
        2 x 4 + 1 concat."""
        if not self.inpaints:
            return None
        channels, latent = int(self.parts[self.denoiser_name].config["in_channels"]), self.latent_channels
        return {latent: "blend", 2 * latent + 1: "concat"}.get(channels)

    def inpainting_model(self) -> bool:
        """An inpainting model: its denoiser takes a mask and a masked image, so every item needs them."""
        return self.inpaint_kind() in ("concat", "fill")

    def latent_mask(self, mask: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
        """Pixel masks (B, 1, H, W) -> latent resolution (nearest, as diffusers), model device and dtype."""
        f = self.vae_scale_factor
        small = torch.nn.functional.interpolate(mask, size=(settings["height"] // f, settings["width"] // f))
        return small.to(self.device, self.dtype)

    def inpaint_condition(self, mask: torch.Tensor, masked_latents: torch.Tensor,
                          settings: dict[str, Any]) -> torch.Tensor:
        """What a "concat" model gets beside the latents: the latent mask and the masked image's latents."""
        return torch.cat([self.latent_mask(mask, settings), masked_latents], dim=1)

    def with_inpaint_condition(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """The denoiser input of a "concat" model: the (scaled) latents, then the condition."""
        return torch.cat([x, condition], dim=1)

    # --------------------------------------------------------------------------- the denoiser
    def encode_prompts(self, batch: Batch) -> Conditioning:
        raise NotImplementedError

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The raw network output for model input ``x`` at timestep ``t`` (0-dim float32)."""
        raise NotImplementedError

    def denoiser(self, cond: Conditioning, batch: Batch) -> Model:
        """``model(x, t)`` for the sampler: the prediction, with classifier-free guidance when the
        batch is guided (diffusers' ``uncond + scale * (cond - uncond)``)."""
        scale = batch.settings["guidance_scale"]
        predict = self._graph_safe(self.predict)
        if not batch.guided:
            return lambda x, t: predict(x, t, cond)

        def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            uncond, conditional = predict(torch.cat([x, x]), t, cond).chunk(2)
            return uncond + scale * (conditional - uncond)

        return guided

    def _graph_safe(self, predict):
        """Under CUDA graphs a replay overwrites the previous output, which multistep samplers still
        hold: mark each step and hand out a copy."""
        if not (self.compiled == "max" and self.device.type == "cuda"):
            return predict

        def wrapped(x, t, cond):
            torch.compiler.cudagraph_mark_step_begin()
            return predict(x, t, cond).clone()

        return wrapped


def image_pixels(image: np.ndarray) -> torch.Tensor:
    """An HxWx3 uint8 image -> (1, 3, H, W) float32 in [-1, 1] on the CPU, as a strided view of the
    (1, H, W, 3) array: the memory layout diffusers' image processor hands the VAE (CPU convolutions
    round differently for other layouts)."""
    pixels = torch.from_numpy((image.astype(np.float32) / 255.0)[None].transpose(0, 3, 1, 2))
    return 2.0 * pixels - 1.0


def pad_rows(latents: torch.Tensor, size: int) -> torch.Tensor:
    """``latents`` padded with zero rows to ``size`` rows, in the real rows' memory layout: the VAE
    encoder hands back channels-last latents, and a batch whose padding were laid out otherwise
    would go through the convolutions in another layout (other rounding) than a full one, so an
    item's bytes would depend on whether its micro-batch was padded."""
    pad = size - latents.shape[0]
    if pad <= 0:
        return latents
    zeros = latents.new_zeros((pad, *latents.shape[1:]))
    if latents.dim() == 4 and not latents.is_contiguous() and latents.is_contiguous(memory_format=torch.channels_last):
        zeros = zeros.contiguous(memory_format=torch.channels_last)
    return torch.cat([latents, zeros])


SCHEDULER = Component((), kind="scheduler")
CLIP_TOKENIZER = Component(("CLIPTokenizer", "CLIPTokenizerFast"), kind="tokenizer")
T5_TOKENIZER = Component(("T5TokenizerFast", "T5Tokenizer"), kind="tokenizer")
VAE = Component(("AutoencoderKL",))
