"""LoRA: our fused weights and images against diffusers' ``load_lora_weights`` + ``fuse_lora``.

Tiny LoRA files with random weights are written in each format by the test itself:

- SD 1.x (the builtin tiny folder): kohya (every UNet linear / conv incl. 3x3 conv LoRA, text
  encoder attention) and diffusers / PEFT (``lora_A`` / ``lora_B``, conv, text encoder attention and
  MLP, alpha from diffusers' ``lora_adapter_metadata``) against diffusers' StableDiffusionPipeline
  loaded from the same folder: fused weights and rendered images; two LoRAs at once; apply + remove
  gives the base model's bytes back; swapping sets touches only what changes;
- SDXL (kohya SGM names, te1 / te2) and FLUX (kohya double / single blocks, PEFT ``transformer.``)
  at the module level against diffusers' own LoRA loaders + PEFT fusing on the same weights.

Known diffusers 0.42 slips the files here stay clear of (our side of each is checked against the
formula ``W + scale * alpha / rank * up @ down`` or the real-size name tables instead): for kohya
SD files it applies only the most common alpha to attention modules, and drops the text encoder's
attention keys when the file also has text encoder MLP keys; its kohya FLUX converter has FLUX.1's
fused sizes (3072 / 12288) built in (the test patches in the tiny sizes), leaves the embedders and
the final layer without the ``transformer.`` prefix its loader filters on (the test adds it) and
ignores the final layer's alpha (the test gives those modules alpha = rank); its SGM key mapper
names ``add_embedding`` and SD 1.x's attention-less ``output_blocks.2.1.conv`` wrongly.
"""

from __future__ import annotations

import copy
import inspect
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from batchgen import load_pipeline
from batchgen.checkpoints.lora import LoraFuser, inspect_lora, lora_deltas, read_lora
from batchgen.errors import CheckpointError

from .module_parity import perturb, public

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

PROMPTS = ["a red bicycle in the rain", "portrait of an old man, oil painting"]
SEEDS = [3, 12345]
SIZE = 48
STEPS = 4
SCALE = 0.7


# --------------------------------------------------------------------------------------------
# Building LoRA files
# --------------------------------------------------------------------------------------------


def _pairs(module: torch.nn.Module, names, rank: int, seed: int, strength: float = 0.3, conv_1x1: bool = False):
    """Random (down, up) per module name (our parameter names without '.weight'), sized so the
    delta is ``strength`` x the weight's spread."""
    params = dict(module.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        weight = params[name + ".weight"]
        amp = (strength * float(weight.detach().std()) / rank**0.5) ** 0.5
        if weight.ndim == 4:
            kernel = tuple(weight.shape[2:]) if not conv_1x1 else (1, 1)
            down = torch.randn(rank, weight.shape[1], *kernel, generator=gen) * amp
            up = torch.randn(weight.shape[0], rank, 1, 1, generator=gen) * amp
        else:
            down = torch.randn(rank, weight.shape[1], generator=gen) * amp
            up = torch.randn(weight.shape[0], rank, generator=gen) * amp
        out[name] = (down, up)
    return out


def _kohya(path, groups: dict, alpha=None, dtype=torch.float32):
    """groups: {kohya prefix: {module name (dotted, in the layout the file uses): (down, up)}}."""
    state = {}
    for prefix, pairs in groups.items():
        for name, (down, up) in pairs.items():
            stem = prefix + name.replace(".", "_")
            state[f"{stem}.lora_down.weight"] = down.to(dtype).clone()
            state[f"{stem}.lora_up.weight"] = up.to(dtype).clone()
            a = alpha(name) if callable(alpha) else alpha
            if a is not None:
                state[f"{stem}.alpha"] = torch.tensor(float(a), dtype=dtype)
    save_file(state, str(path))
    return path


def _peft(path, groups: dict, alphas: dict | None = None, metadata: dict | None = None):
    """groups: {component prefix: {module: (down, up)}}; alphas: {prefix + module: alpha}."""
    state = {}
    for prefix, pairs in groups.items():
        for name, (down, up) in pairs.items():
            state[f"{prefix}.{name}.lora_A.weight"] = down.contiguous()
            state[f"{prefix}.{name}.lora_B.weight"] = up.contiguous()
    for key, alpha in (alphas or {}).items():
        state[f"{key}.alpha"] = torch.tensor(float(alpha))
    save_file(state, str(path), metadata=metadata)
    return path


def _lora_metadata(component: str, config) -> dict:
    """The safetensors header diffusers' save_lora_weights writes for a PEFT LoraConfig."""
    fields = {f"{component}.{k}": (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(fields, indent=2, sort_keys=True, default=str)}


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _compare(ours: dict, ref: dict, base: dict) -> tuple[float, set, set]:
    """(max |ours - ref| over all keys, keys ours changed, keys the reference changed)."""
    assert ours.keys() == ref.keys()
    diff = max((ours[k] - ref[k]).abs().max().item() for k in ours)
    changed = {k for k in ours if not torch.equal(ours[k], base[k])}
    return diff, changed, {k for k in ref if not torch.equal(ref[k], base[k])}


def _max_level_diff(a, b) -> int:
    return max(int(np.abs(x.astype(np.int16) - y.astype(np.int16)).max()) for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------
# SD 1.x, end to end
# --------------------------------------------------------------------------------------------

UNET_TE_ATTENTION = [f"text_model.encoder.layers.{i}.self_attn.{p}" for i in (0, 1)
                     for p in ("q_proj", "k_proj", "v_proj", "out_proj")]


@pytest.fixture(scope="module")
def sd1(tiny_sd1, tmp_path_factory):
    """Our pipeline, the base images and three LoRA files for the tiny SD1 folder."""
    pipe = load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32)
    root = tmp_path_factory.mktemp("loras")
    unet, te = pipe.unet, pipe.text_encoder
    unet_weights = [k[: -len(".weight")] for k, v in unet.named_parameters() if k.endswith(".weight") and v.ndim >= 2]
    te_names = [n.removeprefix("text_model.") for n in UNET_TE_ATTENTION]
    files = {
        # every UNet linear and conv (3x3 conv LoRA on resnet convs), uniform alpha 2 at rank 4
        "kohya": _kohya(root / "a_kohya.safetensors",
                        {"lora_unet_": _pairs(unet, unet_weights, 4, 1),
                         "lora_te_": {f"text_model.{n}": p for n, p in _pairs(te, te_names, 4, 2).items()}},
                        alpha=2.0),
        # diffusers / PEFT: attention, a 3x3 conv, the 1x1 proj_in conv; text encoder attention + MLP
        "peft": _peft(root / "b_peft.safetensors",
                      {"unet": _pairs(unet, ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v",
                                             "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
                                             "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj",
                                             "up_blocks.0.resnets.0.conv2", "mid_block.attentions.0.proj_in"], 2, 3,
                                      strength=0.6),
                       "text_encoder": {f"text_model.{n}": p for n, p in
                                        _pairs(te, ["encoder.layers.1.mlp.fc1", "encoder.layers.0.self_attn.v_proj"],
                                               2, 4).items()}}),
    }
    # PEFT with its alpha in diffusers' lora_adapter_metadata header (lora_alpha + an alpha_pattern)
    meta_pairs = _pairs(unet, ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
                               "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"], 4, 5)
    config = peft.LoraConfig(r=4, lora_alpha=8, alpha_pattern={"attn2.to_k": 2}, target_modules=sorted(meta_pairs))
    files["meta"] = _peft(root / "c_meta.safetensors", {"unet": meta_pairs}, metadata=_lora_metadata("unet", config))
    base_images = pipe.generate(PROMPTS, SEEDS, sampler="ddim", steps=STEPS, width=SIZE, height=SIZE)
    base = {"unet": _state(unet), "text_encoder": _state(te)}
    yield pipe, files, base_images, base
    pipe.set_loras([])


