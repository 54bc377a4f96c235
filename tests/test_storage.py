"""Storage layer: local and S3 (moto server on loopback) round trips, errors in words, the cache."""

from __future__ import annotations

import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.errors import StorageError
from batchgen.storage import Location, StorageConfig

from .fixtures_s3 import s3_client

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _quiet_moto():
    logging.getLogger("werkzeug").setLevel(logging.WARNING)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> Location:
    """An empty folder-like Location: a local temp folder or a prefix in a fresh bucket."""
    if request.param == "local":
        return Location.parse(tmp_path / "root")
    endpoint = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return Location.parse(f"s3://{bucket}/some/prefix", StorageConfig(endpoint_url=endpoint))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket closes


# -- parsing -----------------------------------------------------------------------------------


def test_parse_normalizes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Location.parse("out/demo").uri == str(tmp_path / "out" / "demo")
    assert Location.parse(f"file://{tmp_path}/a/b").uri == str(tmp_path / "a" / "b")
    assert Location.parse(tmp_path / "x").uri == str(tmp_path / "x")
    s3 = Location.parse("s3://bkt//models/sd1/")
    assert (s3.scheme, s3.bucket, s3.key, s3.uri) == ("s3", "bkt", "models/sd1", "s3://bkt/models/sd1")
    assert Location.parse("s3://bkt").uri == "s3://bkt"
    assert s3.join("unet", "a/b.bin").uri == "s3://bkt/models/sd1/unet/a/b.bin"
    assert Location.parse("s3://bkt").join("x").uri == "s3://bkt/x"
    assert Location.parse(s3.uri) == s3 and Location.parse(s3) is s3
    assert s3.join("unet").name == "unet"


def test_parse_and_join_errors():
    with pytest.raises(StorageError, match="unsupported URI scheme 'gs'"):
        Location.parse("gs://bucket/x")
    with pytest.raises(StorageError, match="no bucket"):
        Location.parse("s3:///x")
    with pytest.raises(StorageError, match=r"'\.\.' is not allowed"):
        Location.parse("s3://bkt/a/../b")
    with pytest.raises(StorageError, match="credentials inside an s3:// URI"):
        Location.parse("s3://key:secret@bkt/x")
    with pytest.raises(StorageError, match="empty URI"):
        Location.parse(" ")
    with pytest.raises(ValueError, match=r"join part 1 .*'\.\.'"):
        Location.parse("s3://bkt/a").join("b", "../c")
    with pytest.raises(ValueError, match="endpoint_url must look like"):
        StorageConfig(endpoint_url="127.0.0.1:9000")
    with pytest.raises(ValueError, match="extra"):
        StorageConfig(endpoint="http://x")


