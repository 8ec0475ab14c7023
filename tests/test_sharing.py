"""Sharing one bucket across nodes and clusters: each store has its own local tiers and catalog."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from s3servers import make_bucket, moto_server  # noqa: F401
from seaweed import seaweed, seaweed_available  # noqa: F401

import kvfs
from kvfs.errors import CacheMiss

pytestmark = pytest.mark.s3
SPEC = kvfs.KVSpec("share-test", num_layers=3, num_kv_heads=2, head_dim=32, dtype="bfloat16", chunk_tokens=32)


def _prompt(n_tokens: int, seed: int):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, 50_000, n_tokens).tolist()
    kv = rng.standard_normal(SPEC.chunk_shape(n_tokens)).astype(SPEC.numpy_dtype)
    return toks, kv


@pytest.fixture(params=["moto", "seaweedfs"])
def bucket_url(request, moto_server, tmp_path):
    """A fresh place in a bucket, on moto or on SeaweedFS."""
    if request.param == "moto":
        return f"s3://{make_bucket(moto_server)}/kv?endpoint_url={moto_server}"
    if not seaweed_available():
        pytest.skip("SeaweedFS is not installed")
    server = request.getfixturevalue("seaweed")
    return server.url(server.bucket, f"share-{os.urandom(6).hex()}")


def _exact(a, b) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("local", ["lmdb", "file"])
def test_second_cluster_finds_returns_and_promotes_what_the_first_wrote(bucket_url, tmp_path, local):
    toks, kv = _prompt(100, 1)  # three whole chunks and a partial one
    a = f"memory://::{local}://{tmp_path}/node-a::{bucket_url}"
    with kvfs.open(a) as store:
        assert store.tiers[2].shared and not store.tiers[1].shared
        store.namespace(SPEC).put(toks, kv)
    b = f"memory://::{local}://{tmp_path}/node-b::{bucket_url}"  # its own empty local tiers and catalog
    with kvfs.open(b) as store:
        ns = store.namespace(SPEC)
        paths = [k.path for k in ns.keys(toks)]
        assert store.tiers[1].backend.exists_many(paths) == [False] * 4
        assert ns.lookup(toks) == 100
        _exact(ns.get(toks), kv)
        assert store.tiers[0].backend.exists_many(paths) == [True] * 4, "not promoted into memory"
        store.flush()  # promotion lands in the top tier and is written back to the tiers between
        assert store.tiers[1].backend.exists_many(paths) == [True] * 4, "not promoted into the local tier"
        # a longer prompt sharing the prefix: the stored part is found, the rest is a miss
        longer = toks + _prompt(40, 2)[0]
        assert ns.lookup(longer) == 100
        n, got = ns.get_prefix(longer)
        assert n == 100
        _exact(got, kv)
        with pytest.raises(CacheMiss):
            ns.get(longer)
    with kvfs.open(f"{local}://{tmp_path}/node-b") as local_only:  # the promoted copies stand on their own
        _exact(local_only.namespace(SPEC).get(toks), kv)


def test_a_node_without_the_spec_rebuilds_its_catalog_from_the_bucket(bucket_url, tmp_path):
    toks, kv = _prompt(64, 3)
    with kvfs.open(f"lmdb://{tmp_path}/a::{bucket_url}") as store:
        store.namespace(SPEC).put(toks, kv)
    with kvfs.open(f"lmdb://{tmp_path}/b::{bucket_url}") as store:
        assert store.ls("") == []
        report = store.fsck()
        assert report.chunks == 2 and report.namespaces == 1 and not report.corrupt
        assert [e.name for e in store.ls("")] == ["share-test"]
        spec = store.spec_of(SPEC.path)  # from the manifest in the bucket
        assert spec == SPEC
        _exact(store.namespace(spec).get(toks), kv)


def test_a_chunk_removed_by_another_node_is_a_miss_not_an_error(bucket_url, tmp_path):
    toks, kv = _prompt(64, 4)
    a_url, b_url = f"lmdb://{tmp_path}/a::{bucket_url}", f"memory://::{bucket_url}"
    with kvfs.open(a_url) as a:
        a.namespace(SPEC).put(toks, kv)
    with kvfs.open(b_url) as b:
        ns_b = b.namespace(SPEC)
        assert ns_b.lookup(toks) == 64
        with kvfs.open(a_url) as a:
            a.evict(SPEC.path, force=True)  # removes the chunks from every tier of node a, the bucket too
        b.evict(SPEC.path, tier=0, force=True)  # and node b's memory copy: its next read goes to the bucket
        with pytest.raises(CacheMiss):
            ns_b.get(toks)
        assert ns_b.lookup(toks) == 0  # the stale catalog entries were dropped
        ns_b.put(toks, kv)  # and the chunks can be written again
        b.flush()
    with kvfs.open(f"memory://::{bucket_url}") as c:
        _exact(c.namespace(SPEC).get(toks), kv)


_WRITER = textwrap.dedent(
    """
    import sys, numpy as np, kvfs
    spec = kvfs.KVSpec("share-test", num_layers=3, num_kv_heads=2, head_dim=32, dtype="bfloat16", chunk_tokens=32)
    url, seed, rounds, read_back = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, 50_000, 200).tolist()
    kv = rng.standard_normal(spec.chunk_shape(200)).astype(spec.numpy_dtype)
    with kvfs.open(url) as store:
        ns = store.namespace(spec)
        ns.put(toks, kv)  # skips the chunks another writer already put
        chunks = {k.path: store.cat(k.path) for k in ns.keys(toks)}
        bucket = store.tiers[-1].backend
        for _ in range(rounds):
            bucket.put_many(chunks)  # every writer puts every object again, all at once
            if read_back:  # and reads them back from the bucket while the others overwrite them
                with kvfs.open(url.split("::", 1)[1]) as reader:
                    assert reader.namespace(spec).get(toks).tobytes() == kv.tobytes()
    print("ok")
    """
)


def test_concurrent_writers_of_the_same_chunks_are_harmless(bucket_url, tmp_path):
    # moto's server itself breaks when one key is read while it is overwritten; SeaweedFS does not
    read_back = "1" if "key=" in bucket_url else "0"
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, f"memory://::{bucket_url}", "7", "2", read_back],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == "ok", err[-2000:]
    toks, kv = _prompt(200, 7)
    with kvfs.open(f"lmdb://{tmp_path}/reader::{bucket_url}") as store:
        _exact(store.namespace(SPEC).get(toks), kv)
        report = store.fsck(verify=True)
        assert report.chunks == 7 and not report.corrupt and not report.foreign, report.to_dict()
        keys = list(store.tiers[1].backend.list(SPEC.path + "/"))
        assert len([k for k in keys if k.endswith(".safetensors")]) == 7
