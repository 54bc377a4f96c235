"""Side-by-side GPU benchmark: batchgen eager / compiled vs diffusers eager / compiled, one GPU, one run.

    python benchmarks/gpu.py [--models sd15,sdxl,sd35m,flux-schnell] [--batch 8] [--batches 3]
                             [--variants batchgen-eager,batchgen-max,diffusers-eager,diffusers-max,batchgen-eager-det]
                             [--dtype bfloat16] [--job] [--out results.json]
    python benchmarks/gpu.py --cpu        # the same comparison, small shapes on the CPU

Every model is built with its real architecture (SD 1.5, SDXL base, SD3.5-Medium, FLUX.1-schnell)
and random weights, directly on the device: nothing is downloaded. diffusers' modules are built on
the meta device and take the very same weight tensors (``load_state_dict(assign=True)``), so both
sides compute with identical weights and memory holds one copy. Tokenizers are batchgen's tiny
ones (the token count per prompt, 77 / 256, is what costs, not the vocabulary).

Per variant it reports images/s, seconds per denoising step, peak GPU memory, the max pixel
difference to batchgen-eager, and the denoiser's model FLOP utilisation: FLOPs of one denoiser call
(``torch.utils.flop_counter``) x calls, over the time of the denoiser calls alone (batchgen
variants) and over the whole render (every variant), against the GPU's dense bf16 peak.
``--job`` also runs a real `batchgen run` job (Ray actor, encode, store) on an SD 1.5-shaped
checkpoint saved to disk and compares its steady images/s with the bare pipeline loop.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0}


# --------------------------------------------------------------------------- building blocks
def _tokenizers(tmp: Path):
    """Our tiny CLIP and T5 tokenizers, loaded from files written into ``tmp``."""
    from batchgen.models.text import load_tokenizer
    from batchgen.tiny.common import clip_tokenizer_files, t5_tokenizer_files

    out = {}
    for name, files, cls in (("clip", clip_tokenizer_files(), "CLIPTokenizer"), ("t5", t5_tokenizer_files(), "T5TokenizerFast")):
        folder = tmp / name
        folder.mkdir(parents=True, exist_ok=True)
        for fname, text in files.items():
            (folder / fname).write_text(text, encoding="utf-8")
        out[name] = load_tokenizer(folder, cls)
    return out


def _clip(cls_name: str, hidden: int, layers: int, heads: int, act: str, projection: int | None = None):
    """A CLIP text encoder of the given shape (CLIP-L: 768/12/12, CLIP-G: 1280/32/20)."""
    import transformers

    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden,
                                         num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                                         hidden_act=act, projection_dim=projection or hidden, bos_token_id=49406,
                                         eos_token_id=49407, pad_token_id=49407)
    return getattr(transformers, cls_name)(config).eval().requires_grad_(False)


def _t5(d_model: int, layers: int, heads: int, d_ff: int, d_kv: int = 64):
    import transformers

    config = transformers.T5Config(vocab_size=32128, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers,
                                   num_heads=heads, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                   use_cache=False, dropout_rate=0.0)
    return transformers.T5EncoderModel(config).eval().requires_grad_(False)


class _building:
    """Build modules straight on ``device`` in ``dtype`` (a 12B transformer never exists in fp32)."""

    def __init__(self, device, dtype):
        self.device, self.dtype = torch.device(device), dtype

    def __enter__(self):
        self.saved = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        self.ctx = torch.device(self.device)
        self.ctx.__enter__()

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)
        torch.set_default_dtype(self.saved)


def _twin(ours: torch.nn.Module, diffusers_cls_name: str, config: dict) -> torch.nn.Module:
    """diffusers' module of the same config, sharing ``ours``'s weight tensors."""
    import diffusers

    cls = getattr(diffusers, diffusers_cls_name)
    public = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        twin = cls.from_config(public)
    twin.load_state_dict(ours.state_dict(), strict=True, assign=True)
    return twin.eval().requires_grad_(False)


@dataclass
class Model:
    """One benchmark model: how to build it and how diffusers is called."""

    family: str  # "module:Class" under batchgen.families
    diffusers_pipeline: str
    build: Callable[[bool, dict], tuple[dict, dict, dict]]  # (small, tokenizers) -> (ours, theirs, model_index)
    size: int
    steps: int
    guidance: float
    sampler: str
    small_size: int = 64
    call_kwargs: dict | None = None
    batch: int = 8  # images per micro-batch on a GPU (--batch overrides)


def _sd15(small: bool, tok: dict):
    from batchgen.models import AutoencoderKL, UNet2DConditionModel, tiny_config
    from batchgen.tiny.sd import scheduler_config

    unet_cfg = tiny_config("unet-sd1") if small else {
        "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "cross_attention_dim": 768,
        "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "norm_num_groups": 32,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
    vae_cfg = tiny_config("vae") if small else _vae4(0.18215)
    unet, vae = UNet2DConditionModel(unet_cfg).eval(), AutoencoderKL(vae_cfg).eval()
    te = _clip("CLIPTextModel", 32, 2, 4, "quick_gelu") if small else _clip("CLIPTextModel", 768, 12, 12, "quick_gelu")
    sched = {**scheduler_config("sd1"), "_class_name": "EulerDiscreteScheduler"}
    ours = {"unet": unet, "vae": vae, "text_encoder": te, "tokenizer": tok["clip"], "scheduler": sched}
    theirs = {"unet": _twin(unet, "UNet2DConditionModel", unet_cfg), "vae": _twin(vae, "AutoencoderKL", vae_cfg),
              "text_encoder": te, "tokenizer": tok["clip"], "safety_checker": None, "feature_extractor": None,
              "requires_safety_checker": False}
    return ours, theirs, {}


def _vae4(scale: float) -> dict:
    from batchgen.models.vae import SDXL_VAE_CONFIG

    return {**SDXL_VAE_CONFIG, "scaling_factor": scale}


def _sdxl(small: bool, tok: dict):
    from batchgen.models import AutoencoderKL, UNet2DConditionModel, tiny_config
    from batchgen.models.unet import SDXL_BASE_UNET_CONFIG, UNET_SDXL_TINY
    from batchgen.models.vae import SDXL_VAE_CONFIG
    from batchgen.tiny.sdxl import SCHEDULER

    unet_cfg = dict(UNET_SDXL_TINY if small else SDXL_BASE_UNET_CONFIG)
    vae_cfg = {**tiny_config("vae"), "scaling_factor": 0.13025} if small else dict(SDXL_VAE_CONFIG)
    unet, vae = UNet2DConditionModel(unet_cfg).eval(), AutoencoderKL(vae_cfg).eval()
    if small:
        te, te2 = _clip("CLIPTextModel", 32, 2, 4, "quick_gelu"), _clip("CLIPTextModelWithProjection", 32, 2, 4, "gelu")
    else:
        te = _clip("CLIPTextModel", 768, 12, 12, "quick_gelu")
        te2 = _clip("CLIPTextModelWithProjection", 1280, 32, 20, "gelu", 1280)
    ours = {"unet": unet, "vae": vae, "text_encoder": te, "tokenizer": tok["clip"], "text_encoder_2": te2,
            "tokenizer_2": tok["clip"], "scheduler": dict(SCHEDULER)}
    theirs = {"unet": _twin(unet, "UNet2DConditionModel", unet_cfg), "vae": _twin(vae, "AutoencoderKL", vae_cfg),
              "text_encoder": te, "tokenizer": tok["clip"], "text_encoder_2": te2, "tokenizer_2": tok["clip"]}
    return ours, theirs, {"force_zeros_for_empty_prompt": True}


def _sd35m(small: bool, tok: dict):
    from batchgen.models import AutoencoderKL
    from batchgen.models.mmdit import MMDIT_TINY_SD35, SD35_MEDIUM, SD3Transformer2DModel
    from batchgen.models.vae import SD3_VAE_CONFIG, VAE_TINY_16CH
    from batchgen.tiny.sd3 import scheduler_config

    cfg = dict(MMDIT_TINY_SD35 if small else SD35_MEDIUM)
    vae_cfg = dict(VAE_TINY_16CH if small else SD3_VAE_CONFIG)
    transformer, vae = SD3Transformer2DModel(cfg).eval(), AutoencoderKL(vae_cfg).eval()
    if small:
        te = _clip("CLIPTextModelWithProjection", 8, 2, 2, "quick_gelu", 32)
        te2 = _clip("CLIPTextModelWithProjection", 16, 2, 2, "gelu", 32)
        te3 = _t5(cfg["joint_attention_dim"], 2, 4, 64, 8)
    else:
        te = _clip("CLIPTextModelWithProjection", 768, 12, 12, "quick_gelu", 768)
        te2 = _clip("CLIPTextModelWithProjection", 1280, 32, 20, "gelu", 1280)
        te3 = _t5(4096, 24, 64, 10240)
    ours = {"transformer": transformer, "vae": vae, "text_encoder": te, "tokenizer": tok["clip"], "text_encoder_2": te2,
            "tokenizer_2": tok["clip"], "text_encoder_3": te3, "tokenizer_3": tok["t5"],
            "scheduler": scheduler_config("sd35")}
    theirs = {"transformer": _twin(transformer, "SD3Transformer2DModel", cfg), "vae": _twin(vae, "AutoencoderKL", vae_cfg),
              **{k: v for k, v in ours.items() if k.startswith(("text_encoder", "tokenizer"))}}
    return ours, theirs, {}


def _flux(small: bool, tok: dict, dev: bool = False):
    from batchgen.models import AutoencoderKL
    from batchgen.models.flux import FLUX_1_DEV, FLUX_1_SCHNELL, FLUX_TINY_DEV, FLUX_TINY_SCHNELL, FluxTransformer2DModel
    from batchgen.models.vae import FLUX_VAE_CONFIG, VAE_TINY_16CH
    from batchgen.tiny.flux import SCHEDULERS

    cfg = dict((FLUX_TINY_DEV if dev else FLUX_TINY_SCHNELL) if small else (FLUX_1_DEV if dev else FLUX_1_SCHNELL))
    vae_cfg = {**VAE_TINY_16CH, "scaling_factor": FLUX_VAE_CONFIG["scaling_factor"],
               "shift_factor": FLUX_VAE_CONFIG["shift_factor"]} if small else dict(FLUX_VAE_CONFIG)
    transformer, vae = FluxTransformer2DModel(cfg).eval(), AutoencoderKL(vae_cfg).eval()
    te = _clip("CLIPTextModel", 32, 2, 4, "quick_gelu") if small else _clip("CLIPTextModel", 768, 12, 12, "quick_gelu")
    te2 = _t5(cfg["joint_attention_dim"], 2, 4, 64, 8) if small else _t5(4096, 24, 64, 10240)
    ours = {"transformer": transformer, "vae": vae, "text_encoder": te, "tokenizer": tok["clip"], "text_encoder_2": te2,
            "tokenizer_2": tok["t5"], "scheduler": dict(SCHEDULERS["flux-dev" if dev else "flux-schnell"])}
    theirs = {"transformer": _twin(transformer, "FluxTransformer2DModel", cfg), "vae": _twin(vae, "AutoencoderKL", vae_cfg),
              **{k: v for k, v in ours.items() if k.startswith(("text_encoder", "tokenizer"))}}
    return ours, theirs, {}


MODELS: dict[str, Model] = {
    "sd15": Model("sd:StableDiffusion", "StableDiffusionPipeline", _sd15, 512, 30, 7.5, "euler", batch=8),
    "sdxl": Model("sdxl:StableDiffusionXL", "StableDiffusionXLPipeline", _sdxl, 1024, 30, 5.0, "euler", batch=4),
    "sd35m": Model("sd3:StableDiffusion3", "StableDiffusion3Pipeline", _sd35m, 1024, 28, 7.0, "flow_euler", batch=2),
    # FLUX.1 at its defaults (T5 256 / 512 tokens); diffusers' FluxPipeline defaults to 512 for both.
    "flux-schnell": Model("flux:Flux", "FluxPipeline", _flux, 1024, 4, 0.0, "flow_euler", batch=2,
                          call_kwargs={"max_sequence_length": 256}),
    "flux-dev": Model("flux:Flux", "FluxPipeline", lambda small, tok: _flux(small, tok, dev=True), 1024, 28, 3.5,
                      "flow_euler", batch=2),
}


# --------------------------------------------------------------------------- measuring
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_tflops(device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _denoiser_flops(pipe, batch) -> tuple[float, Callable]:
    """FLOPs of one denoiser call at the benchmark's batch shape, and that call as a closure."""
    from torch.utils.flop_counter import FlopCounterMode

    fam = pipe.family
    settings = batch["settings"]
    items = fam.resolve_items({}, settings, batch["size"])
    from batchgen.families.base import Batch

    b = Batch(batch["prompts"], [""] * batch["size"], settings, items, None, fam.guided(settings))
    with torch.inference_mode():
        cond = fam.encode_prompts(b)
        shape = fam.noise_shape(settings["width"], settings["height"])
        x = fam.pack(torch.randn((batch["size"], *shape), device=fam.device, dtype=fam.dtype), settings)
        t = torch.tensor(500.0, device=fam.device)
        model = fam.denoiser(cond, b)
        counter = FlopCounterMode(display=False)
        with counter:
            model(x, t)
    return float(counter.get_total_flops()), lambda: model(x, t)