def _reference(tiny_sd1, loras):
    """diffusers' pipeline with ``loras`` [(path, scale)] loaded and fused (then the adapters removed)."""
    ref = diffusers.StableDiffusionPipeline.from_pretrained(
        str(tiny_sd1), safety_checker=None, requires_safety_checker=False, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    if len(loras) == 1:
        ref.load_lora_weights(str(loras[0][0]))
        ref.fuse_lora(lora_scale=loras[0][1])
    else:
        names = [f"l{i}" for i in range(len(loras))]
        for name, (path, _scale) in zip(names, loras):
            ref.load_lora_weights(str(path), adapter_name=name)
        ref.set_adapters(names, adapter_weights=[s for _p, s in loras])
        ref.fuse_lora(adapter_names=names)
    ref.unload_lora_weights()
    return ref


def _render(pipe, ref=None):
    ours = pipe.generate(PROMPTS, SEEDS, sampler="ddim", steps=STEPS, width=SIZE, height=SIZE)
    if ref is None:
        return ours
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    expected = ref(PROMPTS, width=SIZE, height=SIZE, num_inference_steps=STEPS, guidance_scale=7.5, output_type="np",
                   generator=[torch.Generator().manual_seed(s) for s in SEEDS]).images
    return ours, [(e * 255).round().astype(np.uint8) for e in expected]


def _check_against_reference(pipe, ref, base, expect_te: bool):
    changed_any = False
    for component in ("unet", "text_encoder"):
        diff, ours_changed, ref_changed = _compare(_state(getattr(pipe, component)),
                                                   _state(getattr(ref, component)), base[component])
        print(f"{component}: max |ours - diffusers| = {diff:.3g} over {len(ours_changed)} fused parameters")
        assert ours_changed == ref_changed  # diffusers applied every module we did, and no other
        assert diff == 0.0  # PEFT's arithmetic: (B @ A) * (alpha / r * scale), added in LoRA order
        changed_any |= bool(ours_changed)
        if component == "text_encoder":
            assert bool(ours_changed) == expect_te
    assert changed_any


@pytest.mark.parametrize("fmt", ["kohya", "peft", "meta"])
def test_fused_weights_and_images_match_diffusers(sd1, tiny_sd1, fmt):
    pipe, files, base_images, base = sd1
    info = pipe.set_loras([{"uri": str(files[fmt]), "scale": SCALE}])
    assert info == pipe.model_info["loras"]
    assert [(e["scale"], e["format"]) for e in info] == [(SCALE, "peft" if fmt == "meta" else fmt)]
    ref = _reference(tiny_sd1, [(files[fmt], SCALE)])
    _check_against_reference(pipe, ref, base, expect_te=fmt != "meta")
    if fmt == "meta":
        return  # weights equal: the images are the kohya / peft cases' business
    ours, expected = _render(pipe, ref)
    print(f"{fmt} images: max |ours - diffusers| = {_max_level_diff(ours, expected)} levels; "
          f"{_max_level_diff(ours, base_images)} levels from the base model's")
    assert all(len(np.unique(o)) > 32 for o in ours)
    assert _max_level_diff(ours, expected) <= 1
    assert _max_level_diff(ours, base_images) > 8  # the LoRA changes the picture


def test_two_loras_at_once_match_diffusers(sd1, tiny_sd1):
    pipe, files, _base_images, base = sd1
    loras = [(files["kohya"], SCALE), (files["peft"], -0.5)]
    pipe.set_loras([{"uri": str(p), "scale": s} for p, s in loras])
    assert [e["scale"] for e in pipe.model_info["loras"]] == [SCALE, -0.5]
    ref = _reference(tiny_sd1, loras)
    _check_against_reference(pipe, ref, base, expect_te=True)
    ours, expected = _render(pipe, ref)
    print(f"two LoRAs images: max |ours - diffusers| = {_max_level_diff(ours, expected)} levels")
    assert all(len(np.unique(o)) > 32 for o in ours)
    assert _max_level_diff(ours, expected) <= 1


def _versions(pipe) -> dict[str, int]:
    """Each parameter's in-place modification counter."""
    return {f"{c}.{k}": p._version for c in ("unet", "text_encoder")
            for k, p in getattr(pipe, c).named_parameters()}


def test_remove_restores_base_bytes_and_swaps_touch_only_what_changes(sd1):
    pipe, files, base_images, base = sd1
    kohya, peft_file = str(files["kohya"]), str(files["peft"])
    pipe.set_loras([])
    assert all(a.tobytes() == b.tobytes() for a, b in zip(_render(pipe), base_images))

    pipe.set_loras([{"uri": kohya, "scale": SCALE}])
    with_a = _render(pipe)
    assert _max_level_diff(with_a, base_images) > 8
    fuser = pipe._lora_fuser
    touched_a = fuser.touched

    before = _versions(pipe)
    pipe.set_loras([{"uri": kohya, "scale": SCALE}])  # unchanged: a no-op
    assert _versions(pipe) == before

    pipe.set_loras([{"uri": peft_file, "scale": 0.5}])  # A -> B
    touched_b = fuser.touched
    assert touched_b and touched_b != touched_a
    after = _versions(pipe)
    untouched = {f"{c}.{k}" for c in ("unet", "text_encoder") for k in base[c]} - {
        f"{c}.{k}" for c, k in touched_a | touched_b}
    assert all(after[k] == before[k] for k in untouched if k in before)
    # the swap gives the same bytes as B fused once into fresh copies of the base weights
    fresh = {c: copy.deepcopy(getattr(pipe, c)) for c in ("unet", "text_encoder")}
    for component, module in fresh.items():
        module.load_state_dict(base[component])
    LoraFuser(fresh).set([{"uri": peft_file, "scale": 0.5}])
    for component, module in fresh.items():
        now = getattr(pipe, component).state_dict()
        assert all(torch.equal(v, now[k]) for k, v in module.state_dict().items())

    pipe.set_loras(None)  # B -> none
    assert pipe.model_info["loras"] == [] and not fuser.touched
    for component in ("unet", "text_encoder"):
        now = getattr(pipe, component).state_dict()
        assert all(torch.equal(now[k], base[component][k]) for k in now)
    images = _render(pipe)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(images, base_images))


