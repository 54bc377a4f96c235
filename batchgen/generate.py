"""`batchgen generate`: render prompts straight to PNG files with the native pipeline (no Ray).

Its per-item options come from the settings table (:mod:`batchgen.settings`): one ``--name-like-this``
option per entry, so every family setting ``Pipeline.generate`` takes (SDXL's ``--original-width``,
FLUX's ``--true-cfg-scale`` ...) is an option here too. An option left out takes the model family's
default, exactly as ``Pipeline.generate(..., x=None)`` does, and the parameters embedded in each
PNG are :func:`batchgen.manifest.image_parameters` of the values actually used, as a job embeds them.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

# The CLI gives seed and init_image their own meaning (first seed of the run, a local image file).
CLI_HELP = {
    "seed": "seed of the first image; image i uses seed+i (default 0)",
    "init_image": "img2img: an image file used for every prompt",
}
CLI_DEFAULT = {"seed": 0}
CLI_METAVAR = {"init_image": "FILE", "negative_prompt": "TEXT"}


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _setting_help(setting) -> str:
    """An option's help from its table entry: the doc, its families, its range and default."""
    if setting.name in CLI_HELP:
        return CLI_HELP[setting.name]
    text = setting.doc.replace("None = ", "unset: ")
    if setting.families:
        text += f" ({', '.join(setting.families)} models only)"
    if setting.type != "str" and (setting.lo is not None or setting.hi is not None):
        text += f"; range {setting.range_text()}"
        if setting.multiple_of:
            text += f", a multiple of {setting.multiple_of}"
    if setting.default is not None:
        text += f" (default {setting.default!r})" if setting.type == "str" else f" (default {setting.default})"
    return text.replace("%", "%%")


def configure(parser) -> None:
    from .settings import SETTINGS

    parser.add_argument("--model", default="builtin:tiny", help="diffusers folder, s3:// URI or builtin:tiny (default)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    parser.add_argument("--sampler", default=None,
                        help="sampler name (README: samplers; A1111 names are aliases); default (or auto): the "
                             "model family's (ddim for SD 1.x/2.x and DiT, euler for SDXL, flow_euler for SD3/FLUX)")
    types = {"str": str, "int": int, "float": float}
    for setting in SETTINGS:  # one option per table entry, generated from the table
        parser.add_argument(_option(setting.name), dest=setting.name, type=types[setting.type],
                            default=CLI_DEFAULT.get(setting.name), choices=setting.choices,
                            metavar=None if setting.choices else CLI_METAVAR.get(setting.name, setting.type.upper()),
                            help=_setting_help(setting))
    parser.add_argument("--micro-batch", type=int, default=None, help="items per model call (default: all)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16")
    parser.add_argument("--out", default="out/generate", help="output folder (default out/generate)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the images of an earlier `generate` in --out (else a non-empty --out is refused)")
    parser.add_argument("--endpoint-url", default=None,
                        help="S3-compatible endpoint for an s3:// --model (default: AWS_ENDPOINT_URL)")
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


def family_options(args) -> dict:
    """The family settings given on the command line (``generate()``'s ``**settings``); an option
    left out is not passed, so the pipeline applies the family's default."""
    from .settings import GENERATE_ARGUMENTS, SETTINGS

    return {s.name: getattr(args, s.name) for s in SETTINGS
            if s.name not in GENERATE_ARGUMENTS and getattr(args, s.name, None) is not None}


def run(args) -> int:
    from .images import encode_image
    from .pipeline import load_pipeline
    from .samplernames import canonical_sampler
    from .job.stages import read_init_image

    out = Path(args.out)
    remove = _check_out(out, args.overwrite)
    sampler = None if args.sampler in (None, "auto") else canonical_sampler(args.sampler)
    if sampler is not None:
        _check_sampler(sampler)  # before the model loads
    prompts = list(args.prompt)
    seeds = [args.seed + i for i in range(len(prompts))]
    init = None
    if args.init_image:
        if not Path(args.init_image).is_file():
            raise ValueError(f"--init-image: no such file {args.init_image}")
        init = [read_init_image(args.init_image, None, args.max_init_image_pixels)] * len(prompts)
    started = time.perf_counter()
    from .storage import StorageConfig

    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype,
                         storage_config=StorageConfig(endpoint_url=args.endpoint_url))
    loaded = time.perf_counter()
    kwargs = dict(negative_prompts=args.negative_prompt, sampler=sampler, steps=args.steps,
                  guidance_scale=args.guidance_scale, width=args.width, height=args.height, init_images=init,
                  **({} if args.strength is None else {"strength": args.strength}), **family_options(args))
    # The request as the pipeline resolves it (family defaults filled in; every error it would
    # raise, such as another family's setting, raised here): what the images embed.
    request = pipe.validate(prompts, seeds, **kwargs)
    progress = progress_bar(len(prompts))
    try:
        images = pipe.generate(prompts, seeds, micro_batch=args.micro_batch, progress=progress, **kwargs)
    finally:
        progress.close()
    for path in remove:
        path.unlink()
    if remove:
        print(f"--overwrite: removed {len(remove)} earlier image(s) from {out}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    from .storage import Location

    rows = image_rows(pipe, request, args)
    for i, (seed, image, row) in enumerate(zip(seeds, images, rows)):
        path = out / f"{i:04d}-seed{seed}.png"
        Location.parse(path).write_bytes(encode_image(image, "png", parameters=row))  # never half a file
        print(path)
    elapsed = time.perf_counter() - loaded
    print(f"{len(images)} image(s) in {elapsed:.1f}s (+{loaded - started:.1f}s load) -> {out}", file=sys.stderr)
    return 0


def image_rows(pipe, request, args) -> list[dict]:
    """Each image's embedded parameters: :func:`batchgen.manifest.image_parameters` of a row
    holding what a job's manifest row holds for the same settings: the resolved size, steps,
    guidance and sampler, the family's settings (given, else the table default), the micro-batch,
    the model's fingerprint and family, and the DiT class name."""
    from .manifest import image_parameters
    from .settings import GENERATE_ARGUMENTS, family_settings

    family = pipe.family.name
    given = family_options(args)
    common = {s.name: given.get(s.name, s.default) for s in family_settings(family) if s.name not in GENERATE_ARGUMENTS}
    common.update({k: request.settings[k] for k in ("width", "height", "steps", "guidance_scale")})
    if request.init_images is not None:
        common.update(init_image=args.init_image, strength=request.settings["strength"])
    common.update(sampler=request.sampler, sampler_options=json.dumps(request.options or {}, sort_keys=True),
                  batch_size=args.micro_batch or len(request.prompts), loras="[]",
                  model_fingerprint=pipe.fingerprint, model_family=family)
    labels = pipe.family.item_labels(request.prompts)
    rows = []
    for i, (prompt, negative, seed) in enumerate(zip(request.prompts, request.negatives, request.seeds)):
        row = {**common, "prompt": prompt, "negative_prompt": negative, "seed": seed}
        row.update({name: values[i] for name, values in labels.items()})
        rows.append(image_parameters(row))
    return rows


def _check_sampler(name: str) -> None:
    from .samplernames import unknown_sampler_message
    from .sampling import SAMPLER_NAMES

    if name not in SAMPLER_NAMES:
        raise ValueError(f"--sampler: {unknown_sampler_message(name, SAMPLER_NAMES)}")
