"""`batchgen export`: WebDataset shards and Hugging Face Parquet read back as plain files."""

import hashlib
import io
import json
import tarfile

import pyarrow.parquet as pq
import pytest
from PIL import Image

from batchgen.cli import main
from batchgen.errors import InputError
from batchgen.export import export_output
from tests.fixtures_regression import noise_image, write_job_output


def _job(tmp_path, name="job"):
    items = [dict(item_id=f"img.{k:02d}" if k % 3 == 0 else f"img-{k:02d}", image=noise_image(k))
             for k in range(7)]
    items[4] = dict(item_id="img-04", status="failed", error="boom")
    items.append(dict(item_id="img-99", image=noise_image(99), prompt="unicode ✓ prompt"))
    return write_job_output(tmp_path / name, items), items


def test_webdataset_shards_read_back_with_tarfile(tmp_path, capsys):
    out, items = _job(tmp_path)
    dest = tmp_path / "wds"
    assert main(["export", str(out), "--format", "webdataset", "--shard-size", "3", "--to", str(dest)]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["exported"] == 7 and counts["failed_skipped"] == 1 and counts["shards"] == 3
    sizes = json.loads((dest / "sizes.json").read_text())
    assert sizes == {"000000.tar": 3, "000001.tar": 3, "000002.tar": 1}
    manifest = {r["item_id"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    seen = {}
    order = []
    for shard in sorted(sizes):
        with tarfile.open(dest / shard) as tar:
            members = tar.getmembers()
            assert len(members) == 3 * sizes[shard]
            for m in members:
                assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
                key, ext = m.name.split(".", 1)  # keys have no dots: one split gives key + ext
                seen.setdefault(key, {})[ext] = tar.extractfile(m).read()
                if ext == "json":
                    order.append(key)
        rows = pq.read_table(dest / shard.replace(".tar", ".parquet")).to_pylist()
        assert [r["key"] for r in rows] == order[-sizes[shard]:]
    ok_ids = sorted(i for i, r in manifest.items() if r["status"] == "ok")
    assert order == [i.replace(".", "_") for i in ok_ids]  # sorted ids, each once
    for item_id in ok_ids:
        sample = seen[item_id.replace(".", "_")]
        assert set(sample) == {"png", "txt", "json"}
        assert hashlib.sha256(sample["png"]).hexdigest() == manifest[item_id]["image_sha256"]
        assert sample["txt"].decode("utf-8") == manifest[item_id]["prompt"]
        assert json.loads(sample["json"]) == manifest[item_id]
    assert "img-04" not in seen
    assert seen["img-99"]["txt"].decode() == "unicode ✓ prompt"

    # Re-export: byte-identical shards; a non-empty destination needs --overwrite.
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    with pytest.raises(InputError, match="not empty"):
        export_output(str(out), "webdataset", str(dest), shard_size=3)
    export_output(str(out), "webdataset", str(dest), shard_size=3, overwrite=True)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    # Fewer, larger shards: the stale shards of the earlier export are removed.
    export_output(str(out), "webdataset", str(dest), shard_size=10, overwrite=True)
    assert sorted(p.name for p in dest.iterdir()) == ["000000.parquet", "000000.tar", "export.json", "sizes.json"]
    # --overwrite never writes over, or deletes from, a folder that is not an earlier export.
    other = tmp_path / "someone-elses"
    other.mkdir()
    (other / "000000.tar").write_bytes(b"not ours")
    (other / "000007.tar").write_bytes(b"not ours either")
    with pytest.raises(InputError, match="no batchgen export.json: --overwrite only replaces an earlier export"):
        export_output(str(out), "webdataset", str(other), shard_size=10, overwrite=True)
    assert sorted(p.read_bytes() for p in other.iterdir()) == [b"not ours", b"not ours either"]


def test_webdataset_key_collision_and_bad_arguments(tmp_path):
    out = write_job_output(tmp_path / "job", [dict(item_id="a.b", image=noise_image(1)),
                                               dict(item_id="a_b", image=noise_image(2))])
    with pytest.raises(InputError, match="'a.b' and 'a_b' both map to WebDataset key 'a_b'"):
        export_output(str(out), "webdataset", str(tmp_path / "wds"))
    assert not (tmp_path / "wds").exists()
    with pytest.raises(ValueError, match="shard_size"):
        export_output(str(out), "parquet", str(tmp_path / "p"), shard_size=0)
    with pytest.raises(ValueError, match="format"):
        export_output(str(out), "tfrecord", str(tmp_path / "p"))
    # Stored bytes that do not match the manifest are refused, naming the item.
    (out / "images" / "a_b.png").write_bytes(b"tampered")
    with pytest.raises(InputError, match="do not match the manifest sha256 of item 'a_b'"):
        export_output(str(out), "parquet", str(tmp_path / "p"))


def test_hf_parquet_reads_back_with_pyarrow_and_datasets(tmp_path, monkeypatch):
    out, items = _job(tmp_path)
    dest = tmp_path / "hf"
    counts = export_output(str(out), "parquet", str(dest), shard_size=4)
    assert counts["exported"] == 7 and counts["failed_skipped"] == 1 and counts["files"] == 2
    files = sorted((dest / "data").iterdir())
    assert [f.name for f in files] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    table = pq.read_table(files[0])
    meta = json.loads(table.schema.metadata[b"huggingface"])
    assert meta["info"]["features"]["image"] == {"_type": "Image"}
    assert meta["info"]["features"]["text"] == {"dtype": "string", "_type": "Value"}
    assert meta["info"]["features"]["seed"] == {"dtype": "int64", "_type": "Value"}
    assert str(table.schema.field("image").type) == "struct<bytes: binary, path: string>"
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    manifest = {r["item_id"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    assert [r["item_id"] for r in rows] == sorted(i for i, r in manifest.items() if r["status"] == "ok")
    for r in rows:
        assert hashlib.sha256(r["image"]["bytes"]).hexdigest() == manifest[r["item_id"]]["image_sha256"]
        assert r["text"] == manifest[r["item_id"]]["prompt"] and r["seed"] == manifest[r["item_id"]]["seed"]
    before = [f.read_bytes() for f in files]
    export_output(str(out), "parquet", str(dest), shard_size=4, overwrite=True)
    assert [f.read_bytes() for f in files] == before

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # local files only: never reach for the Hub
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    datasets = pytest.importorskip("datasets", reason="`datasets` is not installed (optional test extra)")
    ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    assert len(ds) == 7
    assert type(ds.features["image"]).__name__ == "Image"
    first = ds[0]
    assert isinstance(first["image"], Image.Image) and first["image"].size == (24, 24)
    assert first["item_id"] == rows[0]["item_id"] and first["text"] == rows[0]["text"]
    with Image.open(io.BytesIO(rows[0]["image"]["bytes"])) as im:
        assert list(first["image"].convert("RGB").getdata()) == list(im.convert("RGB").getdata())


def test_export_to_s3(request, tmp_path):
    endpoint = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    from batchgen.storage import Location, StorageConfig

    cfg = StorageConfig(endpoint_url=endpoint)
    out, _ = _job(tmp_path)
    uri = f"s3://{bucket}/exports/wds"
    assert main(["export", str(out), "--format", "webdataset", "--to", uri, "--endpoint-url", endpoint]) == 0
    sizes = json.loads(Location.parse(f"{uri}/sizes.json", cfg).read_bytes())
    assert sizes == {"000000.tar": 7}
    local = export_output(str(out), "webdataset", str(tmp_path / "wds"))
    assert local["exported"] == 7
    assert Location.parse(f"{uri}/000000.tar", cfg).read_bytes() == (tmp_path / "wds" / "000000.tar").read_bytes()