def test_load_pipeline_with_loras_and_sha256(tiny_sd1, sd1):
    import hashlib

    _pipe, files, _base_images, base = sd1
    pipe = load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32,
                         loras=[{"uri": f"file://{files['peft']}", "scale": 1.5}, str(files["kohya"])])
    digest = hashlib.sha256(files["peft"].read_bytes()).hexdigest()
    assert pipe.model_info["loras"][0] == {"uri": f"file://{files['peft']}", "sha256": digest, "scale": 1.5,
                                           "format": "peft"}
    assert pipe.model_info["loras"][1]["scale"] == 1.0
    assert pipe.fingerprint == load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32).fingerprint
    assert any(not torch.equal(v, base["unet"][k]) for k, v in pipe.unet.state_dict().items())


def test_kohya_text_encoder_mlp_and_alpha_per_module(sd1, tmp_path):
    """The formula, independently of diffusers: W + scale * alpha / rank * up @ down per module,
    with a different alpha per module and text encoder MLP + attention keys in one kohya file."""
    pipe, _files, _base_images, base = sd1
    te = pipe.text_encoder
    names = ["encoder.layers.0.mlp.fc2", "encoder.layers.1.self_attn.k_proj"]
    pairs = _pairs(te, names, 3, 9)
    alphas = {"text_model.encoder.layers.0.mlp.fc2": 1.0, "text_model.encoder.layers.1.self_attn.k_proj": 6.0}
    path = _kohya(tmp_path / "te.safetensors", {"lora_te1_": {f"text_model.{n}": p for n, p in pairs.items()}},
                  alpha=lambda n: alphas[n], dtype=torch.float16)
    pipe.set_loras([{"uri": str(path), "scale": -0.8}])
    for name in names:
        down, up = (t.to(torch.float16).float() for t in pairs[name])
        expected = base["text_encoder"][name + ".weight"] + (up @ down) * (alphas["text_model." + name] / 3 * -0.8)
        assert torch.allclose(te.state_dict()[name + ".weight"], expected, atol=1e-6, rtol=0)
    pipe.set_loras([])


