"""Issue 19 (hardening, part 2), items 8, 9, 10, 12 and parts of 18: untrusted input reaching
parsers (LoRA metadata, safetensors headers, embedded configs, prompt templates, ``--where``
expressions, the command line) gives a named error, never a hang, a traceback or a silently
wrong number. No Ray here: unit tests and in-process CLI calls."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from batchgen.checkpoints import single_file as sf
from batchgen.checkpoints.lora import LoraFuser, inspect_lora, lora_deltas, read_lora
from batchgen.cli import main as cli_main
from batchgen.errors import CheckpointError, InputError
from batchgen.prompts import TemplateError, load_template
from batchgen.where import WhereError, mask

REPO = Path(__file__).resolve().parents[1]


def _module() -> torch.nn.Module:
    """A stand-in denoiser: LoRA names ``proj`` (a 4x4 linear)."""
    torch.manual_seed(0)
    m = torch.nn.Module()
    m.proj = torch.nn.Linear(4, 4)
    return m


def _peft_lora(path: Path, down=None, up=None, metadata: dict | None = None, **extra) -> Path:
    state = {"unet.proj.lora_A.weight": torch.ones(2, 4) if down is None else down,
             "unet.proj.lora_B.weight": torch.ones(4, 2) if up is None else up, **extra}
    save_file(state, str(path), metadata=metadata)
    return path


def _adapter_metadata(**fields) -> dict:
    return {"lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in fields.items()})}


# ---------------------------------------------------------------------------- item 8: LoRA metadata


def test_alpha_pattern_from_the_file_is_never_a_regex(tmp_path):
    """``(.*)*x`` used to be compiled and matched against every module path: exponential
    backtracking, inspect and pre-flight hung. Now refused at once, naming file and key."""
    stem = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # a real module path's length
    path = tmp_path / "evil.safetensors"
    save_file({f"{stem}.lora_A.weight": torch.ones(2, 4), f"{stem}.lora_B.weight": torch.ones(4, 2)}, str(path),
              metadata=_adapter_metadata(lora_alpha=4, alpha_pattern={"(.*)*x": 3}))
    code = f"from batchgen.checkpoints.lora import read_lora\nread_lora({str(path)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "CheckpointError" in done.stderr
    assert "evil.safetensors" in done.stderr and "unet.alpha_pattern" in done.stderr and "(.*)*x" in done.stderr


def test_alpha_pattern_keys_match_as_module_path_suffixes(tmp_path):
    meta = _adapter_metadata(lora_alpha=4, alpha_pattern={"proj": 1, "other.proj": 8})
    (pair,) = read_lora(_peft_lora(tmp_path / "a.safetensors", metadata=meta)).pairs
    assert pair.alpha == 1.0
    meta = _adapter_metadata(lora_alpha=4, alpha_pattern={"roj": 1})  # not a whole path component
    (pair,) = read_lora(_peft_lora(tmp_path / "b.safetensors", metadata=meta)).pairs
    assert pair.alpha == 4.0


@pytest.mark.parametrize("raw, key", [
    (json.dumps({"unet.alpha_pattern": ["proj"]}), "unet.alpha_pattern"),
    (json.dumps({"unet.lora_alpha": "four"}), "unet.lora_alpha"),
    (json.dumps({"unet.alpha_pattern": {"proj": [1]}}), "unet.alpha_pattern"),
    (json.dumps({"unet.use_rslora": "yes"}), "unet.use_rslora"),
    (json.dumps(["unet.lora_alpha", 4]), "lora_adapter_metadata"),
    ("[" * 100000, "lora_adapter_metadata"),
])
def test_adapter_metadata_has_strict_types(tmp_path, raw, key):
    path = _peft_lora(tmp_path / "typed.safetensors", metadata={"lora_adapter_metadata": raw})
    with pytest.raises(CheckpointError, match="typed.safetensors") as err:
        read_lora(path)
    assert key in str(err.value)


# ---------------------------------------------------------------------------- item 9: named errors


def test_rank_zero_lora_is_a_named_error(tmp_path):
    path = _peft_lora(tmp_path / "rank0.safetensors", down=torch.ones(0, 4), up=torch.ones(4, 0),
                      **{"unet.proj.alpha": torch.tensor(4.0)})
    with pytest.raises(CheckpointError, match=r"rank0.safetensors: 'unet.proj' .*rank-0"):
        lora_deltas(path, {"unet": _module()})


def _header_file(path: Path, entries: dict, data: bytes = b"") -> Path:
    raw = json.dumps(entries).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("entry, message", [
    ({"dtype": "Q7", "shape": [2], "data_offsets": [0, 2]}, "unknown dtype 'Q7'"),
    ({"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}, "unknown dtype"),
    ({"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 0]}, r"shape \[-1, 4\] is not a list of integers >= 0"),
    ({"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 2**82]}, "more than any model holds"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 4]}, "does not fit its data_offsets"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "data_offsets"),
    ({"dtype": "F32", "shape": [2]}, "no valid dtype/shape/data_offsets"),
])
def test_hostile_safetensors_headers_are_named_errors(tmp_path, entry, message, capsys):
    path = _header_file(tmp_path / "hostile.safetensors", {"w.weight": entry})
    with pytest.raises(CheckpointError, match=message) as err:
        sf.read_header(path)
    assert "hostile.safetensors" in str(err.value) and "'w.weight'" in str(err.value)
    assert cli_main(["inspect", str(path)]) == 2
    assert "hostile.safetensors" in capsys.readouterr().err


def test_deeply_nested_safetensors_header_json(tmp_path):
    raw = b"[" * 200000
    path = tmp_path / "nested.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match="nested.safetensors: the safetensors header is not valid JSON"):
        sf.read_header(path)


@pytest.fixture(scope="module")
def tiny_single(tmp_path_factory):
    from batchgen.tiny import make_tiny_single_file

    return make_tiny_single_file(tmp_path_factory.mktemp("single") / "sd1.safetensors", "sd1")


def test_embedded_config_that_overflows_storage_is_a_named_error(tiny_single, tmp_path, capsys):
    from batchgen.checkpoints.sources import CONFIGS_KEY
    from batchgen.inspect import inspect_model

    with safe_open(str(tiny_single), "pt") as fh:
        metadata = dict(fh.metadata())
    configs = json.loads(metadata[CONFIGS_KEY])
    configs["vae"]["block_out_channels"] = [2**32] * len(configs["vae"]["block_out_channels"])
    path = tmp_path / "overflow.safetensors"
    save_file(load_file(str(tiny_single)), str(path), metadata={**metadata, CONFIGS_KEY: json.dumps(configs)})
    with pytest.raises(CheckpointError, match=r"overflow.safetensors.*vae.*cannot build the model from its config"):
        inspect_model(path, fingerprint=False)
    assert cli_main(["inspect", str(path)]) == 2
    assert "overflow" in capsys.readouterr().err


def test_where_nesting_is_bounded():
    table = pa.table({"seed": pa.array([1, 2], pa.int64())})
    for text in ["(" * 5000 + "seed == 1" + ")" * 5000, "not " * 5000 + "seed == 1"]:
        with pytest.raises(WhereError, match="nest more than 64 deep"):
            mask(text, table)
    assert mask("(" * 60 + "seed == 1" + ")" * 60, table).to_pylist() == [True, False]
    assert mask("not " * 60 + "seed == 1", table).to_pylist() == [True, False]


def test_where_integer_literals_beyond_int64_compare_exactly():
    big = 2**63 - 1
    table = pa.table({"seed": pa.array([0, big, None], pa.int64()), "u": pa.array([0, 2**64 - 1, 5], pa.uint64())})
    assert mask(f"seed < {10**30}", table).to_pylist() == [True, True, False]
    assert mask(f"seed > {10**30}", table).to_pylist() == [False, False, False]
    assert mask(f"seed > {-10**30}", table).to_pylist() == [True, True, False]
    assert mask(f"seed != {10**30}", table).to_pylist() == [True, True, False]
    assert mask(f"u == {2**64 - 1}", table).to_pylist() == [False, True, False]
    assert mask("u > -1", table).to_pylist() == [True, True, True]


def test_where_float_literal_against_integers_beyond_2_53_is_exact():
    """Arrow compares an int64 column with a float in float64: it refused values beyond 2**53
    (``seed > 1.5`` on real seeds), and would round them. Now exact."""
    big = 2**60 + 1  # float64 cannot hold it
    table = pa.table({"seed": pa.array([1, 2, big, None], pa.int64())})
    assert mask("seed > 1.5", table).to_pylist() == [False, True, True, False]
    assert mask("seed <= 1.5", table).to_pylist() == [True, False, False, False]
    assert mask("seed == 2.0", table).to_pylist() == [False, True, False, False]
    assert mask("seed != 2.5", table).to_pylist() == [True, True, True, False]
    assert mask(f"seed > {float(2**60)}", table).to_pylist() == [False, False, True, False]
    assert mask("seed < 1e999", table).to_pylist() == [True, True, True, False]
    floats = pa.table({"x": pa.array([float(2**60), 1.0])})
    assert mask(f"x < {big}", floats).to_pylist() == [True, True]  # 2**60 < 2**60 + 1, not equal after rounding
    assert mask(f"x == {big}", floats).to_pylist() == [False, False]


def _template(tmp_path: Path, body: str, name: str = "t.yaml") -> Path:
    path = tmp_path / name
    path.write_text("count: 1\n" + body)
    return path


def test_deeply_nested_template_choices_are_named_errors(tmp_path):
    deep = "{a|" * 3000 + "b" + "}" * 3000
    with pytest.raises(TemplateError, match=r"t.yaml, templates\[0\].*choices nest more than 32 deep"):
        load_template(_template(tmp_path, f'templates:\n  - "{deep}"\n'))
    ok = "{a|" * 30 + "b" + "}" * 30
    assert len(list(load_template(_template(tmp_path, f'templates:\n  - "{ok}"\n')).rows())) == 1
    # through wildcards: each file nests 30 deep and uses the next one
    for i in range(8):
        nxt = f"__w{i + 1}__" if i < 7 else "x"
        (tmp_path / f"w{i}.txt").write_text("{a|" * 30 + nxt + "}" * 30 + "\n")
    with pytest.raises(TemplateError, match=r"levels deep \(at most 160\)"):
        load_template(_template(tmp_path, 'max_depth: 20\ntemplates:\n  - "__w0__"\n'))
    with pytest.raises(TemplateError, match="max_depth must be <= 32"):
        load_template(_template(tmp_path, 'max_depth: 100000\ntemplates:\n  - "a"\n'))


# ---------------------------------------------------------------------------- item 10: non-finite values


@pytest.mark.parametrize("tensors, message", [
    ({"up": torch.tensor([[float("nan"), 0.0]] * 4)}, "'unet.proj' up matrix holds NaN or infinite values"),
    ({"down": torch.full((2, 4), float("inf"), dtype=torch.bfloat16)}, "'unet.proj' down matrix holds NaN"),
    ({"unet.proj.alpha": torch.tensor(float("inf"))}, r"'unet.proj.alpha' is inf"),
])
def test_non_finite_lora_values_are_refused(tmp_path, tensors, message):
    path = _peft_lora(tmp_path / "nan.safetensors", tensors.pop("down", None), tensors.pop("up", None), **tensors)
    with pytest.raises(CheckpointError, match="nan.safetensors: " + message):
        read_lora(path)


def test_non_finite_adapter_alphas_are_refused(tmp_path):
    for raw in ('{"unet.lora_alpha": Infinity}', '{"unet.alpha_pattern": {"proj": NaN}}'):
        path = _peft_lora(tmp_path / "alpha.safetensors", metadata={"lora_adapter_metadata": raw})
        with pytest.raises(CheckpointError, match="alpha.safetensors.*expected a finite number"):
            read_lora(path)


def test_fusing_that_overflows_float32_is_refused_and_restores_the_weights(tmp_path):
    path = _peft_lora(tmp_path / "huge.safetensors", down=torch.full((2, 4), 1e20), up=torch.full((4, 2), 1e20))
    module = _module()
    before = module.proj.weight.detach().clone()
    fuser = LoraFuser({"unet": module})
    with pytest.raises(CheckpointError, match=r"huge.safetensors 'unet.proj'.*NaN or infinite weights"):
        fuser.set([str(path)])
    assert torch.equal(module.proj.weight, before)
    with pytest.raises(CheckpointError, match="huge.safetensors"):
        lora_deltas(path, {"unet": module})


def test_template_weights_that_overflow_are_refused(tmp_path):
    huge = "9" * 400
    with pytest.raises(TemplateError, match=r"templates\[0\].*weight 9{20}\.\.\. is too large"):
        load_template(_template(tmp_path, f'templates:\n  - "{{{huge}::a|b}}"\n'))
    big = "9" * 308
    with pytest.raises(TemplateError, match="add up to more than"):
        load_template(_template(tmp_path, f'templates:\n  - "{{{big}::a|{big}::b}}"\n'))
    (tmp_path / "style.txt").write_text(f"{huge}::oil\nwatercolor\n")
    with pytest.raises(TemplateError, match=r"style.txt, line 1: weight 9+\.\.\. is too large"):
        load_template(_template(tmp_path, 'templates:\n  - "__style__"\n'))
    body = "variables:\n  c: {values: [a, b], weights: [1.7e+308, 1.7e+308]}\ntemplates:\n  - \"{c}\"\n"
    with pytest.raises(TemplateError, match=r"variables.c.*weights must be finite"):
        load_template(_template(tmp_path, body))
    (tmp_path / "classes.csv").write_text("name,freq\ncat,inf\ndog,1\n")
    body = "variables:\n  c: {file: classes.csv, weight: freq}\ntemplates:\n  - \"{c.name}\"\n"
    with pytest.raises(TemplateError, match=r"variables.c.*weights must be finite"):
        load_template(_template(tmp_path, body))


# ---------------------------------------------------------------------------- item 12: inspect, CLI


def test_inspect_refuses_a_truncated_file(tiny_single, tmp_path, capsys):
    data = tiny_single.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    assert cli_main(["inspect", str(cut)]) == 2
    err = capsys.readouterr().err
    assert "cut.safetensors: truncated safetensors file" in err and f"the file has {len(data) // 2}" in err
    assert cli_main(["inspect", str(tiny_single)]) == 0  # the whole file still passes


def test_inspect_reports_wrong_shape_lora_keys_as_mismatched(tmp_path):
    module = _module()
    path = _peft_lora(tmp_path / "wide.safetensors", down=torch.ones(2, 8), up=torch.ones(4, 2))
    info = inspect_lora(path, {"unet": module})
    assert info["matched"] == 0 and info["unmatched"] == []
    assert info["mismatched"] == [{"key": "unet.proj", "parameter": "unet.proj.weight", "expected": [4, 4],
                                   "got": [4, 8]}]
    good = inspect_lora(_peft_lora(tmp_path / "fits.safetensors"), {"unet": module})
    assert (good["matched"], good["mismatched"]) == (1, [])


@pytest.mark.parametrize("argv", [
    ["run", "x.yaml", "--s3-url", "http://user:s3cret@minio:9000"],
    ["status", "out", "--bogus", "user:s3cret@minio"],
    ["run", "x.yaml", "--max-failures", "s3://user:s3cret@bucket/x"],
])
def test_argparse_errors_do_not_echo_credentials(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "s3cret" not in err and "***@" in err


@pytest.mark.parametrize("command", ["run", "submit", "status", "rerender", "compare", "export", "prompts",
                                     "inspect", "generate"])
def test_every_subcommand_that_reaches_storage_takes_endpoint_url(command, capsys):
    with pytest.raises(SystemExit):
        cli_main([command, "--help"])
    assert "--endpoint-url" in capsys.readouterr().out


def test_run_endpoint_url_sets_the_spec_storage(capsys):
    from batchgen.jobcli import spec_overrides
    from batchgen.spec import load_spec

    args = Namespace(overrides=["sampling.steps=3"], endpoint_url="http://minio:9000")
    spec = load_spec(REPO / "jobs" / "demo.yaml", spec_overrides(args))
    assert spec.storage.endpoint_url == "http://minio:9000" and spec.sampling.steps == 3
    assert cli_main(["run", str(REPO / "jobs" / "demo.yaml"), "--endpoint-url", "http://u:s3cret@minio:9000"]) == 2
    err = capsys.readouterr().err
    assert "endpoint_url" in err and "s3cret" not in err


# ---------------------------------------------------------------------------- item 18 (parts)


def test_lora_errors_name_the_file_once(tmp_path):
    from batchgen.jobstate import _check_loras
    from batchgen.modelcheck import validate_model

    model = validate_model("builtin:tiny")
    nan = _peft_lora(tmp_path / "nan.safetensors", up=torch.full((4, 2), math.nan))
    for path in (tmp_path / "missing.safetensors", nan):
        with pytest.raises(CheckpointError) as err:
            _check_loras(model, {json.dumps([{"uri": str(path), "scale": 1.0}])}, None)
        assert str(err.value).count(str(path)) == 1, str(err.value)


def test_prompts_help_documents_the_template_format(capsys):
    with pytest.raises(SystemExit):
        cli_main(["prompts", "--help"])
    out = capsys.readouterr().out
    assert "docstring" not in out and "see `batchgen.prompts`" not in out
    for text in ("Template format", "templates:", "{a|b|c}", "__style__", "{name.field}", "combinatorial",
                 "sampled", "Output columns"):
        assert text in out, text


def test_tiny_flux_builtin_defaults_to_a_small_size():
    from batchgen.inspect import inspect_model

    defaults = inspect_model("builtin:tiny-flux-schnell", fingerprint=False)["defaults"]
    assert (defaults["width"], defaults["height"]) == (256, 256)
