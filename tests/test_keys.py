"""Namespaces and content-addressed keys."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import kvfs
from kvfs.errors import InvalidInput
from kvfs.keys import as_tokens, chunk_keys, segment_keys

SPEC = kvfs.KVSpec("meta-llama/Llama-3.1-8B", num_layers=32, num_kv_heads=8, head_dim=128)
TOKENS = list(range(1000, 1000 + 700))

_KEYS_SCRIPT = r"""
import json, sys, kvfs
spec = kvfs.KVSpec("meta-llama/Llama-3.1-8B", num_layers=32, num_kv_heads=8, head_dim=128)
store_free = spec  # keys need no store
from kvfs.keys import chunk_keys, as_tokens
keys = chunk_keys(spec.seed, spec.path, as_tokens(list(range(1000, 1700))), spec.chunk_tokens)
print(json.dumps([k.path for k in keys] + [{"x": hash("x")}]))
"""


def _keys_in_subprocess(hashseed: str) -> list:
    env = dict(os.environ, PYTHONHASHSEED=hashseed)
    out = subprocess.run([sys.executable, "-c", _KEYS_SCRIPT], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_keys_are_identical_across_processes_whatever_the_hash_seed():
    a = _keys_in_subprocess("1")
    b = _keys_in_subprocess("12345")
    assert a[-1] != b[-1], "the two processes really had different Python hash seeds"
    assert a[:-1] == b[:-1]
    here = [k.path for k in chunk_keys(SPEC.seed, SPEC.path, as_tokens(TOKENS), SPEC.chunk_tokens)]
    assert here == a[:-1]


def test_key_scheme_is_the_documented_one():
    import hashlib

    toks = np.array(TOKENS, dtype="<u4")
    h0 = hashlib.blake2b(SPEC.seed + toks[:256].tobytes(), digest_size=32).digest()
    h1 = hashlib.blake2b(h0 + toks[256:512].tobytes(), digest_size=32).digest()
    h2 = hashlib.blake2b(h1 + toks[512:].tobytes(), digest_size=32).digest()  # trailing partial chunk
    keys = chunk_keys(SPEC.seed, SPEC.path, toks, 256)
    assert [k.digest for k in keys] == [h0, h1, h2]
    assert SPEC.seed == hashlib.blake2b(SPEC.manifest_bytes(), digest_size=32).digest()
    assert keys[1].parent == h0 and keys[0].parent is None
    assert (keys[2].start, keys[2].end) == (512, 700)
    assert keys[0].path == f"{SPEC.model_dir}/{SPEC.namespace_id}/{h0.hex()[:2]}/{h0.hex()}.safetensors"
    assert SPEC.namespace_id.endswith(SPEC.seed[:4].hex())
    assert SPEC.namespace_id.startswith("bf16-L32-H8-D128-c256-tp1.0-")
    seg = segment_keys(SPEC.seed, SPEC.path, toks[:10], 256)
    assert seg[0].digest == hashlib.blake2b(SPEC.seed + b"segment" + toks[:10].tobytes(), digest_size=32).digest()


@pytest.mark.parametrize(
    "change",
    [
        {"model": "meta-llama/Llama-3.1-70B"},
        {"revision": "abc123"},
        {"dtype": "float16"},
        {"num_layers": 31},
        {"num_kv_heads": 4},
        {"head_dim": 64},
        {"chunk_tokens": 128},
        {"tp_rank": 1, "tp_size": 2},
        {"tp_size": 2},
    ],
)
def test_keys_differ_for_any_change_of_namespace(change):
    other = dataclasses.replace(SPEC, **change)
    toks = as_tokens(TOKENS)
    a = {k.digest for k in chunk_keys(SPEC.seed, SPEC.path, toks, SPEC.chunk_tokens)}
    b = {k.digest for k in chunk_keys(other.seed, other.path, toks, other.chunk_tokens)}
    assert not a & b
    assert other.namespace_id != SPEC.namespace_id


def test_mla_namespace():
    mla = kvfs.KVSpec("deepseek-v3", num_layers=61, num_kv_heads=1, head_dim=576, mla=True)
    assert mla.chunk_shape(256) == (61, 1, 256, 1, 576)
    assert "mla576" in mla.namespace_id
    with pytest.raises(InvalidInput):
        kvfs.KVSpec("deepseek-v3", num_layers=61, num_kv_heads=8, head_dim=576, mla=True)


def test_a_changed_early_token_changes_every_later_key():
    toks = as_tokens(TOKENS)
    changed = toks.copy()
    changed[3] += 1
    a = chunk_keys(SPEC.seed, SPEC.path, toks, 256)
    b = chunk_keys(SPEC.seed, SPEC.path, changed, 256)
    assert all(x.digest != y.digest for x, y in zip(a, b))
    # while a change in the last chunk leaves the earlier keys alone
    late = toks.copy()
    late[600] += 1
    c = chunk_keys(SPEC.seed, SPEC.path, late, 256)
    assert [k.digest for k in c[:2]] == [k.digest for k in a[:2]] and c[2].digest != a[2].digest


def test_partial_chunk_length_is_part_of_the_key():
    toks = as_tokens(TOKENS[:300])
    a = chunk_keys(SPEC.seed, SPEC.path, toks, 256)
    b = chunk_keys(SPEC.seed, SPEC.path, toks[:299], 256)
    assert a[0].digest == b[0].digest and a[1].digest != b[1].digest


@pytest.mark.parametrize(
    "bad",
    [[], [-1, 2], [2**32], [1.5], ["a"], [[1, 2]], np.array([[1, 2]]), np.array([1.0, 2.0]), "abc", None],
)
def test_bad_tokens_are_refused(bad):
    with pytest.raises(InvalidInput):
        as_tokens(bad)


def test_tokens_accept_lists_arrays_and_tensors():
    import torch

    ref = as_tokens([1, 2, 3])
    assert ref.dtype == np.dtype("<u4")
    for t in ([1, 2, 3], (1, 2, 3), range(1, 4), np.array([1, 2, 3], dtype=np.int64), torch.tensor([1, 2, 3])):
        assert np.array_equal(as_tokens(t), ref)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"model": ""},
        {"num_layers": 0},
        {"num_kv_heads": -1},
        {"head_dim": 1.5},
        {"dtype": "int4"},
        {"tp_rank": 2, "tp_size": 2},
        {"chunk_tokens": 0},
    ],
)
def test_bad_specs_are_refused_with_a_clear_message(kwargs):
    base = dict(model="m", num_layers=2, num_kv_heads=2, head_dim=8)
    base.update(kwargs)
    with pytest.raises(InvalidInput) as ei:
        kvfs.KVSpec(**base)
    assert str(ei.value)


def test_manifest_round_trip_and_dtype_aliases():
    s = kvfs.KVSpec("m", 2, 2, 8, dtype="bf16")
    assert s.dtype == "bfloat16"
    assert kvfs.KVSpec.from_manifest(s.manifest_bytes()) == s
    import torch

    assert kvfs.KVSpec("m", 2, 2, 8, dtype=torch.float16).dtype == "float16"
    assert kvfs.KVSpec("meta-llama/Llama 3", 1, 1, 1).model_dir == "meta-llama--Llama_3"


def test_import_kvfs_is_light():
    code = ("import sys, kvfs; heavy = [m for m in ('numpy', 'torch', 'lmdb', 's3fs', 'boto3', 'fsspec', "
            "'transformers', 'pyfuse3', 'kvfs.store') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
