"""Every way a stored chunk can be wrong is a miss plus a quarantine, never data.

Each case writes a bad chunk at the path of a good one (in LMDB and in the file backend),
then asks for it through get, get_prefix and the raw-bytes views (cat, fsck --verify).
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

import fault_report
import kvfs
from bitrot import stored_chunk
from kvfs import chunk
from kvfs.errors import CacheMiss, ChunkFormatError, NotFound
from kvfs.keys import as_tokens

SPEC = kvfs.KVSpec("bad/tiny", num_layers=3, num_kv_heads=2, head_dim=8, dtype="bfloat16", chunk_tokens=16)
TOKENS = list(range(1000, 1048))
COUNT = {"cases": 0, "served_wrong": 0}


def kv(seed=0, n=48, spec=SPEC):
    return np.random.default_rng(seed).standard_normal(spec.chunk_shape(n), dtype=np.float32).astype(
        spec.numpy_dtype)


def rewrite_meta(buf: bytes, **changes) -> bytes:
    n = struct.unpack("<Q", buf[:8])[0]
    header = json.loads(buf[8 : 8 + n])
    header["__metadata__"].update(changes)
    header["__metadata__"]["meta_checksum"] = chunk._xxh(chunk._canonical_meta(header["__metadata__"]))
    raw = json.dumps(header, separators=(",", ":")).encode()
    return buf[:8] + raw + b" " * (n - len(raw)) + buf[8 + n :]


def encode_as(spec, tokens, key, arr, start=16, parent=""):
    raw = arr.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[spec.itemsize])
    return bytes(chunk.encode(spec, key=key.hex, parent=parent, tokens=as_tokens(tokens), kv=raw, start=start))


def _cases(ns, good: bytes):
    key = ns.keys(TOKENS)[1]
    h = chunk.parse_header(good)
    other_spec = kvfs.KVSpec("bad/tiny", 3, 2, 8, dtype="float16", chunk_tokens=16)
    other_shape = kvfs.KVSpec("bad/other", 3, 1, 8, dtype="bfloat16", chunk_tokens=16)
    flip = lambda i: good[:i] + bytes([good[i] ^ 0x20]) + good[i + 1 :]  # noqa: E731
    yield "flipped data byte", flip(h.data_offset + 7)
    yield "flipped last data byte", flip(len(good) - 1)
    yield "flipped header byte", flip(20)
    yield "flipped metadata token", good.replace(b'"tokens":"[1016', b'"tokens":"[1017', 1)
    yield "flipped length field", flip(1)
    yield "truncated in the data", good[: h.data_offset + 100]
    yield "truncated in the header", good[:50]
    yield "empty", b""
    yield "header claims a huge size", struct.pack("<Q", (1 << 62) - 8) + good[8:]
    yield "padded", good + b"\0" * 10
    yield "tokens that do not match the key", rewrite_meta(good, tokens=json.dumps(list(range(16))).replace(" ", ""))
    yield "another key", rewrite_meta(good, key="ab" * 32)
    yield "another namespace's chunk", encode_as(other_shape, TOKENS[16:32], key, kv(1, 16, other_shape))
    yield "wrong dtype for the namespace", rewrite_meta(
        encode_as(other_spec, TOKENS[16:32], key, kv(2, 16, other_spec)), namespace=SPEC.namespace_id)
    yield "wrong shape for the namespace", rewrite_meta(
        encode_as(other_shape, TOKENS[16:32], key, kv(3, 16, other_shape)), namespace=SPEC.namespace_id)
    yield "not a chunk at all", b"PK\x03\x04 this is a zip file" * 100
    yield "valid JSON but no tensor", struct.pack("<Q", 4088) + b'{"__metadata__":{}}'.ljust(4088)


@pytest.mark.parametrize("scheme", ["lmdb", "file"])
def test_every_bad_chunk_is_a_miss_and_is_quarantined(tmp_path, scheme, caplog):
    good_kv = kv()
    n_cases = 0
    for case_i in range(len(list(_cases_names()))):
        url = f"{scheme}://{tmp_path}/s{case_i}"
        with kvfs.open(url) as store:
            ns, key, backend, good = stored_chunk(store, SPEC, TOKENS, good_kv)
            name, bad = list(_cases(ns, good))[case_i]
            backend.put(key.path, bad)
            store._headers.clear()
            COUNT["cases"] += 1
            n_cases += 1
            with pytest.raises(CacheMiss):
                ns.get(TOKENS)
            COUNT["cases"] += 1
            n, got = ns.get_prefix(TOKENS)
            assert n == 16, name
            if got.tobytes() != good_kv[:, :, :16].tobytes():
                COUNT["served_wrong"] += 1
            assert got.tobytes() == good_kv[:, :, :16].tobytes(), name
            assert key.path in store.catalog.quarantined(), name
            assert not backend.exists_many([key.path])[0], f"{name}: the bad chunk was not removed"
            with pytest.raises(NotFound):
                store.cat(key.path)
            # a second copy of the same bad bytes, found by fsck and by cat
            backend.put(key.path, bad)
            store._headers.clear()
            with pytest.raises(ChunkFormatError, match="failed its checks"):  # the reason, not "no such chunk"
                store.cat(key.path)
            assert not backend.exists_many([key.path])[0], f"{name}: cat did not quarantine the bad chunk"
            backend.put(key.path, bad)
            report = store.fsck(verify=True)
            assert report.corrupt or report.foreign or report.orphans, name
            # and the store heals: putting the good KV again serves it
            ns.put(TOKENS, good_kv)
            assert ns.get(TOKENS).tobytes() == good_kv.tobytes(), name
    assert n_cases == 17  # a newer format version is a miss but kept: see the test below
    assert "quarantined" in caplog.text


def _cases_names():
    class _NS:
        def keys(self, t):
            return kvfs.open("memory://").namespace(SPEC).keys(t)

    with kvfs.open("memory://") as s:
        ns = s.namespace(SPEC)
        ns.put(TOKENS, kv())
        good = bytes(s.tiers[0].backend.get(ns.keys(TOKENS)[1].path))
        return [name for name, _ in _cases(ns, good)]


def teardown_module(module):
    fault_report.add("bad data", corrupt_chunks_tried=COUNT["cases"], wrong_KV_served=COUNT["served_wrong"])


def test_chunks_of_a_newer_format_are_misses_but_never_deleted(tmp_path, caplog):
    """A mixed-version fleet: an old node must not delete what a newer node wrote to a shared tier."""
    with kvfs.open(f"file://{tmp_path}/s") as store:
        ns = store.namespace(SPEC)
        ns.put(TOKENS, kv())
        key = ns.keys(TOKENS)[1]
        backend = store.tiers[0].backend
        newer = rewrite_meta(bytes(backend.get(key.path)), version="2")
        backend.put(key.path, newer)
        store._headers.clear()
        with pytest.raises(CacheMiss):
            ns.get(TOKENS)
        assert ns.get_prefix(TOKENS)[0] == 16
        assert bytes(backend.get(key.path)) == newer  # still there, untouched
        assert key.path not in store.catalog.quarantined()
        report = store.fsck(verify=True)
        assert report.newer and not report.corrupt
        assert bytes(backend.get(key.path)) == newer
        assert "newer format" in caplog.text
    # `kvfs fsck` says so (not an error: exit 0), and leaves the chunk where it is
    from click.testing import CliRunner

    from kvfs.cli import main

    r = CliRunner().invoke(main, ["--url", f"file://{tmp_path}/s", "fsck", "--verify"], prog_name="kvfs")
    assert r.exit_code == 0, r.output
    assert "1 chunk(s) in a newer chunk format" in r.stderr and key.path in r.stderr
    assert bytes(backend.get(key.path)) == newer
