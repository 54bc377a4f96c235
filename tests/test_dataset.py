"""Input rows: ids, validation errors naming file/row/column, per-row overrides, pre-flight scan."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.dataset import derived_id_prefix, list_input_files, scan_inputs
from batchgen.errors import InputError
from batchgen.noise import derive_seed
from batchgen.spec import spec_from_dict
from batchgen.storage import StorageConfig

from .fixtures_jobs import job_dict, write_prompts

CFG = StorageConfig()


def _spec(inp, **kw):
    return spec_from_dict(job_dict(inp, "/tmp/unused-out", **kw))


def _rows(inp, **kw):
    """All normalized rows of an input, via the same code the Ray read stage runs."""
    from batchgen.dataset import open_parquet, normalize_batch, row_settings

    spec = _spec(inp, **kw)
    scan = scan_inputs(spec, CFG)
    out = []
    for f in scan.files:
        out.extend(normalize_batch(open_parquet(f.uri, CFG).read(), f.uri, f.rel, 0, row_settings(spec)).to_pylist())
    return scan, out


def test_derived_ids_are_stable_and_safe(tmp_path):
    write_prompts(tmp_path / "in" / "a.parquet", 3)
    write_prompts(tmp_path / "in" / "sub dir" / "b c.parquet", 2)
    scan, rows = _rows(tmp_path / "in")
    ids = [r["item_id"] for r in rows]
    assert ids[:3] == ["a-00000000", "a-00000001", "a-00000002"]
    assert all(i.startswith("sub_dir_b_c-") for i in ids[3:]) and len(set(ids)) == 5
    assert scan.total_rows == 5 and [f.rel for f in scan.files] == ["a.parquet", "sub dir/b c.parquet"]
    assert derived_id_prefix("x/y.parquet") != derived_id_prefix("x_y.parquet")
    # seeds derive from (job seed, item id) when the row has none
    assert rows[0]["seed"] == derive_seed(0, "a-00000000")


def test_row_overrides_and_empty_prompt(tmp_path):
    f = write_prompts(tmp_path / "p.parquet", 3, seed=pa.array([5, None, 2**63 - 1], pa.int64()),
                      width=pa.array([None, 128, None], pa.int32()), negative_prompt=["bad", None, ""],
                      init_image=[None, None, "s3://b/i.png"], strength=[None, None, 0.5])
    tbl = pq.read_table(f).set_column(0, "prompt", pa.array(["", "x", "y"]))
    pq.write_table(tbl, f)
    scan, rows = _rows(f, sampling={"negative_prompt": "job-neg"})
    assert [r["prompt"] for r in rows] == ["", "x", "y"]
    assert rows[0]["seed"] == 5 and rows[2]["seed"] == 2**63 - 1
    assert rows[1]["seed"] == derive_seed(0, rows[1]["item_id"])
    assert [r["width"] for r in rows] == [64, 128, 64]
    assert [r["negative_prompt"] for r in rows] == ["bad", "job-neg", ""]
    assert rows[0]["strength"] is None and rows[2]["strength"] == 0.5
    assert len(scan.groups) == 3  # 64 txt2img, 128 txt2img, 64 img2img


@pytest.mark.parametrize(
    "bad_id, why",
    [("../x", "unsafe item id '../x'"), ("/", "unsafe item id '/'"), ("", "unsafe item id ''"),
     ("x" * 129, "unsafe item id"), ("..", "unsafe item id '..'"), ("a b", "unsafe item id 'a b'")],
)
def test_unsafe_ids_name_file_row_column(tmp_path, bad_id, why):
    f = write_prompts(tmp_path / "p.parquet", 3, id=["ok-1", bad_id, "ok-2"])
    with pytest.raises(InputError) as err:
        _rows(f, input={"id_column": "id"})
    assert why in str(err.value) and f"{f}, row 1, column 'id'" in str(err.value)


def test_duplicate_ids_across_files(tmp_path):
    write_prompts(tmp_path / "in" / "a.parquet", 2, id=["x1", "x2"])
    write_prompts(tmp_path / "in" / "b.parquet", 2, id=["x3", "x2"])
    with pytest.raises(InputError) as err:
        scan_inputs(_spec(tmp_path / "in", input={"id_column": "id"}), CFG)
    msg = str(err.value)
    assert "duplicate item id 'x2'" in msg and "b.parquet, row 1" in msg and "a.parquet, row 1" in msg


@pytest.mark.parametrize(
    "column, values, message",
    [("seed", pa.array([1, -1], pa.int64()), "row 1, column 'seed': -1 is outside [0, 2**63)"),
     ("seed", pa.array([1, 2**63], pa.uint64()), "row 1, column 'seed': 9223372036854775808 is outside"),
     ("width", pa.array([64, 100], pa.int32()), "row 1, column 'width': 100 is not a multiple of 8"),
     ("height", pa.array([0, 64], pa.int32()), "row 0, column 'height': 0 must be in [8, 4096]"),
     ("steps", pa.array([0, 2], pa.int32()), "row 0, column 'steps'"),
     ("seed", pa.array(["1", "2"]), "column 'seed': expected int values"),
     ("strength", pa.array([None, 1.5]), "row 1, column 'strength'")],
)
def test_bad_row_values(tmp_path, column, values, message):
    f = write_prompts(tmp_path / "p.parquet", 2, **{column: values})
    with pytest.raises(InputError) as err:
        _rows(f)
    assert message in str(err.value) and str(f) in str(err.value)


def test_null_prompt_and_missing_prompt_column(tmp_path):
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", None, "c"]}), f)
    with pytest.raises(InputError, match=r"p.parquet, row 1, column 'prompt': prompt is null"):
        _rows(f)
    pq.write_table(pa.table({"text": ["a"]}), f)
    with pytest.raises(InputError, match=r"no prompt column 'prompt'.*\['text'\]"):
        _rows(f)


def test_missing_unreadable_and_glob_inputs(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        list_input_files(str(tmp_path / "missing"), CFG)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match=r"bad.parquet: cannot read as Parquet"):
        scan_inputs(_spec(tmp_path / "bad.parquet"), CFG)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no Parquet files"):
        list_input_files(str(tmp_path / "empty"), CFG)
    write_prompts(tmp_path / "g" / "part-1.parquet", 1)
    write_prompts(tmp_path / "g" / "part-2.parquet", 1)
    write_prompts(tmp_path / "g" / "other.parquet", 1)
    files = list_input_files(str(tmp_path / "g" / "part-*.parquet"), CFG)
    assert [f.rel for f in files] == ["part-1.parquet", "part-2.parquet"]


# ----------------------------------------------------------------------------- issue 9 hardening


@pytest.mark.parametrize(
    "column, values, message",
    [  # item 14: overflow and unsigned values name the row, the column and the column's own range
     ("width", pa.array([64, 2**40], pa.int64()), "row 1, column 'width': 1099511627776 must be in [8, 4096]"),
     ("width", pa.array([64, 2**64 - 1], pa.uint64()), "row 1, column 'width': 18446744073709551615 is outside [8, 4096]"),
     ("steps", pa.array([2, 2**31], pa.int64()), "row 1, column 'steps': 2147483648 must be in [1, 1000]"),
     # item 13: NaN is not a number in range
     ("guidance_scale", pa.array([5.0, float("nan")]), "row 1, column 'guidance_scale': NaN is not a number"),
     ("strength", pa.array([float("nan"), 0.5]), "row 0, column 'strength': NaN is not a number")],
)
def test_bad_values_name_row_column_and_range(tmp_path, column, values, message):
    f = write_prompts(tmp_path / "p.parquet", 2, **{column: values})
    with pytest.raises(InputError) as err:
        _rows(f)
    assert message in str(err.value) and str(f) in str(err.value)
    assert "2**63" not in str(err.value)


def test_dictionary_encoded_columns_are_read(tmp_path):
    """Item 14: dictionary-typed prompts and ids (pandas categoricals) are plain strings to us."""
    f = tmp_path / "p.parquet"
    table = pa.table({"id": pa.array(["a", "b", "c"]).dictionary_encode(),
                      "prompt": pa.array(["x", "y", "x"]).dictionary_encode(),
                      "negative_prompt": pa.array(["n", None, "n"]).dictionary_encode()})
    pq.write_table(table, f)
    scan, rows = _rows(f, input={"id_column": "id"})
    assert [r["item_id"] for r in rows] == ["a", "b", "c"]
    assert [r["prompt"] for r in rows] == ["x", "y", "x"]
    assert [r["negative_prompt"] for r in rows] == ["n", "", "n"]


def test_per_row_n_column_expands_items_with_stable_ids_and_seeds(tmp_path):
    """A row's ``n`` overrides sampling.images_per_prompt (null: the job's value): items <id>-<k>
    with seeds seed + k; n out of range is an error naming the row and the column."""
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["x", "y", "z"], "id": ["a", "b", "c"], "seed": pa.array([10, 20, 30], pa.int64()),
                             "n": pa.array([1, None, 3], pa.int64())}), f)
    _, rows = _rows(f, input={"id_column": "id"}, sampling={"images_per_prompt": 2})
    assert [r["item_id"] for r in rows] == ["a-0", "b-0", "b-1", "c-0", "c-1", "c-2"]
    assert [r["seed"] for r in rows] == [10, 20, 21, 30, 31, 32]
    assert [r["prompt"] for r in rows] == ["x", "y", "y", "z", "z", "z"]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["x", "y"], "n": pa.array([2, 0], pa.int64())}), bad)
    with pytest.raises(InputError, match=r"bad\.parquet, row 1, column 'n': 0 must be in"):
        _rows(bad)
