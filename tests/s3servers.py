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


def eventually(op, errors: tuple, within: float = 20.0):
    """``op()`` once it stops raising ``errors``: an S3 backend fails fast for a while after its server timed
    out or refused a connection, and uses it again once it answers."""
    import time

    deadline = time.monotonic() + within
    while True:
        try:
            return op()
        except errors:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


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


class FaultyProxy:
    """An HTTP proxy in front of a real S3 server that injects faults: throttling, errors, delays.

    Requests are forwarded unchanged (moto does not check signatures) unless a
    fault is armed: ``throttle(n)`` answers the next ``n`` requests with 503
    SlowDown, ``fail(n, status, code)`` with any S3 error, ``delay`` sleeps
    before forwarding. ``max_inflight`` records the most requests in flight
    at once (to check bounded concurrency).
    """

    def __init__(self, upstream: str) -> None:
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        up = urlsplit(upstream)
        proxy = self
        self._lock = threading.Lock()
        self._faults: list[tuple[int, str]] = []
        self.delay = 0.0
        self.inflight = 0
        self.max_inflight = 0
        self.requests = 0
        self.faults_sent = 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                with proxy._lock:
                    proxy.requests += 1
                    proxy.inflight += 1
                    proxy.max_inflight = max(proxy.max_inflight, proxy.inflight)
                    fault = proxy._faults.pop(0) if proxy._faults else None
                try:
                    if proxy.delay:
                        import time

                        time.sleep(proxy.delay)
                    if fault is not None:
                        status, code = fault
                        with proxy._lock:
                            proxy.faults_sent += 1
                        xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                               f"<Message>injected by the test proxy</Message><RequestId>kvfs</RequestId></Error>")
                        payload = b"" if self.command == "HEAD" else xml.encode()
                        self.send_response(status)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(payload)))
                        self.end_headers()
                        self.wfile.write(payload)
                        return
                    conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                    conn.close()
                finally:
                    with proxy._lock:
                        proxy.inflight -= 1

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def throttle(self, n: int) -> None:
        self.fail(n, 503, "SlowDown")

    def fail(self, n: int, status: int, code: str) -> None:
        with self._lock:
            self._faults.extend([(status, code)] * n)

    def reset(self) -> None:
        with self._lock:
            self._faults.clear()
            self.delay = 0.0
            self.max_inflight = self.inflight
            self.requests = self.faults_sent = 0

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def faulty_s3(moto_server):
    """``(proxy, bucket)``: a fresh bucket on moto, reached through a :class:`FaultyProxy`."""
    proxy = FaultyProxy(moto_server)
    bucket = make_bucket(moto_server)
    yield proxy, bucket
    proxy.close()
