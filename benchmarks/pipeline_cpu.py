"""images/s of batchgen's pipeline vs diffusers on the same tiny checkpoint and settings (CPU, fp32).

    python benchmarks/pipeline_cpu.py [--variant sd1] [--images 16] [--batch 4] [--steps 20] [--size 128]
                                      [--sampler NAME] [--controlnet] [--inpaint concat|blend]

Prints both throughputs and their ratio (batchgen / diffusers), plus the max pixel difference.
Every tiny variant (``make-tiny-model --variant``) with an entry in REFERENCES can be measured:
the entry names the diffusers pipeline class and how to call it. ``--controlnet`` (sd1, sdxl) adds
the variant's tiny ControlNet and one control image per item on both sides (diffusers'
``StableDiffusion(XL)ControlNetPipeline``). ``--inpaint`` (sd1, sdxl) renders with an init image and
a mask per item on both sides (``StableDiffusion(XL)InpaintPipeline``, strength 1.0, guidance
7.5): ``concat`` with the variant's 9-channel inpainting UNet, ``blend`` with the ordinary one.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REF_SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
                  "dpmpp_2m": "DPMSolverMultistepScheduler", "flow_euler": "FlowMatchEulerDiscreteScheduler"}


def _call_text(pipe, prompts, generators, args):
    """A text-to-image diffusers pipeline called with prompts (SD, SDXL, SD3, FLUX)."""
    return pipe(prompts, num_inference_steps=args.steps, width=args.size, height=args.size, generator=generators,
                output_type="np").images


def _call_flux(max_sequence_length):
    """FluxPipeline at batchgen's default T5 length for the variant (diffusers defaults to 512 for both)."""
    def call(pipe, prompts, generators, args):
        return pipe(prompts, num_inference_steps=args.steps, width=args.size, height=args.size, generator=generators,
                    max_sequence_length=max_sequence_length, output_type="np").images

    return call


def _call_dit(pipe, prompts, generators, args):
    """DiTPipeline: class ids (from the same id2label names the batchgen side renders), fixed size."""
    return pipe(pipe.get_label_ids(prompts), num_inference_steps=args.steps, generator=generators,
                output_type="np").images


def _call_control(pipe, prompts, generators, args):
    """A ControlNet pipeline: the batch's control images as PIL images, as a user passes them."""
    return pipe(prompts, image=args.control_images[args.batch_slice], num_inference_steps=args.steps,
                width=args.size, height=args.size, generator=generators, output_type="np").images


def _call_inpaint(pipe, prompts, generators, args):
    """An inpainting pipeline: the batch's init images and masks as PIL images, strength 1.0."""
    return pipe(prompts, image=args.init_images[args.batch_slice], mask_image=args.mask_images[args.batch_slice],
                strength=1.0, guidance_scale=7.5, num_inference_steps=args.steps, width=args.size,
                height=args.size, generator=generators, output_type="np").images


def _text_prompts(n):
    return [f"benchmark prompt number {i}, a detailed painting" for i in range(n)]


def _class_prompts(n):
    names = ["golden retriever", "tabby cat", "macaw", "otter", "volcano", "balloon", "convertible", "goldfish"]
    return [names[i % len(names)] for i in range(n)]


# variant -> (diffusers pipeline class, call(pipe, prompts, generators, args) -> float images, default sampler
#             [, options: {"prompts": n -> prompts, "fixed_size": True when the model renders one size only}])
REFERENCES = {
    "sd1": ("StableDiffusionPipeline", _call_text, "ddim"),
    "sd2": ("StableDiffusionPipeline", _call_text, "ddim"),
    "sdxl": ("StableDiffusionXLPipeline", _call_text, "euler"),
    "sd3": ("StableDiffusion3Pipeline", _call_text, "flow_euler"),
    "sd35": ("StableDiffusion3Pipeline", _call_text, "flow_euler"),
    "dit": ("DiTPipeline", _call_dit, "ddim", {"prompts": _class_prompts, "fixed_size": True}),
    "flux-schnell": ("FluxPipeline", _call_flux(256), "flow_euler"),
    "flux-dev": ("FluxPipeline", _call_flux(512), "flow_euler"),
}

