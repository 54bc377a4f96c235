"""Issue 19 (hardening, part 2), the input items, all found in pre-flight (no Ray):

1. item ids that collide only after derivation (``<id>-<k>`` image numbers, positional ids);
7. passthrough columns named like what batchgen uses itself (one reserved list, manifest + exports);
13. spec settings the input overrides: named in pre-flight, recorded in job.json, named by compare;
16. integer columns that pandas wrote as floats: accepted when whole, with one warning; else an
    error that says how to write them.
"""

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.cli import main
from batchgen.compare import compare_outputs, format_summary
from batchgen.dataset import normalize_batch, open_parquet, row_settings, scan_inputs
from batchgen.errors import InputError
from batchgen.export import export_output
from batchgen.manifest import LABEL_COLUMNS, MANIFEST_SCHEMA
from batchgen.spec import spec_from_dict
from batchgen.storage import StorageConfig

from .faults import prepare, run_job
from .fixtures_jobs import job_dict
from .fixtures_regression import noise_image, write_job_output

NULL = {"renderer": "null"}
CFG = StorageConfig()


def _write(path, count, /, **columns):
    """A prompt Parquet of ``count`` rows with extra columns (``n`` among them: images per row)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"prompt": [f"prompt {i}" for i in range(count)], **columns}), path)
    return path


def _preflight_error(tmp_path, inp, **sections) -> str:
    """Run the job's pre-flight (the null renderer: no model, no Ray); the InputError's text."""
    with pytest.raises(InputError) as err:
        run_job(spec_from_dict(job_dict(inp, tmp_path / "out", **sections)), faults=NULL)
    assert not (tmp_path / "out" / "images").exists()  # nothing rendered
    assert not (tmp_path / "out" / "job.json").exists()
    return str(err.value)


def _rows(inp, **sections):
    """The scan and every normalized row (the function the Ray read stage runs)."""
    spec = spec_from_dict(job_dict(inp, "/tmp/unused-out", **sections))
    scan = scan_inputs(spec, CFG)
    rows = []
    for f in scan.files:
        table = open_parquet(f.uri, CFG).read()
        rows += normalize_batch(table, f.uri, f.rel, 0, row_settings(spec)).to_pylist()
    return scan, rows


# ----------------------------------------------------------------------------- 1. final item ids


def test_id_that_collides_with_an_image_number_of_another_row(tmp_path):
    """Row 'x' with n: 2 makes items x-0 and x-1; a row 'x-0' in another file makes x-0 too."""
    inp = tmp_path / "in"
    _write(inp / "a.parquet", 2, id=["x", "y"], n=pa.array([2, 1], pa.int64()))
    _write(inp / "b.parquet", 2, id=["z", "x-0"])
    msg = _preflight_error(tmp_path, inp, input={"id_column": "id"})
    assert "duplicate item id 'x-0'" in msg
    assert f"{inp / 'b.parquet'}, row 1, column 'id'" in msg
    assert f"first seen in input file {inp / 'a.parquet'}, row 0 (id 'x', 2 images per prompt: image 0)" in msg


def test_images_per_prompt_collision_the_other_way_round(tmp_path):
    """The plain row comes first, the numbered one second (sampling.images_per_prompt on one file's rows
    via an n column): the error names both rows whichever is first."""
    inp = tmp_path / "in"
    _write(inp / "a.parquet", 1, id=["p-1"])
    _write(inp / "b.parquet", 1, id=["p"], n=pa.array([3], pa.int64()))
    msg = _preflight_error(tmp_path, inp, input={"id_column": "id"})
    assert "duplicate item id 'p-1'" in msg and "a.parquet, row 0" in msg
    assert "b.parquet, row 0 (id 'p', 3 images per prompt: image 1)" in msg


def test_positional_ids_that_collide_across_files(tmp_path):
    """Without an id column ids come from the file path: 'a' and 'a.parquet' both give a-00000000."""
    inp = tmp_path / "in"
    _write(inp / "a.parquet", 2)
    _write(inp / "a", 1)
    msg = _preflight_error(tmp_path, f"{inp}/*")
    assert "duplicate item id 'a-00000000'" in msg
    assert "ids come from the file path 'a'" in msg and "ids come from the file path 'a.parquet'" in msg
    assert f"{inp / 'a'}, row 0" in msg and f"{inp / 'a.parquet'}, row 0" in msg


def test_same_input_id_numbered_in_one_file_and_plain_in_another(tmp_path):
    """Items x-0, x-1 and x do not collide, but two input rows with id 'x' are still a duplicate."""
    inp = tmp_path / "in"
    _write(inp / "a.parquet", 1, id=["x"], n=pa.array([2], pa.int64()))
    _write(inp / "b.parquet", 1, id=["x"])
    msg = _preflight_error(tmp_path, inp, input={"id_column": "id"})
    assert "duplicate input id 'x'" in msg and "a.parquet, row 0" in msg and "b.parquet, row 0" in msg


def test_numbered_ids_that_do_not_collide_are_fine(tmp_path):
    """x (n 2 -> x-0, x-1) and x-0 in a file with an n column (-> x-0-0): no collision, all kept."""
    inp = tmp_path / "in"
    _write(inp / "a.parquet", 1, id=["x"], n=pa.array([2], pa.int64()))
    _write(inp / "b.parquet", 1, id=["x-0"], n=pa.array([1], pa.int64()))
    _write(inp / "c.parquet", 1, id=["x-2"])
    scan, rows = _rows(inp, input={"id_column": "id"})
    ids = sorted(r["item_id"] for r in rows)
    assert ids == ["x-0", "x-0-0", "x-1", "x-2"] and scan.total_rows == 4


# ----------------------------------------------------------------------------- 7. reserved names


@pytest.mark.parametrize("name", ["text", "key", "image", "applied_loras", "warmup_ms", "path", "_ok",
                                  "render_ms", "status", "seed", "group", "n"])
def test_passthrough_reserved_names_refused_in_preflight(tmp_path, name):
    from batchgen.manifest import RESERVED_NAMES

    f = _write(tmp_path / "p.parquet", 2, **{name: ["a", "b"]} if name not in ("seed", "n")
                      else {name: pa.array([1, 2], pa.int64())})
    msg = _preflight_error(tmp_path, f, input={"passthrough": [name]})
    assert f"input.passthrough: {name!r} is " in msg
    assert "reserved names: " + ", ".join(sorted(RESERVED_NAMES)) in msg


def test_passthrough_listed_twice_refused(tmp_path):
    f = _write(tmp_path / "p.parquet", 1, caption=["c"])
    assert "'caption' is listed twice" in _preflight_error(tmp_path, f, input={"passthrough": ["caption", "caption"]})


def test_one_reserved_list_for_manifest_stages_and_exports():
    from batchgen.export import export_fields
    from batchgen.manifest import RESERVED_NAMES

    assert set(export_fields()) <= RESERVED_NAMES
    assert set(MANIFEST_SCHEMA.names) - set(LABEL_COLUMNS) <= RESERVED_NAMES
    assert not set(LABEL_COLUMNS) & RESERVED_NAMES  # class_id / class_name may be passed through
    assert {"applied_loras", "warmup_ms", "image", "path"} <= RESERVED_NAMES


def test_passthrough_label_columns_and_ordinary_names_still_pass(tmp_path):
    f = _write(tmp_path / "p.parquet", 2, caption=["a", "b"], label=pa.array([0, 1], pa.int64()),
                      class_name=["cat", "dog"])
    plan = prepare(spec_from_dict(job_dict(f, tmp_path / "out", input={"passthrough": ["caption", "label",
                                                                                       "class_name"]})),
                   faults=NULL)
    plan.release()
    job = json.loads((tmp_path / "out" / "job.json").read_text())
    assert job["passthrough"] == {"caption": "string", "label": "int64", "class_name": "string"}


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_export_refuses_a_manifest_column_named_like_an_export_field(tmp_path, fmt):
    """An output written before the check (a passthrough 'text'): both formats refuse it alike
    (the parquet export used to drop it, the webdataset export kept it)."""
    out = write_job_output(tmp_path / "job", [dict(item_id="a", image=noise_image(1))])
    table = pq.read_table(out / "manifest.parquet")
    pq.write_table(table.append_column("text", pa.array(["mine"])), out / "manifest.parquet")
    with pytest.raises(InputError, match=r"the manifest has column\(s\) 'text', which the exports use themselves"):
        export_output(str(out), fmt, str(tmp_path / "export"))
    assert not (tmp_path / "export").exists()


# ----------------------------------------------------------------------------- 13. overrides


def test_overridden_spec_settings_logged_and_recorded(tmp_path, caplog):
    f = _write(tmp_path / "p.parquet", 3, steps=pa.array([3, 4, 5], pa.int32()),
                      guidance_scale=pa.array([None, 2.0, None], pa.float64()),
                      n=pa.array([1, 2, 1], pa.int64()))
    spec = spec_from_dict(job_dict(f, tmp_path / "out", sampling={"steps": 20}))
    with caplog.at_level(logging.INFO, logger="batchgen"):
        plan = prepare(spec, faults=NULL)
    plan.release()
    lines = [r.getMessage() for r in caplog.records]
    steps = [line for line in lines if line.startswith("sampling.steps: ")]
    assert steps == ["sampling.steps: input column 'steps' overrides it in 3 of 3 rows: the spec's value 20 is "
                     "used by no row"]
    assert [r.levelname for r in caplog.records if r.getMessage() == steps[0]] == ["WARNING"]
    assert "sampling.guidance_scale: input column 'guidance_scale' overrides it in 1 of 3 rows" in lines
    assert "sampling.images_per_prompt: input column 'n' overrides it in 3 of 3 rows" in lines
    job = json.loads((tmp_path / "out" / "job.json").read_text())
    assert job["overridden_by_input"] == {
        "sampling.guidance_scale": {"column": "guidance_scale", "rows": 1, "of": 3},
        "sampling.images_per_prompt": {"column": "n", "rows": 3, "of": 3},
        "sampling.steps": {"column": "steps", "rows": 3, "of": 3},
    }
    assert job["spec"]["sampling"]["steps"] == 20 and job["total_items"] == 4


def test_no_override_recorded_without_such_columns(tmp_path):
    f = _write(tmp_path / "p.parquet", 2, steps=pa.array([None, None], pa.int32()))
    plan = prepare(spec_from_dict(job_dict(f, tmp_path / "out")), faults=NULL)
    plan.release()
    assert json.loads((tmp_path / "out" / "job.json").read_text())["overridden_by_input"] == {}


def _prepared_job(tmp_path, name, steps):
    """job.json of a job whose input carries 'steps' in every row, run with sampling.steps = ``steps``."""
    f = tmp_path / "p.parquet"
    if not f.exists():
        _write(f, 2, steps=pa.array([4, 4], pa.int32()))
    out = tmp_path / f"{name}-prep"
    plan = prepare(spec_from_dict(job_dict(f, out, sampling={"steps": steps})), faults=NULL)
    plan.release()
    return (out / "job.json").read_text()


def test_compare_names_job_settings_that_differ_with_identical_images(tmp_path, capsys):
    """`--set sampling.steps=20` on an input whose rows carry steps changed nothing: compare
    passes on the images but says the specs differ and that the input overrode the setting."""
    items = [dict(item_id=f"i{k}", image=noise_image(k)) for k in range(2)]
    base = write_job_output(tmp_path / "base", items)
    cand = write_job_output(tmp_path / "cand", items)
    (base / "job.json").write_text(_prepared_job(tmp_path, "base", 30))
    (cand / "job.json").write_text(_prepared_job(tmp_path, "cand", 20))
    res = compare_outputs(str(base), str(cand))
    assert res.passed and res.counts["identical"] == 2
    entry = res.job_settings_differ["sampling.steps"]
    assert entry["baseline"] == 30 and entry["candidate"] == 20
    assert entry["overridden_by_input"]["candidate"] == {"column": "steps", "rows": 2, "of": 2}
    assert list(res.job_settings_differ) == ["sampling.steps"]  # output.uri / input.uri are not settings
    text = format_summary(res)
    assert "2 identical" in text and "PASS, but the job settings differ (sampling.steps" in text
    assert ("sampling.steps: 30 -> 20 [input column 'steps' overrides it in 2 of 2 rows of both outputs: "
            "the spec's value is used by no item]") in text
    assert main(["compare", str(base), str(cand), "--report", str(tmp_path / "rep")]) == 0
    assert "job settings that differ (job.json):" in capsys.readouterr().out
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["job_settings_differ"]["sampling.steps"]["candidate"] == 20
    # Asked to ignore it, it is not named.
    assert compare_outputs(str(base), str(cand), ignore_settings=["sampling.steps"]).job_settings_differ == {}


def test_compare_of_the_same_spec_is_a_plain_pass(tmp_path):
    items = [dict(item_id="i0", image=noise_image(0))]
    base = write_job_output(tmp_path / "base", items)
    cand = write_job_output(tmp_path / "cand", items)
    job = _prepared_job(tmp_path, "same", 30)
    (base / "job.json").write_text(job)
    (cand / "job.json").write_text(job.replace(str(tmp_path / "same-prep"), str(tmp_path / "elsewhere")))
    res = compare_outputs(str(base), str(cand))
    assert res.job_settings_differ == {} and "-> PASS\n" in format_summary(res) + "\n"


# ----------------------------------------------------------------------------- 16. floats from pandas


def _pandas_parquet(path, **columns):
    """What pandas writes for integer columns with missing values: float64 (NaN -> null)."""
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame({"prompt": [f"prompt {i}" for i in range(len(next(iter(columns.values()))))], **columns})
    df.to_parquet(path)
    return path


def test_integral_float_columns_accepted_with_one_warning(tmp_path, caplog):
    pd_file = _pandas_parquet(tmp_path / "f" / "p.parquet", id=["a", "b", "c"], seed=[7, None, 9],
                              steps=[3, 4, None], n=[1, None, 2])
    assert pq.read_schema(pd_file).field("seed").type == pa.float64()  # pandas made them floats
    ints = _write(tmp_path / "i" / "p.parquet", 3, id=["a", "b", "c"],
                         seed=pa.array([7, None, 9], pa.int64()), steps=pa.array([3, 4, None], pa.int32()),
                         n=pa.array([1, None, 2], pa.int64()))
    with caplog.at_level(logging.WARNING, logger="batchgen"):
        _, float_rows = _rows(pd_file, input={"id_column": "id"}, sampling={"steps": 2})
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "hold floats" in r.getMessage()]
    assert len(warnings) == 1
    assert str(pd_file) in warnings[0] and all(f"'{c}'" in warnings[0] for c in ("seed", "steps", "n"))
    assert 'astype("Int64")' in warnings[0]
    _, int_rows = _rows(ints, input={"id_column": "id"}, sampling={"steps": 2})
    strip = [{k: v for k, v in r.items() if k != "source_file"} for r in float_rows]
    assert strip == [{k: v for k, v in r.items() if k != "source_file"} for r in int_rows]
    by_id = {r["item_id"]: r for r in float_rows}
    # null -> the spec's value (steps 2) / the derived seed / the job's images per prompt (1)
    assert sorted(by_id) == ["a-0", "b-0", "c-0", "c-1"]
    assert by_id["a-0"]["seed"] == 7 and by_id["c-1"]["seed"] == 10 and by_id["c-0"]["steps"] == 2


def test_float_warning_once_per_job(tmp_path, caplog):
    """The job's pre-flight (however many passes it makes over the input) warns once."""
    a = _write(tmp_path / "in" / "a.parquet", 2, seed=pa.array([1.0, None], pa.float64()))
    _write(tmp_path / "in" / "b.parquet", 1, seed=pa.array([3.0], pa.float64()),
           steps=pa.array([None], pa.float64()))
    with caplog.at_level(logging.INFO, logger="batchgen"):
        plan = prepare(spec_from_dict(job_dict(tmp_path / "in", tmp_path / "out")), faults=NULL)
    plan.release()
    warnings = [r.getMessage() for r in caplog.records if "hold floats" in r.getMessage()]
    assert len(warnings) == 1 and f"'seed' in {a} and 1 more files" in warnings[0]
    assert "'steps' in " in warnings[0]