def test_endpoint_from_environment(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000/")
    assert StorageConfig().resolved_endpoint() == "http://127.0.0.1:9000"
    pinned = StorageConfig().resolved()
    assert StorageConfig(endpoint_url="https://minio.example").resolved_endpoint() == "https://minio.example"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert StorageConfig().resolved_endpoint() is None
    assert pinned.endpoint_url == "http://127.0.0.1:9000" == pinned.resolved_endpoint()


# -- round trips (local and S3) ----------------------------------------------------------------


def test_round_trip(root):
    assert not root.exists() and not root.is_dir_like() and root.list() == []
    a, b, c = root.join("a.txt"), root.join("images", "b.png"), root.join("images/deep/c.bin")
    for loc, data in ((a, b"alpha"), (b, b"\x89PNG..."), (c, b"")):
        loc.write_bytes(data)
    assert a.read_bytes() == b"alpha" and b.read_bytes() == b"\x89PNG..." and c.read_bytes() == b""
    a.write_bytes(b"alpha v2")  # overwrite
    assert a.read_bytes() == b"alpha v2"
    assert root.exists() and root.is_dir_like() and a.exists() and not a.is_dir_like()
    assert root.join("images").is_dir_like() and not root.join("missing").exists()
    assert a.is_file() and not root.join("images").is_file()
    assert [loc.uri for loc in root.list()] == [a.uri, b.uri, c.uri]
    assert [loc.uri for loc in root.list(recursive=False)] == [a.uri]
    assert [loc.uri for loc in root.join("images").list()] == [b.uri, c.uri]
    root.require_folder()
    b.delete()
    assert not b.exists() and [loc.uri for loc in root.list()] == [a.uri, c.uri]
    root.join("images").delete()  # a folder: everything under it
    assert [loc.uri for loc in root.list()] == [a.uri]
    root.join("never-written").delete()  # missing is fine
    root.delete()
    assert root.list() == [] and not root.exists()


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    loc = Location.parse(tmp_path / "out" / "x.bin")
    loc.write_bytes(b"1" * 1000)
    loc.write_bytes(b"2" * 10)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.bin"]
    assert loc.read_bytes() == b"2" * 10
    assert (tmp_path / "out" / "x.bin").stat().st_mode & 0o777 != 0o600  # normal file mode


def test_pyarrow_fs_round_trip(root):
    table = pa.table({"id": ["a", "b"], "prompt": ["x", "y"]})
    fs, path = root.pyarrow_fs()
    if root.scheme == "local":
        fs.create_dir(path)
    pq.write_table(table, f"{path}/part-0.parquet", filesystem=fs)
    assert pq.read_table(f"{path}/part-0.parquet", filesystem=fs).equals(table)
    assert [loc.name for loc in root.list()] == ["part-0.parquet"]
    written = pq.read_table(pa.BufferReader(root.join("part-0.parquet").read_bytes()))
    assert written.equals(table)


def test_no_credentials_in_anything_returned(s3_server, s3_bucket, monkeypatch):
    secret = "SECRETvalue-must-not-leak-1234"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDmustnotleak")
    cfg = StorageConfig(endpoint_url=s3_server)
    loc = Location.parse(f"s3://{s3_bucket}/p", cfg)
    fs, path = loc.pyarrow_fs()
    blob = pickle.dumps((loc, fs, path)) + repr(loc).encode() + cfg.model_dump_json().encode()
    assert secret.encode() not in blob and b"AKIDmustnotleak" not in blob
    assert pickle.loads(pickle.dumps(loc)) == loc  # Ray ships Locations to workers
    with pytest.raises(StorageError) as info:
        Location.parse("s3://no-such-bucket-xyz/k", cfg).read_bytes()
    assert secret not in str(info.value) and "AKIDmustnotleak" not in str(info.value)


# -- errors ------------------------------------------------------------------------------------


def test_local_errors(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="no such file: .*missing.bin"):
        Location.parse(tmp_path / "missing.bin").read_bytes()
    with pytest.raises(StorageError, match="file.txt is a file where a folder is needed"):
        Location.parse(blocker).join("images", "a.png").write_bytes(b"x")
    with pytest.raises(StorageError, match="needs to be a folder but .*file.txt is a file"):
        Location.parse(blocker).require_folder()
    with pytest.raises(StorageError, match="needs to be a folder but .*file.txt is a file"):
        Location.parse(blocker).join("sub").require_folder()
    with pytest.raises(StorageError, match="it is an existing folder"):
        Location.parse(tmp_path).write_bytes(b"x")
    with pytest.raises(StorageError, match="is a folder, expected a file"):
        Location.parse(tmp_path).read_bytes()
    with pytest.raises(StorageError, match="no such file or folder"):
        Location.parse(tmp_path / "nope").local_cache_copy()


def test_s3_output_that_is_an_object(s3_server, s3_bucket):
    cfg = StorageConfig(endpoint_url=s3_server)
    out = Location.parse(f"s3://{s3_bucket}/out", cfg)
    out.write_bytes(b"I am a file")
    with pytest.raises(StorageError, match=f"output s3://{s3_bucket}/out needs to be a folder .* it is an object"):
        out.require_folder()
    with pytest.raises(StorageError, match="no such object: s3://.*/out/missing"):
        out.join("missing").read_bytes()


@pytest.mark.parametrize("op", ["read", "write", "list", "exists", "require_folder", "cache"])
def test_s3_missing_bucket(s3_server, op):
    loc = Location.parse("s3://no-such-bucket-42/prefix/x", StorageConfig(endpoint_url=s3_server))
    call = {
        "read": loc.read_bytes, "write": lambda: loc.write_bytes(b"x"), "list": loc.list,
        "exists": loc.exists,
        "require_folder": loc.require_folder, "cache": loc.local_cache_copy,
    }[op]
    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket-42' does not exist \("):
        call()


def test_s3_wrong_credentials(s3_bucket, s3_strict_auth, monkeypatch):  # bucket made before auth is on
    # moto checks signatures against its IAM here: the session's test key pair is unknown.
    loc = Location.parse(f"s3://{s3_bucket}/k", StorageConfig(endpoint_url=s3_strict_auth.endpoint))
    for call in (loc.read_bytes, lambda: loc.write_bytes(b"x"), loc.list):
        with pytest.raises(StorageError, match=r"S3 rejected the credentials \(InvalidAccessKeyId\)"):
            call()
    with pytest.raises(StorageError, match="access denied"):
        loc.require_folder()  # HEAD requests carry no error code: a plain 403
    # the IAM user's keys work (a changed environment gets a fresh client) ...
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_strict_auth.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_strict_auth.secret_access_key)
    loc.write_bytes(b"ok")
    assert loc.read_bytes() == b"ok" and [x.uri for x in loc.list()] == []
    loc.join("sub").require_folder()
    fs, path = loc.pyarrow_fs()  # pyarrow takes the same credentials from the AWS chain
    assert fs.open_input_file(path).read() == b"ok"
    # ... and the right key id with a wrong secret is refused
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(StorageError, match=r"S3 rejected the credentials \(SignatureDoesNotMatch\)"):
        loc.read_bytes()


