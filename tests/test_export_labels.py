"""`batchgen export` with labels (WebDataset .cls, HF ClassLabel) and filters (--where, --min-score).

Job outputs are written in the runner's layout by tests.fixtures_regression, then their
manifest.parquet gains the per-job columns a labelled job has: passthrough input columns
(``label``, ``class_name``, ``caption``), DiT's ``class_id`` / ``class_name``, and ``clip_score``.
"""

import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.cli import main
from batchgen.errors import InputError
from batchgen.export import export_output, resolve_labels
from batchgen.where import WhereError, filter_table, parse
from tests.fixtures_regression import noise_image, write_job_output

NAMES = ["cat", "dog", "bird"]


def _with_columns(out, columns: dict, passthrough=()):
    """Add columns ({name: arrow array in item_id order}) to a fixture's manifest and job.json."""
    table = pq.read_table(out / "manifest.parquet")
    for name, values in columns.items():  # the manifest schema has class_id, class_name, clip_score: replace
        if name in table.column_names:
            table = table.set_column(table.schema.get_field_index(name), name, values)
        else:
            table = table.append_column(name, values)
    pq.write_table(table, out / "manifest.parquet")
    job = {"name": "labelled", "spec": {"input": {"passthrough": list(passthrough)}}}
    (out / "job.json").write_text(json.dumps(job))
    return out


def _labelled_job(tmp_path, name="job"):
    """8 items, label k % 3 with its class name and a caption, clip_score 20 + k; img-05 failed."""
    items = [dict(item_id=f"img-{k:02d}", image=noise_image(k)) for k in range(8)]
    items[5] = dict(item_id="img-05", status="failed", error="RuntimeError: boom")
    out = write_job_output(tmp_path / name, items)
    scores = [None if k == 5 else 20.0 + k for k in range(8)]
    return _with_columns(out, {
        "label": pa.array([k % 3 for k in range(8)], pa.int64()),
        "class_name": pa.array([NAMES[k % 3] for k in range(8)], pa.string()),
        "caption": pa.array([f"a photo of a {NAMES[k % 3]} #{k}" for k in range(8)], pa.string()),
        "clip_score": pa.array(scores, pa.float64()),
    }, passthrough=["label", "class_name", "caption"])


def _dit_job(tmp_path, ids, names, name="dit"):
    """A DiT-style output: class_id (int32) and class_name columns, no label column."""
    items = [dict(item_id=f"d-{k}", image=noise_image(50 + k)) for k in range(len(ids))]
    out = write_job_output(tmp_path / name, items)
    return _with_columns(out, {"class_id": pa.array(ids, pa.int32()), "class_name": pa.array(names, pa.string())})


def _read_wds(dest):
    webdataset = pytest.importorskip("webdataset")
    urls = [str(p) for p in sorted(dest.glob("*.tar"))]
    ds = webdataset.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")
    return list(ds)


