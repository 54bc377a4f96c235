"""IP-Adapter loading, requests and errors (no diffusers pipelines; parity is test_ip_adapter_parity.py).

The files people download are read strictly (the variants batchgen does not build refused by name,
a file for another model refused naming the key), the image encoder is found as in the h94 layout or
the error names where it looked, generate() refuses inconsistent arguments naming argument and item,
the builtins load, and LoRA / Family.to / fp8 keep working with an adapter loaded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from batchgen import load_pipeline
from batchgen.errors import CheckpointError
from batchgen.tiny.ip_adapter import write_ip_adapter

SIZE = 32
KW = dict(steps=2, width=SIZE, height=SIZE)


def refs(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (24 + 4 * i, 36, 3), dtype=np.uint8) for i in range(count)]


@pytest.fixture(scope="module")
def sd1_adapter(tmp_path_factory):
    return write_ip_adapter(tmp_path_factory.mktemp("ipa") / "models", "sd1", "plain", 1)


@pytest.fixture(scope="module")
def pipe(tiny_sd1, sd1_adapter):
    return load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32, ip_adapter=str(sd1_adapter))


def test_cross_attention_order_is_diffusers_processor_order():
    diffusers = pytest.importorskip("diffusers")
    from batchgen.models import UNET_SD1_TINY
    from batchgen.models.unet import SDXL_BASE_UNET_CONFIG, UNET_SDXL_TINY, UNet2DConditionModel

    for config in (UNET_SD1_TINY, UNET_SDXL_TINY, SDXL_BASE_UNET_CONFIG):
        with torch.device("meta"):
            ours = UNet2DConditionModel(config)
            theirs = diffusers.UNet2DConditionModel.from_config(config)
        names = [k.removesuffix(".processor") for k in theirs.attn_processors if k.endswith("attn2.processor")]
        layers = ours.cross_attentions()
        assert [n for n, _ in layers] == names
        assert [a.ip_slot for _, a in layers] == list(range(len(names)))
    assert len(names) == 70  # the real SDXL UNet: ip_adapter.1 ... ip_adapter.139


def test_model_info_and_scale_zero_is_the_plain_model(pipe, tiny_sd1, sd1_adapter):
    info = pipe.model_info["ip_adapter"]
    assert info["uri"] == str(sd1_adapter) and info["kind"] == "plain" and len(info["sha256"]) == 64
    assert info["image_encoder"]["uri"].endswith("models/image_encoder") and len(info["image_encoder"]["sha256"]) == 64
    plain = load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32)
    base = plain.generate(["a cat", "a dog"], [1, 2], **KW)
    off = pipe.generate(["a cat", "a dog"], [1, 2], ip_adapter_images=refs(2), ip_adapter_scale=0, **KW)
    assert all(np.array_equal(a, b) for a, b in zip(base, off))
    on = pipe.generate(["a cat", "a dog"], [1, 2], ip_adapter_images=refs(2), ip_adapter_scale=[0, 1], **KW)
    assert np.array_equal(on[0], base[0]) and not np.array_equal(on[1], base[1])


def test_request_errors_name_argument_and_item(pipe, tiny_sd1):
    plain = load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32)
    img = refs(1)[0]
    cases = [
        (plain, dict(ip_adapter_images=[img]), "ip_adapter_images: no IP-Adapter is loaded"),
        (plain, dict(ip_adapter_scale=0.5), "ip_adapter_scale: no IP-Adapter is loaded"),
        (pipe, {}, "ip_adapter_images: this pipeline has an IP-Adapter loaded"),
        (pipe, dict(ip_adapter_images=[img]), r"ip_adapter_images: expected 2 images \(one per prompt\), got 1"),
        (pipe, dict(ip_adapter_images=[img, None]), r"ip_adapter_images\[1\]: missing"),
        (pipe, dict(ip_adapter_images=[img, "x.png"]), r"ip_adapter_images\[1\]: expected a PIL image"),
        (pipe, dict(ip_adapter_images=[img, img], ip_adapter_scale=[1.0]), "ip_adapter_scale: expected one value or 2"),
        (pipe, dict(ip_adapter_images=[img, img], ip_adapter_scale=[1.0, -1]), r"ip_adapter_scale\[1\]: -1"),
    ]
    for model, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            model.validate(["a", "b"], [1, 2], **kwargs)


def _variant(path, tmp_path, name, change):
    state = dict(load_file(str(path)))
    change(state)
    out = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out


def test_files_refused_by_name(tiny_sd1, sd1_adapter, tmp_path):
    """Variants not built, files for another model, missing / unexpected keys, a wrong encoder."""
    faceid = lambda s: (s.pop("image_proj.proj.weight"), s.update({"image_proj.proj.0.weight": torch.zeros(8, 4),  # noqa: E731
                                                                    "image_proj.proj.2.weight": torch.zeros(8, 8)}))
    fullface = lambda s: s.update({"image_proj.proj.3.weight": torch.zeros(8)})  # noqa: E731
    plus_face = lambda s: s.update({"image_proj.perceiver_resampler.proj_in.weight": torch.zeros(8, 8)})  # noqa: E731
    lora = lambda s: s.update({"ip_adapter.1.to_k_lora.down.weight": torch.zeros(4, 4)})  # noqa: E731
    missing = lambda s: s.pop("ip_adapter.7.to_v_ip.weight")  # noqa: E731
    extra = lambda s: s.update({"ip_adapter.9.to_k_ip.weight": torch.zeros(64, 32)})  # noqa: E731
    cases = [(faceid, "IP-Adapter FaceID file"), (fullface, "full-face"), (plus_face, "FaceID Plus"),
             (lora, "FaceID file .it carries LoRA"), (missing, r"missing weight key 'ip_adapter.7.to_v_ip.weight'"),
             (extra, r"unexpected key 'ip_adapter.9.to_k_ip.weight'")]
    for i, (change, message) in enumerate(cases):
        path = _variant(sd1_adapter, tmp_path, f"v{i}.safetensors", change)
        with pytest.raises(CheckpointError, match=message):
            load_pipeline(tiny_sd1, device="cpu", ip_adapter=str(path),
                          ip_adapter_image_encoder=str(sd1_adapter.parent / "image_encoder"))
    sdxl = write_ip_adapter(tmp_path / "sdxl_models", "sdxl", "plain", 1, encoder=False)
    with pytest.raises(CheckpointError, match=r"ip-adapter_sdxl.safetensors: (missing|unexpected) key 'ip_adapter"):
        load_pipeline(tiny_sd1, device="cpu", ip_adapter=str(sdxl))
    with pytest.raises(CheckpointError, match=r"looked in .*sdxl_models/image_encoder, .*/image_encoder.*"
                                              r"pass ip_adapter_image_encoder"):
        from batchgen.checkpoints.ip_adapter import find_image_encoder, open_ip_adapter

        find_image_encoder(str(sdxl), open_ip_adapter(sdxl), lambda u: u)
    plus = write_ip_adapter(tmp_path / "plus", "sd1", "plus", 1, encoder=False)
    with pytest.raises(CheckpointError, match="hidden states .hidden_size. are 24 wide but the IP-Adapter "
                                              "ip-adapter-plus_sd15.safetensors reads 32"):
        load_pipeline(tiny_sd1, device="cpu", ip_adapter=str(plus),
                      ip_adapter_image_encoder=str(_narrow_encoder(tmp_path)))
    with pytest.raises(CheckpointError, match="pickle weights are refused"):
        torch.save({"image_proj": {}, "ip_adapter": {}}, tmp_path / "ip-adapter_sd15.bin")
        load_pipeline(tiny_sd1, device="cpu", ip_adapter=str(tmp_path / "ip-adapter_sd15.bin"))


def _narrow_encoder(tmp_path):
    """An encoder folder whose hidden size (24) fits no tiny adapter."""
    import json

    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from batchgen.tiny.common import random_state_dict
    from batchgen.tiny.ip_adapter import ENCODER_CONFIG

    root = tmp_path / "narrow"
    root.mkdir()
    config = {**ENCODER_CONFIG, "hidden_size": 24, "intermediate_size": 48}
    module = CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
    save_file({k: v.contiguous() for k, v in random_state_dict(module, 0).items()}, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return root


def test_builtins_and_what_keeps_working(tmp_path):
    """builtin:tiny(-sdxl)-ip-adapter load on their tiny models; LoRA swaps, Family.to and fp8
    storage of the UNet keep working with an adapter loaded."""
    from batchgen.builtin import BUILTINS

    assert BUILTINS["tiny-sd1-ip-adapter"] == ("sd1-ip-adapter", 0)
    xl = load_pipeline("builtin:tiny-sdxl", device="cpu", dtype=torch.float32, ip_adapter="builtin:tiny-sdxl-ip-adapter")
    assert xl.model_info["ip_adapter"]["uri"] == "builtin:tiny-sdxl-ip-adapter"
    xl.generate(["a"], [1], ip_adapter_images=refs(1), **KW)
    assert xl.warmup(2, width=SIZE, height=SIZE) > 0  # the actors' warm-up: a gray reference image per item
    pipe = load_pipeline("builtin:tiny", device="cpu", dtype=torch.float32, ip_adapter="builtin:tiny-sd1-ip-adapter")
    args = (["a cat"], [3])
    kwargs = dict(ip_adapter_images=refs(1, seed=4), ip_adapter_scale=0.8, **KW)
    base = pipe.generate(*args, **kwargs)[0]
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    gen = torch.Generator().manual_seed(0)
    save_file({f"{key}.lora_down.weight": torch.randn(2, 32, generator=gen),
               f"{key}.lora_up.weight": torch.randn(64, 2, generator=gen)}, str(tmp_path / "l.safetensors"))
    pipe.set_loras([{"uri": str(tmp_path / "l.safetensors"), "scale": 1.0}])
    assert not np.array_equal(pipe.generate(*args, **kwargs)[0], base)
    pipe.set_loras([])
    pipe.family.to(torch.device("cpu"), torch.float32)
    assert np.array_equal(pipe.generate(*args, **kwargs)[0], base)
    fp8 = load_pipeline("builtin:tiny", device="cpu", dtype=torch.float32, fp8=("unet",),
                        ip_adapter="builtin:tiny-sd1-ip-adapter")
    assert fp8.generate(*args, **kwargs)[0].std() > 0


def test_from_s3_with_the_encoder_found_beside_it(tiny_sd1, sd1_adapter, s3_server, s3_bucket, tmp_path):
    """An s3:// IP-Adapter: its encoder is looked for at the same places under the URI; the SDXL
    layout's other encoder (sdxl_models/image_encoder) does not fit a Plus file, models/ does."""
    from batchgen.checkpoints.ip_adapter import find_image_encoder, open_ip_adapter
    from batchgen.storage import StorageConfig
    from tests.fixtures_s3 import s3_client

    client = s3_client(s3_server)
    plus = write_ip_adapter(tmp_path / "models", "sd1", "plus", 2, encoder=False)
    encoder = sd1_adapter.parent / "image_encoder"
    uploads = {"models/ip-adapter_sd15.safetensors": sd1_adapter, "sdxl_models/plus.safetensors": plus}
    uploads.update({f"models/image_encoder/{p.name}": p for p in encoder.iterdir()})
    uploads.update({f"sdxl_models/image_encoder/{p.name}": p for p in _narrow_encoder(tmp_path).iterdir()})
    for key, path in uploads.items():
        client.put_object(Bucket=s3_bucket, Key=key, Body=path.read_bytes())
    cfg = StorageConfig(endpoint_url=s3_server)
    uri = f"s3://{s3_bucket}/models/ip-adapter_sd15.safetensors"
    pipe = load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32, storage_config=cfg, ip_adapter=uri)
    info = pipe.model_info["ip_adapter"]
    assert info["uri"] == uri and info["image_encoder"]["uri"] == f"s3://{s3_bucket}/models/image_encoder"
    local = load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32, ip_adapter=str(sd1_adapter))
    assert info["sha256"] == local.model_info["ip_adapter"]["sha256"]
    assert info["image_encoder"]["sha256"] == local.model_info["ip_adapter"]["image_encoder"]["sha256"]
    from batchgen.builtin import resolve_model_uri

    resolve = lambda u: resolve_model_uri(u, cfg)  # noqa: E731
    plus_uri = f"s3://{s3_bucket}/sdxl_models/plus.safetensors"
    where, _folder = find_image_encoder(plus_uri, open_ip_adapter(resolve(plus_uri)), resolve)
    assert where == f"s3://{s3_bucket}/models/image_encoder"


def test_preprocessor_config_of_the_encoder_folder_is_used(sd1_adapter, tmp_path):
    """The encoder folder's preprocessor_config.json decides the pixels (and is part of its sha256);
    without one, CLIP's standard preprocessing at the encoder's image size."""
    import json
    import shutil

    from batchgen.checkpoints.ip_adapter import image_processor, open_image_encoder

    plain = open_image_encoder(sd1_adapter.parent / "image_encoder")
    assert image_processor(plain).crop_size == {"height": 32, "width": 32}
    folder = shutil.copytree(sd1_adapter.parent / "image_encoder", tmp_path / "enc")
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": 24, "size": 28, "do_center_crop": True, "do_normalize": True, "do_resize": True,
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3}), encoding="utf-8")
    given = open_image_encoder(folder)
    pixels = image_processor(given)(refs(1)[0], return_tensors="pt").pixel_values
    assert tuple(pixels.shape) == (1, 3, 24, 24) and given.sha256 != plain.sha256