@torch.inference_mode()
def _time(fn, device, repeats: int) -> float:
    """Mean seconds per call (inference mode, as generate runs: no grad-mode recompiles)."""
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def run_model(name: str, spec: Model, args, device, dtype, tok) -> list[dict]:
    import importlib

    import diffusers

    from batchgen.pipeline import Pipeline

    small = args.cpu
    size = spec.small_size if small else spec.size
    steps = 4 if small else spec.steps
    with _building(device, dtype):
        ours_parts, their_parts, index = spec.build(small, tok)
    module, cls = spec.family.split(":")
    family_cls = getattr(importlib.import_module(f"batchgen.families.{module}"), cls)
    fam = family_cls.from_parts(ours_parts, index).to(device, dtype)
    pipe = Pipeline(fam, {"fingerprint": "random-weights", **fam.info()})
    ref = getattr(diffusers, spec.diffusers_pipeline)(scheduler=_scheduler(diffusers, fam.scheduler_config, spec.sampler),
                                                      **their_parts)
    ref.to(device=device, dtype=dtype)
    if fam.vae_dtype != dtype:
        ref.vae.to(dtype=fam.vae_dtype)
    ref.set_progress_bar_config(disable=True)

    n = args.batch or (2 if small else spec.batch)
    prompts = [f"a detailed photo of a {w} at dawn, cinematic lighting" for w in
               ("cat", "dog", "red car", "lighthouse", "castle", "horse", "boat", "tree", "robot", "city")]
    prompts = (prompts * (n // len(prompts) + 1))[:n]
    seeds = list(range(n))
    settings = {"width": size, "height": size, "steps": steps, "guidance_scale": spec.guidance}
    settings = fam.resolve(dict(settings))
    total_params = sum(p.numel() for p in fam.parts[fam.denoiser_name].parameters())
    flops, denoise_call = _denoiser_flops(pipe, {"settings": settings, "prompts": prompts, "size": n})
    calls_per_image_batch = steps * (2 if spec.sampler in ("heun",) else 1)
    peak = _peak_tflops(device, args.peak_tflops)
    print(f"\n== {name}: {size}x{size}, {steps} steps, batch {n}, {dtype}, denoiser {total_params / 1e9:.2f}B params, "
          f"{flops / 1e12:.2f} TFLOP per denoiser call", flush=True)

    def ours_run():
        return pipe.generate(prompts, seeds, sampler=spec.sampler, steps=steps, guidance_scale=spec.guidance,
                             width=size, height=size, micro_batch=n, progress=False)

    def ref_run():
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        out = ref(prompts, num_inference_steps=steps, guidance_scale=spec.guidance, width=size, height=size,
                  generator=gens, output_type="np", **(spec.call_kwargs or {})).images
        return [(im * 255).round().astype(np.uint8) for im in out]

    rows, baseline = [], None
    for variant in args.variants:
        side, mode = variant.split("-", 1)
        deterministic = mode.endswith("-det")  # batchgen-eager-det: compute.deterministic's cost
        mode = mode.removesuffix("-det")
        switches = _deterministic(deterministic)
        if mode != "eager":
            torch._dynamo.reset()
            target = fam if side == "batchgen" else None
            if target is not None:
                target.compile(mode)
            else:
                opts = {"dynamic": False, "mode": "reduce-overhead" if (mode == "max" and device.type == "cuda") else None}
                denoiser = getattr(ref, "unet", None) or ref.transformer
                denoiser.compile(**{k: v for k, v in opts.items() if v})
                ref.vae.decoder.compile(**{k: v for k, v in opts.items() if v})
        fn = ours_run if side == "batchgen" else ref_run
        start = time.perf_counter()
        fn()  # warm-up: compiles compiled variants at this shape
        _sync(device)
        warmup = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        for _ in range(args.batches):
            images = fn()
        _sync(device)
        elapsed = time.perf_counter() - start
        per_batch = elapsed / args.batches
        row = {"model": name, "variant": variant, "images_per_s": n / per_batch, "s_per_step": per_batch / steps,
               "warmup_s": warmup, "peak_mem_gb": (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None,
               "nan_or_flat": any(len(np.unique(im)) <= 1 for im in images)}
        if baseline is None:
            baseline = images
        row["max_pixel_diff_vs_batchgen_eager"] = max(int(np.abs(a.astype(int) - b.astype(int)).max())
                                                     for a, b in zip(images, baseline))
        if peak:
            row["mfu_end_to_end"] = flops * calls_per_image_batch / per_batch / (peak * 1e12)
        if side == "batchgen":
            t_call = _time(lambda: (torch.compiler.cudagraph_mark_step_begin() if mode == "max" and device.type == "cuda" else None,
                                    denoise_call()), device, max(3, args.batches * 2))
            row["denoiser_ms"] = t_call * 1000
            if peak:
                row["mfu_denoiser"] = flops / t_call / (peak * 1e12)
        rows.append(row)
        _restore(switches)
        print("   " + "  ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "model"), flush=True)
    del pipe, ref, fam, ours_parts, their_parts
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _deterministic(on: bool) -> dict | None:
    """Turn on compute.deterministic's switches (batchgen.stages.set_deterministic) for one variant;
    returns what to restore."""
    if not on:
        return None
    from batchgen.stages import set_deterministic

    saved = {"algorithms": torch.are_deterministic_algorithms_enabled(), "precision": torch.get_float32_matmul_precision(),
             "cudnn": (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32),
             "tf32": torch.backends.cuda.matmul.allow_tf32}
    set_deterministic()
    return saved


def _restore(saved: dict | None) -> None:
    if saved is None:
        return
    torch.use_deterministic_algorithms(saved["algorithms"])
    torch.set_float32_matmul_precision(saved["precision"])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = saved["cudnn"]
    torch.backends.cuda.matmul.allow_tf32 = saved["tf32"]


def _scheduler(diffusers, config: dict, sampler: str):
    names = {"euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler", "flow_euler": "FlowMatchEulerDiscreteScheduler"}
    return getattr(diffusers, names[sampler]).from_config({k: v for k, v in config.items() if k != "_class_name"})


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# --------------------------------------------------------------------------- full job
def run_job_benchmark(args, device, dtype, tok) -> dict:
    """A real `batchgen run` (local Ray, one GPU actor, PNG encode + store) vs the bare loop, on an
    SD 1.5-shaped checkpoint with random weights saved in the diffusers layout."""
    from safetensors.torch import save_file

    from batchgen import load_pipeline
    from batchgen.tiny.common import clip_tokenizer_files

    small = args.cpu
    spec = MODELS["sd15"]
    root = Path(tempfile.mkdtemp(prefix="bench-sd15-"))
    with _building(device, dtype):
        parts, _, _ = spec.build(small, tok)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (root / "model_index.json").write_text(json.dumps(index))
    for name in ("unet", "vae", "text_encoder"):
        (root / name).mkdir()
        module = parts[name]
        config = dict(module.config) if isinstance(module.config, dict) else module.config.to_dict()
        (root / name / "config.json").write_text(json.dumps(config, default=str))
        stem = "model" if name == "text_encoder" else "diffusion_pytorch_model"
        state = {k: v.to(dtype).contiguous().cpu() for k, v in module.state_dict().items() if not k.endswith("position_ids")}
        save_file(state, str(root / name / f"{stem}.safetensors"))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(parts["scheduler"]))
    (root / "tokenizer").mkdir()
    for fname, text in clip_tokenizer_files().items():
        (root / "tokenizer" / fname).write_text(text)
    del parts

    size = spec.small_size if small else spec.size
    steps = 4 if small else spec.steps
    n_items = args.job_items
    import pyarrow as pa
    import pyarrow.parquet as pq

    inputs = root / "prompts.parquet"
    pq.write_table(pa.table({"prompt": [f"job prompt {i}, a detailed painting" for i in range(n_items)]}), inputs)
    dtype_name = str(dtype).removeprefix("torch.")
    job_spec = {
        "name": "gpu-bench", "input": {"uri": str(inputs)},
        "model": {"uri": str(root), "dtype": dtype_name},
        "sampling": {"sampler": spec.sampler, "steps": steps, "width": size, "height": size,
                     "guidance_scale": spec.guidance},
        "output": {"uri": str(root / "out"), "format": "png"},
        "compute": {"batch_size": args.batch or spec.batch, "gpus_per_worker": 1 if device.type == "cuda" else 0,
                    "min_workers": 1, "max_workers": 1},
    }
    spec_path = root / "job.yaml"
    spec_path.write_text(json.dumps(job_spec))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "batchgen.cli", "run", str(spec_path)], capture_output=True, text=True)
    job_wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        return {"job_error": proc.returncode}
    summary = json.loads((root / "out" / "summary.json").read_text())

    pipe = load_pipeline(root, device=device, dtype=dtype)
    prompts = [f"job prompt {i}, a detailed painting" for i in range(n_items)]
    kwargs = dict(sampler=spec.sampler, steps=steps, width=size, height=size, guidance_scale=spec.guidance,
                  micro_batch=args.batch or spec.batch, progress=False)
    pipe.generate(prompts[:kwargs["micro_batch"]], list(range(kwargs["micro_batch"])), **kwargs)
    _sync(device)
    start = time.perf_counter()
    pipe.generate(prompts, list(range(n_items)), **kwargs)
    _sync(device)
    bare = n_items / (time.perf_counter() - start)
    steady = summary.get("steady_images_per_s") or summary.get("images_per_s")
    result = {"job_items": n_items, "job_wall_s": job_wall, "job_images_per_s": summary.get("images_per_s"),
              "job_steady_images_per_s": steady, "bare_loop_images_per_s": bare,
              "job_vs_bare": (steady / bare) if steady else None}
    print("\n== job vs bare loop: " + "  ".join(f"{k}={_fmt(v)}" for k, v in result.items()), flush=True)
    return result


# --------------------------------------------------------------------------- cheap wins
def _fused_qkv_patch():
    """Self-attention with one fused q/k/v projection (weights concatenated once, cached)."""
    import torch.nn.functional as F

    from batchgen.models import blocks

    original = blocks.Attention.forward

    def forward(self, x, context=None):
        if context is not None:
            return original(self, x, context)
        fused = getattr(self, "_bench_qkv", None)
        if fused is None:
            fused = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight]).contiguous()
            self._bench_qkv = fused
        q, k, v = F.linear(x, fused).chunk(3, dim=-1)
        return self.to_out[0](blocks.attention(q, k, v, self.heads, self.upcast))

    return original, forward


