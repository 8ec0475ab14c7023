"""Signed chunks in a shared bucket: a poisoned chunk is refused when signing is on."""

from __future__ import annotations

import os

import numpy as np
import pytest

import kvfs
from kvfs.errors import CacheMiss
from s3servers import moto_server, s3_bucket_url  # noqa: F401  (fixtures)

SPEC = kvfs.KVSpec("signed/tiny", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", chunk_tokens=16)
KEY = b"deployment-secret-0123456789"


def kv(seed, n=32):
    return np.random.default_rng(seed).standard_normal(SPEC.chunk_shape(n), dtype=np.float32).astype(np.float16)


def test_poisoned_chunk_in_a_shared_bucket_is_refused_with_signing(s3_bucket_url, tmp_path, caplog):
    tokens = list(range(100, 132))
    good, poison = kv(1), kv(2)
    with kvfs.open(s3_bucket_url, signing_key=KEY, catalog=str(tmp_path / "a")) as a:
        a.namespace(SPEC).put(tokens, good)
    # an attacker who can write the bucket but has no key plants different KV for the same tokens:
    # a perfectly valid chunk (right key, tokens, checksums), just not what the model computes
    with kvfs.open(s3_bucket_url, catalog=str(tmp_path / "evil")) as evil:
        ns = evil.namespace(SPEC)
        backend = evil.tiers[0].backend
        from kvfs import chunk
        from kvfs.keys import as_tokens

        k = ns.keys(tokens)[1]
        raw = poison.view(np.uint16)
        buf = chunk.encode(SPEC, key=k.hex, parent=k.parent_hex, tokens=as_tokens(tokens)[16:32],
                           kv=raw[:, :, 16:32], start=16)
        backend.put(k.path, bytes(buf))
    # a reader with signing on refuses it: the first chunk is served, the poisoned one is a miss
    with kvfs.open(s3_bucket_url, signing_key=KEY, catalog=str(tmp_path / "b")) as b:
        ns = b.namespace(SPEC)
        with pytest.raises(CacheMiss):
            ns.get(tokens)
        n, got = ns.get_prefix(tokens)
        assert n == 16 and got.tobytes() == good[:, :, :16].tobytes()
        assert "signature" in caplog.text or "not signed" in caplog.text
    # without signing the same chunk would be served: that is the documented threat model
    with kvfs.open(s3_bucket_url, catalog=str(tmp_path / "c")) as c:
        ns = c.namespace(SPEC)
        got = ns.get(tokens[:16])
        assert got.tobytes() == good[:, :, :16].tobytes()


def test_wrong_key_and_unsigned_chunks_are_misses(tmp_path):
    url = f"lmdb://{tmp_path}/s"
    tokens = list(range(32))
    with kvfs.open(url) as unsigned:
        unsigned.namespace(SPEC).put(tokens, kv(3))
    with kvfs.open(url, signing_key=KEY) as s:
        with pytest.raises(CacheMiss):
            s.namespace(SPEC).get(tokens)
        assert s.namespace(SPEC).lookup(tokens) == 0  # not counted once found unsigned
        s.namespace(SPEC).put(tokens, kv(3))  # the unsigned chunks were left in place: the put replaces them
        assert s.namespace(SPEC).get(tokens).tobytes() == kv(3).tobytes()
    with kvfs.open(url, signing_key=b"another key") as other:
        with pytest.raises(CacheMiss):
            other.namespace(SPEC).get(tokens)


def test_a_node_with_the_wrong_key_deletes_nothing(tmp_path, caplog):
    """A node given another signing key (or none where the writers sign nothing) finds every chunk without a
    valid signature: misses, left in place, never deleted (each read used to quarantine, that is delete, the
    chunk: one misconfigured node wiped the store its team shares); fsck and verify --quarantine keep them."""
    from click.testing import CliRunner

    from kvfs.cli import main

    url = f"file://{tmp_path}/s"
    tokens = list(range(48))
    with kvfs.open(url, signing_key=KEY) as good:
        good.namespace(SPEC).put(tokens, kv(4, 48))
        paths = [k.path for k in good.namespace(SPEC).keys(tokens)]
    files = [tmp_path / "s" / p for p in paths]
    with kvfs.open(url, signing_key=b"a mistyped key") as wrong:
        ns = wrong.namespace(SPEC)
        assert ns.get_prefix(tokens)[0] == 0
        assert ns.lookup(tokens) == 0
        report = wrong.fsck(verify=True)
        assert len(report.unsigned) == 3 and not report.corrupt, report.to_dict()
        assert len(wrong.records(SPEC.path)) == 3  # kept in the catalog (space, eviction), never served here
        results = wrong.verify_chunks(quarantine=True)
        assert all(f.exists() for f in files)
    assert "no valid signature for this store's key" in caplog.text and "KVFS_SIGNING_KEY" in caplog.text
    r = CliRunner().invoke(main, ["--url", url, "verify", "--quarantine"], env={"KVFS_SIGNING_KEY": "mistyped"})
    assert r.exit_code == 1 and "without a valid signature" in r.output and "quarantined" not in r.output, r.output
    r = CliRunner().invoke(main, ["--url", url, "fsck", "--verify"], env={"KVFS_SIGNING_KEY": "mistyped"})
    assert "without a valid signature" in r.output and "kept in the catalog" in r.output, r.output
    assert all(f.exists() for f in files)
    assert len(results) == 3 and all(not r["ok"] and r["problem"] == "unsigned" for r in results), results
    with kvfs.open(url, signing_key=KEY) as good:  # the team's nodes still read everything
        ns = good.namespace(SPEC)
        assert ns.get(tokens).tobytes() == kv(4, 48).tobytes()



def test_one_unsigned_chunk_does_not_slow_every_lookup(tmp_path, monkeypatch):
    """Once a store had found one chunk without a valid signature (anywhere), every lookup of a fully stored
    prompt left the one-query fast path for a full plan, for the rest of the process (about 3 times slower)."""
    from kvfs.namespace import Namespace

    url = f"lmdb://{tmp_path}/s"
    other = list(range(10_000, 10_016))
    with kvfs.open(url) as unsigned:
        unsigned.namespace(SPEC).put(other, kv(5, 16))
    toks = list(range(16 * 64))
    plans = []
    real_plan = Namespace.plan
    monkeypatch.setattr(Namespace, "plan", lambda self, t: plans.append(1) or real_plan(self, t))
    with kvfs.open(url, signing_key=KEY) as s:
        ns = s.namespace(SPEC)
        ns.put(toks, kv(6, len(toks)))
        assert ns.get_prefix(other)[0] == 0 and ns.lookup(other) == 0  # found unsigned: a miss
        plans.clear()
        assert ns.lookup(toks) == len(toks)
        assert not plans, "a lookup of a prompt whose chunks are all stored left the one-query fast path"
        assert ns.lookup(other) == 0 and plans  # the unsigned one is not counted


def test_signing_key_from_environment(tmp_path, monkeypatch):
    keyfile = tmp_path / "key"
    keyfile.write_bytes(KEY + b"\n")
    monkeypatch.setenv("KVFS_SIGNING_KEY_FILE", str(keyfile))
    url = f"lmdb://{tmp_path}/s"
    with kvfs.open(url) as s:
        s.namespace(SPEC).put(list(range(16)), kv(4, 16))
        assert s.signer is not None
    monkeypatch.delenv("KVFS_SIGNING_KEY_FILE")
    with kvfs.open(url, signing_key=KEY) as s:
        assert s.namespace(SPEC).get(list(range(16))).tobytes() == kv(4, 16).tobytes()


def test_signed_layers_are_authenticated_one_by_one(tmp_path):
    """Layer-wise loads of a signed chunk check each layer's BLAKE2b digest, which the signature covers:
    even KV that matched the (non-cryptographic) xxh3 sums would be refused."""
    import dataclasses

    from kvfs import chunk
    from kvfs.errors import IntegrityError

    with kvfs.open(f"lmdb://{tmp_path}/s", signing_key=KEY) as s:
        ns = s.namespace(SPEC)
        ns.put(list(range(16)), kv(5, 16))
        path = ns.keys(list(range(16)))[0].path
        buf = bytes(s.tiers[0].backend.get(path))
        h = chunk.parse_header(buf)
        assert h.layer_digests and len(h.layer_digests) == SPEC.num_layers
        s.signer.verify(h)
        lo, hi = h.layer_range(1)
        tampered = bytearray(buf[lo:hi])
        tampered[10] ^= 1
        # pretend the attacker found data with the same xxh3 sum: the signed digest still refuses it
        meta = dict(h.metadata)
        sums = h.layer_checksums
        sums[1] = chunk._xxh(bytes(tampered))
        meta["layer_checksums"] = ",".join(sums)
        forged = dataclasses.replace(h, metadata=meta)
        with pytest.raises(IntegrityError):
            chunk.check_layer(forged, 1, bytes(tampered))
        chunk.check_layer(h, 1, buf[lo:hi])
        # and layer-wise prefetch of the signed chunk works end to end
        with ns.prefetch(list(range(16)) + [1], device="cpu") as pf:
            for layer in range(SPEC.num_layers):
                k, v = pf.wait_layer(layer)
                assert k.shape[-3] == 16


def test_cp_rotates_the_deployment_key_and_publishes_unsigned_caches(tmp_path):
    import subprocess
    import sys

    old, new = tmp_path / "old.key", tmp_path / "new.key"
    old.write_bytes(b"old deployment key")
    new.write_bytes(b"new deployment key")
    tokens = list(range(48))
    signed_old = f"lmdb://{tmp_path}/old"
    with kvfs.open(signed_old, signing_key=b"old deployment key") as s:
        s.namespace(SPEC).put(tokens, kv(6, 48))
    unsigned = f"lmdb://{tmp_path}/plain"
    with kvfs.open(unsigned) as s:
        s.namespace(SPEC).put(tokens, kv(6, 48))

    def cp(*args, key=new):
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVFS_SIGNING")}
        env["KVFS_SIGNING_KEY_FILE"] = str(key)
        return subprocess.run([sys.executable, "-m", "kvfs.cli", "cp", *args], capture_output=True, text=True,
                              env=env)

    # rotation: read with the old key, store signed with the new one
    r = cp("--source-key-file", str(old), signed_old, f"lmdb://{tmp_path}/rotated")
    assert r.returncode == 0, r.stderr
    with kvfs.open(f"lmdb://{tmp_path}/rotated", signing_key=b"new deployment key") as s:
        assert s.namespace(SPEC).get(tokens).tobytes() == kv(6, 48).tobytes()
    with kvfs.open(f"lmdb://{tmp_path}/rotated", signing_key=b"old deployment key") as s:
        with pytest.raises(CacheMiss):
            s.namespace(SPEC).get(tokens)
    # an unsigned source needs an explicit --source-unsigned; without it nothing is copied
    r = cp(unsigned, f"lmdb://{tmp_path}/published")
    assert r.returncode == 1 and "not copied" in r.stderr
    r = cp("--source-unsigned", unsigned, f"lmdb://{tmp_path}/published")
    assert r.returncode == 0, r.stderr
    with kvfs.open(f"lmdb://{tmp_path}/published", signing_key=b"new deployment key") as s:
        assert s.namespace(SPEC).get(tokens).tobytes() == kv(6, 48).tobytes()
    # a wrong source key verifies nothing, so nothing is vouched for
    r = cp("--source-key-file", str(new), signed_old, f"lmdb://{tmp_path}/wrong")
    assert r.returncode == 1