CONTROLNET_PIPELINES = {"sd1": "StableDiffusionControlNetPipeline", "sdxl": "StableDiffusionXLControlNetPipeline"}
INPAINT_PIPELINES = {"sd1": "StableDiffusionInpaintPipeline", "sdxl": "StableDiffusionXLInpaintPipeline"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=None, help="default 128 (DiT: its fixed size)")
    parser.add_argument("--sampler", default=None, choices=sorted(REF_SCHEDULERS),
                        help="default: the variant's own scheduler")
    parser.add_argument("--variant", default="sd1", choices=sorted(REFERENCES))
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is reported")
    parser.add_argument("--controlnet", action="store_true", help="sd1, sdxl: with a tiny ControlNet")
    parser.add_argument("--inpaint", choices=("concat", "blend"), default=None,
                        help="sd1, sdxl: inpaint (init image + mask per item) with the 9-channel inpainting UNet "
                             "(concat) or the ordinary one (blend)")
    args = parser.parse_args()
    if args.controlnet and args.variant not in CONTROLNET_PIPELINES:
        parser.error(f"--controlnet: for {', '.join(CONTROLNET_PIPELINES)} only")
    if args.inpaint and (args.variant not in INPAINT_PIPELINES or args.controlnet):
        parser.error(f"--inpaint: for {', '.join(INPAINT_PIPELINES)} only, without --controlnet")

    import diffusers

    from batchgen import load_pipeline
    from batchgen.tiny import make_tiny_model

    path = Path(tempfile.mkdtemp()) / "tiny"
    make_tiny_model(path, variant=f"{args.variant}-inpaint" if args.inpaint == "concat" else args.variant, seed=0)
    ref_class, call, default_sampler, *extra = REFERENCES[args.variant]
    options = extra[0] if extra else {}
    prompts = options.get("prompts", _text_prompts)(args.images)
    seeds = list(range(args.images))

    args.sampler = args.sampler or default_sampler
    control = {}
    if args.controlnet:
        from PIL import Image

        from batchgen.tiny.controlnet import write_controlnet

        net = write_controlnet(path.parent / "controlnet", args.variant, seed=0)
        ref_class, call = CONTROLNET_PIPELINES[args.variant], _call_control
        control = {"controlnets": [str(net)], "model": diffusers.ControlNetModel.from_pretrained(str(net))}
        edges = np.zeros((args.size or 128, args.size or 128, 3), dtype=np.uint8)
        edges[::8] = 255
        args.control_images = [Image.fromarray(np.roll(edges, i, axis=0)) for i in range(args.images)]
    inpaint = {}
    if args.inpaint:
        from PIL import Image

        ref_class, call = INPAINT_PIPELINES[args.variant], _call_inpaint
        size = args.size or 128
        ramp = np.linspace(0, 255, size, dtype=np.float32)
        photos = [np.stack([np.add.outer(ramp, ramp * (i % 3 + 1)) % 256, np.roll(np.add.outer(ramp, ramp) / 2, i, 0),
                            np.add.outer(ramp[::-1], ramp) / 2], axis=-1).astype(np.uint8) for i in range(args.images)]
        masks = []
        for i in range(args.images):
            m = np.zeros((size, size), np.uint8)
            m[size // 8 + i % 5: size // 2 + i % 7, size // 4: 3 * size // 4] = 255
            masks.append(m)
        args.init_images = [Image.fromarray(p) for p in photos]
        args.mask_images = [Image.fromarray(m) for m in masks]
        inpaint = {"init_images": photos, "mask_images": masks, "strength": 1.0, "guidance_scale": 7.5}
    ours = load_pipeline(path, device="cpu", dtype=torch.float32, controlnets=control.get("controlnets"))
    if options.get("fixed_size"):
        if args.size not in (None, ours.default_size[0]):
            parser.error(f"--size: tiny {args.variant} renders {ours.default_size[0]} px only")
        args.size = ours.default_size[0]
    args.size = args.size or 128
    extra_parts = {"controlnet": control["model"]} if control else {}
    ref = getattr(diffusers, ref_class).from_pretrained(str(path), local_files_only=True, **extra_parts)
    ref.scheduler = getattr(diffusers, REF_SCHEDULERS[args.sampler]).from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)

    def run_ours():
        images = {"control_images": args.control_images} if control else {}
        return ours.generate(prompts, seeds, sampler=args.sampler, steps=args.steps, width=args.size,
                             height=args.size, micro_batch=args.batch, **images, **inpaint)

    def run_ref():
        out = []
        for i in range(0, args.images, args.batch):
            gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + args.batch]]
            args.batch_slice = slice(i, i + args.batch)
            imgs = call(ref, prompts[i:i + args.batch], gens, args)
            out.extend((im * 255).round().astype(np.uint8) for im in imgs)
        return out

    # Warm both up, then alternate them repeat by repeat so a load spike cannot favour one side.
    run_ref()
    run_ours()
    times_ref, times_ours = [], []
    for _ in range(args.repeats):
        for fn, times in ((run_ref, times_ref), (run_ours, times_ours)):
            start = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - start)
            if fn is run_ref:
                imgs_ref = result
            else:
                imgs_ours = result
    rate_ref, rate_ours = args.images / min(times_ref), args.images / min(times_ours)
    diff = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(imgs_ours, imgs_ref))
    print(f"settings: {args.images} images, {args.size}x{args.size}, {args.steps} steps, {args.sampler}, "
          f"micro-batch {args.batch}, tiny {args.variant}{' + ControlNet' if control else ''}"
          f"{f' inpainting ({args.inpaint})' if args.inpaint else ''}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"diffusers: {rate_ref:.2f} images/s")
    print(f"batchgen:  {rate_ours:.2f} images/s")
    print(f"ratio batchgen/diffusers: {rate_ours / rate_ref:.3f}")
    print(f"max pixel difference vs diffusers: {diff} level(s)")


if __name__ == "__main__":
    main()
