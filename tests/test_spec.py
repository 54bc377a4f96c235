"""JobSpec: YAML loading, unknown keys, overrides, digest (resume vs different job)."""

from pathlib import Path

import pytest

from batchgen.errors import InputError
from batchgen.spec import diff_keys, load_spec, spec_from_dict

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path, text):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_demo_spec_loads_with_documented_layout():
    spec = load_spec(REPO / "jobs" / "demo.yaml")
    assert spec.model.uri == "builtin:tiny"
    assert spec.compute.gpus_per_worker == 0
    assert spec.input.id_column == "id"
    assert spec.output.format == "png"


def test_synthetic_example_spec_loads():
    """jobs/synthetic/job.yaml (the README walkthrough) reads the template's prompts with labels."""
    spec = load_spec(REPO / "jobs" / "synthetic" / "job.yaml")
    assert spec.input.uri == "out/synthetic-prompts.parquet" and spec.input.passthrough == ["label", "class_name"]
    assert spec.sampling.images_per_prompt == 2 and spec.output.uri == "out/synthetic"


def test_every_field_is_documented():
    from batchgen.spec import JobSpec

    def walk(model):
        for name, f in model.model_fields.items():
            yield model.__name__, name, f
            ann = f.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                yield from walk(ann)

    missing = [f"{m}.{n}" for m, n, f in walk(JobSpec) if not f.description and n not in
               ("input", "model", "sampling", "output", "compute", "storage")]
    assert missing == []


def test_unknown_keys_are_named(tmp_path):
    p = _write(tmp_path, "input: {uri: x, colum: id}\noutput: {uri: o}\nsampling: {stpes: 3}\n")
    with pytest.raises(InputError) as err:
        load_spec(p)
    msg = str(err.value)
    assert "unknown key 'input.colum'" in msg and "unknown key 'sampling.stpes'" in msg and str(p) in msg


def test_missing_and_bad_values_are_named(tmp_path):
    with pytest.raises(InputError, match=r"missing key 'output'"):
        spec_from_dict({"input": {"uri": "x"}})
    with pytest.raises(InputError, match=r"sampling.width.*multiple of 8"):
        spec_from_dict({"input": {"uri": "x"}, "output": {"uri": "o"}, "sampling": {"width": 100}})
    with pytest.raises(InputError, match=r"sampling.seed"):
        spec_from_dict({"input": {"uri": "x"}, "output": {"uri": "o"}, "sampling": {"seed": 2**63}})
    with pytest.raises(InputError, match=r"compute.*max_workers"):
        spec_from_dict({"input": {"uri": "x"}, "output": {"uri": "o"},
                        "compute": {"min_workers": 3, "max_workers": 2}})
    with pytest.raises(InputError, match="not valid YAML"):
        load_spec(_write(tmp_path, "input: [unclosed\n"))
    with pytest.raises(InputError, match="cannot read job spec"):
        load_spec(tmp_path / "nope.yaml")


def test_set_overrides_parse_yaml_scalars(tmp_path):
    p = _write(tmp_path, "input: {uri: x}\noutput: {uri: o}\n")
    spec = load_spec(p, ["sampling.steps=7", "output.format=webp", "storage.endpoint_url=http://h:9000",
                         "compute.gpus_per_worker=0"])
    assert spec.sampling.steps == 7 and spec.output.format == "webp"
    assert spec.storage.endpoint_url == "http://h:9000" and spec.compute.gpus_per_worker == 0
    with pytest.raises(InputError, match="unknown key 'sampling.nope'"):
        load_spec(p, ["sampling.nope=1"])
    with pytest.raises(InputError, match="expected dotted.key=value"):
        load_spec(p, ["sampling.steps"])


def test_digest_covers_output_affecting_fields_only():
    base = {"input": {"uri": "x"}, "output": {"uri": "o"}}
    a = spec_from_dict(base)
    b = spec_from_dict({**base, "compute": {"max_workers": 9, "min_workers": 2}, "name": "other"})
    assert a.digest() == b.digest()
    c = spec_from_dict({**base, "sampling": {"steps": 3}, "compute": {"batch_size": 8}})
    assert a.digest() != c.digest()
    assert diff_keys(a.digest_fields(), c.digest_fields()) == ["compute.batch_size", "sampling.steps"]


