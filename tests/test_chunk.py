"""The chunk format: valid safetensors, 4096-aligned data, strict parsing."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import fault_report
import kvfs
from kvfs import chunk
from kvfs.errors import ChunkFormatError, IntegrityError
from kvfs.keys import as_tokens, chunk_keys

SPEC = kvfs.KVSpec("m", num_layers=3, num_kv_heads=2, head_dim=8, dtype="bfloat16", chunk_tokens=16)


def make_chunk(spec=SPEC, ntok=16, seed=0):
    rng = np.random.default_rng(seed)
    toks = as_tokens(rng.integers(0, 50000, ntok).tolist())
    kv = rng.standard_normal(spec.chunk_shape(ntok)).astype(spec.numpy_dtype)
    key = chunk_keys(spec.seed, spec.path, toks, spec.chunk_tokens)[0]
    buf = chunk.encode(spec, key=key.hex, parent="", tokens=toks, kv=kv, start=0)
    return buf, toks, kv, key


def test_chunk_is_safetensors_with_aligned_data(tmp_path):
    buf, toks, kv, key = make_chunk()
    p = tmp_path / "c.safetensors"
    p.write_bytes(buf)
    import torch
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata()
        t = f.get_tensor("kv")
    assert t.dtype == torch.bfloat16 and tuple(t.shape) == SPEC.chunk_shape(16)
    assert np.array_equal(t.view(torch.int16).numpy().view(np.uint16), kv.view(np.uint16))
    assert json.loads(meta["tokens"]) == toks.tolist()
    assert meta["key"] == key.hex and meta["namespace"] == SPEC.namespace_id
    (n,) = struct.unpack("<Q", bytes(buf[:8]))
    assert (8 + n) % 4096 == 0
    h = chunk.parse_header(buf)
    assert h.data_offset % 4096 == 0 and h.file_size == len(buf)


def test_numpy_safetensors_reader_opens_float16_chunks(tmp_path):
    spec = kvfs.KVSpec("m", 2, 1, 4, dtype="float16", chunk_tokens=8)
    buf, toks, kv, _ = make_chunk(spec, 8)
    from safetensors.numpy import load

    loaded = load(bytes(buf))
    assert np.array_equal(loaded["kv"], kv)


def test_decode_round_trip_and_layer_ranges():
    buf, toks, kv, key = make_chunk()
    header, out = chunk.decode(buf, SPEC, key=key.hex, tokens=toks)
    assert np.array_equal(out.view(np.uint16), kv.view(np.uint16))
    for layer in range(SPEC.num_layers):
        s, e = header.layer_range(layer)
        assert bytes(buf[s:e]) == kv[layer].tobytes()


def test_large_token_chunks_spill_into_a_bigger_aligned_header():
    spec = kvfs.KVSpec("m", 1, 1, 2, dtype="float32", chunk_tokens=2048)
    buf, toks, kv, key = make_chunk(spec, 2048)
    h = chunk.parse_header(buf)
    assert h.data_offset > 4096 and h.data_offset % 4096 == 0
    assert np.array_equal(chunk.decode(buf, spec)[1], kv)


def _rewrite_meta(buf, **changes):
    """Re-encode a chunk's header with changed metadata (recomputing the metadata checksum)."""
    n = struct.unpack("<Q", bytes(buf[:8]))[0]
    header = json.loads(bytes(buf[8 : 8 + n]))
    header["__metadata__"].update(changes)
    header["__metadata__"]["meta_checksum"] = chunk._xxh(chunk._canonical_meta(header["__metadata__"]))
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= n
    out = bytearray(buf)
    out[8 : 8 + n] = raw + b" " * (n - len(raw))
    return out


@pytest.mark.parametrize(
    "mutate,exc",
    [
        (lambda b: b[:5], ChunkFormatError),
        (lambda b: b[:100], ChunkFormatError),
        (lambda b: b[:-1], ChunkFormatError),
        (lambda b: b + b"\0", ChunkFormatError),
        (lambda b: b"", ChunkFormatError),
        (lambda b: struct.pack("<Q", 1 << 40) + b[8:], ChunkFormatError),
        (lambda b: struct.pack("<Q", 10) + b[8:], ChunkFormatError),
        (lambda b: _rewrite_meta(b, version="2"), ChunkFormatError),
        (lambda b: _rewrite_meta(b, format="other"), ChunkFormatError),
        (lambda b: _rewrite_meta(b, tokens="[1,2]"), ChunkFormatError),
        (lambda b: _rewrite_meta(b, kind="weird"), ChunkFormatError),
    ],
)
def test_malformed_chunks_raise_only_chunk_format_error(mutate, exc):
    buf, *_ = make_chunk()
    with pytest.raises(exc):
        chunk.parse_header(mutate(bytes(buf)))


