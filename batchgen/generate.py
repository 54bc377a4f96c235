"""`batchgen generate`: render prompts straight to PNG files with the native pipeline (no Ray)."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path


def configure(parser) -> None:
    parser.add_argument("--model", default="builtin:tiny", help="diffusers folder, s3:// URI or builtin:tiny (default)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    parser.add_argument("--negative-prompt", default="", help="negative prompt for every image")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i")
    parser.add_argument("--sampler", default="ddim", help="sampler name (see README), default ddim")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--init-image", help="img2img: an image file used for every prompt")
    parser.add_argument("--strength", type=float, default=0.8, help="img2img strength in (0, 1]")
    parser.add_argument("--micro-batch", type=int, default=None, help="items per model call (default: all)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16")
    parser.add_argument("--out", default="out/generate", help="output folder (default out/generate)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the images of an earlier `generate` in --out (else a non-empty --out is refused)")
    parser.add_argument("--max-init-image-pixels", type=int, default=None, metavar="N",
                        help="refuse a larger --init-image (width x height) before decoding it (default 40 Mpx)")


OUR_FILE = re.compile(r"^\d{4}-seed\d+\.png$")


def _check_out(out: Path, overwrite: bool) -> list[Path]:
    """--out must be empty (or missing) unless --overwrite; returns our earlier files to remove.
    Other files are never removed, and with them present --out is refused even with --overwrite."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} exists and is not a folder")
    present = sorted(p for p in out.iterdir()) if out.is_dir() else []
    if not present:
        return []
    ours = [p for p in present if p.is_file() and not p.is_symlink() and OUR_FILE.match(p.name)]
    others = [p for p in present if p not in ours]
    if others:
        raise ValueError(f"--out: {out} holds files `generate` did not write (e.g. {others[0].name}); "
                         "use an empty or new folder")
    if not overwrite:
        raise ValueError(f"--out: {out} already holds {len(ours)} image(s) of an earlier run; pass --overwrite "
                         "to replace them, or use another folder")
    return ours


def progress_bar(total: int, file=None):
    """A ``progress(done, total)`` callback for ``Pipeline.generate`` drawing a tqdm bar on a
    terminal (nothing otherwise); call ``.close()`` on it at the end."""
    from tqdm import tqdm

    file = file or sys.stderr
    try:
        tty = file.isatty()
    except (AttributeError, ValueError):
        tty = False
    bar = tqdm(total=total, unit="img", file=file, disable=not tty, dynamic_ncols=True)

    def progress(done: int, _total: int) -> None:
        bar.update(done - bar.n)

    progress.close = bar.close
    return progress


def run(args) -> int:
    from .images import encode_image
    from .pipeline import load_pipeline
    from .samplernames import canonical_sampler
    from .stages import read_init_image

    out = Path(args.out)
    remove = _check_out(out, args.overwrite)
    sampler = canonical_sampler(args.sampler)
    _check_sampler(sampler)
    seeds = [args.seed + i for i in range(len(args.prompt))]
    init = None
    if args.init_image:
        if not Path(args.init_image).is_file():
            raise ValueError(f"--init-image: no such file {args.init_image}")
        init = [read_init_image(args.init_image, None, args.max_init_image_pixels)] * len(args.prompt)
    started = time.perf_counter()
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
    loaded = time.perf_counter()
    progress = progress_bar(len(args.prompt))
    try:
        images = pipe.generate(args.prompt, seeds, negative_prompts=args.negative_prompt, sampler=sampler,
                               steps=args.steps, guidance_scale=args.guidance_scale, width=args.width,
                               height=args.height, init_images=init, strength=args.strength,
                               micro_batch=args.micro_batch, progress=progress)
    finally:
        progress.close()
    for path in remove:
        path.unlink()
    if remove:
        print(f"--overwrite: removed {len(remove)} earlier image(s) from {out}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    for i, (prompt, seed, image) in enumerate(zip(args.prompt, seeds, images)):
        params = {"prompt": prompt, "negative_prompt": args.negative_prompt, "seed": seed, "sampler": sampler,
                  "steps": args.steps, "guidance_scale": args.guidance_scale, "width": args.width,
                  "height": args.height, "model": args.model, "model_fingerprint": pipe.fingerprint,
                  "batch_size": args.micro_batch or len(args.prompt)}
        if init is not None:
            params.update(init_image=args.init_image, strength=args.strength)
        path = out / f"{i:04d}-seed{seed}.png"
        path.write_bytes(encode_image(image, "png", parameters=params))
        print(path)
    elapsed = time.perf_counter() - loaded
    print(f"{len(images)} image(s) in {elapsed:.1f}s (+{loaded - started:.1f}s load) -> {out}", file=sys.stderr)
    return 0


def _check_sampler(name: str) -> None:
    from .samplernames import unknown_sampler_message
    from .sampling import SAMPLER_NAMES

    if name not in SAMPLER_NAMES:
        raise ValueError(f"--sampler: {unknown_sampler_message(name, SAMPLER_NAMES)}")
