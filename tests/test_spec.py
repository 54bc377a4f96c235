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
