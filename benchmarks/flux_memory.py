"""Peak GPU memory of FLUX.1 at its real size, per memory plan: what fits on 24 / 40-48 / 80 GB GPUs.

    python benchmarks/flux_memory.py [--variant dev|schnell] [--size 1024] [--batches 1 4]
                                     [--device auto|cpu|cuda] [--json PATH] [--time-cpu-text]

Builds the real FLUX.1 transformer (12B), T5-XXL encoder (4.7B), CLIP-L text encoder and the
16-channel VAE from their published configs with *random* weights (nothing is downloaded): each
module is built on the meta device and materialized layer by layer in bf16 on its target device
(float8 layers are quantized as soon as they exist, so bf16 copies never pile up). Then, for each
memory plan, it runs the phases of one micro-batch as the pipeline does (prompt encoding, one
denoising step at ``--size`` x ``--size``, the VAE decode) and reports

- on a GPU: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` per phase and for the
  whole plan, plus the CUDA context, and the transformer step time (bf16 vs fp8 storage);
- without a GPU: the same table by arithmetic on the meta device: exact weight bytes of the
  meta-built (and fp8-quantized) modules plus the activation peak of each phase, found by running
  the real forward passes on meta tensors (shapes only, no compute) under a dispatch mode that adds
  up the bytes of every tensor alive (:class:`LiveBytes`). This counts what
  ``max_memory_allocated`` counts except kernel workspaces and allocator rounding; the CUDA context
  is taken as CONTEXT_GIB.

Memory plans (``load_pipeline`` arguments):
  bf16           everything on the GPU in bf16
  bf16+text-cpu  text_encoder_device="cpu": CLIP-L and T5-XXL on the host (bf16), the rest on the GPU
  fp8+text-cpu   + fp8=("transformer",): the transformer's block Linears stored in float8 e4m3
  fp8-all-gpu    fp8=("transformer", "text_encoder_2"): everything on the GPU, transformer and T5 in fp8
The FLUX family's VAE decodes at most one megapixel per call (one 1024x1024 image at a time), so
its peak does not grow with the micro-batch; ``decode xB`` shows what a batched decode would need.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import weakref
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batchgen.models.flux import FLUX_1_DEV, FLUX_1_SCHNELL, FluxTransformer2DModel, latent_image_ids  # noqa: E402
from batchgen.models.fp8 import FLUX_TRANSFORMER_KEEP, Fp8Linear, quantize_linears  # noqa: E402
from batchgen.models.vae import FLUX_VAE_CONFIG, AutoencoderKL  # noqa: E402

GIB = 1024**3
# black-forest-labs/FLUX.1-dev text_encoder/config.json (openai CLIP ViT-L/14 text tower).
CLIP_L = {"model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
          "projection_dim": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
          "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
# black-forest-labs/FLUX.1-dev text_encoder_2/config.json (google t5-v1_1-xxl encoder).
T5_XXL = {"model_type": "t5", "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
          "num_heads": 64, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
          "dropout_rate": 0.1, "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu",
          "is_encoder_decoder": False, "use_cache": False, "pad_token_id": 0, "eos_token_id": 1}

PLANS = {  # name -> (components on the GPU, components stored in fp8)
    "bf16": (("transformer", "vae", "text_encoder", "text_encoder_2"), ()),
    "bf16+text-cpu": (("transformer", "vae"), ()),
    "fp8+text-cpu": (("transformer", "vae"), ("transformer",)),
    "fp8-all-gpu": (("transformer", "vae", "text_encoder", "text_encoder_2"), ("transformer", "text_encoder_2")),
}
PLAN_ARGS = {
    "bf16": 'load_pipeline(path)',
    "bf16+text-cpu": 'load_pipeline(path, text_encoder_device="cpu")',
    "fp8+text-cpu": 'load_pipeline(path, text_encoder_device="cpu", fp8=("transformer",))',
    "fp8-all-gpu": 'load_pipeline(path, fp8=("transformer", "text_encoder_2"))',
}
GPU_CLASSES = (  # (class, GiB a job may use: the smallest card of the class less ~0.5 GiB headroom)
    ("24 GB (L4, A10G, RTX 4090)", 22.0),
    ("40/48 GB (A100-40GB, L40S, A6000)", 39.0),
    ("80 GB (A100-80GB, H100)", 78.5),
)
CONTEXT_GIB = 0.5  # CUDA context + cuBLAS/cuDNN handles, outside the allocator (arithmetic mode)


# --------------------------------------------------------------------------------- building
def build_meta(variant: str) -> dict[str, nn.Module]:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        return {
            "transformer": FluxTransformer2DModel(FLUX_1_DEV if variant == "dev" else FLUX_1_SCHNELL),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            "text_encoder_2": T5EncoderModel(T5Config(**T5_XXL)),
            "vae": AutoencoderKL(FLUX_VAE_CONFIG),
        }


def fp8_keep(name: str) -> tuple[str, ...]:
    """What the FLUX family keeps in bf16 under fp8 (Flux.fp8_keep)."""
    return FLUX_TRANSFORMER_KEEP if name == "transformer" else ()


def _quantized(name: str, module_name: str, fp8: tuple[str, ...]) -> bool:
    keep = fp8_keep(name)
    return name in fp8 and not any(module_name == k or module_name.startswith(k + ".") for k in keep)


def materialize(module: nn.Module, name: str, device: torch.device, fp8: tuple[str, ...]) -> nn.Module:
    """Meta module -> random bf16 weights on ``device``, leaf by leaf; float8 Linears quantized at once."""
    done: dict[int, nn.Parameter] = {}
    for mod_name, mod in list(module.named_modules()):
        for pname, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) in done:  # tied weights (T5's embed_tokens = shared)
                mod._parameters[pname] = done[id(p)]
                continue
            new = torch.empty(p.shape, device=device, dtype=torch.bfloat16)
            if pname == "weight" and p.ndim == 1:
                new.fill_(1.0)  # norm scales
            else:
                new.normal_(0.0, 0.02)
            done[id(p)] = mod._parameters[pname] = nn.Parameter(new, requires_grad=False)
        for bname, b in list(mod._buffers.items()):
            if b is not None and b.is_meta:
                value = torch.arange(b.shape[-1]).expand(b.shape) if b.dtype == torch.int64 else torch.zeros(b.shape)
                mod._buffers[bname] = value.to(device=device, dtype=b.dtype)
        if isinstance(mod, nn.Linear) and _quantized(name, mod_name, fp8):
            parent_name, _, attr = mod_name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, Fp8Linear.from_linear(mod))
            done.pop(id(mod.weight), None)
            del mod
    return module.eval().requires_grad_(False)


def weight_bytes(module: nn.Module, name: str, fp8: tuple[str, ...]) -> int:
    """Exact bytes of ``module``'s weights in bf16, float8 Linears counted at 1 byte + 4 (scale)."""
    total, seen = 0, set()
    for mod_name, mod in module.named_modules():
        quant = isinstance(mod, nn.Linear) and _quantized(name, mod_name, fp8)
        for pname, p in mod._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel() * (1 if quant and pname == "weight" else 2) + (4 if quant and pname == "weight" else 0)
    return total


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


