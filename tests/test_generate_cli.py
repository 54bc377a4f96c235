"""`batchgen generate` and `batchgen make-tiny-model` from the command line."""

from __future__ import annotations

import numpy as np
from PIL import Image

from batchgen import load_pipeline
from batchgen.cli import main
from batchgen.images import read_generation_parameters


def test_generate_writes_the_same_pixels_as_the_api(tmp_path, tiny_sd1, capsys):
    out = tmp_path / "out"
    code = main(["generate", "--model", str(tiny_sd1), "--prompt", "a red bicycle", "--prompt", "a cat",
                 "--seed", "5", "--steps", "3", "--width", "64", "--height", "64", "--sampler", "euler",
                 "--out", str(out)])
    assert code == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["0000-seed5.png", "0001-seed6.png"]
    expected = load_pipeline(tiny_sd1, device="cpu").generate(["a red bicycle", "a cat"], [5, 6], sampler="euler",
                                                              steps=3, width=64, height=64)
    for f, exp in zip(files, expected):
        assert np.array_equal(np.asarray(Image.open(f).convert("RGB")), exp)
    params = read_generation_parameters(files[0].read_bytes())
    assert params["seed"] == 5 and params["prompt"] == "a red bicycle" and params["sampler"] == "euler"


def test_generate_bad_arguments_exit_nonzero_with_message(tmp_path, tiny_sd1, capsys):
    code = main(["generate", "--model", str(tiny_sd1), "--prompt", "x", "--width", "100", "--out", str(tmp_path)])
    assert code == 2
    assert "width" in capsys.readouterr().err
    code = main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path)])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_make_tiny_model_cli(tmp_path, capsys):
    assert main(["make-tiny-model", str(tmp_path / "m"), "--variant", "sd2", "--seed", "3"]) == 0
    pipe = load_pipeline(tmp_path / "m", device="cpu")
    assert pipe.model_info["variant"] == "sd2" and pipe.model_info["prediction_type"] == "v_prediction"
    assert main(["make-tiny-model", str(tmp_path / "m")]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err


# --------------------------------------------------------------- family defaults and family options

def _run(tmp_path, model, *options, prompt="a cat"):
    out = tmp_path / "out"
    code = main(["generate", "--model", model, "--prompt", prompt, "--out", str(out), "--device", "cpu", *options])
    return code, out


def _only_image(out):
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["0000-seed0.png"]
    data = files[0].read_bytes()
    return Image.open(files[0]), read_generation_parameters(data)


def test_generate_options_come_from_the_settings_table():
    """One option per settings-table entry, none with a hard-coded value: left out = family default."""
    from batchgen.cli import build_parser
    from batchgen.settings import SETTINGS

    parser = build_parser(["generate"])
    args = parser.parse_args(["generate", "--prompt", "x"])
    for s in SETTINGS:
        assert hasattr(args, s.name), s.name
        if s.name != "seed":
            assert getattr(args, s.name) is None, s.name
    assert args.sampler is None
    args = parser.parse_args(["generate", "--prompt", "x", "--original-width", "1024", "--true-cfg-scale", "2",
                              "--max-sequence-length", "77", "--prompt-syntax", "a1111", "--crop-top", "8"])
    assert (args.original_width, args.true_cfg_scale, args.max_sequence_length, args.prompt_syntax,
            args.crop_top) == (1024, 2.0, 77, "a1111", 8)


def test_generate_flux_schnell_uses_its_family_defaults(tmp_path, capsys):
    code, out = _run(tmp_path, "builtin:tiny-flux-schnell", "--width", "32", "--height", "32")
    assert code == 0, capsys.readouterr().err
    image, params = _only_image(out)
    assert image.size == (32, 32)
    # the values actually used (FLUX schnell: flow_euler, 4 steps, no guidance), not ddim/30/7.5
    assert params["sampler"] == "flow_euler" and params["steps"] == 4 and params["guidance_scale"] == 0.0
    assert params["model_family"] == "flux" and params["true_cfg_scale"] == 1.0
    assert "Sampler: flow_euler" in image.info["parameters"]


def test_generate_dit_renders_a_class_name_at_its_own_size(tmp_path, capsys):
    code, out = _run(tmp_path, "builtin:tiny-dit", "--steps", "2", prompt="tabby")
    assert code == 0, capsys.readouterr().err
    image, params = _only_image(out)
    assert image.size == (64, 64)  # the DiT model's fixed size, not 512
    assert params["sampler"] == "ddim" and params["width"] == 64 and params["height"] == 64
    assert params["class_name"] == "tabby, tabby cat" and params["model_family"] == "dit"


def test_generate_sdxl_family_option_reaches_the_pipeline(tmp_path, capsys):
    code, out = _run(tmp_path, "builtin:tiny-sdxl", "--original-width", "1024", "--width", "64", "--height", "64",
                     "--steps", "2")
    assert code == 0, capsys.readouterr().err
    image, params = _only_image(out)
    assert image.size == (64, 64)
    assert params["sampler"] == "euler" and params["guidance_scale"] == 5.0  # SDXL's defaults
    assert params["original_width"] == 1024 and params["model_family"] == "sdxl"
    assert params["aesthetic_score"] == 6.0 and params["prompt_syntax"] == "plain"  # table defaults, as a job embeds
    pipe = load_pipeline("builtin:tiny-sdxl", device="cpu")
    with_option, without = (pipe.generate(["a cat"], [0], width=64, height=64, steps=2, **extra)[0]
                            for extra in ({"original_width": 1024}, {}))
    assert np.array_equal(np.asarray(image.convert("RGB")), with_option)
    assert not np.array_equal(with_option, without)  # the option changes the pixels: it was passed


def test_generate_parameters_are_the_jobs(tmp_path, capsys):
    """The embedded parameters are manifest.image_parameters of the row a job would hold."""
    from batchgen.manifest import image_parameters

    code, out = _run(tmp_path, "builtin:tiny-flux-schnell", "--width", "32", "--height", "32",
                     "--max-sequence-length", "32")
    assert code == 0, capsys.readouterr().err
    _, params = _only_image(out)
    row = {"item_id": None, "prompt": "a cat", "negative_prompt": "", "seed": 0, "width": 32, "height": 32,
           "steps": 4, "guidance_scale": 0.0, "strength": None, "init_image": None, "max_sequence_length": 32,
           "true_cfg_scale": 1.0, "sampler": "flow_euler", "sampler_options": "{}", "batch_size": 1, "loras": "[]",
           "model_fingerprint": params["model_fingerprint"], "model_family": "flux", "class_name": None}
    assert params == image_parameters(row)


def test_generate_refuses_another_familys_option(tmp_path, capsys):
    code, out = _run(tmp_path, "builtin:tiny-flux-schnell", "--width", "32", "--height", "32",
                     "--original-width", "1024")
    assert code == 2
    err = capsys.readouterr().err
    assert "original_width" in err and "sdxl" in err and "flux" in err
    assert not out.exists() or not any(out.iterdir())
