"""A real S3 endpoint for tests: moto's threaded server on 127.0.0.1 (HTTP on loopback, free port).

- ``s3_server`` (session): starts the server, sets test AWS credentials/region in the environment
  (restored at the end) and yields the endpoint URL, e.g. ``http://127.0.0.1:40123``.
- ``s3_bucket``: a fresh, empty bucket per test; returns its name (emptied and removed afterwards).
- ``s3_strict_auth``: for the test's duration the server checks signatures and permissions
  against moto's IAM. Yields :class:`StrictAuth`: the endpoint and one IAM key pair allowed
  ``s3:*``; any other key pair (the session's test one included) is rejected as unknown.
"""

from __future__ import annotations

import contextlib
import json
import urllib.request
import uuid
from dataclasses import dataclass

import pytest

TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never wait on an instance-metadata lookup
    "AWS_CONFIG_FILE": "/nonexistent/batchgen-test-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/batchgen-test-aws-credentials",
}
UNSET_ENV = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL",
             "AWS_ENDPOINT_URL_S3")


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL of a moto S3 server on 127.0.0.1 (a free port); test credentials in the env."""
    from moto.server import ThreadedMotoServer

    mp = pytest.MonkeyPatch()
    for name, value in TEST_ENV.items():
        mp.setenv(name, value)
    for name in UNSET_ENV:
        mp.delenv(name, raising=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        mp.undo()


def s3_client(endpoint: str):
    """A plain boto3 client for test setup/inspection (not batchgen code)."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


@pytest.fixture
def s3_bucket(s3_server):
    """Name of a fresh empty bucket on the test server."""
    client = s3_client(s3_server)
    name = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    yield name
    with contextlib.suppress(Exception):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        client.delete_bucket(Bucket=name)


def _set_auth(endpoint: str, initial_no_auth_count: str) -> None:
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth",
                                     data=initial_no_auth_count.encode(), method="POST",
                                     headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        resp.read()


@dataclass(frozen=True)
class StrictAuth:
    endpoint: str
    access_key_id: str
    secret_access_key: str


@pytest.fixture
def s3_strict_auth(s3_server):
    """Turn on moto's IAM checks for this test; yields the endpoint and one valid key pair.

    Request fixtures that create buckets before this one: once it is on, the session's test
    key pair is rejected (InvalidAccessKeyId).
    """
    import boto3

    iam = boto3.client("iam", endpoint_url=s3_server, region_name="us-east-1")
    user = f"tester-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    policy = {"Version": "2012-10-17",
              "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName=user, PolicyName="s3-all", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    _set_auth(s3_server, "0")
    try:
        yield StrictAuth(s3_server, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        _set_auth(s3_server, "inf")
