"""One table of per-item settings: the knobs that decide an item's pixels, defined once.

Each :class:`Setting` says its type and range, its job-wide default, whether it may differ per item
(an input column) and whether items with different values can share a model call (``group``:
settings that change tensor shapes or the schedule, such as size, steps or strength, split the work
into homogeneous micro-batches). ``Pipeline.generate`` validates its keyword arguments against this
table; the job spec, the input-row schema, the settings-group key, the manifest columns and the
parameters embedded in each image are derived from it, so a new knob is an entry here plus the
code that uses it.

Two more per-row columns are not settings of ``generate()`` and live in the job code: ``n`` (images
per prompt, :mod:`batchgen.dataset`) and ``loras`` (LoRA set, grouped like a group setting).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Sequence

SEED_LIMIT = 2**63


@dataclass(frozen=True)
class Setting:
    name: str
    type: str  # "str" | "int" | "float"
    default: Any  # job-wide default; None = "the family's default" (or no value)
    doc: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # (lo, hi] instead of [lo, hi]
    multiple_of: int | None = None
    per_item: bool = True  # may differ between items of one call (an input column)
    group: bool = False  # items with different values never share a model call
    families: tuple[str, ...] | None = None  # None: every family
    img2img: bool = False  # only meaningful for img2img items (rows with init_image)
    choices: tuple[str, ...] | None = None  # allowed values of a "str" setting
    spec: bool = True  # the job spec's sampling section has a job-wide default for it
    row: bool = True  # an input column of this name sets it per row

    def check(self, value: Any, where: str) -> Any:
        """``value`` normalized to this setting's type; ValueError naming ``where`` otherwise."""
        if value is None:
            return None
        if self.type == "str":
            if not isinstance(value, str):
                raise ValueError(f"{where}: expected a string, got {type(value).__name__}")
            if self.choices is not None and value not in self.choices:
                raise ValueError(f"{where}: expected one of {', '.join(self.choices)}, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (Integral, Real)):
            raise ValueError(f"{where}: expected {'an integer' if self.type == 'int' else 'a number'}, "
                             f"got {value!r}")
        if self.type == "int":
            if not isinstance(value, Integral):
                if float(value).is_integer():
                    value = int(value)
                else:
                    raise ValueError(f"{where}: expected an integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"{where}: expected a finite number, got {value!r}")
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            raise ValueError(f"{where}: {value!r} is outside {self.range_text()}")
        if self.hi is not None and value > self.hi:
            raise ValueError(f"{where}: {value!r} is outside {self.range_text()}")
        if self.multiple_of and value % self.multiple_of:
            raise ValueError(f"{where}: {value!r} is not a multiple of {self.multiple_of}")
        return value

    def range_text(self) -> str:
        lo = "-inf" if self.lo is None else _num(self.lo)
        hi = "inf" if self.hi is None else _num(self.hi)
        return f"{'(' if self.lo_open else '['}{lo}, {hi}]"


def _num(x: float) -> str:
    if x == SEED_LIMIT - 1:
        return "2**63 - 1"
    return str(int(x)) if float(x).is_integer() else str(x)


SETTINGS: tuple[Setting, ...] = (
    Setting("negative_prompt", "str", "", "negative prompt (\"\" = unconditional)"),
    Setting("seed", "int", None, "noise seed; a row without one gets derive(job seed, item id)",
            lo=0, hi=SEED_LIMIT - 1, spec=False),
    Setting("width", "int", None, "image width in pixels; None = the model's own size (sample_size x VAE factor)",
            lo=8, hi=4096, multiple_of=8, group=True),
    Setting("height", "int", None, "image height in pixels; None = the model's own size", lo=8, hi=4096,
            multiple_of=8, group=True),
    Setting("steps", "int", None, "denoising steps; None = family default (30; FLUX schnell 4)", lo=1, hi=1000,
            group=True),
    Setting("guidance_scale", "float", None,
            "classifier-free guidance (FLUX.1-dev: the distilled guidance value); None = family default",
            lo=0, hi=100, group=True),
    Setting("strength", "float", 0.8, "img2img: how much of the schedule re-noises the init image",
            lo=0, hi=1, lo_open=True, group=True, img2img=True),
    Setting("init_image", "str", None, "img2img: URI of the init image (local path or s3://)", img2img=True,
            spec=False),
    Setting("mask_blur", "int", None, "inpainting: Gaussian blur radius in pixels of the mask as given, applied "
            "before it is resized and binarized (diffusers' mask_processor.blur); None or 0 = none", lo=0, hi=1024,
            img2img=True),
    Setting("padding_mask_crop", "int", None, "inpainting: render only the mask's region grown by this many "
            "pixels (widened to the render's aspect ratio) and paste it back into the init image, whose size the "
            "output then has (diffusers' padding_mask_crop); None = the whole image", lo=0, hi=65536, img2img=True),
    *(Setting(f"outpaint_{side}", "int", None, f"outpainting: pixels added on the {side} of the init image and "
              "painted (generate() makes the mask; see batchgen.outpaint)", lo=0, hi=4096, img2img=True)
      for side in ("left", "top", "right", "bottom")),
    Setting("original_width", "int", None, "SDXL micro-conditioning: original size (default: width)",
            lo=1, hi=65536, families=("sdxl",)),
    Setting("original_height", "int", None, "SDXL micro-conditioning: original size (default: height)",
            lo=1, hi=65536, families=("sdxl",)),
    Setting("crop_top", "int", 0, "SDXL micro-conditioning: crop top coordinate", lo=0, hi=65536,
            families=("sdxl",)),
    Setting("crop_left", "int", 0, "SDXL micro-conditioning: crop left coordinate", lo=0, hi=65536,
            families=("sdxl",)),
    Setting("target_width", "int", None, "SDXL micro-conditioning: target size (default: width)",
            lo=1, hi=65536, families=("sdxl",)),
    Setting("target_height", "int", None, "SDXL micro-conditioning: target size (default: height)",
            lo=1, hi=65536, families=("sdxl",)),
    Setting("aesthetic_score", "float", 6.0, "SDXL refiner: aesthetic score of the prompt", lo=0, hi=10,
            families=("sdxl",)),
    Setting("negative_aesthetic_score", "float", 2.5, "SDXL refiner: aesthetic score of the negative prompt",
            lo=0, hi=10, families=("sdxl",)),
    Setting("max_sequence_length", "int", None, "T5 tokens per prompt (SD3 default 256; FLUX schnell 256, "
            "dev 512); Z-Image: Qwen3 tokens (default 512)", lo=1, hi=512, group=True,
            families=("sd3", "flux", "zimage")),
    Setting("prompt_syntax", "str", "plain", "plain: prompts as diffusers reads them; a1111: (word:1.2) weights, "
            "[word], BREAK and prompts over 75 tokens in 75-token chunks, as the A1111 webui computes them",
            group=True, families=("sd", "sdxl"), choices=("plain", "a1111")),
    Setting("controlnet_conditioning_scale", "float", None, "ControlNet: how strongly the control image steers "
            "(when a ControlNet is loaded: 1, img2img 0.8 as in diffusers; several ControlNets: one value each)",
            lo=0, hi=10),
    Setting("control_guidance_start", "float", None, "ControlNet: fraction of the model calls after which it "
            "starts acting (0 when a ControlNet is loaded)", lo=0, hi=1),
    Setting("control_guidance_end", "float", None, "ControlNet: fraction of the model calls after which it "
            "stops acting (1 when a ControlNet is loaded)", lo=0, hi=1),
    Setting("ip_adapter_scale", "float", None, "IP-Adapter: how strongly the reference image steers (1 when an "
            "IP-Adapter is loaded, as diffusers' set_ip_adapter_scale; 0 = not at all)", lo=0, hi=10),
    Setting("true_cfg_scale", "float", 1.0, "FLUX: true classifier-free guidance with the negative prompt "
            "(1 = off)", lo=1, hi=100, group=True, families=("flux",)),
)
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
SPEC_SETTINGS: tuple[Setting, ...] = tuple(s for s in SETTINGS if s.spec)
ROW_SETTINGS: tuple[Setting, ...] = tuple(s for s in SETTINGS if s.row)
GROUP_SETTINGS: tuple[str, ...] = tuple(s.name for s in SETTINGS if s.group)
# Settings Pipeline.generate() takes as its own named arguments (prompts/seeds aside, in their
# plural forms or as themselves); every other entry of the table goes in its ``**settings``.
GENERATE_ARGUMENTS: tuple[str, ...] = ("negative_prompt", "seed", "width", "height", "steps", "guidance_scale",
                                       "strength", "init_image")


def family_settings(family: str) -> tuple[Setting, ...]:
    """The settings that apply to ``family`` (shared ones and its own)."""
    return tuple(s for s in SETTINGS if s.families is None or family in s.families)


def per_item_values(name: str, value: Any, n: int) -> list:
    """A generate() argument given as one value or one per item -> a validated list of ``n``."""
    setting = BY_NAME[name]
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: expected {n} values (one per prompt) or a single value, got {len(value)}")
        return [setting.check(v, f"{name}[{i}]") for i, v in enumerate(value)]
    one = setting.check(value, name)
    return [one] * n


def one_per_prompt(name: str, values: Any, n: int, what: str = "images") -> list:
    """A generate() argument that must be a list of one entry per prompt (reference images, control
    images ...) -> that list; ValueError naming ``name`` otherwise."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name}: expected a list of {n} images (one per prompt), got {type(values).__name__}")
    if len(values) != n:
        raise ValueError(f"{name}: expected {n} {what} (one per prompt), got {len(values)}")
    return list(values)


def check_family(family: str, given: Sequence[str]) -> None:
    """A setting that another family owns is an error naming the setting and its families."""
    for name in given:
        setting = BY_NAME.get(name)
        if setting is None:
            known = ", ".join(s.name for s in SETTINGS)
            raise ValueError(f"unknown setting {name!r} (known: {known})")
        if setting.families is not None and family not in setting.families:
            raise ValueError(f"setting {name!r} applies to {', '.join(setting.families)} models only; "
                             f"this model is {family}")