def test_nan_values_mean_no_value(tmp_path):
    """A float column with real NaN (not Parquet nulls) reads NaN as null too."""
    f = _write(tmp_path / "p.parquet", 2, steps=pa.array([float("nan"), 5.0], pa.float64()))
    _, rows = _rows(f)
    assert [r["steps"] for r in rows] == [2, 5]


@pytest.mark.parametrize("column, values, bad", [
    ("seed", [1.0, 1.5], "1.5 is not a whole number"),
    ("steps", [2.0, float("inf")], "inf is not a whole number"),
    ("n", [1.0, 2.25], "2.25 is not a whole number"),
    ("seed", [1.0, float(2**60)], "1.152921504606847e+18 is a float beyond 2**53"),
])
def test_non_integral_float_column_error_says_how_to_fix(tmp_path, column, values, bad):
    f = _write(tmp_path / "p.parquet", 2, **{column: pa.array(values, pa.float64())})
    msg = _preflight_error(tmp_path, f)
    assert f"{f}, row 1, column {column!r}: {bad}" in msg
    assert f'df[{column!r}].astype("Int64")' in msg


def test_float_id_column_error_says_how_to_fix(tmp_path):
    f = _write(tmp_path / "p.parquet", 2, id=pa.array([1.0, None], pa.float64()))
    msg = _preflight_error(tmp_path, f, input={"id_column": "id"})
    assert "ids must be strings or integers, got double" in msg and "df['id'].astype(\"Int64\")" in msg