def test_unmatched_and_bad_files_are_errors(sd1, tmp_path):
    pipe, files, _base_images, base = sd1
    unet = pipe.unet
    good = _pairs(unet, ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"], 2, 11)
    fake = {"down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q": good[next(iter(good))],
            "input_blocks.4.1.transformer_blocks.0.attn1.to_k": good[next(iter(good))]}

    nothing = _kohya(tmp_path / "nothing.safetensors", {"lora_unet_": fake})
    with pytest.raises(CheckpointError, match=r"nothing\.safetensors: none of its modules match") as exc:
        pipe.set_loras([{"uri": str(nothing), "scale": 1.0}])
    assert "lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q" in str(exc.value)

    partly = _kohya(tmp_path / "partly.safetensors", {"lora_unet_": {**good, **fake}})
    with pytest.raises(CheckpointError, match=r"partly\.safetensors: 2 of 3 of its modules") as exc:
        pipe.set_loras([{"uri": str(files["kohya"]), "scale": 1.0}, {"uri": str(partly), "scale": 1.0}])
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k" in str(exc.value)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q" not in str(exc.value)  # matched

    te_missing = _peft(tmp_path / "te2.safetensors", {"text_encoder_2": _pairs(pipe.text_encoder,
                                                                               ["encoder.layers.0.mlp.fc1"], 2, 1)})
    with pytest.raises(CheckpointError, match="text_encoder_2.encoder.layers.0.mlp.fc1"):
        pipe.set_loras([{"uri": str(te_missing)}])

    wrong = {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (torch.zeros(2, 48), torch.zeros(64, 2))}
    shape = _kohya(tmp_path / "shape.safetensors", {"lora_unet_": wrong})
    with pytest.raises(CheckpointError, match=r"shape\.safetensors: 'lora_unet_down_blocks_1_.*attn1_to_q' makes "
                                              r"a \(64, 48\) update .* of shape \(64, 64\)"):
        pipe.set_loras([{"uri": str(shape)}])

    unknown = tmp_path / "unknown.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, str(unknown))
    with pytest.raises(CheckpointError, match=r"unknown\.safetensors: cannot tell the LoRA format: looked for kohya"):
        pipe.set_loras([{"uri": str(unknown)}])

    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_conv_in.hada_w1_a": torch.zeros(2, 2), "lora_unet_conv_in.alpha": torch.tensor(1.0)},
              str(loha))
    with pytest.raises(CheckpointError, match="LyCORIS LoHa"):
        pipe.set_loras([{"uri": str(loha)}])

    half = tmp_path / "half.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3)}, str(half))
    with pytest.raises(CheckpointError, match=r"'lora_unet_conv_in' has no 'lora_up.weight'"):
        pipe.set_loras([{"uri": str(half)}])

    pickle = tmp_path / "lora.pt"
    pickle.write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickle"):
        pipe.set_loras([{"uri": str(pickle)}])
    with pytest.raises(ValueError, match=r"loras\[0\]: unknown key\(s\) \['weight'\]"):
        pipe.set_loras([{"uri": str(nothing), "weight": 1.0}])
    with pytest.raises(ValueError, match=r"loras\[0\].scale"):
        pipe.set_loras([{"uri": str(nothing), "scale": float("nan")}])

    # every failure above left the base weights alone
    assert pipe.model_info["loras"] == []
    assert all(torch.equal(v, base["unet"][k]) for k, v in unet.state_dict().items())


def test_inspect_lora(sd1):
    pipe, files, _base_images, _base = sd1
    info = inspect_lora(str(files["kohya"]))
    n_unet = sum(1 for k, v in pipe.unet.named_parameters() if k.endswith(".weight") and v.ndim >= 2)
    assert info["format"] == "kohya" and info["layout"] == "diffusers"
    assert info["components"] == ["text_encoder", "unet"]
    assert info["modules"] == n_unet + len(UNET_TE_ATTENTION)
    assert info["ranks"] == [4] and info["alphas"] == [2.0] and info["without_alpha"] == 0
    matched = inspect_lora(str(files["peft"]), pipe)
    assert matched["format"] == "peft" and matched["matched"] == matched["modules"] == 7
    assert matched["unmatched"] == [] and matched["ranks"] == [2] and matched["without_alpha"] == 7


