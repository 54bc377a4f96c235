"""`batchgen generate`: render prompts straight to PNG files with the native pipeline (no Ray)."""

from __future__ import annotations

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


def run(args) -> int:
    from PIL import Image

    from .images import encode_image
    from .pipeline import load_pipeline

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} exists and is not a folder")
    seeds = [args.seed + i for i in range(len(args.prompt))]
    init = None
    if args.init_image:
        try:
            init = [Image.open(args.init_image).convert("RGB")] * len(args.prompt)
        except OSError as exc:
            raise ValueError(f"--init-image: cannot read {args.init_image} ({exc})") from None
    started = time.perf_counter()
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
    loaded = time.perf_counter()

    def progress(done: int, total: int) -> None:
        print(f"\rrendered {done}/{total}", end="", file=sys.stderr, flush=True)

    images = pipe.generate(args.prompt, seeds, negative_prompts=args.negative_prompt, sampler=args.sampler,
                           steps=args.steps, guidance_scale=args.guidance_scale, width=args.width,
                           height=args.height, init_images=init, strength=args.strength,
                           micro_batch=args.micro_batch, progress=progress)
    print(file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    for i, (prompt, seed, image) in enumerate(zip(args.prompt, seeds, images)):
        params = {"prompt": prompt, "negative_prompt": args.negative_prompt, "seed": seed, "sampler": args.sampler,
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