def run_tweaks(args, device, dtype, tok) -> list[dict]:
    """The issue's cheap wins, each timed on the SD 1.5 denoiser call alone (eager and compiled):
    channels_last, each SDPA backend, fused q/k/v; plus pinned noise copies and the share of a
    batch spent encoding prompts."""
    import importlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from batchgen.families.base import Batch
    from batchgen.models import blocks
    from batchgen.noise import item_generators, randn_items
    from batchgen.pipeline import Pipeline

    spec = MODELS["sd15"]
    small = args.cpu
    size = spec.small_size if small else spec.size
    with _building(device, dtype):
        parts, _, index = spec.build(small, tok)
    module, cls = spec.family.split(":")
    fam = getattr(importlib.import_module(f"batchgen.families.{module}"), cls).from_parts(parts, index).to(device, dtype)
    pipe = Pipeline(fam, {"fingerprint": "random-weights", **fam.info()})
    n = args.batch or spec.batch
    settings = fam.resolve({"width": size, "height": size, "steps": spec.steps, "guidance_scale": spec.guidance})
    flops, call = _denoiser_flops(pipe, {"settings": settings, "prompts": ["a photo of a cat"] * n, "size": n})
    peak = _peak_tflops(device, args.peak_tflops)
    repeats = 10 if not small else 2
    rows = []

    def record(name, fn):
        try:
            t = _time(fn, device, repeats)
            row = {"tweak": name, "denoiser_ms": t * 1000, "mfu": flops / t / (peak * 1e12) if peak else None}
        except Exception as exc:  # noqa: BLE001 - a backend may not support this shape/dtype
            row = {"tweak": name, "error": f"{type(exc).__name__}: {str(exc)[:120]}"}
        rows.append(row)
        print("   " + "  ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)

    print(f"\n== cheap wins on the sd15 denoiser ({size}px, batch {n}, guided: {2 * n} rows)", flush=True)
    for compiled in (False, True):
        tag = "compiled-max" if compiled else "eager"
        if compiled:
            torch._dynamo.reset()
            fam.compile("max")
            mark = torch.compiler.cudagraph_mark_step_begin if device.type == "cuda" else (lambda: None)
            base = call
            call = lambda: (mark(), base())  # noqa: E731
        record(f"{tag}", call)
        for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            if compiled:
                torch._dynamo.reset()
                fam.compile("max")

            def with_backend(backend=backend):
                with sdpa_kernel(getattr(SDPBackend, backend)):
                    return call()

            record(f"{tag} sdpa={backend.lower()}", with_backend)
        fam.unet.to(memory_format=torch.channels_last)
        if compiled:
            torch._dynamo.reset()
            fam.compile("max")
        record(f"{tag} channels_last", call)
        fam.unet.to(memory_format=torch.contiguous_format)
        original, fused = _fused_qkv_patch()
        blocks.Attention.forward = fused
        if compiled:
            torch._dynamo.reset()
            fam.compile("max")
        record(f"{tag} fused_qkv", call)
        blocks.Attention.forward = original
    torch._dynamo.reset()

    shape = fam.noise_shape(size, size)
    gens = item_generators(range(n))
    plain = _time(lambda: randn_items(item_generators(range(n)), shape, device, dtype), device, repeats)

    def pinned():
        draws = torch.cat([torch.randn((1, *shape), generator=g) for g in item_generators(range(n))])
        return draws.pin_memory().to(device, dtype, non_blocking=True) if device.type == "cuda" else draws
    del gens
    rows.append({"tweak": "noise H2D plain", "ms": plain * 1000})
    rows.append({"tweak": "noise H2D pinned+non_blocking", "ms": _time(pinned, device, repeats) * 1000})
    b = Batch(["a photo of a cat"] * n, [""] * n, settings, fam.resolve_items({}, settings, n), None, True)
    encode = _time(lambda: fam.encode_prompts(b), device, repeats)
    rows.append({"tweak": "text encoding per micro-batch", "ms": encode * 1000,
                 "share_of_batch": encode / (encode + spec.steps * rows[0]["denoiser_ms"] / 1000)})
    for r in rows[-3:]:
        print("   " + "  ".join(f"{k}={_fmt(v)}" for k, v in r.items()), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sd15,sdxl,sd35m", help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--variants", default="batchgen-eager,diffusers-eager,batchgen-max,diffusers-max",
                        help="comma list of batchgen-{eager,default,max}, diffusers-{eager,default,max}; "
                        "a -det suffix on a batchgen variant (batchgen-eager-det) runs it with "
                        "compute.deterministic's switches on, to measure their cost")
    parser.add_argument("--batch", type=int, default=None, help="images per micro-batch (default: per model, "
                        "8 for sd15, the issue's target shape)")
    parser.add_argument("--batches", type=int, default=3, help="timed micro-batches per variant")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--cpu", action="store_true", help="small shapes on the CPU, float32")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by GPU name)")
    parser.add_argument("--job", action="store_true", help="also run a real batchgen job vs the bare loop (SD 1.5 shape)")
    parser.add_argument("--tweaks", action="store_true", help="also time the cheap wins on the SD 1.5 denoiser")
    parser.add_argument("--job-items", type=int, default=64)
    parser.add_argument("--out", default=None, help="write all rows as JSON here")
    args = parser.parse_args()
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if any(v.endswith("-det") for v in args.variants):
        # cuBLAS reads its workspace setting when its first handle is made: before any GPU work.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    device = torch.device("cpu" if args.cpu else "cuda")
    dtype = torch.float32 if args.cpu else getattr(torch, args.dtype)
    if args.cpu:
        args.batch, args.batches = min(args.batch or 2, 2), min(args.batches, 2)
    torch.manual_seed(0)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "cuda": torch.version.cuda, "dtype": str(dtype)}
    print("environment:", json.dumps(env), flush=True)
    tok = _tokenizers(Path(tempfile.mkdtemp(prefix="bench-tok-")))
    results = {"environment": env, "rows": []}
    def save() -> None:  # after every part, so a run cut short keeps what it measured
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2, default=str))

    if args.tweaks:
        results["tweaks"] = run_tweaks(args, device, dtype, tok)
        save()
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        results["rows"].extend(run_model(name, MODELS[name], args, device, dtype, tok))
        save()
    if args.job:
        results["job"] = run_job_benchmark(args, device, dtype, tok)
        save()
    print("\n| model | variant | images/s | s/step | peak GB | MFU denoiser | MFU end-to-end | max px diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['model']} | {r['variant']} | {r['images_per_s']:.3f} | {r['s_per_step']:.4f} | "
              f"{_fmt(r.get('peak_mem_gb'))} | {_fmt(r.get('mfu_denoiser'))} | {_fmt(r.get('mfu_end_to_end'))} | "
              f"{r['max_pixel_diff_vs_batchgen_eager']} |")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
