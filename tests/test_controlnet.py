"""ControlNet loading and request checks: what is refused (naming the argument, item or file), what
model_info records, and that LoRAs, dtype moves, fp8 storage and warmup keep working with ControlNets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from batchgen import load_pipeline
from batchgen.errors import CheckpointError

SIZE = 32


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    from batchgen.tiny.controlnet import write_controlnet

    root = tmp_path_factory.mktemp("cn")
    return {"sd1": write_controlnet(root / "sd1", "sd1", 1), "sd1b": write_controlnet(root / "sd1b", "sd1", 2),
            "sdxl": write_controlnet(root / "sdxl", "sdxl", 1)}


@pytest.fixture(scope="module")
def plain(tiny_sd1):
    return load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def one(tiny_sd1, nets):
    return load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32, controlnets=[str(nets["sd1"])])


@pytest.fixture(scope="module")
def two(tiny_sd1, nets):
    return load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32, controlnets=[nets["sd1"], nets["sd1b"]])


IMG = np.full((40, 40, 3), 200, dtype=np.uint8)
ARGS = dict(steps=2, width=SIZE, height=SIZE)


def test_model_info_lists_each_controlnet_with_its_sha256(one, two, plain, nets):
    from batchgen.checkpoints.folder import fingerprint

    info = two.model_info["controlnets"]
    assert [c["uri"] for c in info] == [str(nets["sd1"]), str(nets["sd1b"])]
    files = [nets["sd1"] / "config.json", nets["sd1"] / "diffusion_pytorch_model.safetensors"]
    assert info[0]["sha256"] == fingerprint(nets["sd1"], files) and info[0]["format"] == "diffusers"
    assert info[0]["sha256"] != info[1]["sha256"]
    assert "controlnets" not in plain.model_info
    assert one.controlnet.nets[0].config["conditioning_channels"] == 3


def test_control_arguments_without_a_controlnet_are_refused(plain):
    with pytest.raises(ValueError, match=r"control_images: no ControlNet is loaded.*controlnets="):
        plain.generate(["a"], [0], control_images=[IMG], **ARGS)
    with pytest.raises(ValueError, match=r"controlnet_conditioning_scale: no ControlNet is loaded"):
        plain.generate(["a"], [0], controlnet_conditioning_scale=0.5, **ARGS)


@pytest.mark.parametrize("kwargs, message", [
    ({}, r"control_images: this pipeline has 1 ControlNet loaded; pass one control image per prompt"),
    ({"control_images": [IMG]}, r"control_images: expected 2 entries \(one per prompt\), got 1"),
    ({"control_images": [IMG, None]}, r"control_images\[1\]: missing"),
    ({"control_images": [IMG, "x.png"]}, r"control_images\[1\]: expected a PIL image or uint8 array, got str"),
    ({"control_images": [IMG, IMG], "controlnet_conditioning_scale": [1.0, 2.0, 3.0]},
     r"controlnet_conditioning_scale: expected one value, 2 values \(one per prompt\); got 3"),
    ({"control_images": [IMG, IMG], "controlnet_conditioning_scale": [1.0, 11.0]},
     r"controlnet_conditioning_scale\[1\]: 11.0 is outside \[0, 10\]"),
    ({"control_images": [IMG, IMG], "control_guidance_start": [0.0, 0.6], "control_guidance_end": 0.5},
     r"control_guidance_start\[1\]: 0.6 is not below control_guidance_end 0.5"),
])
def test_bad_control_requests_name_the_argument_and_item(one, kwargs, message):
    with pytest.raises(ValueError, match=message):
        one.validate(["a", "b"], [0, 1], **ARGS, **kwargs)


def test_several_controlnets_take_a_list_per_item_and_per_net_values(two):
    with pytest.raises(ValueError, match=r"control_images\[0\]: expected a list of 2 images \(one per ControlNet\)"):
        two.validate(["a"], [0], control_images=[IMG], **ARGS)
    with pytest.raises(ValueError,
                       match=r"controlnet_conditioning_scale\[1\]: expected 2 values \(one per ControlNet\)"):
        two.validate(["a", "b", "c"], [0, 1, 2], control_images=[[IMG, IMG]] * 3,
                     controlnet_conditioning_scale=[1.0, [1.0, 2.0, 3.0], 1.0], **ARGS)
    req = two.validate(["a", "b", "c"], [0, 1, 2], control_images=[[IMG, IMG]] * 3,
                       controlnet_conditioning_scale=[0.5, 1.5], control_guidance_end=[1.0, [0.5, 0.9], 0.3], **ARGS)
    assert req.control.scales == [[0.5, 1.5]] * 3  # a flat list of 2 = one per ControlNet (diffusers' meaning)
    assert req.control.ends == [[1.0, 1.0], [0.5, 0.9], [0.3, 0.3]]


def test_control_images_are_resized_like_diffusers_control_image_processor(one):
    from PIL import Image

    from batchgen.control import control_pixels

    rgba = np.random.default_rng(0).integers(0, 256, (50, 70, 4), dtype=np.uint8)
    got = control_pixels(rgba, SIZE, SIZE, "x")
    # diffusers: resize in the image's own mode (premultiplied alpha for RGBA), then RGB
    want = np.asarray(Image.fromarray(rgba).resize((SIZE, SIZE), resample=Image.LANCZOS).convert("RGB"))
    assert np.array_equal(got, want)
    gray = control_pixels(np.zeros((SIZE, SIZE), dtype=np.uint8), SIZE, SIZE, "x")
    assert gray.shape == (SIZE, SIZE, 3)
    assert one.generate(["a"], [0], control_images=[rgba], **ARGS)[0].shape == (SIZE, SIZE, 3)


def test_a_controlnet_of_another_model_is_refused_naming_the_file(tiny_sd1, nets, tmp_path):
    with pytest.raises(CheckpointError, match=rf"{nets['sdxl']}.*ControlNet \(SDXL\) does not fit the model"):
        load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32, controlnets=[str(nets["sdxl"])])
    lora_like = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(lora_like))
    with pytest.raises(CheckpointError, match=rf"{lora_like}: not a ControlNet checkpoint"):
        load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32, controlnets=[str(lora_like)])
    with pytest.raises(CheckpointError, match=r"missing: .*does not exist|does not exist"):
        load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32, controlnets=[str(tmp_path / "missing")])
    with pytest.raises(ValueError, match=r"controlnets: expected a list"):
        load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32, controlnets=str(nets["sd1"]))


def test_a_controlnet_for_a_family_without_controlnets_is_refused(nets):
    with pytest.raises(CheckpointError, match=r"controlnets: this is a dit model"):
        load_pipeline("builtin:tiny-dit", device="cpu", dtype=torch.float32, controlnets=[str(nets["sd1"])])


def test_loras_dtype_and_warmup_work_with_controlnets(tiny_sd1, nets, tmp_path):
    pipe = load_pipeline(tiny_sd1, device="cpu", dtype=torch.bfloat16, controlnets=[str(nets["sd1"])])
    assert all(p.dtype == torch.bfloat16 for p in pipe.controlnet.parameters())  # Family.to moved them
    pipe = load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32, controlnets=[str(nets["sd1"])])
    assert pipe.warmup(2, width=SIZE, height=SIZE) > 0  # gray control images
    before = pipe.generate(["a"], [3], control_images=[IMG], **ARGS)
    weight = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight
    lora = tmp_path / "l.safetensors"
    gen = torch.Generator().manual_seed(0)
    save_file({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
               torch.randn(2, weight.shape[1], generator=gen),
               "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight":
               torch.randn(weight.shape[0], 2, generator=gen)}, str(lora))
    pipe.set_loras([{"uri": str(lora), "scale": 1.0}])
    assert not np.array_equal(pipe.generate(["a"], [3], control_images=[IMG], **ARGS)[0], before[0])
    pipe.set_loras([])
    assert np.array_equal(pipe.generate(["a"], [3], control_images=[IMG], **ARGS)[0], before[0])


def test_controlnet_weights_can_be_stored_in_fp8(tiny_sd1, nets):
    pipe = load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32, controlnets=[str(nets["sd1"])],
                         fp8=("controlnet",))
    assert pipe.model_info["fp8"] == ["controlnet"]
    assert pipe.generate(["a"], [0], control_images=[IMG], **ARGS)[0].shape == (SIZE, SIZE, 3)


@pytest.mark.parametrize("base, controlnet", [("builtin:tiny", "builtin:tiny-sd1-controlnet"),
                                              ("builtin:tiny-sdxl", "builtin:tiny-sdxl-controlnet")])
def test_builtin_controlnets_fit_their_tiny_models(base, controlnet):
    from batchgen.builtin import builtin_model_path

    pipe = load_pipeline(base, device="cpu", dtype=torch.float32, controlnets=[controlnet])
    info = pipe.model_info["controlnets"][0]
    assert info["uri"] == controlnet and info["format"] == "diffusers"
    folder = builtin_model_path(controlnet.removeprefix("builtin:"))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    edges = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    edges[::8] = 255
    with_edges = pipe.generate(["a"], [0], control_images=[edges], **ARGS)[0]
    without = pipe.generate(["a"], [0], control_images=[edges], controlnet_conditioning_scale=0.0, **ARGS)[0]
    assert not np.array_equal(with_edges, without)  # the tiny ControlNet steers the image


def test_make_tiny_single_file_of_a_controlnet_is_the_original_layout(tmp_path, tiny_sd1):
    from batchgen.checkpoints.single_file import read_header
    from batchgen.tiny import make_tiny_single_file

    path = make_tiny_single_file(tmp_path / "control_tiny.safetensors", variant="sd1-controlnet")
    keys = set(read_header(path))
    assert "control_model.input_hint_block.0.weight" in keys and "control_model.zero_convs.0.0.weight" in keys
    pipe = load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32, controlnets=[str(path)])
    assert pipe.model_info["controlnets"][0]["format"] == "ldm-single-file"


def test_controlnets_load_from_s3(tiny_sd1, nets, s3_server, s3_bucket, one):
    """A ControlNet folder and a single file from s3:// render as their local copies do."""
    from batchgen.storage import StorageConfig
    from tests.fixtures_s3 import s3_client

    client = s3_client(s3_server)
    for path in sorted(nets["sd1"].iterdir()):
        client.put_object(Bucket=s3_bucket, Key=f"cn/folder/{path.name}", Body=path.read_bytes())
    client.put_object(Bucket=s3_bucket, Key="cn/single.safetensors",
                      Body=(nets["sd1"] / "diffusion_pytorch_model.safetensors").read_bytes())
    cfg = StorageConfig(endpoint_url=s3_server)
    want = one.generate(["a"], [5], control_images=[IMG], **ARGS)[0]
    for uri in (f"s3://{s3_bucket}/cn/folder", f"s3://{s3_bucket}/cn/single.safetensors"):
        pipe = load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32, controlnets=[uri], storage_config=cfg)
        assert pipe.model_info["controlnets"][0]["uri"] == uri
        assert np.array_equal(pipe.generate(["a"], [5], control_images=[IMG], **ARGS)[0], want), uri
    assert (load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32, storage_config=cfg,
                          controlnets=[f"s3://{s3_bucket}/cn/folder"]).model_info["controlnets"][0]["sha256"]
            == one.model_info["controlnets"][0]["sha256"])