def test_lora_from_s3(sd1, s3_server, s3_bucket):
    from batchgen.storage import StorageConfig
    from tests.fixtures_s3 import s3_client

    pipe, files, _base_images, _base = sd1
    s3_client(s3_server).put_object(Bucket=s3_bucket, Key="loras/b.safetensors", Body=files["peft"].read_bytes())
    cfg = StorageConfig(endpoint_url=s3_server)
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    local = lora_deltas(str(files["peft"]), modules)
    remote = lora_deltas(f"s3://{s3_bucket}/loras/b.safetensors", modules, storage_config=cfg)
    assert {c: d.keys() for c, d in local.items()} == {c: d.keys() for c, d in remote.items()}
    assert all(torch.equal(local[c][k], remote[c][k]) for c in local for k in local[c])
    assert read_lora(f"s3://{s3_bucket}/loras/b.safetensors", cfg).sha256 == read_lora(files["peft"]).sha256


# --------------------------------------------------------------------------------------------
# SDXL (kohya SGM names, two text encoders) at the module level
# --------------------------------------------------------------------------------------------


def _clip(with_projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=32, bos_token_id=0,
                            eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _sgm_names(unet) -> dict[str, str]:
    """diffusers module name -> SGM module name, through single_file's own inverse (tested there)."""
    from batchgen.checkpoints import single_file as sf

    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    weights = {k: k for k, v in unet.state_dict().items() if k.endswith(".weight") and v.ndim >= 2}
    sgm = sf._apply_inverse(weights, sf._rules_for("unet", shapes, "diffusers"), "unet")
    return {d[: -len(".weight")]: s[: -len(".weight")] for s, d in sgm.items()}


def test_sdxl_kohya_sgm_lora_matches_diffusers(tmp_path):
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin as Loader
    from diffusers.loaders.lora_base import fuse_text_encoder_lora
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    from batchgen.models.unet import UNET_SDXL_TINY, UNet2DConditionModel

    torch.manual_seed(0)
    ref_unet = diffusers.UNet2DConditionModel(**public(UNET_SDXL_TINY)).eval()
    perturb(ref_unet, 1)
    unet = UNet2DConditionModel(UNET_SDXL_TINY).eval()
    unet.load_state_dict(ref_unet.state_dict())
    te1, te2 = _clip(False, 2), _clip(True, 3)
    ref_te1, ref_te2 = copy.deepcopy(te1), copy.deepcopy(te2)
    base = {"unet": _state(unet), "text_encoder": _state(te1), "text_encoder_2": _state(te2)}

    to_sgm = _sgm_names(unet)
    wanted = [n for n in to_sgm if n != "add_embedding.linear_2"]  # every UNet linear / conv but one
    unet_pairs = {to_sgm[n]: p for n, p in _pairs(unet, wanted, 4, 4).items()}
    assert {"input_blocks.0.0", "out.2", "time_embed.0", "label_emb.0.0", "input_blocks.3.0.op",
            "output_blocks.2.2.conv", "middle_block.1.transformer_blocks.0.attn2.to_k",
            "input_blocks.4.1.transformer_blocks.1.ff.net.2", "output_blocks.0.0.skip_connection",
            "input_blocks.1.0.emb_layers.1"} <= set(unet_pairs)
    te_names = [n.removeprefix("text_model.") for n in UNET_TE_ATTENTION]
    path = _kohya(tmp_path / "sdxl.safetensors",
                  {"lora_unet_": unet_pairs,
                   "lora_te1_": {f"text_model.{n}": p for n, p in _pairs(te1, te_names, 4, 5).items()},
                   "lora_te2_": {n: p for n, p in _pairs(te2, UNET_TE_ATTENTION, 4, 6).items()}},
                  alpha=8.0, dtype=torch.float16)

    modules = {"unet": unet, "text_encoder": te1, "text_encoder_2": te2}
    LoraFuser(modules).set([{"uri": str(path), "scale": SCALE}])
    info = inspect_lora(str(path), modules)
    assert info["layout"] == "sgm" and info["unmatched"] == [] and info["matched"] == info["modules"]

    state, alphas = Loader.lora_state_dict(str(path), unet_config=ref_unet.config)
    Loader.load_lora_into_unet(state, alphas, unet=ref_unet)
    Loader.load_lora_into_text_encoder(state, alphas, text_encoder=ref_te1, prefix="text_encoder")
    Loader.load_lora_into_text_encoder(state, alphas, text_encoder=ref_te2, prefix="text_encoder_2")
    ref_unet.fuse_lora(lora_scale=SCALE)
    fuse_text_encoder_lora(ref_te1, lora_scale=SCALE)
    fuse_text_encoder_lora(ref_te2, lora_scale=SCALE)
    ref_unet.unload_lora()
    recurse_remove_peft_layers(ref_te1)
    recurse_remove_peft_layers(ref_te2)

    for name, ours, ref in (("unet", unet, ref_unet), ("text_encoder", te1, ref_te1), ("text_encoder_2", te2, ref_te2)):
        diff, ours_changed, ref_changed = _compare(_state(ours), _state(ref), base[name])
        print(f"SDXL {name}: max |ours - diffusers| = {diff:.3g} over {len(ours_changed)} fused parameters")
        assert ours_changed == ref_changed and ours_changed
        assert diff == 0.0


# --------------------------------------------------------------------------------------------
# FLUX (kohya BFL names with fused q/k/v, PEFT transformer.) at the module level
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_pair():
    from batchgen.models.flux import FLUX_TINY_DEV, FluxTransformer2DModel

    torch.manual_seed(0)
    ref = diffusers.FluxTransformer2DModel(**public(FLUX_TINY_DEV)).eval()
    perturb(ref, 1)
    ours = FluxTransformer2DModel(FLUX_TINY_DEV).eval()
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _bfl_lora(ours, rank: int, seed: int) -> dict:
    """(down, up) per BFL module name: fused qkv / linear1 sized for the tiny model."""
    gen = torch.Generator().manual_seed(seed)
    sd = ours.state_dict()
    inner = sd["x_embedder.weight"].shape[0]
    mlp = sd["single_transformer_blocks.0.proj_mlp.weight"].shape[0]

    def pair(out: int, inp: int, r: int = rank):
        amp = 0.15
        return torch.randn(r, inp, generator=gen) * amp, torch.randn(out, r, generator=gen) * amp

    pairs = {}
    for i in range(2):
        db = f"double_blocks.{i}"
        pairs |= {f"{db}.img_attn.qkv": pair(3 * inner, inner), f"{db}.img_attn.proj": pair(inner, inner),
                  f"{db}.img_mlp.0": pair(4 * inner, inner), f"{db}.img_mlp.2": pair(inner, 4 * inner),
                  f"{db}.img_mod.lin": pair(6 * inner, inner), f"{db}.txt_attn.proj": pair(inner, inner),
                  f"{db}.txt_mlp.0": pair(4 * inner, inner), f"{db}.txt_mlp.2": pair(inner, 4 * inner),
                  f"{db}.txt_mod.lin": pair(6 * inner, inner)}
        sb = f"single_blocks.{i}"
        pairs |= {f"{sb}.linear1": pair(3 * inner + mlp, inner), f"{sb}.linear2": pair(inner, inner + mlp),
                  f"{sb}.modulation.lin": pair(3 * inner, inner)}
    # sd-scripts' split_qkv layout: rank 3r down, block-diagonal up (diffusers' "sparse" path)
    down, up = pair(3 * inner, inner, 3 * rank)
    mask = torch.block_diag(*[torch.ones(inner, rank)] * 3)
    pairs["double_blocks.1.txt_attn.qkv"] = (down, up * mask)
    pairs |= {"img_in": pair(inner, sd["x_embedder.weight"].shape[1]), "txt_in": pair(inner, inner),
              "time_in.in_layer": pair(inner, 256), "vector_in.out_layer": pair(inner, inner),
              "guidance_in.in_layer": pair(inner, 256), "final_layer.linear": pair(*sd["proj_out.weight"].shape),
              "final_layer.adaLN_modulation.1": pair(2 * inner, inner)}
    return pairs


def _flux_alpha(name: str) -> float:
    """Per-module alphas for the kohya FLUX file. diffusers 0.42 ignores the alpha of the final
    layer's modules (it copies their matrices as they are), so those get alpha = rank (4)."""
    return 4.0 if name.startswith("final_layer") else 2.0 if "mlp" in name else 8.0


def _tiny_kohya_flux_converter(inner: int, mlp: int):
    """diffusers' _convert_kohya_flux_lora_to_diffusers with FLUX.1's built-in fused sizes replaced
    by the tiny model's (the function hard-codes dims=[3072, 3072, 3072, 12288])."""
    from diffusers.loaders import lora_conversion_utils as lcu

    source = inspect.getsource(lcu._convert_kohya_flux_lora_to_diffusers)
    real = "dims=[3072, 3072, 3072, 12288]"
    assert source.count(real) == 1
    namespace = dict(vars(lcu))
    exec(source.replace(real, f"dims=[{inner}, {inner}, {inner}, {mlp}]"), namespace)  # noqa: S102
    return namespace["_convert_kohya_flux_lora_to_diffusers"]


def _diffusers_flux(ref, state, alphas=None):
    ref = copy.deepcopy(ref)
    ref.load_lora_adapter(state, network_alphas=alphas, prefix="transformer")
    ref.fuse_lora(lora_scale=SCALE)
    ref.unload_lora()
    return ref


def test_flux_kohya_lora_matches_diffusers(flux_pair, tmp_path):
    from safetensors.torch import load_file

    ours, ref = flux_pair
    base = _state(ref)
    ours.load_state_dict(base)
    pairs = _bfl_lora(ours, 4, 7)
    path = _kohya(tmp_path / "flux_kohya.safetensors", {"lora_unet_": pairs}, alpha=_flux_alpha)
    fuser = LoraFuser({"transformer": ours})
    fuser.set([{"uri": str(path), "scale": SCALE}])
    ours_state = _state(ours)

    sd = ours.state_dict()
    convert = _tiny_kohya_flux_converter(sd["x_embedder.weight"].shape[0],
                                         sd["single_transformer_blocks.0.proj_mlp.weight"].shape[0])
    converted = convert(load_file(str(path)))
    # diffusers 0.42's converter leaves the embedders and the final layer without the
    # 'transformer.' prefix, so its own loader would drop them: put them where it looks.
    converted = {(k if k.startswith("transformer.") else f"transformer.{k}"): v for k, v in converted.items()}
    expected = _diffusers_flux(ref, converted)
    diff, ours_changed, ref_changed = _compare(ours_state, _state(expected), base)
    print(f"FLUX kohya: max |ours - diffusers| = {diff:.3g} over {len(ours_changed)} fused parameters "
          "(diffusers folds alpha / rank into the matrices before multiplying)")
    assert ours_changed == ref_changed
    assert {"transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.attn.to_k.weight",
            "transformer_blocks.1.attn.add_v_proj.weight", "single_transformer_blocks.1.proj_mlp.weight",
            "single_transformer_blocks.0.attn.to_v.weight", "norm_out.linear.weight"} <= ours_changed
    assert diff <= 1e-6

    # the same LoRA as PEFT keys under the original names (ComfyUI's diffusion_model.*) fuses identically
    peft_path = _peft(tmp_path / "flux_dm.safetensors", {"diffusion_model": pairs},
                      alphas={f"diffusion_model.{n}": _flux_alpha(n) for n in pairs})
    fuser.set([{"uri": str(peft_path), "scale": SCALE}])
    assert all(torch.equal(v, ours_state[k]) for k, v in ours.state_dict().items())
    assert inspect_lora(str(path))["layout"] == "bfl"
    fuser.clear()
    assert all(torch.equal(v, base[k]) for k, v in ours.state_dict().items())


def test_flux_peft_lora_with_alphas_matches_diffusers(flux_pair, tmp_path):
    from diffusers.loaders import FluxLoraLoaderMixin

    ours, ref = flux_pair
    base = _state(ref)
    ours.load_state_dict(base)
    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.add_k_proj", "transformer_blocks.0.ff.net.2",
             "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.1.attn.to_v", "norm_out.linear",
             "x_embedder", "time_text_embed.guidance_embedder.linear_1"]
    pairs = _pairs(ours, names, 4, 8, strength=0.5)
    alphas = {f"transformer.{n}": (2.0 if i % 3 else 16.0) for i, n in enumerate(names)}
    path = _peft(tmp_path / "flux_peft.safetensors", {"transformer": pairs}, alphas=alphas)
    LoraFuser({"transformer": ours}).set([{"uri": str(path), "scale": SCALE}])

    state, network_alphas = FluxLoraLoaderMixin.lora_state_dict(str(path), return_alphas=True)
    expected = _diffusers_flux(ref, state, network_alphas)
    diff, ours_changed, ref_changed = _compare(_state(ours), _state(expected), base)
    print(f"FLUX PEFT: max |ours - diffusers| = {diff:.3g} over {len(ours_changed)} fused parameters")
    assert ours_changed == ref_changed == {n + ".weight" for n in names}
    assert diff == 0.0
    ours.load_state_dict(base)


