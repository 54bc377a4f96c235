"""Integration: a job with input, model and output in S3 (moto's threaded server on 127.0.0.1)."""

import hashlib
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batchgen.jobcli import rerender_item
from batchgen.runner import run_job
from batchgen.spec import spec_from_dict

from .fixtures_jobs import job_dict
from .fixtures_s3 import s3_client


def _put_parquet(client, bucket, key, table):
    sink = io.BytesIO()
    pq.write_table(table, sink)
    client.put_object(Bucket=bucket, Key=key, Body=sink.getvalue())


def test_job_in_s3(s3_server, s3_bucket, ray_local, builtin_tiny):
    client = s3_client(s3_server)
    _put_parquet(client, s3_bucket, "prompts/part-0.parquet",
                 pa.table({"id": ["x1", "x2", "x3"], "prompt": ["a cat", "a dog", ""]}))
    _put_parquet(client, s3_bucket, "prompts/part-1.parquet", pa.table({"id": ["y1"], "prompt": ["a boat"]}))
    for path in sorted(Path(builtin_tiny).rglob("*")):
        if path.is_file():
            client.put_object(Bucket=s3_bucket, Key=f"models/tiny/{path.relative_to(builtin_tiny).as_posix()}",
                              Body=path.read_bytes())
    spec = spec_from_dict(job_dict(
        f"s3://{s3_bucket}/prompts", f"s3://{s3_bucket}/out/run1",
        input={"id_column": "id"}, model={"uri": f"s3://{s3_bucket}/models/tiny"},
        storage={"endpoint_url": s3_server}))
    result = run_job(spec)
    assert result.all_ok and result.total == 4

    def get(key):
        return client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()

    manifest = pq.read_table(io.BytesIO(get("out/run1/manifest.parquet")))
    assert manifest.column("item_id").to_pylist() == ["x1", "x2", "x3", "y1"]  # manifest rows == input rows
    assert manifest.column("prompt").to_pylist() == ["a cat", "a dog", "", "a boat"]
    for row in manifest.to_pylist():
        assert row["image_uri"] == f"s3://{s3_bucket}/out/run1/images/{row['item_id']}.png"
        data = get(f"out/run1/images/{row['item_id']}.png")
        assert hashlib.sha256(data).hexdigest() == row["image_sha256"]
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="out/run1/")["Contents"]}
    assert {"out/run1/job.json", "out/run1/summary.json", "out/run1/manifest.parquet"} <= keys
    assert any(k.startswith("out/run1/manifest/part-") for k in keys)
    assert b"testing" not in get("out/run1/job.json")  # no credentials written
    # resume on S3: nothing left to do
    assert run_job(spec).rendered_this_run == 0
    # rerender from the S3 manifest alone (model fetched from S3 again): the stored bytes
    data, row = rerender_item(f"s3://{s3_bucket}/out/run1", "x3", s3_server)
    assert data == get("out/run1/images/x3.png") and row["batch_size"] == 2
