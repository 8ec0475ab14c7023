"""Real S3 servers on loopback for tests: moto's server (unit tests) and SeaweedFS (integration).

Import the fixtures into a test module (``from s3servers import moto_server, s3_bucket_url``) or
use them through conftest. Each test gets its own bucket.
"""

from __future__ import annotations

import os
import uuid

import pytest

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def moto_server():
    """A moto S3 server on 127.0.0.1 (random port) for the whole session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def make_bucket(endpoint: str, name: str | None = None) -> str:
    import boto3

    name = name or f"kvfs-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_bucket_url(moto_server):
    """``s3://<fresh bucket>/kv?endpoint_url=...`` on the moto server."""
    bucket = make_bucket(moto_server)
    return f"s3://{bucket}/kv?endpoint_url={moto_server}"