def test_flux_kohya_text_encoders_map_to_clip_and_t5(flux_pair, tmp_path):
    """lora_te1_ -> FLUX's CLIP (text_encoder), lora_te3_ -> its T5 (text_encoder_2), by the formula."""
    from transformers import T5Config, T5EncoderModel

    ours, _ref = flux_pair
    clip = _clip(False, 4)
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4)).eval()
    clip_pairs = _pairs(clip, ["encoder.layers.0.mlp.fc1"], 2, 1)
    t5_pairs = _pairs(t5, ["encoder.block.0.layer.0.SelfAttention.q"], 2, 2)
    path = _kohya(tmp_path / "te.safetensors", {"lora_te1_": {f"text_model.{n}": p for n, p in clip_pairs.items()},
                                                "lora_te3_": t5_pairs}, alpha=1.0)
    modules = {"transformer": ours, "text_encoder": clip, "text_encoder_2": t5}
    deltas = lora_deltas(str(path), modules, scale=2.0)
    assert set(deltas) == {"text_encoder", "text_encoder_2"}
    for component, pairs in (("text_encoder", clip_pairs), ("text_encoder_2", t5_pairs)):
        (name, (down, up)), = pairs.items()
        assert list(deltas[component]) == [name + ".weight"]
        assert torch.equal(deltas[component][name + ".weight"], (up @ down) * (1.0 / 2 * 2.0))