def test_keep_table_is_diffusers_controlnet_keep():
    from batchgen.control import keeps

    for calls in (1, 3, 7, 9, 20):  # 9: Heun's 2 x 5 - 1 calls
        for start, end in ((0.0, 1.0), (0.2, 0.7), (1 / 3, 0.9), (0.0, 0.1)):
            want = [1.0 - float(i / calls < start or (i + 1) / calls > end) for i in range(calls)]
            assert list(keeps(calls, start, end)) == want


@pytest.mark.parametrize("base, extra", [("sd1", {}), ("sd2", {"controlnet_conditioning_channel_order": "bgr"}),
                                         ("sdxl", {}), ("sdxl", {"mid_block_type": "UNetMidBlock2D"})])
def test_controlnet_module_equals_diffusers(base, extra):
    """Module level: diffusers' ControlNetModel and ours with the same (perturbed) weights give the
    same residuals, exactly; a per-row scale equals diffusers' scalar scale row by row."""
    diffusers = pytest.importorskip("diffusers")
    from batchgen.models.controlnet import ControlNetModel
    from batchgen.tiny.controlnet import controlnet_config
    from tests.module_parity import max_diff, module_pair

    config = {**controlnet_config(base), **extra}
    ref, ours = module_pair(diffusers.ControlNetModel, ControlNetModel, config, seed=3)
    assert sorted(ref.state_dict()) == sorted(ours.state_dict())
    gen = torch.Generator().manual_seed(0)
    x, image = torch.randn(2, 4, 8, 8, generator=gen), torch.rand(2, 3, 64, 64, generator=gen)
    context = torch.randn(2, 7, config["cross_attention_dim"], generator=gen)
    added, ref_added = {}, {}
    if config.get("addition_embed_type"):
        added = {"text_embeds": torch.randn(2, 32, generator=gen),
                 "time_ids": torch.tensor([[64.0, 48, 0, 0, 64, 48]] * 2)}
        ref_added = {"added_cond_kwargs": added}
    with torch.no_grad():
        down_ref, mid_ref = ref(x, torch.tensor(501.0), context, image, conditioning_scale=0.7, return_dict=False,
                                **ref_added)
        down, mid = ours(x, torch.tensor(501.0), context, image, conditioning_scale=0.7, **added)
        down_rows, mid_rows = ours(x, torch.tensor(501.0), context, image,
                                   conditioning_scale=torch.tensor([0.7, 0.7]), **added)
    assert len(down) == len(down_ref)
    assert max(max_diff(a, b) for a, b in zip(down, down_ref)) == 0 and max_diff(mid, mid_ref) == 0
    assert all(torch.equal(a, b) for a, b in zip(down, down_rows)) and torch.equal(mid, mid_rows)
