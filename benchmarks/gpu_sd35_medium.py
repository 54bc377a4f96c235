"""SD3.5-Medium-shaped random weights in bf16 on a GPU: renders without NaN/inf; images/s.

    python benchmarks/gpu_sd35_medium.py [--images 8] [--batch 4] [--steps 28] [--size 1024] [--no-t5]
    python benchmarks/gpu_sd35_medium.py --mini --device cpu     # the same code path, tiny shapes

Writes a diffusers folder with the real SD3.5-Medium transformer config, the SD3 VAE, CLIP-L /
CLIP-G / T5-XXL shaped text encoders (the tiny tokenizers: vocabularies are small, widths and depths
are real) and random weights drawn on the device in bf16 (matrices N(0, 1/fan_in), norm scales 1,
biases 0, embeddings N(0, 0.02^2)), then renders through ``load_pipeline`` (dtype auto: the family's
bf16 on CUDA) and checks every latent and decoded image is finite.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch


def _configs(mini: bool):
    from batchgen.models.mmdit import MMDIT_TINY_SD35, SD35_MEDIUM
    from batchgen.models.vae import SD3_VAE_CONFIG, VAE_TINY_16CH
    from batchgen.tiny.common import clip_text_config, clip_tokenizer_files, t5_config, t5_tokenizer_files

    clip_tok, t5_tok = clip_tokenizer_files(), t5_tokenizer_files()
    vocab = json.loads(clip_tok["vocab.json"])
    from tokenizers import Tokenizer

    t5_vocab = Tokenizer.from_str(t5_tok["tokenizer.json"]).get_vocab_size()
    if mini:
        transformer = {**MMDIT_TINY_SD35, "joint_attention_dim": 64, "pooled_projection_dim": 64}
        clip_l = clip_text_config(vocab, hidden=32, layers=2, heads=2, projection_dim=32,
                                  cls="CLIPTextModelWithProjection")
        clip_g = clip_text_config(vocab, hidden=32, layers=2, heads=2, act="gelu", projection_dim=32,
                                  cls="CLIPTextModelWithProjection")
        t5 = t5_config(t5_vocab, d_model=64, layers=2, heads=4)
        vae = copy.deepcopy(VAE_TINY_16CH)
    else:  # stabilityai/stable-diffusion-3.5-medium shapes
        transformer = copy.deepcopy(SD35_MEDIUM)
        clip_l = {**clip_text_config(vocab, hidden=768, layers=12, heads=12, projection_dim=768,
                                     cls="CLIPTextModelWithProjection"), "intermediate_size": 3072}
        clip_g = {**clip_text_config(vocab, hidden=1280, layers=32, heads=20, act="gelu", projection_dim=1280,
                                     cls="CLIPTextModelWithProjection"), "intermediate_size": 5120}
        t5 = {**t5_config(t5_vocab, d_model=4096, layers=24, heads=64), "d_kv": 64, "d_ff": 10240,
              "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128}
        vae = copy.deepcopy(SD3_VAE_CONFIG)
    return transformer, vae, clip_l, clip_g, t5, clip_tok, t5_tok


@torch.no_grad()
def _random_weights(module: torch.nn.Module, device, seed: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for key, ref in module.state_dict().items():
        if key.endswith("position_ids"):
            continue
        shape = tuple(ref.shape)
        noise = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        if "embed" in key and ref.dim() == 2 and "proj" not in key and "linear" not in key:
            value = 0.02 * noise
        elif ref.dim() >= 2:
            value = noise / ref[0].numel() ** 0.5
        elif "norm" in key and key.endswith("weight"):
            value = torch.ones(shape, device=device)
        else:
            value = torch.zeros(shape, device=device)
        state[key] = value.to(torch.bfloat16).cpu().contiguous()
    return state


def build(root: Path, mini: bool, no_t5: bool, device) -> Path:
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from batchgen.models import AutoencoderKL, SD3Transformer2DModel
    from batchgen.tiny.common import FolderWriter

    transformer, vae, clip_l, clip_g, t5, clip_tok, t5_tok = _configs(mini)
    out = FolderWriter(root, "StableDiffusion3Pipeline", 0, "sd35-medium-random")
    out.scheduler({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0})
    out.tokenizer("tokenizer", "CLIPTokenizer", clip_tok)
    out.tokenizer("tokenizer_2", "CLIPTokenizer", clip_tok)
    parts = [("transformer", "diffusers", "SD3Transformer2DModel", transformer, lambda c: SD3Transformer2DModel(c)),
             ("vae", "diffusers", "AutoencoderKL", vae, lambda c: AutoencoderKL(c)),
             ("text_encoder", "transformers", "CLIPTextModelWithProjection", clip_l,
              lambda c: CLIPTextModelWithProjection(CLIPTextConfig(**c))),
             ("text_encoder_2", "transformers", "CLIPTextModelWithProjection", clip_g,
              lambda c: CLIPTextModelWithProjection(CLIPTextConfig(**c)))]
    if no_t5:
        out.entry("text_encoder_3", None, None)
        out.entry("tokenizer_3", None, None)
    else:
        out.tokenizer("tokenizer_3", "T5TokenizerFast", t5_tok)
        parts.append(("text_encoder_3", "transformers", "T5EncoderModel", t5, lambda c: T5EncoderModel(T5Config(**c))))
    for seed, (name, library, cls, config, make) in enumerate(parts):
        with torch.device("meta"):
            module = make(config)
        out.json(f"{name}/config.json", config)
        stem = "diffusion_pytorch_model" if library == "diffusers" else "model"
        state = _random_weights(module, device, seed)
        if cls == "T5EncoderModel":
            state.pop("encoder.embed_tokens.weight", None)  # tied to `shared`
        save_file(state, str(root / name / f"{stem}.safetensors"), metadata={"format": "pt"})
        out.entry(name, library, cls)
        print(f"wrote {name}: {sum(v.numel() for v in state.values()) / 1e6:.0f}M parameters", flush=True)
    for name in ("image_encoder", "feature_extractor"):
        out.entry(name, None, None)
    return out.finish()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--size", type=int, default=None, help="default 1024 (--mini: 64)")
    parser.add_argument("--no-t5", action="store_true", help="a checkpoint without T5 (zeros in its place)")
    parser.add_argument("--mini", action="store_true", help="tiny shapes, same code path (a CPU smoke test)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    args = parser.parse_args()
    size = args.size or (64 if args.mini else 1024)

    from batchgen import load_pipeline

    root = Path(args.dir or tempfile.mkdtemp()) / "sd35-medium-random"
    start = time.perf_counter()
    build(root, args.mini, args.no_t5, args.device)
    print(f"checkpoint built in {time.perf_counter() - start:.0f} s", flush=True)
    pipe = load_pipeline(root, device=args.device, dtype="auto")
    fam = pipe.family
    bad: list[str] = []
    decode = fam.decode

    def checked_decode(latents):
        images = decode(latents)
        for what, t in (("latents", latents), ("decoded", images)):
            if not torch.isfinite(t).all():
                bad.append(f"{what}: {int((~torch.isfinite(t)).sum())} non-finite values")
        return images

    fam.decode = checked_decode
    prompts = [f"a photo of item {i}, detailed, cinematic lighting" for i in range(args.images)]
    seeds = list(range(args.images))
    kwargs = dict(steps=args.steps, width=size, height=size, micro_batch=args.batch)
    pipe.generate(prompts[: args.batch], seeds[: args.batch], **kwargs)  # warm-up (kernels, allocator)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    images = pipe.generate(prompts, seeds, **kwargs)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    spread = min(float(im.std()) for im in images)
    print(f"model: {pipe.model_info['variant']}, dtype {pipe.model_info['dtype']}, device {pipe.model_info['device']}"
          f"{', no T5' if args.no_t5 else ''}; {args.images} images {size}x{size}, {args.steps} steps, "
          f"micro-batch {args.batch}")
    print(f"images/s: {args.images / elapsed:.3f} ({elapsed:.1f} s)")
    if args.device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print("non-finite: " + ("; ".join(bad) if bad else "none") + f"; min per-image pixel std {spread:.1f}")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
