"""``kvfs cp`` from the embedded LMDB store to a shared S3 bucket (moto on loopback), and reading it back
as another node would: a fresh catalog rebuilt by ``kvfs fsck``."""

from __future__ import annotations

import json
import os

import pytest
from s3servers import moto_server, s3_bucket_url  # noqa: F401  (fixtures)
from test_cli import P2, SPEC, fill, invoke, one_error_line, run

import kvfs

pytestmark = pytest.mark.s3


def test_cp_lmdb_to_s3_then_ls_and_cat_there(tmp_path, s3_bucket_url):
    src = f"lmdb://{tmp_path}/local"
    filled = fill(src)
    p = run("cp", src, s3_bucket_url)
    assert f"copied {len(filled['paths'])} chunk(s)" in p.stdout and p.stderr == ""
    assert "secret" not in p.stdout.lower()

    doc = json.loads(invoke("ls", "-R", "--json", url=s3_bucket_url).stdout)
    assert sorted(e["path"] for e in doc["entries"] if e["type"] == "chunk") == filled["paths"]
    with kvfs.open(src) as a, kvfs.open(s3_bucket_url) as b:
        for path in filled["paths"]:
            assert b.cat(path) == a.cat(path)  # byte-exact, and verified on the way out of the bucket
        assert b.namespace(SPEC).get(P2).tobytes() == a.namespace(SPEC).get(P2).tobytes()

    # again: everything is there already
    doc = json.loads(invoke("cp", "--json", src, s3_bucket_url).stdout)
    assert doc["copied"] == 0 and doc["skipped"] == len(filled["paths"])


def test_another_node_sees_the_bucket_after_fsck(tmp_path, s3_bucket_url, monkeypatch):
    src = f"lmdb://{tmp_path}/local"
    filled = fill(src)
    invoke("cp", src, s3_bucket_url)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other-node-cache"))  # its own, empty catalog
    r = invoke("ls", url=s3_bucket_url)
    assert r.stdout == "" and "kvfs fsck" in r.stderr
    r = invoke("fsck", url=s3_bucket_url)
    assert f"{len(filled['paths'])} chunk(s) in 1 namespace(s)" in r.stdout
    doc = json.loads(invoke("du", "--json", url=s3_bucket_url).stdout)
    assert doc["chunks"] == len(filled["paths"]) and doc["tokens"] == filled["tokens"]
    r = invoke("verify", url=s3_bucket_url)
    assert f"{len(filled['paths'])} ok, 0 failed" in r.stdout


def test_cp_to_a_missing_bucket_or_a_dead_server_is_one_clear_line(tmp_path, moto_server):
    src = f"lmdb://{tmp_path}/local"
    fill(src)
    p = run("cp", src, f"s3://no-such-bucket-kvfs/kv?endpoint_url={moto_server}", check=1)
    line = one_error_line(p.stderr)
    assert "no-such-bucket-kvfs" in line and "does not exist" in line
    p = run("cp", src, "s3://bucket/kv?endpoint_url=http://127.0.0.1:9&timeout=5&retries=0", check=1)
    line = one_error_line(p.stderr)
    assert "127.0.0.1:9" in line
    assert os.path.isdir(f"{tmp_path}/local")


def test_cp_from_an_unreachable_source_says_so_not_that_chunks_failed_their_checks(tmp_path, moto_server):
    """The source's catalog lists chunks in a bucket whose server is down: `kvfs cp` names the server it cannot
    reach (exit 1), rather than reporting every chunk as missing or as failing its checks."""
    from s3servers import FaultyProxy, make_bucket

    proxy = FaultyProxy(moto_server)
    src = f"s3://{make_bucket(moto_server)}/kv?endpoint_url={proxy.endpoint}&timeout=5&retries=0"
    fill(src)
    proxy.close()  # the server is gone: connections are refused
    p = run("cp", src, f"lmdb://{tmp_path}/dst", check=1)
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("kvfs cp:")]
    assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "cannot connect" in err[0] and proxy.endpoint in err[0], err[0]
    assert "failed their checks" not in p.stderr and "no such chunk" not in p.stderr