def test_s3_unreachable_endpoint_fails_fast(tmp_path):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    loc = Location.parse("s3://bkt/x", StorageConfig(endpoint_url=endpoint))
    for call in (loc.read_bytes, loc.exists, loc.list, lambda: loc.local_cache_copy(tmp_path)):
        start = time.monotonic()
        with pytest.raises(StorageError, match=f"cannot reach S3 endpoint {endpoint}"):
            call()
        assert time.monotonic() - start < 10


# -- local_cache_copy --------------------------------------------------------------------------


def _upload_model(endpoint: str, bucket: str, prefix: str = "models/m", extra: int = 0) -> dict[str, bytes]:
    files = {"model_index.json": b"{}", "unet/config.json": b'{"a": 1}', "unet/w.bin": os.urandom(3000)}
    files.update({f"shards/{i:03d}.bin": os.urandom(100) for i in range(extra)})
    client = s3_client(endpoint)
    for rel, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=data)
    return files


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and not p.name.startswith(".")}


def _downloads(caplog) -> int:
    return sum(1 for r in caplog.records if r.name == "batchgen.storage" and "downloading" in r.getMessage())


def test_cache_copy_downloads_once(s3_server, s3_bucket, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="batchgen.storage")
    files = _upload_model(s3_server, s3_bucket)
    loc = Location.parse(f"s3://{s3_bucket}/models/m", StorageConfig(endpoint_url=s3_server))
    first = loc.local_cache_copy(tmp_path / "cache")
    assert _tree(first) == files and _downloads(caplog) == 1
    mtimes = {p: p.stat().st_mtime_ns for p in first.rglob("*")}
    second = loc.local_cache_copy(tmp_path / "cache")
    assert second == first and _downloads(caplog) == 1
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*")} == mtimes
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()) == [first.name]
    # changed content -> a new cache folder with the new bytes
    loc.join("unet/config.json").write_bytes(b'{"a": 2}')
    third = loc.local_cache_copy(tmp_path / "cache")
    assert third != first and _tree(third)["unet/config.json"] == b'{"a": 2}' and _downloads(caplog) == 2
    # a single object
    single = loc.join("unet/w.bin").local_cache_copy(tmp_path / "cache")
    assert single.name == "w.bin" and single.read_bytes() == files["unet/w.bin"]
    # a whole bucket keeps its folder structure
    whole = Location.parse(f"s3://{s3_bucket}", loc.config).local_cache_copy(tmp_path / "cache")
    assert _tree(whole) == {f"models/m/{rel}": data for rel, data in _tree(third).items()}
    # the default cache root follows BATCHGEN_CACHE (set by conftest)
    assert str(loc.local_cache_copy()).startswith(os.environ["BATCHGEN_CACHE"])
    # local URIs are their own copy; an empty prefix is an error
    assert Location.parse(tmp_path).local_cache_copy() == tmp_path
    with pytest.raises(StorageError, match=f"no objects under s3://{s3_bucket}/nothing/"):
        Location.parse(f"s3://{s3_bucket}/nothing", loc.config).local_cache_copy(tmp_path / "cache")


def test_cache_copy_concurrent_threads_download_once(s3_server, s3_bucket, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="batchgen.storage")
    files = _upload_model(s3_server, s3_bucket)
    loc = Location.parse(f"s3://{s3_bucket}/models/m", StorageConfig(endpoint_url=s3_server))
    results: list[Path] = []
    barrier = threading.Barrier(3)

    def worker():
        barrier.wait()
        results.append(loc.local_cache_copy(tmp_path / "cache"))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 3 and len(set(results)) == 1
    assert _tree(results[0]) == files and _downloads(caplog) == 1
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp-")]


CHILD = """
import logging, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
from batchgen.storage import Location, StorageConfig
loc = Location.parse(sys.argv[1], StorageConfig(endpoint_url=sys.argv[2]))
time.sleep(max(0.0, float(sys.argv[4]) - time.time() - 0.02))
while time.time() < float(sys.argv[4]):
    pass
print(loc.local_cache_copy(sys.argv[3]))
"""


def test_cache_copy_concurrent_processes_download_once(s3_server, s3_bucket, tmp_path):
    files = _upload_model(s3_server, s3_bucket, extra=40)  # a download long enough to overlap
    uri = f"s3://{s3_bucket}/models/m"
    start_at = str(time.time() + 3)  # both children start downloading at the same moment
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, uri, s3_server, str(tmp_path / "cache"), start_at],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1 and _tree(Path(paths.pop())) == files
    logs = "".join(err for _, err in outs)
    assert logs.count("batchgen.storage downloading") == 1, logs
