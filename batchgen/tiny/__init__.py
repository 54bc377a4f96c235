"""Tiny random-weight checkpoints in the diffusers layout, for tests, the demo and benchmarks.

``make_tiny_model(dir, variant, seed)`` writes a complete diffusers folder (model_index.json, every
component with its config and random weights, tokenizers of our own, the scheduler) for any family:
one builder per family in this package, listed in :data:`VARIANTS`. Weights are drawn from a
generator seeded per tensor from (seed, key), so the files are identical for the same seed on any
machine. The ``builtin:`` models (``builtin:tiny`` is SD 1.x) are listed and built once into the
user cache by :mod:`batchgen.builtin`, which uses this package (never the reverse).
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
from pathlib import Path

from .common import FolderWriter, random_state_dict  # noqa: F401 - re-exported for tests and tools

log = logging.getLogger(__name__)

TINY_FORMAT = 2  # bump when the tiny layout changes, so cached builtins are rebuilt
# variant -> (builder module in this package, diffusers pipeline class)
VARIANTS: dict[str, tuple[str, str]] = {
    "sd1": ("sd", "StableDiffusionPipeline"),
    "sd2": ("sd", "StableDiffusionPipeline"),
    "sd1-inpaint": ("sd", "StableDiffusionInpaintPipeline"),
    "sdxl": ("sdxl", "StableDiffusionXLPipeline"),
    "sdxl-refiner": ("sdxl", "StableDiffusionXLImg2ImgPipeline"),
    "sdxl-inpaint": ("sdxl", "StableDiffusionXLInpaintPipeline"),
    "sd3": ("sd3", "StableDiffusion3Pipeline"),
    "sd35": ("sd3", "StableDiffusion3Pipeline"),
    "sd3-no-t5": ("sd3", "StableDiffusion3Pipeline"),
    "dit": ("dit", "DiTPipeline"),
    "flux-schnell": ("flux", "FluxPipeline"),
    "flux-dev": ("flux", "FluxPipeline"),
    "zimage": ("zimage", "ZImagePipeline"),
    # a ControlNet folder (config.json + weights, no model_index.json) for the tiny sd1 / sdxl UNet
    "sd1-controlnet": ("controlnet", "ControlNetModel"),
    "sdxl-controlnet": ("controlnet", "ControlNetModel"),
    "sd3-controlnet": ("controlnet", "SD3ControlNetModel"),
    "flux-controlnet": ("controlnet", "FluxControlNetModel"),
    "flux-fill": ("flux", "FluxFillPipeline"),
    # an IP-Adapter in the h94 layout (weight file + image_encoder/) for the tiny sd1 / sdxl UNet
    "sd1-ip-adapter": ("ip_adapter", "IPAdapter"),
    "sdxl-ip-adapter": ("ip_adapter", "IPAdapter"),
}
def make_tiny_model(directory: str | os.PathLike, variant: str = "sd1", seed: int = 0) -> Path:
    """Write a tiny random-weight checkpoint of ``variant`` in the diffusers folder layout."""
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {', '.join(VARIANTS)}, got {variant!r}")
    root = Path(directory)
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"directory: {root} exists and is not empty")
    root.mkdir(parents=True, exist_ok=True)
    module, pipeline_class = VARIANTS[variant]
    builder = importlib.import_module(f".{module}", __name__)
    builder.build(FolderWriter(root, pipeline_class, seed, variant), variant)
    return root


def make_tiny_single_file(path: str | os.PathLike, variant: str = "sd1", seed: int = 0, dtype=None) -> Path:
    """Write a tiny checkpoint of ``variant`` as one single-file ``.safetensors`` (original key
    layout; the diffusers configs and tokenizer files embedded in its metadata, since tiny models
    have no standard configs: see :func:`batchgen.checkpoints.write_single_file`)."""
    from ..checkpoints import write_single_file

    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {', '.join(VARIANTS)}, got {variant!r}")
    out = Path(path)
    if out.exists():
        raise ValueError(f"path: {out} exists")
    with tempfile.TemporaryDirectory(prefix="batchgen-tiny-") as tmp:
        folder = make_tiny_model(Path(tmp) / "m", variant=variant, seed=seed)
        if variant.endswith("-controlnet"):
            from .controlnet import write_ldm_single_file

            return write_ldm_single_file(folder, out, dtype=dtype)
        if variant.endswith("-ip-adapter"):  # the weight file itself (its encoder is a folder)
            import shutil

            weights = next(p for p in folder.iterdir() if p.suffix == ".safetensors")
            out.parent.mkdir(parents=True, exist_ok=True)
            return Path(shutil.copyfile(weights, out))
        return write_single_file(folder, out, dtype=dtype)


def configure(parser) -> None:
    parser.add_argument("directory", help="folder to create (must not exist or be empty)")
    parser.add_argument("--variant", choices=list(VARIANTS), default="sd1",
                        help="sd1: epsilon, conv projections; sd2: v-prediction, linear projections; "
                             "the others: the family of that name")
    parser.add_argument("--seed", type=int, default=0, help="weights are deterministic from this seed")
    parser.add_argument("--single-file", action="store_true",
                        help="write one .safetensors in the original (A1111 / ComfyUI) layout instead of a folder: "
                             "DIRECTORY is then the file to write (or a folder to put tiny-VARIANT.safetensors in)")


def run(args) -> int:
    if args.single_file:
        target = Path(args.directory)
        if target.suffix.lower() != ".safetensors":
            target = target / f"tiny-{args.variant}.safetensors"
        path = make_tiny_single_file(target, variant=args.variant, seed=args.seed)
        print(f"wrote tiny {args.variant} single-file checkpoint (seed {args.seed}) to {path}")
        return 0
    path = make_tiny_model(args.directory, variant=args.variant, seed=args.seed)
    print(f"wrote tiny {args.variant} checkpoint (seed {args.seed}) to {path}")
    return 0