def test_webdataset_cls_from_label_read_back_with_webdataset(tmp_path, capsys):
    out = _labelled_job(tmp_path)
    dest = tmp_path / "wds"
    assert main(["export", str(out), "--format", "webdataset", "--shard-size", "3", "--to", str(dest)]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["exported"] == 7 and counts["failed_skipped"] == 1 and counts["filtered_out"] == 0
    assert counts["labels"] == {"column": "label", "names_column": "class_name", "num_classes": 3}
    samples = _read_wds(dest)
    manifest = {r["item_id"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    assert [s["__key__"] for s in samples] == [i for i in sorted(manifest) if i != "img-05"]
    for s in samples:
        row = manifest[s["__key__"]]
        assert isinstance(s["cls"], int) and s["cls"] == row["label"]
        assert s["json"]["class_name"] == row["class_name"] and s["json"]["caption"] == row["caption"]
        assert s["json"] == row and s["txt"] == row["prompt"]
        assert s["png"].size == (24, 24)
    # The tar member holds the id as ASCII digits (webdataset's .cls convention).
    with tarfile.open(dest / "000000.tar") as tar:
        assert tar.extractfile("img-01.cls").read() == b"1"
        assert [m.name for m in tar.getmembers()][:4] == ["img-00.png", "img-00.cls", "img-00.txt", "img-00.json"]

    # --label-column none: no .cls; a string column as the label is refused.
    plain = tmp_path / "plain"
    counts = export_output(str(out), "webdataset", str(plain), label_column="none")
    assert counts["labels"] is None
    assert all("cls" not in s for s in _read_wds(plain))
    with pytest.raises(InputError, match="--label-column 'caption' has type string; the label must be an integer"):
        export_output(str(out), "webdataset", str(tmp_path / "x"), label_column="caption")
    with pytest.raises(InputError, match="--label-column 'lable': no such manifest column.*'label'"):
        export_output(str(out), "webdataset", str(tmp_path / "x"), label_column="lable")
    with pytest.raises(InputError, match="already has a column 'label'"):
        export_output(str(out), "parquet", str(tmp_path / "x"), label_column="source_row")
    assert not (tmp_path / "x").exists()


def test_webdataset_cls_from_dit_class_id(tmp_path):
    out = _dit_job(tmp_path, [4, 1, 4], ["tench", "goldfish", "tench"])
    dest = tmp_path / "wds"
    counts = export_output(str(out), "webdataset", str(dest))
    assert counts["labels"] == {"column": "class_id", "names_column": "class_name", "num_classes": 5}
    samples = _read_wds(dest)
    assert [(s["__key__"], s["cls"]) for s in samples] == [("d-0", 4), ("d-1", 1), ("d-2", 4)]
    assert samples[1]["json"]["class_name"] == "goldfish"


def _load_hf(tmp_path, dest, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # local files only: never reach for the Hub
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    datasets = pytest.importorskip("datasets", reason="`datasets` is not installed (optional test extra)")
    files = sorted(str(p) for p in (dest / "data").iterdir())
    return datasets, datasets.load_dataset("parquet", data_files=files, split="train",
                                           cache_dir=str(tmp_path / "hf-cache"))


def test_hf_classlabel_from_label_and_names(tmp_path, monkeypatch):
    out = _labelled_job(tmp_path)
    dest = tmp_path / "hf"
    counts = export_output(str(out), "parquet", str(dest), shard_size=4)
    assert counts["exported"] == 7 and counts["files"] == 2
    meta = json.loads(pq.read_schema(next((dest / "data").iterdir())).metadata[b"huggingface"])
    assert meta["info"]["features"]["label"] == {"names": NAMES, "_type": "ClassLabel"}
    datasets, ds = _load_hf(tmp_path, dest, monkeypatch)
    label = ds.features["label"]
    assert isinstance(label, datasets.ClassLabel) and label.names == NAMES and label.num_classes == 3
    assert ds["label"] == [k % 3 for k in range(8) if k != 5]
    assert [label.int2str(i) for i in ds["label"]] == ds["class_name"]  # original columns kept
    assert ds["caption"][0] == "a photo of a cat #0" and ds["text"][0] == "prompt for img-00"
    assert type(ds.features["image"]).__name__ == "Image"


def test_hf_classlabel_from_dit_class_id_with_gaps(tmp_path, monkeypatch):
    # Ids 0, 2 and 5 have names in the data; 1, 3 and 4 do not (named "1", "3", "4"). The names
    # come from the whole manifest: the failed item's class (5) is still a class.
    items = [dict(item_id=f"d-{k}", image=noise_image(70 + k)) for k in range(4)]
    items[3] = dict(item_id="d-3", status="failed", error="RuntimeError: boom")
    out = write_job_output(tmp_path / "dit", items)
    _with_columns(out, {"class_id": pa.array([2, 0, 2, 5], pa.int32()),
                        "class_name": pa.array(["crane", "tench", None, "ostrich"], pa.string())})
    dest = tmp_path / "hf"
    counts = export_output(str(out), "parquet", str(dest))
    assert counts["labels"]["num_classes"] == 6
    datasets, ds = _load_hf(tmp_path, dest, monkeypatch)
    assert ds.features["label"].names == ["tench", "1", "crane", "3", "4", "ostrich"]
    assert ds["label"] == [2, 0, 2] and ds["class_id"] == [2, 0, 2]
    assert ds.features["class_id"] == datasets.Value("int32")
    # Without names: a plain int64 label column, no ClassLabel.
    counts = export_output(str(out), "parquet", str(tmp_path / "hf2"), label_names_column="none")
    meta = json.loads(pq.read_schema(next((tmp_path / "hf2" / "data").iterdir())).metadata[b"huggingface"])
    assert meta["info"]["features"]["label"] == {"dtype": "int64", "_type": "Value"}


def test_label_names_errors(tmp_path):
    table = pa.table({"class_id": pa.array([1, 1, 0], pa.int64()), "class_name": ["a", "b", "c"]})
    with pytest.raises(InputError, match="class id 1 has two names in column 'class_name': 'a' and 'b'"):
        resolve_labels(table)
    table = pa.table({"label": pa.array([-1, 0], pa.int64()), "class_name": ["x", "y"]})
    with pytest.raises(InputError, match="class id -1; a ClassLabel needs ids >= 0"):
        resolve_labels(table)
    assert resolve_labels(table, "none") is None
    assert resolve_labels(table, "label", "none").names is None
    # A string `label` is no class: auto does not fall back to class_id under another `label`.
    table = pa.table({"label": ["cat"], "class_id": pa.array([3], pa.int64())})
    assert resolve_labels(table) is None
    assert resolve_labels(pa.table({"x": [1]})) is None
    # An exported row without a class id is an error that says how to leave it out.
    out = _dit_job(tmp_path, [0, None, 1], ["a", None, "b"])
    with pytest.raises(InputError, match="item 'd-1' has no class id.*--where \"class_id >= 0\""):
        export_output(str(out), "webdataset", str(tmp_path / "w"))
    counts = export_output(str(out), "webdataset", str(tmp_path / "w"), where="class_id >= 0")
    assert counts["exported"] == 2 and counts["filtered_out"] == 1


def test_where_and_min_score_filter_without_deleting(tmp_path, capsys):
    out = _labelled_job(tmp_path)
    before = sorted((p.name, p.read_bytes()) for p in out.rglob("*") if p.is_file())
    dest = tmp_path / "wds"
    # scores: img-00 20 .. img-07 27 (img-05 failed, no score); labels k % 3 (1 = dog).
    assert main(["export", str(out), "--format", "webdataset", "--to", str(dest),
                 "--where", "clip_score >= 22 and not class_name == 'dog'"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["exported"] == 3 and counts["failed_skipped"] == 1 and counts["filtered_out"] == 4
    assert counts["where"] == "clip_score >= 22 and not class_name == 'dog'" and counts["min_score"] is None
    assert json.loads((dest / "export.json").read_text()) == counts
    assert [s["__key__"] for s in _read_wds(dest)] == ["img-02", "img-03", "img-06"]

    hf = tmp_path / "hf"
    assert main(["export", str(out), "--format", "parquet", "--to", str(hf), "--min-score", "25",
                 "--where", "label == 0 or label == 2"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["min_score"] == 25.0 and counts["exported"] == 1 and counts["filtered_out"] == 6
    rows = pq.read_table(next((hf / "data").iterdir())).to_pylist()
    assert [(r["item_id"], r["label"], r["clip_score"]) for r in rows] == [("img-06", 0, 26.0)]
    # The job output is untouched.
    assert sorted((p.name, p.read_bytes()) for p in out.rglob("*") if p.is_file()) == before

    # Errors come before anything is written.
    with pytest.raises(WhereError, match=r"position 1: unknown column 'clip_scor' \(did you mean 'clip_score'\?\)"):
        export_output(str(out), "parquet", str(tmp_path / "bad"), where="clip_scor >= 22")
    with pytest.raises(ValueError, match="min_score must be a finite number"):
        export_output(str(out), "parquet", str(tmp_path / "bad"), min_score=float("nan"))
    plain = write_job_output(tmp_path / "plain", [dict(item_id="a", image=noise_image(1))])
    with pytest.raises(InputError, match="no.*clip_score.*run the job with scoring.clip to get scores"):
        export_output(str(plain), "webdataset", str(tmp_path / "bad"), min_score=0.28)
    assert main(["export", str(plain), "--format", "webdataset", "--to", str(tmp_path / "bad"),
                 "--min-score", "0.28"]) == 2
    assert "run the job with scoring.clip to get scores" in capsys.readouterr().err
    with pytest.raises(WhereError, match="column 'clip_score' has no values.*run the job with scoring.clip"):
        export_output(str(plain), "webdataset", str(tmp_path / "bad"), where="clip_score > 1")
    assert not (tmp_path / "bad").exists()


_TABLE = pa.table({
    "clip_score": pa.array([30.0, None, 20.0, 29.0], pa.float64()),
    "label": pa.array([1, 2, 3, 1], pa.int64()),
    "class_name": pa.array(["cat", "dog", "cat", None]).dictionary_encode(),
    "caption": pa.array(["it's", 'say "hi"', "c", "d"]),
    "flag": pa.array([True, False, None, True]),
    "item_id": ["a", "b", "c", "d"],
})


@pytest.mark.parametrize("expr, ids", [
    ("clip_score >= 28", ["a", "d"]),
    ("28 <= clip_score", ["a", "d"]),  # a literal on the left flips the operator
    ("clip_score < 28", ["c"]),  # null scores never match
    ("not clip_score >= 28", ["c"]),  # ... not even negated (SQL's three-valued logic)
    ("clip_score >= 28 or label == 2", ["a", "b", "d"]),  # unknown or true is true
    ("label > 1.5 AND label != 3", ["b"]),
    ("(label == 2 or class_name == \"cat\") and not flag == true", ["b"]),
    ("class_name != 'cat'", ["b"]),
    ("caption == 'it\\'s' or caption == \"say \\\"hi\\\"\"", ["a", "b"]),
    ("flag == false or item_id >= 'd'", ["b", "d"]),
    ("clip_score > 1e1 and label >= -1", ["a", "c", "d"]),
    ("((label == 1))", ["a", "d"]),
])
def test_where_expressions(expr, ids):
    assert filter_table(_TABLE, expr).column("item_id").to_pylist() == ids


@pytest.mark.parametrize("expr, position, message", [
    ("clip_scor >= 28", 1, "unknown column 'clip_scor' (did you mean 'clip_score'?); the manifest columns are"),
    ("label >= 1 and lable == 2", 16, "unknown column 'lable' (did you mean 'label'?)"),
    ("clip_score = 3", 12, "unexpected character '=' (use == for equality)"),
    ("label == 1 && label == 2", 12, "unexpected character '&' (use 'and', 'or', 'not')"),
    ("clip_score >= 'high'", 15, "column 'clip_score' is double: compare it with a number"),
    ("class_name == 3", 15, "compare it with a quoted string"),
    ("flag < true", 6, "true/false compare only with == or !="),
    ("(label == 1", 12, "expected ')' to close the '(' at position 1, found the end of the expression"),
    ("label == 1 label", 12, "expected 'and', 'or' or the end of the expression, found 'label'"),
    ("label ==", 9, "expected a column name or a literal"),
    ("label == class_name", 10, "a column can only be compared with a literal"),
    ("3 == 4", 1, "a comparison needs a column name on one side"),
    ("caption == 'open", 12, "string not closed"),
    ("", 1, "empty expression"),
    ("label == 1 and", 15, "expected a column name, a literal, 'not' or '('"),
])
def test_where_errors_name_the_position(expr, position, message):
    with pytest.raises(WhereError) as err:
        filter_table(_TABLE, expr)
    assert err.value.position + 1 == position
    text = str(err.value)
    assert f"--where {expr!r}, position {position}: " in text and message in text
    assert text.splitlines()[-1] == "  " + " " * (position - 1) + "^"


def test_where_never_evaluates_python():
    with pytest.raises(WhereError, match="unexpected character"):
        parse("__import__('os').system('true') == 1")
    with pytest.raises(WhereError):
        parse("label == 1; import os")