# --------------------------------------------------------------------------------------------
# Real-size name mapping (meta tensors): every module a kohya LoRA can name, against diffusers
# --------------------------------------------------------------------------------------------


def _diffusers_unet_module(stem: str, layers_per_block: int) -> set[str]:
    """The UNet module diffusers' kohya converters load ``lora_unet_<stem>`` into."""
    from types import SimpleNamespace

    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils import convert_unet_state_dict_to_peft

    key = f"lora_unet_{stem}"
    state = {f"{key}.lora_down.weight": torch.zeros(1), f"{key}.lora_up.weight": torch.zeros(1)}
    state = _maybe_map_sgm_blocks_to_diffusers(state, SimpleNamespace(layers_per_block=layers_per_block))
    state, _alphas = _convert_non_diffusers_lora_to_diffusers(state)
    state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
    return {k.split(".lora_A")[0] for k in state if ".lora_A" in k}


@pytest.mark.parametrize("variant", ["sdxl", "sd1"])
def test_real_unet_kohya_names_map_like_diffusers(variant):
    """SDXL files name modules in the SGM layout (input_blocks_4_1_...), SD 1.x files in diffusers'
    (down_blocks_1_attentions_0_...): at the real sizes every linear / conv of the UNet is found
    where diffusers' converters put it (two documented diffusers slips aside)."""
    from batchgen.checkpoints import single_file as sf
    from batchgen.checkpoints.lora import _Index
    from batchgen.models.unet import UNet2DConditionModel

    config = sf._UNET_SDXL if variant == "sdxl" else sf._UNET_SD1
    with torch.device("meta"):
        unet = UNet2DConditionModel(config)
    index = _Index("unet", unet)
    table = index.original_underscored if variant == "sdxl" else index.underscored
    assert len(table) == len(index.params) == (794 if variant == "sdxl" else 282)
    known_slips = {  # where diffusers 0.42 is wrong, not us
        "add_embedding_linear_1", "add_embedding_linear_2",  # diffusers: 'add.embedding.linear'
        "output_blocks_2_1_conv",  # SD1's first up level has no attention: diffusers says attentions.2.conv
    }
    for stem, targets in table.items():
        if stem in known_slips:
            continue
        assert _diffusers_unet_module(stem, config["layers_per_block"]) == {targets[0].param[: -len(".weight")]}, stem


