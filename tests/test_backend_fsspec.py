"""FsspecBackend: S3 (moto, SeaweedFS) and other fsspec filesystems; batching, retries, errors, timeouts."""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import threading
import time
import uuid

import pytest
from s3servers import FaultyProxy, eventually, faulty_s3, make_bucket, moto_server, s3_bucket_url  # noqa: F401
from seaweed import ACCESS_KEY, SECRET_KEY, SeaweedServer, seaweed, seaweed_available, seaweed_bucket_url  # noqa: F401

import kvfs
from kvfs.backends import ByteRange, open_backend
from kvfs.backends._fsspec import TMP_SUFFIX, FsspecBackend, classify
from kvfs.errors import BackendIOError, ConnectionFailed, InvalidURL, PermissionDenied, StoreError, Timeout
from kvfs.testing import BackendSuite, backend_state_machine

pytestmark = pytest.mark.s3
K1 = "m/ns-1/aa/aa00.safetensors"


# ------------------------------------------------------------------------------------ conformance
class TestS3OnMoto(BackendSuite):
    @pytest.fixture
    def backend(self, s3_bucket_url):
        with open_backend(s3_bucket_url + "&timeout=20") as b:
            yield b

    def reopen(self, backend):
        url = f"s3://{backend.root}?endpoint_url={backend.endpoint}"
        backend.close()
        return open_backend(url)


@pytest.mark.skipif(not seaweed_available(), reason="SeaweedFS is not installed")
class TestS3OnSeaweedFS(BackendSuite):
    @pytest.fixture
    def backend(self, seaweed_bucket_url):
        with open_backend(seaweed_bucket_url) as b:
            yield b

    def reopen(self, backend):
        url = f"s3://{backend.root}?endpoint_url={backend.endpoint}&key={ACCESS_KEY}&secret={SECRET_KEY}"
        backend.close()
        return open_backend(url)


class TestFsspecMemory(BackendSuite):
    @pytest.fixture
    def backend(self):
        with open_backend(f"fsspec+memory://suite-{uuid.uuid4().hex}/kv") as b:
            yield b

    def reopen(self, backend):
        backend.close()
        return open_backend(backend.url)  # fsspec's memory filesystem is process-wide


class TestFsspecLocal(BackendSuite):
    @pytest.fixture
    def backend(self, tmp_path):
        with open_backend(f"fsspec+file://{tmp_path}/kv") as b:
            yield b

    def reopen(self, backend):
        backend.close()
        return open_backend(backend.url)


_MOTO: list[str] = []


def _moto_backend() -> FsspecBackend:
    if not _MOTO:
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        _MOTO.append(f"http://{host}:{port}")
    return open_backend(f"s3://{make_bucket(_MOTO[0])}/sm?endpoint_url={_MOTO[0]}")


TestS3MotoMachine = backend_state_machine(_moto_backend, max_examples=8).TestCase
TestFsspecMemoryMachine = backend_state_machine(
    lambda: open_backend(f"fsspec+memory://sm-{uuid.uuid4().hex}"), max_examples=30).TestCase


# ------------------------------------------------------------------------------------ options
def test_url_options_reach_s3fs_with_their_types(moto_server):
    bucket = make_bucket(moto_server)
    b = open_backend(
        f"s3://{bucket}/p?endpoint_url={moto_server}&region=eu-west-1&anon=false&requester_pays=false"
        f"&config_kwargs=%7B%22read_timeout%22%3A%207%7D&concurrency=5&timeout=3.5&retries=2"
        f"&key=AKIDEXAMPLE&secret=very-secret-value"
    )
    try:
        fs = b.fs
        assert fs.anon is False and fs.requester_pays is False
        assert fs.key == "AKIDEXAMPLE" and fs.secret == "very-secret-value"
        assert fs.client_kwargs["region_name"] == "eu-west-1"
        assert fs.config_kwargs["read_timeout"] == 7  # the user's own setting wins
        assert fs.config_kwargs["max_pool_connections"] >= 5
        assert fs.config_kwargs["retries"] == {"max_attempts": 0, "mode": "standard"}
        assert (b.concurrency, b.timeout, b.retries) == (5, 3.5, 2)
        assert b.shared is True
        assert "very-secret-value" not in repr(b) and "very-secret-value" not in b.url
        b.put("k", b"v")
        assert bytes(b.get("k")) == b"v"
    finally:
        b.close()
    # keyword options win over the query and are passed as given
    b = open_backend(f"s3://{bucket}/p?endpoint_url=http://127.0.0.1:1&concurrency=3", endpoint_url=moto_server,
                     concurrency=7)
    try:
        assert b.concurrency == 7 and bytes(b.get("k")) == b"v"
    finally:
        b.close()