def test_float_column_of_a_float_setting_is_not_warned_about(tmp_path, caplog):
    f = _write(tmp_path / "p.parquet", 2, guidance_scale=pa.array([1.5, None], pa.float64()),
                      seed=pa.array([1, 2], pa.int64()))
    with caplog.at_level(logging.WARNING, logger="batchgen"):
        _rows(f)
    assert not [r for r in caplog.records if "hold floats" in r.getMessage()]


def test_images_from_float_seeds_match_integer_seeds(tmp_path):
    """The seeds a float column gives are exactly the integer ones (the noise depends on them)."""
    big = 2**53 - 1
    f = _write(tmp_path / "p.parquet", 2, seed=pa.array([float(big), 0.0], pa.float64()))
    _, rows = _rows(f)
    assert [r["seed"] for r in rows] == [big, 0] and isinstance(rows[0]["seed"], int)
    assert np.int64(rows[0]["seed"]) == big


def test_job_with_pandas_float_columns_renders_like_integers(tmp_path, ray_local):
    """The workers read the float columns as the pre-flight did: same items, seeds and sizes as
    the integer input (the null renderer: no model)."""
    outs = {}
    for kind in ("float", "int"):
        if kind == "float":
            f = _pandas_parquet(tmp_path / kind / "p.parquet", id=["a", "b"], seed=[5, None], n=[2, None])
        else:
            f = _write(tmp_path / kind / "p.parquet", 2, id=["a", "b"], seed=pa.array([5, None], pa.int64()),
                       n=pa.array([2, None], pa.int64()))
        run_job(spec_from_dict(job_dict(f, tmp_path / f"out-{kind}", input={"id_column": "id"})), faults=NULL)
        table = pq.read_table(tmp_path / f"out-{kind}" / "manifest.parquet")
        outs[kind] = table.select(["item_id", "seed", "steps", "image_sha256", "status"]).to_pylist()
    assert outs["float"] == outs["int"]
    assert [r["item_id"] for r in outs["int"]] == ["a-0", "a-1", "b-0"]
    assert all(r["status"] == "ok" for r in outs["int"]) and outs["int"][1]["seed"] == 6