def test_a_header_naming_a_member_twice_is_refused():
    """Readers disagree on which of two equal names wins (Python keeps the last): such a header is malformed,
    even when the value that Python keeps would pass every check."""
    buf, *_ = make_chunk()
    n = struct.unpack("<Q", bytes(buf[:8]))[0]
    raw = bytes(buf[8 : 8 + n])
    i = raw.index(b'"format":"kvfs"')
    dup = raw[:i] + b'"format":"zz",' + raw[i:]
    assert dup.endswith(b" " * 14)
    bad = bytes(buf[:8]) + dup[: n] + bytes(buf[8 + n :])
    with pytest.raises(ChunkFormatError, match="'format' more than once"):
        chunk.parse_header(bad)


def test_flipped_metadata_byte_is_caught_by_the_metadata_checksum():
    buf, *_ = make_chunk()
    i = bytes(buf).index(b'"start":"0"') + len('"start":"')
    bad = bytearray(buf)
    bad[i] = ord("7")
    with pytest.raises(IntegrityError, match="metadata checksum"):
        chunk.parse_header(bad)


def test_flipped_data_byte_fails_verification():
    buf, toks, kv, key = make_chunk()
    h = chunk.parse_header(buf)
    bad = bytearray(buf)
    bad[h.data_offset + 1000] ^= 0x40
    with pytest.raises(IntegrityError, match="checksum"):
        chunk.decode(bad, SPEC, key=key.hex, tokens=toks)


def test_check_expected_refuses_other_namespace_key_and_tokens():
    buf, toks, kv, key = make_chunk()
    h = chunk.parse_header(buf)
    other = kvfs.KVSpec("other", 3, 2, 8, dtype="bfloat16", chunk_tokens=16)
    with pytest.raises(IntegrityError, match="namespace"):
        chunk.check_expected(h, other)
    with pytest.raises(IntegrityError, match="key"):
        chunk.check_expected(h, SPEC, key="00" * 32)
    with pytest.raises(IntegrityError, match="token"):
        chunk.check_expected(h, SPEC, tokens=toks[::-1].copy())
    chunk.check_expected(h, SPEC, key=key.hex, tokens=toks)


def test_partial_copies_verify_from_the_source():
    buf, toks, kv, key = make_chunk()
    h = chunk.parse_header(buf)
    dest = np.empty((2, 2, 5, 2, 8), dtype=np.uint16)
    chunk.copy_verified(h, memoryview(buf)[h.layer_range(1)[0] :], dest, layers=range(1, 3), take=5)
    assert np.array_equal(dest, kv.view(np.uint16)[1:3, :, :5])


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_chunks_only_ever_raise_chunk_format_error(data):
    fault_report.add("chunk parser fuzz (Hypothesis)", cases=1)
    base = bytes(make_chunk(ntok=4)[0]) if not hasattr(test_fuzzed_chunks_only_ever_raise_chunk_format_error, "b") \
        else test_fuzzed_chunks_only_ever_raise_chunk_format_error.b
    test_fuzzed_chunks_only_ever_raise_chunk_format_error.b = base
    kind = data.draw(st.sampled_from(["flip", "truncate", "splice", "random", "header"]))
    buf = bytearray(base)
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(buf) - 1))
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        buf = buf[: data.draw(st.integers(0, len(buf) - 1))]
    elif kind == "splice":
        i = data.draw(st.integers(0, len(buf)))
        buf[i:i] = data.draw(st.binary(max_size=64))
    elif kind == "header":
        n = struct.unpack("<Q", bytes(buf[:8]))[0]
        i = data.draw(st.integers(8, 8 + n - 1))
        buf[i] = data.draw(st.integers(0, 255))
    else:
        buf = bytearray(data.draw(st.binary(max_size=5000)))
    try:
        h = chunk.parse_header(buf)
        out = np.empty(h.shape, dtype=np.uint16 if h.dtype in ("bfloat16", "float16") else np.uint8)
        chunk.copy_verified(h, memoryview(buf)[h.data_offset :], out)
    except ChunkFormatError:
        return
    # it parsed and verified: then it must be byte-identical in everything that matters
    h = chunk.parse_header(buf)
    assert h.metadata == chunk.parse_header(base).metadata
    assert bytes(buf[h.data_offset :]) == base[h.data_offset :]
