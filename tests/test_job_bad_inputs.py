"""Bad input: each case fails before rendering with a message naming file/row/column/key,
and nothing an earlier run wrote is lost."""

import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from batchgen.cli import main
from batchgen.errors import CheckpointError, InputError, StorageError
from batchgen.spec import spec_from_dict

from .faults import run_job
from .fixtures_jobs import image_digests, job_dict, write_prompts

NULL = {"renderer": "null"}


def test_bad_second_file_keeps_first_runs_results(tmp_path, ray_local):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_prompts(inp / "a.parquet", 3)
    spec = spec_from_dict(job_dict(inp, out))
    run_job(spec, faults=NULL)
    images, manifest = image_digests(out), (out / "manifest.parquet").read_bytes()
    pq.write_table(pa.table({"prompt": ["x", "y", None]}), inp / "b.parquet")
    with pytest.raises(InputError, match=r"b.parquet, row 2, column 'prompt': prompt is null"):
        run_job(spec, faults=NULL)
    assert image_digests(out) == images and (out / "manifest.parquet").read_bytes() == manifest


def _bad(tmp_path, case):
    """(spec dict, expected error type, message fragment) for one bad-input case."""
    out = tmp_path / "out"
    f = tmp_path / "p.parquet"
    if case == "missing input":
        return job_dict(tmp_path / "nope", out), InputError, "no such file or folder"
    if case == "unreadable input":
        f.write_bytes(b"garbage")
        return job_dict(f, out), InputError, "p.parquet: cannot read as Parquet"
    if case == "no prompt column":
        pq.write_table(pa.table({"text": ["a"]}), f)
        return job_dict(f, out), InputError, "no prompt column 'prompt'"
    if case == "duplicate ids":
        write_prompts(f, 3, id=["a", "b", "a"])
        return (job_dict(f, out, input={"id_column": "id"}), InputError,
                "row 2, column 'id': duplicate item id 'a' (first seen in")
    if case == "unsafe id":
        write_prompts(f, 2, id=["ok", "../x"])
        return job_dict(f, out, input={"id_column": "id"}), InputError, "row 1, column 'id': unsafe item id '../x'"
    if case == "seed out of range":
        write_prompts(f, 2, seed=pa.array([-5, 1], pa.int64()))
        return job_dict(f, out), InputError, "row 0, column 'seed': -5 is outside [0, 2**63)"
    if case == "bad size":
        write_prompts(f, 2, height=pa.array([64, 4100], pa.int32()))
        return job_dict(f, out), InputError, "row 1, column 'height'"
    if case == "output is a file":
        write_prompts(f, 1)
        (tmp_path / "file").write_text("x")
        return job_dict(f, tmp_path / "file"), StorageError, "needs to be a folder"
    if case == "unknown sampler":
        write_prompts(f, 1)
        return job_dict(f, out, sampling={"sampler": "magic"}), InputError, "sampling.sampler: unknown sampler 'magic'"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing input", "unreadable input", "no prompt column", "duplicate ids",
                                  "unsafe id", "seed out of range", "bad size", "output is a file",
                                  "unknown sampler"])
def test_bad_input_fails_before_rendering(tmp_path, case):
    data, error, fragment = _bad(tmp_path, case)
    with pytest.raises(error) as err:
        run_job(spec_from_dict(data), faults=NULL)  # pre-flight: no Ray needed, nothing rendered
    assert fragment in str(err.value)
    assert not (tmp_path / "out" / "images").exists()


def test_model_uri_that_does_not_exist(tmp_path):
    data = job_dict(write_prompts(tmp_path / "p.parquet", 1), tmp_path / "out", model={"uri": str(tmp_path / "m")})
    with pytest.raises(CheckpointError, match=r"model.uri .*: no such model folder"):
        run_job(spec_from_dict(data))
    data["model"]["uri"] = "builtin:huge"
    with pytest.raises(CheckpointError, match="unknown built-in model"):
        run_job(spec_from_dict(data))


def test_unknown_yaml_key_via_cli(tmp_path, capsys):
    data = job_dict(write_prompts(tmp_path / "p.parquet", 1), tmp_path / "out", sampling={"stepz": 3})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'sampling.stepz'" in err and str(path) in err
    assert main(["run", str(path), "--set", "sampling.stepz"]) == 2


def _s3_job(tmp_path, out_uri, endpoint):
    return spec_from_dict(job_dict(write_prompts(tmp_path / "p.parquet", 1), out_uri,
                                   storage={"endpoint_url": endpoint}))


def test_unreachable_s3_endpoint_fails_fast(tmp_path, s3_server):
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        run_job(_s3_job(tmp_path, "s3://bucket/out", "http://127.0.0.1:9"), faults=NULL)
    assert "127.0.0.1:9" in str(err.value) and time.monotonic() - start < 60


def test_missing_bucket(tmp_path, s3_server):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        run_job(_s3_job(tmp_path, "s3://no-such-bucket/out", s3_server), faults=NULL)


def test_wrong_credentials(tmp_path, s3_bucket, s3_strict_auth):
    with pytest.raises(StorageError) as err:
        run_job(_s3_job(tmp_path, f"s3://{s3_bucket}/out", s3_strict_auth.endpoint), faults=NULL)
    assert "credential" in str(err.value).lower() or "access key" in str(err.value).lower()
    assert "testing" not in str(err.value)  # the secret never appears