@pytest.mark.parametrize("url,match", [
    ("s3://b/p?endpoint=http://x", "unknown option.*endpoint"),
    ("s3://b/p?anon=perhaps", "anon"),
    ("s3://b/p?concurrency=0", "concurrency"),
    ("s3://b/p?timeout=soon", "timeout"),
    ("s3://b/p?config_kwargs=%7Bnot-json", "JSON"),
    ("s3://", "bucket"),
    ("fsspec+nosuchprotocol://x", "nosuchprotocol"),
    # out of range or not understood: refused at open, naming the option (not a hang, a crash or silence later)
    ("s3://b/p?timeout=nan", "timeout"),
    ("s3://b/p?timeout=inf", "timeout"),
    ("s3://b/p?retries=-1", "retries"),
    ("s3://b/p?retries=1.5", "retries"),
    ("s3://b/p?config_kwargs=notjson", "config_kwargs.*JSON object"),
    ("s3://b/p?client_kwargs=%5B1%5D", "client_kwargs.*JSON object"),
    ("s3://b/p?endpoint_url=127.0.0.1:9000", "endpoint_url.*http://"),
    ("s3://b/p?endpoint_url=minio", "endpoint_url.*http://"),
    ("fsspec+memory://x?concurency=4", "concurency.*did you mean concurrency"),
    ("fsspec+file:///tmp/x?timout=3", "timout.*did you mean timeout"),
])
def test_bad_options_are_clear_errors(url, match):
    with pytest.raises(InvalidURL, match=match):
        open_backend(url)


def test_secrets_never_reach_logs_or_errors(faulty_s3, caplog):
    proxy, bucket = faulty_s3
    url = f"s3://{bucket}/kv?endpoint_url={proxy.endpoint}&key=AKID&secret=TOPSECRET&timeout=15&retries=1"
    proxy.fail(20, 403, "AccessDenied")
    with caplog.at_level(logging.DEBUG):
        with kvfs.open(f"memory://::{url}") as store:
            assert "TOPSECRET" not in store.redacted_url and "TOPSECRET" not in repr(store)
            b = store.tiers[1].backend
            with pytest.raises(PermissionDenied) as ei:
                b.get("k")
            assert ei.value.errno == errno.EACCES
            assert "TOPSECRET" not in str(ei.value)
    assert "TOPSECRET" not in caplog.text


# ------------------------------------------------------------------------------------ behaviour
def test_batches_are_concurrent_and_bounded(faulty_s3):
    proxy, bucket = faulty_s3
    b = open_backend(f"s3://{bucket}/kv?endpoint_url={proxy.endpoint}&concurrency=4")
    try:
        keys = [f"m/ns/{i:02x}/{i}" for i in range(16)]
        b.put_many({k: k.encode() for k in keys})
        proxy.reset()
        proxy.delay = 0.05  # every request takes a while: batches overlap them
        assert [bytes(v) for v in b.get_many(keys)] == [k.encode() for k in keys]
        assert 2 <= proxy.max_inflight <= 4
        proxy.reset()
        proxy.delay = 0.05
        assert b.exists_many(keys + ["m/ns/zz/none"]) == [True] * 16 + [False]
        assert 2 <= proxy.max_inflight <= 4
        proxy.reset()
        b.delete_many(keys)  # one DeleteObjects request for the whole batch
        assert proxy.requests == 1
        assert b.exists_many(keys[:3]) == [False] * 3
    finally:
        b.close()