def test_real_flux_kohya_names_map_like_diffusers():
    """Every BFL module of the real FLUX.1-dev (fused q/k/v, linear1 = q/k/v/mlp, adaLN swap) lands
    on the parameters diffusers' kohya converter (with its real built-in sizes) targets."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from batchgen.checkpoints import single_file as sf
    from batchgen.checkpoints.lora import _Index
    from batchgen.models.flux import FluxTransformer2DModel

    with torch.device("meta"):
        flux = FluxTransformer2DModel(sf._FLUX_DEV)
    index = _Index("transformer", flux)
    table = index.original_underscored
    assert "double_blocks_18_img_attn_qkv" in table and "single_blocks_37_linear1" in table
    for stem, targets in table.items():
        rows = sum(index.params[t.param].shape[0] for t in targets)
        cols = index.params[targets[0].param].shape[1]
        key = f"lora_unet_{stem}"
        state = {f"{key}.lora_down.weight": torch.zeros(1, cols), f"{key}.lora_up.weight": torch.zeros(rows, 1)}
        converted = _convert_kohya_flux_lora_to_diffusers(state)
        expected = {k.removeprefix("transformer.").split(".lora_A")[0] for k in converted if ".lora_A" in k}
        assert expected == {t.param[: -len(".weight")] for t in targets}, stem


def test_sd3_kohya_fused_qkv_becomes_row_slices(tmp_path):
    """sd-scripts' SD3 names (joint_blocks_N_x_block_attn_qkv, ..._context_block_...) through the
    same single-file rules: the fused LoRA's delta is cut into to_q / to_k / to_v (diffusers has no
    kohya SD3 converter to compare with, so the reference is the formula on up's row blocks)."""
    from batchgen.models.mmdit import MMDIT_TINY_SD35, SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(MMDIT_TINY_SD35).eval()
    inner = model.state_dict()["transformer_blocks.0.attn.to_q.weight"].shape[0]
    gen = torch.Generator().manual_seed(1)
    qkv = (torch.randn(2, inner, generator=gen), torch.randn(3 * inner, 2, generator=gen))
    context = (torch.randn(2, inner, generator=gen), torch.randn(3 * inner, 2, generator=gen))
    proj = (torch.randn(2, inner, generator=gen), torch.randn(inner, 2, generator=gen))
    path = _kohya(tmp_path / "sd3.safetensors", {"lora_unet_": {"joint_blocks.0.x_block.attn.qkv": qkv,
                                                               "joint_blocks.0.context_block.attn.qkv": context,
                                                               "joint_blocks.0.x_block.attn2.proj": proj}}, alpha=1.0)
    deltas = lora_deltas(str(path), {"transformer": model}, scale=0.5)["transformer"]
    factor = 1.0 / 2 * 0.5
    for (down, up), names in ((qkv, ("to_q", "to_k", "to_v")), (context, ("add_q_proj", "add_k_proj", "add_v_proj"))):
        for i, name in enumerate(names):
            expected = (up[i * inner:(i + 1) * inner] @ down) * factor
            assert torch.equal(deltas[f"transformer_blocks.0.attn.{name}.weight"], expected)
    assert torch.equal(deltas["transformer_blocks.0.attn2.to_out.0.weight"], (proj[1] @ proj[0]) * factor)
    assert len(deltas) == 7
    assert inspect_lora(str(path))["layout"] == "mmdit"
