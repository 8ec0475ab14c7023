"""docs/format.md is enough to implement chunks: an independent writer and reader built from it alone.

Nothing here imports kvfs's chunk code: keys, headers and checksums are made from the spec with
json, struct, hashlib and xxhash, then kvfs must read what this writes and vice versa.
"""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import xxhash

import kvfs

MANIFEST = {"kvfs_manifest": 1, "model": "spec/test", "revision": "", "dtype": "float16", "num_layers": 2,
            "num_kv_heads": 2, "head_dim": 4, "layout": "kv", "chunk_tokens": 8, "tp_rank": 0, "tp_size": 1,
            "hash": "blake2b-256"}


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def seed() -> bytes:
    return hashlib.blake2b(canonical(MANIFEST), digest_size=32).digest()


def namespace_id() -> str:
    return f"f16-L2-H2-D4-c8-tp1.0-{seed()[:4].hex()}"


def keys(tokens):
    out, prev = [], seed()
    for s in range(0, len(tokens), 8):
        prev = hashlib.blake2b(prev + struct.pack(f"<{len(tokens[s:s + 8])}I", *tokens[s : s + 8]),
                               digest_size=32).digest()
        out.append(prev)
    return out


def write_chunk(key: bytes, parent: bytes | None, tokens, start, kv: np.ndarray) -> bytes:
    data = kv.astype("<f2").tobytes()
    layer = len(data) // kv.shape[0]
    meta = {"format": "kvfs", "version": "1", "namespace": namespace_id(), "key": key.hex(),
            "parent": parent.hex() if parent else "", "kind": "prefix", "start": str(start),
            "positions": str(start), "tokens": json.dumps(list(tokens), separators=(",", ":")),
            "checksum": "xxh3-64:" + xxhash.xxh3_64_hexdigest(data),
            "layer_checksums": ",".join(xxhash.xxh3_64_hexdigest(data[i * layer:(i + 1) * layer])
                                        for i in range(kv.shape[0]))}
    meta["meta_checksum"] = xxhash.xxh3_64_hexdigest(canonical(meta))
    header = json.dumps({"__metadata__": meta, "kv": {"dtype": "F16", "shape": list(kv.shape),
                                                       "data_offsets": [0, len(data)]}}).encode()
    n = -(-(8 + len(header)) // 4096) * 4096 - 8
    return struct.pack("<Q", n) + header + b" " * (n - len(header)) + data


def read_chunk(buf: bytes, want_key: bytes, want_tokens) -> np.ndarray:
    (n,) = struct.unpack("<Q", buf[:8])
    assert (8 + n) % 4096 == 0
    header = json.loads(buf[8 : 8 + n])
    meta, t = header["__metadata__"], header["kv"]
    rest = {k: v for k, v in meta.items() if k not in ("meta_checksum", "signature")}
    assert xxhash.xxh3_64_hexdigest(canonical(rest)) == meta["meta_checksum"]
    assert meta["namespace"] == namespace_id() and meta["key"] == want_key.hex()
    assert json.loads(meta["tokens"]) == list(want_tokens)
    data = buf[8 + n :]
    assert len(data) == t["data_offsets"][1] == int(np.prod(t["shape"])) * 2
    assert "xxh3-64:" + xxhash.xxh3_64_hexdigest(data) == meta["checksum"]
    return np.frombuffer(data, "<f2").reshape(t["shape"])


def test_kvfs_reads_chunks_written_from_the_spec(tmp_path):
    tokens = list(range(500, 520))
    kv = np.random.default_rng(0).standard_normal((2, 2, 20, 2, 4)).astype(np.float16)
    spec = kvfs.KVSpec.from_manifest(MANIFEST)
    assert spec.seed == seed() and spec.namespace_id == namespace_id()
    ks = keys(tokens)
    with kvfs.open(f"lmdb://{tmp_path}/s") as store:
        ns = store.namespace(spec)
        assert [k.digest for k in ns.keys(tokens)] == ks
        for i, k in enumerate(ks):
            s, e = i * 8, min(i * 8 + 8, len(tokens))
            path = f"spec--test/{namespace_id()}/{k.hex()[:2]}/{k.hex()}.safetensors"
            blob = write_chunk(k, ks[i - 1] if i else None, tokens[s:e], s, kv[:, :, s:e])
            assert store.import_chunk(path, blob, manifest=canonical(MANIFEST))
        assert ns.get(tokens).tobytes() == kv.tobytes()


def test_spec_reader_reads_chunks_kvfs_writes(tmp_path):
    tokens = list(range(900, 913))
    kv = np.random.default_rng(1).standard_normal((2, 2, 13, 2, 4)).astype(np.float16)
    spec = kvfs.KVSpec.from_manifest(MANIFEST)
    with kvfs.open(f"lmdb://{tmp_path}/s") as store:
        ns = store.namespace(spec)
        ns.put(tokens, kv)
        ks = keys(tokens)
        for i, k in enumerate(ks):
            blob = store.cat(f"spec--test/{namespace_id()}/{k.hex()[:2]}/{k.hex()}.safetensors")
            got = read_chunk(blob, k, tokens[i * 8 : i * 8 + 8])
            assert np.array_equal(got, kv[:, :, i * 8 : i * 8 + 8])