def test_model_block_is_digested_whole():
    """Every field of the model block (and any added later) changes the digest: a new model knob
    can never be missed by the resume check."""
    from batchgen.spec import ModelSpec

    base = {"input": {"uri": "x"}, "output": {"uri": "o"}}
    a = spec_from_dict(base)
    changes = {"uri": "builtin:tiny-sd2", "dtype": "float16", "variant": "fp16", "loras": [{"uri": "/l.safetensors"}],
               "vae": "/vae.safetensors", "text_encoders": {"text_encoder_2": "/t5"}, "tokenizers": {"tokenizer_2": "/t"},
               "prediction_type": "v_prediction", "allow_pickle": True, "text_encoder_device": "cpu",
               "fp8": ["transformer"], "controlnets": [{"uri": "builtin:tiny-sd1-controlnet"}],
               "ip_adapter": {"uri": "builtin:tiny-sd1-ip-adapter"}}
    assert set(changes) == set(ModelSpec.model_fields), "a model field without a digest check here"
    for key, value in changes.items():
        b = spec_from_dict({**base, "model": {key: value}})
        assert a.digest() != b.digest(), key
        assert [k.split(".")[1] for k in diff_keys(a.digest_fields(), b.digest_fields())] == [key]


# ----------------------------------------------------------------------------- issue 9 hardening


def test_yaml_alias_bomb_is_refused_fast_and_small(tmp_path):
    """Item 3: a billion-laughs document is refused before it expands (no repr, no digest)."""
    import time

    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    p = _write(tmp_path, "\n".join(lines) + "\ninput: {uri: *a9}\noutput: {uri: o}\n")
    start = time.monotonic()
    with pytest.raises(InputError) as err:
        load_spec(p)
    assert time.monotonic() - start < 2
    msg = str(err.value)
    assert "line 2: YAML alias '*a0' is not allowed" in msg and str(p) in msg and len(msg) < 400
    with pytest.raises(InputError, match="YAML alias"):
        load_spec(_write(tmp_path, "input: {uri: x}\noutput: {uri: o}\n"),
                  ["sampling.sampler_options={a: &x [1, 2], b: *x}"])
    big = _write(tmp_path, "input: {uri: x}\noutput: {uri: o}\nname: " + "x" * (1 << 20) + "\n")
    with pytest.raises(InputError, match="too large for a job spec"):
        load_spec(big)


def test_duplicate_keys_and_strict_types(tmp_path):
    """Item 14: duplicate keys are errors; `steps: true` and `seed: "7"` are not 1 and 7."""
    with pytest.raises(InputError, match=r"line 5: duplicate key 'steps' \(first on line 4\)"):
        load_spec(_write(tmp_path, "input: {uri: x}\noutput: {uri: o}\nsampling:\n  steps: 3\n  steps: 4\n"))
    with pytest.raises(InputError) as err:
        load_spec(_write(tmp_path, "input: {uri: x}\noutput: {uri: o}\nsampling: {steps: true, seed: '7'}\n"))
    msg = str(err.value)
    assert "key 'sampling.steps': Input should be a valid integer (got True)" in msg
    assert "key 'sampling.seed': Input should be a valid integer (got '7')" in msg
    # floats accept integers; YAML integers stay integers
    spec = load_spec(_write(tmp_path, "input: {uri: x}\noutput: {uri: o}\nsampling: {guidance_scale: 7}\n"))
    assert spec.sampling.guidance_scale == 7.0


def test_set_errors_name_the_set_not_the_file(tmp_path):
    """Item 14: a --set typo is blamed on the --set, with the closest key; no 'got X (got X)'."""
    p = _write(tmp_path, "input: {uri: x}\noutput: {uri: o}\n")
    with pytest.raises(InputError) as err:
        load_spec(p, ["sampling.stepz=3"])
    msg = str(err.value)
    assert "--set 'sampling.stepz=3': unknown key 'sampling.stepz' (did you mean 'sampling.steps'?)" in msg
    assert str(p) not in msg
    with pytest.raises(InputError) as err:
        load_spec(p, ["sampling.width=100"])
    assert str(err.value).count("got 100") == 1 and "--set 'sampling.width=100'" in str(err.value)
    with pytest.raises(InputError) as err:
        load_spec(_write(tmp_path, "input: {uri: x}\noutput: {uri: o}\ncompute: {gpus_per_workers: 0}\n"))
    assert "unknown key 'compute.gpus_per_workers' (did you mean 'compute.gpus_per_worker'?)" in str(err.value)