def test_throttling_is_retried_with_backoff(faulty_s3):
    proxy, bucket = faulty_s3
    b = open_backend(f"s3://{bucket}/kv?endpoint_url={proxy.endpoint}&retries=4&timeout=20")
    try:
        proxy.throttle(3)
        b.put("k", b"value")  # three 503 SlowDown, then the put goes through
        assert proxy.faults_sent == 3
        proxy.fail(2, 500, "InternalError")
        assert bytes(b.get("k")) == b"value"
        proxy.fail(1, 503, "SlowDown")
        assert b.exists_many(["k"]) == [True]  # HEAD: the code comes from the status alone
        proxy.throttle(50)
        t0 = time.monotonic()
        with pytest.raises(StoreError) as ei:
            b.get("k")
        assert ei.value.errno == errno.EAGAIN and "throttled" in str(ei.value)
        assert time.monotonic() - t0 < 10
        proxy.reset()
        # a non-retryable error is not retried
        proxy.fail(5, 400, "InvalidArgument")
        with pytest.raises(StoreError) as ei:
            b.get("k")
        assert ei.value.errno == errno.EINVAL and proxy.faults_sent == 1
    finally:
        b.close()


def test_error_table_by_code_and_type():
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    def client_error(code, status=400):
        return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                           "GetObject")

    assert classify(client_error("NoSuchKey", 404)) == ("missing", errno.ENOENT)
    assert classify(client_error("SlowDown", 503)) == ("retry", errno.EAGAIN)
    assert classify(client_error("AccessDenied", 403)) == ("fail", errno.EACCES)
    assert classify(client_error("NoSuchBucket", 404)) == ("fail", errno.ENOENT)
    assert classify(client_error("InternalError", 500)) == ("retry", errno.EIO)
    # s3fs translates ClientErrors into builtins with __cause__: the code still decides
    translated = OSError(errno.EBUSY, "whatever text")
    translated.__cause__ = client_error("SlowDown", 503)
    assert classify(translated) == ("retry", errno.EAGAIN)
    head = ClientError({"Error": {}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "HeadObject")
    assert classify(head) == ("retry", errno.EBUSY) or classify(head)[0] == "retry"
    assert classify(EndpointConnectionError(endpoint_url="http://x")) == ("retry", errno.ECONNREFUSED)
    assert classify(ReadTimeoutError(endpoint_url="http://x")) == ("retry", errno.ETIMEDOUT)
    assert classify(FileNotFoundError("gone")) == ("missing", errno.ENOENT)
    assert classify(ValueError("text mentioning SlowDown")) == ("fail", errno.EIO)  # never by message


def test_missing_bucket_is_an_error_not_a_miss(moto_server):
    b = open_backend(f"s3://kvfs-no-such-bucket-{uuid.uuid4().hex[:6]}/kv?endpoint_url={moto_server}")
    try:
        with pytest.raises(StoreError, match="does not exist") as ei:
            b.put("k", b"v")
        assert ei.value.errno == errno.ENOENT and isinstance(ei.value.__cause__, BaseException)
    finally:
        b.close()


def test_unreachable_endpoint_fails_fast_with_connection_error():
    b = open_backend("s3://bucket/kv?endpoint_url=http://127.0.0.1:9&timeout=3")
    try:
        t0 = time.monotonic()
        with pytest.raises(ConnectionFailed) as ei:
            b.get_many(["a", "b", "c"])
        assert time.monotonic() - t0 < 5
        assert ei.value.errno == errno.ECONNREFUSED and "127.0.0.1:9" in str(ei.value)
    finally:
        b.close()


def test_ranges_past_the_end_and_empty_ranges(s3_bucket_url):
    b = open_backend(s3_bucket_url)
    try:
        data = bytes(range(256)) * 16
        b.put_many({"k": data, "empty": b""})
        got = b.get_ranges([ByteRange("k", 4000, 5000), ByteRange("k", 4096, None), ByteRange("k", 9000, 9100),
                            ByteRange("k", 7, 7), ByteRange("none", 7, 7), ByteRange("empty", 0, None)])
        assert [None if g is None else bytes(g) for g in got] == [data[4000:], b"", b"", b"", None, b""]
        buf = bytearray(10)
        assert b.readinto("k", buf, 4090) == 6 and bytes(buf[:6]) == data[4090:]
    finally:
        b.close()


def test_local_fsspec_puts_are_atomic_through_a_temporary_name(tmp_path):
    b = open_backend(f"fsspec+file://{tmp_path}/kv")
    b.put(K1, b"x" * 1000)
    b.put(K1, b"y" * 10)
    assert os.listdir(tmp_path / "kv/m/ns-1/aa") == ["aa00.safetensors"]  # moved into place, nothing left
    assert bytes(b.get(K1)) == b"y" * 10
    # a writer that died mid-put leaves a temporary name that no listing shows
    (tmp_path / "kv" / "m/ns-1/aa" / f"aa00.safetensors.abc{TMP_SUFFIX}").write_bytes(b"partial")
    assert list(b.list("")) == [K1]


def test_a_listing_of_many_pages_is_bounded_per_page_not_as_a_whole(faulty_s3):
    """fsck lists a whole bucket: a million chunks are a thousand LIST pages, far longer than the per-request
    timeout. Each page gets the timeout; a server that stops answering still fails the listing in time."""
    proxy, bucket = faulty_s3
    b = open_backend(f"s3://{bucket}/kv?endpoint_url={proxy.endpoint}&timeout=3&retries=0&concurrency=32")
    try:
        keys = sorted(f"m/ns/{i % 256:02x}/{i:05d}.safetensors" for i in range(2100))  # 3 pages of 1000
        b.put_many({k: b"x" for k in keys})
        proxy.reset()
        proxy.delay = 1.3  # each page takes 1.3 s (and moto's own time): the whole listing 4 s, over the timeout
        assert sorted(b.list("")) == keys
        assert sorted(b.list("m/ns/0")) == [k for k in keys if k.startswith("m/ns/0")]
        proxy.delay = 4.0  # one page over the timeout
        with pytest.raises(Timeout):
            list(b.list(""))
    finally:
        b.close()


def test_closed_backend_refuses_work(s3_bucket_url):
    b = open_backend(s3_bucket_url)
    b.put("k", b"v")
    b.close()
    b.close()
    with pytest.raises(StoreError) as ei:
        b.get("k")
    assert ei.value.errno == errno.EBADF


# ------------------------------------------------------------------------------------ real server faults
@pytest.mark.skipif(not seaweed_available(), reason="SeaweedFS is not installed")
def test_server_that_stops_mid_batch_times_out_then_recovers():
    with SeaweedServer() as server:
        bucket = server.make_bucket()
        b = open_backend(server.url(bucket, timeout=3, concurrency=4))
        try:
            keys = [f"m/ns/{i:02x}/{i}" for i in range(24)]
            value = os.urandom(1 << 20)
            b.put_many({k: value for k in keys})
            errors: list[BaseException] = []
            done = threading.Event()

            def reader():
                try:
                    for _ in range(50):
                        b.get_many(keys)
                except BaseException as e:  # noqa: BLE001
                    errors.append(e)
                done.set()

            t = threading.Thread(target=reader)
            t.start()
            time.sleep(0.3)
            server.pause()  # SIGSTOP: the server stops answering in the middle of a batch
            t0 = time.monotonic()
            assert done.wait(30), "a batch hung on a stopped server"
            elapsed = time.monotonic() - t0
            t.join()
            assert errors and isinstance(errors[0], Timeout), errors
            assert errors[0].errno == errno.ETIMEDOUT and "timed out after 3 s" in str(errors[0])
            assert elapsed < 3 + 4, f"the error came {elapsed:.1f} s after the server stopped (timeout=3)"
            t0 = time.monotonic()
            with pytest.raises(Timeout, match="not answering"):  # fails fast for a while: no second deadline
                b.exists_many(keys[:2])
            assert time.monotonic() - t0 < 1
            server.resume()
            # tried again once the breaker's window is over (BREAKER_FIRST_S)
            got = eventually(lambda: b.get_many(keys[:4]), (Timeout, ConnectionFailed))
            assert [bytes(v) for v in got] == [value] * 4
            # killed outright, then restarted on the same ports and data: refused, then fine again
            server.kill()
            with pytest.raises(ConnectionFailed):
                b.get(keys[0])
            server.start(same_ports=True)
            # the restarted gateway answers before its filer and volume server serve the old data again:
            # until then a read is an InternalError (BackendIOError, seen in CI), never wrong bytes
            deadline = time.monotonic() + 30
            while True:
                try:
                    got = b.get(keys[0])
                    break
                except (BackendIOError, ConnectionFailed, Timeout):  # (failing fast until it is tried again)
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            assert bytes(got) == value
        finally:
            b.close()


@pytest.mark.skipif(not seaweed_available(), reason="SeaweedFS is not installed")
def test_wrong_secret_on_a_real_server_is_permission_denied(seaweed):
    b = open_backend(seaweed.url(seaweed.bucket).replace(SECRET_KEY, "not-the-secret"))
    try:
        with pytest.raises(PermissionDenied) as ei:
            b.put("k", b"v")
        assert ei.value.errno == errno.EACCES and "not-the-secret" not in str(ei.value)
    finally:
        b.close()


def test_missing_client_library_gives_an_install_hint():
    import importlib.util

    from kvfs.errors import BackendUnavailable

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(BackendUnavailable, match="pip install gcsfs"):
        open_backend("gs://bucket/prefix")


class _NoDeleteProxy:
    """In front of moto: answers every ``DeleteObjects`` as S3 does for credentials without
    ``s3:DeleteObject`` (HTTP 200, each key listed under ``<Error>`` with ``AccessDenied``), deleting nothing;
    every other request is forwarded."""

    def __init__(self, upstream: str) -> None:
        import http.client
        import re
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        up = urlsplit(upstream)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                if self.command == "POST" and "delete" in self.path.partition("?")[2].split("&"):
                    keys = re.findall(rb"<Key>(.*?)</Key>", body)
                    data = b'<?xml version="1.0" encoding="UTF-8"?><DeleteResult>' + b"".join(
                        b"<Error><Key>" + k + b"</Key><Code>AccessDenied</Code><Message>Access Denied</Message>"
                        b"</Error>" for k in keys) + b"</DeleteResult>"
                    status, headers = 200, [("Content-Type", "application/xml")]
                else:
                    conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
                    conn.request(self.command, self.path, body=body,
                                 headers={k: v for k, v in self.headers.items() if k.lower() != "connection"})
                    resp = conn.getresponse()
                    data, status = resp.read(), resp.status
                    headers = [(k, v) for k, v in resp.getheaders()
                               if k.lower() not in ("transfer-encoding", "connection", "content-length")]
                    conn.close()
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_keys_a_delete_objects_request_could_not_delete_are_an_error(moto_server):
    """DeleteObjects answers 200 and lists the keys it could not delete (no s3:DeleteObject permission, object
    lock): a delete_many that left them in the bucket raises (PermissionDenied here), and an eviction does not
    report as freed what the bucket still holds."""
    proxy = _NoDeleteProxy(moto_server)
    bucket = make_bucket(moto_server)
    try:
        url = f"s3://{bucket}/kv?endpoint_url={proxy.endpoint}&timeout=10"
        with open_backend(url) as b:
            b.put_many({K1: b"a", "m/ns-1/bb/bb00.safetensors": b"b"})
            with pytest.raises(PermissionDenied) as ei:
                b.delete_many([K1, "m/ns-1/bb/bb00.safetensors"])
            assert ei.value.errno == errno.EACCES and "access denied" in str(ei.value)
            assert b.exists_many([K1, "m/ns-1/bb/bb00.safetensors"]) == [True, True]
        import numpy as np

        spec = kvfs.KVSpec("nodel", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float16", chunk_tokens=16)
        with kvfs.open(url) as store:
            ns = store.namespace(spec)
            ns.put(list(range(32)), np.ones(spec.chunk_shape(32), np.float16))
            with pytest.raises(PermissionDenied):
                store.evict(all=True)
            assert ns.lookup(list(range(32))) == 32  # still there, and found again
    finally:
        proxy.close()


def test_operations_in_flight_when_a_server_stops_answering_open_the_breaker_once(faulty_s3):
    """Several operations waiting on a server that stops answering all time out together: that is one failure,
    not one per operation. The breaker opens for its first window (not doubled once per operation in flight,
    up to BREAKER_MAX_S), so that a server back moments later is used again after BREAKER_FIRST_S."""
    from backends import _fsspec

    proxy, bucket = faulty_s3
    b = open_backend(f"s3://{bucket}/kv?endpoint_url={proxy.endpoint}&timeout=1&retries=0")
    try:
        b.put(K1, b"value")
        proxy.delay = 3.0  # the server stops answering
        errors: list[BaseException] = []

        def read():
            try:
                b.get(K1)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=read) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(errors) == 4 and all(isinstance(e, Timeout) for e in errors), errors
        proxy.delay = 0.0  # back
        time.sleep(_fsspec.BREAKER_FIRST_S + 0.5)
        assert bytes(b.get(K1)) == b"value"
    finally:
        b.close()