# ----------------------------------------------------------------------------------- phases
def run_clip(clip, rows: int, device):
    ids = torch.randint(0, CLIP_L["vocab_size"], (rows, 77), device=device)
    return clip(ids).pooler_output


def run_t5(t5, rows: int, length: int, device):
    ids = torch.randint(0, T5_XXL["vocab_size"], (rows, length), device=device)
    return t5(ids)[0]


def run_step(transformer, rows: int, size: int, length: int, device):
    tokens = (size // 16) ** 2
    x = torch.randn(rows, tokens, 64, device=device, dtype=torch.bfloat16)
    context = torch.randn(rows, length, 4096, device=device, dtype=torch.bfloat16)
    pooled = torch.randn(rows, 768, device=device, dtype=torch.bfloat16)
    t = torch.full((rows,), 0.5, device=device, dtype=torch.bfloat16)
    guidance = torch.full((rows,), 3.5, device=device) if transformer.config["guidance_embeds"] else None
    img_ids = latent_image_ids(size // 8, size // 8, device, torch.bfloat16)
    txt_ids = torch.zeros(length, 3, device=device, dtype=torch.bfloat16)
    return transformer(x, context, pooled, t, img_ids, txt_ids, guidance=guidance)


def run_decode(vae, rows: int, size: int, device):
    z = torch.randn(rows, 16, size // 8, size // 8, device=device, dtype=torch.bfloat16)
    return vae.decode(z)


# -------------------------------------------------------------------------------- measuring
def _sync():
    torch.cuda.synchronize()


def measure_plan(plan: str, variant: str, size: int, batches: list[int], length: int, device="cuda") -> dict:
    """Build the plan's GPU components, run each phase per batch size, record peaks (GiB)."""
    device = torch.device(device)
    on_gpu, fp8 = PLANS[plan]
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    meta = build_meta(variant)
    parts = {}
    resident = {}
    for name in on_gpu:
        before = torch.cuda.memory_allocated()
        parts[name] = materialize(meta[name], name, device, fp8)
        resident[name] = (torch.cuda.memory_allocated() - before) / GIB
    weights = (torch.cuda.memory_allocated() - base) / GIB
    result = {"plan": plan, "weights_gib": weights, "resident_gib": resident, "batches": {}}
    with torch.inference_mode():
        for rows in batches:
            phases = {}

            def phase(label, fn):
                _sync()
                torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                out = fn()
                _sync()
                elapsed = time.perf_counter() - start
                del out
                phases[label] = {"peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
                                 "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB, "seconds": elapsed}

            if "text_encoder_2" in parts:
                phase("encode", lambda: (run_clip(parts["text_encoder"], rows, device),
                                         run_t5(parts["text_encoder_2"], rows, length, device)))
            run_step(parts["transformer"], rows, size, length, device)  # warm-up (kernels, allocator)
            phase("step", lambda: run_step(parts["transformer"], rows, size, length, device))
            times = []
            for _ in range(3):
                _sync()
                start = time.perf_counter()
                run_step(parts["transformer"], rows, size, length, device)
                _sync()
                times.append(time.perf_counter() - start)
            phases["step"]["seconds"] = min(times)
            phase("decode", lambda: run_decode(parts["vae"], 1, size, device))
            if rows > 1:
                phase(f"decode x{rows}", lambda: run_decode(parts["vae"], rows, size, device))
            torch.cuda.empty_cache()
            pipeline = [v for k, v in phases.items() if not k.startswith("decode x")]
            result["batches"][rows] = {
                "phases": phases,
                "peak_allocated_gib": max(p["peak_allocated_gib"] for p in pipeline),
                "peak_reserved_gib": max(p["peak_reserved_gib"] for p in pipeline),
            }
    del parts, meta
    gc.collect()
    torch.cuda.empty_cache()
    return result


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors alive while the traced code runs (on meta tensors: no compute).

    Every tensor an aten op returns is counted once per storage (views share it) until the last
    Python tensor on that storage is gone; ``external`` tensors (weights, buffers) are not counted.
    """

    def __init__(self, external=()):
        super().__init__()
        self.external = {t.untyped_storage()._cdata for t in external}
        self.refs: dict[int, list[int]] = {}
        self.live = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self.external:
                continue
            entry = self.refs.get(key)
            if entry is None:
                entry = self.refs[key] = [0, storage.nbytes()]
                self.live += entry[1]
                self.peak = max(self.peak, self.live)
            entry[0] += 1
            weakref.finalize(t, self._release, key)
        return out


def simulate_peak(modules, fn) -> float:
    """GiB of activations ``fn()`` keeps alive at its peak, run on meta tensors."""
    external = [t for m in modules for t in list(m.parameters()) + list(m.buffers())]
    with torch.inference_mode(), LiveBytes(external) as tracker:
        out = fn()
        del out
    return tracker.peak / GIB


def estimate_plan(plan: str, variant: str, size: int, batches: list[int], length: int) -> dict:
    """The table by arithmetic: exact weight bytes of the (quantized) meta modules + simulated activations."""
    from batchgen.models.fp8 import weight_bytes as module_bytes

    on_gpu, fp8 = PLANS[plan]
    meta = {name: module.to(torch.bfloat16) for name, module in build_meta(variant).items() if name in on_gpu}
    for name in fp8:
        quantize_linears(meta[name], keep=fp8_keep(name))
    resident = {name: module_bytes(module) / GIB for name, module in meta.items()}
    weights = sum(resident.values())
    device = torch.device("meta")
    result = {"plan": plan, "weights_gib": weights, "resident_gib": resident, "batches": {}, "estimated": True}
    for rows in batches:
        phases = {
            "step": simulate_peak([meta["transformer"]],
                                  lambda: run_step(meta["transformer"], rows, size, length, device)),
            "decode": simulate_peak([meta["vae"]], lambda: run_decode(meta["vae"], 1, size, device)),
        }
        if "text_encoder_2" in meta:
            phases["encode"] = max(
                simulate_peak([meta["text_encoder"]], lambda: run_clip(meta["text_encoder"], rows, device)),
                simulate_peak([meta["text_encoder_2"]], lambda: run_t5(meta["text_encoder_2"], rows, length, device)))
        if rows > 1:
            phases[f"decode x{rows}"] = simulate_peak([meta["vae"]],
                                                      lambda: run_decode(meta["vae"], rows, size, device))
        phases = {k: {"peak_allocated_gib": weights + v, "activations_gib": v} for k, v in phases.items()}
        pipeline = [v["peak_allocated_gib"] for k, v in phases.items() if not k.startswith("decode x")]
        result["batches"][rows] = {"phases": phases, "peak_allocated_gib": max(pipeline)}
    return result


def time_cpu_text(length: int) -> dict:
    """Seconds to encode one prompt with CLIP-L + T5-XXL in bf16 on the host CPU (text-cpu plans)."""
    meta = build_meta("dev")
    out = {}
    with torch.inference_mode():
        for name in ("text_encoder", "text_encoder_2"):
            start = time.perf_counter()
            module = materialize(meta[name], name, torch.device("cpu"), ())
            out[f"{name}_build_seconds"] = time.perf_counter() - start
            if name == "text_encoder":
                def fn():
                    return run_clip(module, 1, "cpu")
            else:
                def fn():
                    return run_t5(module, 1, length, "cpu")
            fn()
            start = time.perf_counter()
            fn()
            out[f"{name}_encode_seconds"] = time.perf_counter() - start
            del module
    out["threads"] = torch.get_num_threads()
    return out


# --------------------------------------------------------------------------------- reporting
def print_report(results: list[dict], args, context_gib: float, measured: bool, meta) -> None:
    how = (f"measured on {torch.cuda.get_device_name()} (torch.cuda.max_memory_allocated; reserved in brackets)"
           if measured else "by arithmetic (no GPU): exact weight bytes + activations simulated on meta tensors")
    print(f"FLUX.1-{args.variant} at {args.size}x{args.size}, max_sequence_length {args.max_sequence_length}: {how}")
    print("parameters: " + ", ".join(f"{n} {param_count(m) / 1e9:.3f}B" for n, m in meta.items()))
    print("bf16 weight bytes: " + ", ".join(f"{n} {weight_bytes(m, n, ()) / GIB:.2f} GiB" for n, m in meta.items())
          + f"; transformer in fp8: {weight_bytes(meta['transformer'], 'transformer', ('transformer',)) / GIB:.2f} GiB"
          + f"; T5 in fp8: {weight_bytes(meta['text_encoder_2'], 'text_encoder_2', ('text_encoder_2',)) / GIB:.2f} GiB")
    print(f"CUDA context (not in the allocator figures): {context_gib:.2f} GiB")
    print()
    header = f"{'plan':<15} {'batch':>5} {'weights':>8} " + " ".join(f"{p:>15}" for p in ("encode", "step", "decode")) \
        + f" {'decode xB':>15} {'peak':>15} {'step s':>7}"
    print(header)
    print("-" * len(header))
    for r in results:
        for rows, b in r["batches"].items():
            def cell(key):
                p = b["phases"].get(key)
                if p is None:
                    return f"{'-':>15}"
                text = f"{p['peak_allocated_gib']:.2f}"
                if "peak_reserved_gib" in p:
                    text += f" [{p['peak_reserved_gib']:.2f}]"
                return f"{text:>15}"

            step_s = b["phases"]["step"].get("seconds")
            peak = f"{b['peak_allocated_gib']:.2f}"
            if "peak_reserved_gib" in b:
                peak += f" [{b['peak_reserved_gib']:.2f}]"
            batched = cell(f"decode x{rows}") if rows > 1 else f"{'-':>15}"
            seconds = "" if step_s is None else f"{step_s:.3f}"
            print(f"{r['plan']:<15} {rows:>5} {r['weights_gib']:>8.2f} {cell('encode')} {cell('step')} "
                  f"{cell('decode')} {batched} {peak:>15} {seconds:>7}")
    print()
    print("What fits (peak [reserved when measured] + CUDA context <= usable GiB of the class):")
    classes = [c for c, _ in GPU_CLASSES]
    print(f"{'plan':<15} {'batch':>5} " + " ".join(f"{c:>34}" for c in classes))
    for r in results:
        for rows, b in r["batches"].items():
            need = b.get("peak_reserved_gib", b["peak_allocated_gib"]) + context_gib
            cells = [("yes" if need <= usable else "no") + f" ({need:.1f}/{usable:.0f})" for _, usable in GPU_CLASSES]
            print(f"{r['plan']:<15} {rows:>5} " + " ".join(f"{c:>34}" for c in cells))
    print()
    print("plans: " + "; ".join(f"{k} = {v}" for k, v in PLAN_ARGS.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=("dev", "schnell"), default="dev")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--max-sequence-length", type=int, default=None, help="default: dev 512, schnell 256")
    parser.add_argument("--plans", nargs="+", default=list(PLANS), choices=list(PLANS))
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="cuda: measure; cpu: arithmetic; auto: cuda when available")
    parser.add_argument("--time-cpu-text", action="store_true",
                        help="also time CLIP-L + T5-XXL encoding one prompt on the CPU (needs ~10 GB of host memory)")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args()
    if args.max_sequence_length is None:
        args.max_sequence_length = 512 if args.variant == "dev" else 256
    measured = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    meta = build_meta(args.variant)
    results, context = [], CONTEXT_GIB
    if measured:
        torch.cuda.init()
        torch.zeros(1, device="cuda")
        free, total = torch.cuda.mem_get_info()
        context = (total - free - torch.cuda.memory_reserved()) / GIB
        for plan in args.plans:
            results.append(measure_plan(plan, args.variant, args.size, args.batches, args.max_sequence_length))
            print(f"measured {plan}", file=sys.stderr, flush=True)
    else:
        for plan in args.plans:
            results.append(estimate_plan(plan, args.variant, args.size, args.batches, args.max_sequence_length))
    print_report(results, args, context, measured, meta)
    extra = {}
    if args.time_cpu_text:
        extra["cpu_text"] = time_cpu_text(args.max_sequence_length)
        print(f"\nCPU text encoding, one prompt, bf16, {extra['cpu_text']['threads']} threads: "
              f"CLIP-L {extra['cpu_text']['text_encoder_encode_seconds']:.2f} s, "
              f"T5-XXL ({args.max_sequence_length} tokens) {extra['cpu_text']['text_encoder_2_encode_seconds']:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"variant": args.variant, "size": args.size, "measured": measured,
                                               "device": torch.cuda.get_device_name() if measured else "cpu",
                                               "context_gib": context, "results": results, **extra}, indent=2))


if __name__ == "__main__":
    main()
