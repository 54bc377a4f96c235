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