def test_endpoint_url_with_credentials_is_refused_without_echoing_them(tmp_path):
    """Item 9: user-info in storage.endpoint_url is an error and the secret is never printed."""
    with pytest.raises(InputError) as err:
        load_spec(_write(tmp_path, "input: {uri: x}\noutput: {uri: o}\n"
                                   "storage: {endpoint_url: 'http://AKIAKEY:s3cr3t@minio:9000'}\n"))
    msg = str(err.value)
    assert "storage.endpoint_url" in msg and "user:password@" in msg
    assert "s3cr3t" not in msg and "AKIAKEY" not in msg


def test_a1111_sampler_names_and_non_finite_options():
    """Item 20: A1111 names are aliases (the spec holds our name); item 13: NaN options are refused."""
    base = {"input": {"uri": "x"}, "output": {"uri": "o"}}
    for alias, name in [("Euler a", "euler_a"), ("DPM++ 2M Karras", "dpmpp_2m_karras"), ("UniPC", "unipc"),
                        ("dpm++ 2m sde", "dpmpp_2m_sde")]:
        spec = spec_from_dict({**base, "sampling": {"sampler": alias}})
        assert spec.sampling.sampler == name
        assert spec.digest() == spec_from_dict({**base, "sampling": {"sampler": name}}).digest()
    with pytest.raises(InputError, match=r"sampler_options.*eta is nan: numbers must be finite"):
        spec_from_dict({**base, "sampling": {"sampler_options": {"eta": float("nan")}}})
    with pytest.raises(InputError, match=r"guidance_scale.*finite"):
        spec_from_dict({**base, "sampling": {"guidance_scale": float("nan")}})


def test_unknown_sampler_suggests_names():
    """Item 20: an unknown sampler gets 'did you mean'."""
    from batchgen.jobstate import check_sampler

    with pytest.raises(InputError) as err:
        check_sampler(spec_from_dict({"input": {"uri": "x"}, "output": {"uri": "o"},
                                      "sampling": {"sampler": "eular_a"}}))
    assert "unknown sampler 'eular_a' (did you mean 'euler_a'?)" in str(err.value)


def test_output_of_an_older_batchgen_is_refused_with_the_reason(tmp_path):
    """job.json written by an earlier batchgen (other spec keys and defaults): the refusal says so."""
    from batchgen import __version__
    from batchgen.jobstate import check_previous
    from batchgen.storage import Location

    spec = spec_from_dict({"input": {"uri": "in.parquet"}, "output": {"uri": str(tmp_path)}})
    fields = dict(spec.digest_fields())
    del fields["sampling.images_per_prompt"]  # a key the older spec did not have
    old = {"digest_fields": fields, "versions": {"batchgen": "0.1.0"}}
    out = Location.parse(str(tmp_path))
    with pytest.raises(InputError, match=rf"keys differ: sampling.images_per_prompt\) \(it was written by batchgen "
                                         rf"0.1.0.*this is {__version__}, which cannot resume it\).*--overwrite"):
        check_previous(out, spec, old, overwrite=False)
    same = {"digest_fields": spec.digest_fields(), "versions": {"batchgen": "0.1.0"}}
    assert check_previous(out, spec, same, overwrite=False) == []


def test_endpoint_error_names_the_redacted_value_once():
    with pytest.raises(InputError) as err:
        spec_from_dict({"input": {"uri": "x"}, "output": {"uri": "o"},
                        "storage": {"endpoint_url": "http://AK:se/cret@h:9"}})
    message = str(err.value)
    assert message.count("(got 'http://***@h:9')") == 1 and "cret" not in message
