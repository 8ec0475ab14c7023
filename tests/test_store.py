"""The store and namespace API on the embedded LMDB default and in memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

import kvfs
from kvfs.errors import CacheMiss, InvalidInput, InvalidURL, NotFound

SPEC = kvfs.KVSpec("test/llama-tiny", num_layers=4, num_kv_heads=2, head_dim=16, dtype="bfloat16", chunk_tokens=32)


def rand_kv(spec, n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(spec.chunk_shape(n), dtype=np.float32).astype(spec.numpy_dtype)


def prompt(n, seed=0):
    return np.random.default_rng(seed + 1000).integers(0, 32000, n).tolist()


@pytest.fixture(params=["lmdb", "memory"])
def url(request, tmp_path):
    return f"lmdb://{tmp_path}/store" if request.param == "lmdb" else "memory://"


def test_put_lookup_get_round_trip(url):
    toks, kv = prompt(100), rand_kv(SPEC, 100)
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        assert ns.lookup(toks) == 0
        assert ns.put(toks, kv) == 4  # 3 whole chunks of 32 and a partial one of 4
        assert ns.put(toks, kv) == 0  # nothing rewritten
        assert ns.lookup(toks) == 100
        out = ns.get(toks)
        assert out.dtype == ml_dtypes.bfloat16 and out.tobytes() == kv.tobytes()
        keys = ns.keys(toks)
        assert [(k.start, k.end) for k in keys] == [(0, 32), (32, 64), (64, 96), (96, 100)]


def test_default_store_lives_in_xdg_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("KVFS_URL", raising=False)
    with kvfs.open() as store:
        store.namespace(SPEC).put(prompt(40), rand_kv(SPEC, 40))
        assert store.url == f"lmdb://{tmp_path}/cache/kvfs"
    assert (tmp_path / "cache" / "kvfs" / "data.mdb").exists()
    monkeypatch.setenv("KVFS_URL", "memory://")
    with kvfs.open() as store:
        assert store.url == "memory://"


def test_token_granular_lookup_reuses_part_of_a_stored_chunk(url):
    toks, kv = prompt(128), rand_kv(SPEC, 128)
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        ns.put(toks, kv)
        other = toks[:75] + prompt(40, seed=9)
        assert ns.lookup(other) == 75  # 2 whole chunks + 11 tokens of the third
        n, got = ns.get_prefix(other)
        assert n == 75 and got.tobytes() == kv[:, :, :75].tobytes()
        assert ns.get(toks[:50]).tobytes() == kv[:, :, :50].tobytes()
        # a stored partial chunk is found for a longer prompt too
        ns2 = store.namespace(kvfs.KVSpec("test/other", 2, 1, 8, dtype="float16", chunk_tokens=16))
        t2, kv2 = prompt(20, 5), rand_kv(ns2.spec, 20, 5)
        ns2.put(t2, kv2)  # one whole chunk + a 4-token partial chunk
        assert ns2.lookup(t2 + [7, 7, 7]) == 20
        assert ns2.lookup(t2[:18]) == 18


def test_get_of_uncached_tokens_is_a_cache_miss(url):
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        ns.put(prompt(64), rand_kv(SPEC, 64))
        with pytest.raises(CacheMiss, match="not stored"):
            ns.get(prompt(64) + [1])
        with pytest.raises(KeyError):
            ns.get(prompt(10, seed=3))


def test_put_from_a_chunk_boundary_writes_only_the_rest(url):
    toks, kv = prompt(100), rand_kv(SPEC, 100)
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        assert ns.put(toks[:64], kv[:, :, :64]) == 2
        # the KV of tokens 64.. only; keys chain over all 100 tokens, so the prefix is found with it
        assert ns.put(toks, kv[:, :, 64:].copy(), start=64) == 2
        assert ns.get(toks).tobytes() == kv.tobytes()
        # a chunk before start that is not stored (evicted since the caller looked): nothing is written, as
        # nothing after it could be found
        other, okv = prompt(100, seed=1), rand_kv(SPEC, 100, seed=1)
        assert ns.put(other, okv[:, :, 32:], start=32) == 0
        assert ns.lookup(other) == 0 and sum(e.kind == "chunk" for e in store.ls(ns.path, recursive=True)) == 4
        assert ns.put(other, okv) == 4
        assert ns.get(other).tobytes() == okv.tobytes()
        assert ns.put(toks, kv[:, :, 96:], start=96) == 0  # the partial last chunk is stored already
        for bad in (16, -32, 128, 32.0, True):
            with pytest.raises(InvalidInput, match="start="):
                ns.put(toks, kv[:, :, 32:], start=bad)
        with pytest.raises(InvalidInput, match="shape"):
            ns.put(toks, kv, start=32)  # kv must hold tokens 32.. only


def test_put_from_a_chunk_boundary_keeps_the_stored_prefix_over_older_chunks(tmp_path):
    with kvfs.open(f"lmdb://{tmp_path}/probe") as probe:
        probe.namespace(SPEC).put(prompt(32), rand_kv(SPEC, 32))
        size = probe.du()["bytes"]
    with kvfs.open(f"lmdb://{tmp_path}/s?capacity={int(size * 4.5)}&watermark=1.0") as store:
        ns = store.namespace(SPEC)
        system, skv = prompt(64, seed=5), rand_kv(SPEC, 64, seed=5)
        ns.put(system, skv)  # the oldest chunks of a full store
        ns.put(prompt(64, seed=6), rand_kv(SPEC, 64, seed=6))
        turn = system + prompt(64, seed=7)
        tkv = rand_kv(SPEC, 128, seed=7)
        tkv[:, :, :64] = skv
        # making room for the two new chunks evicts the other prompt, not the prefix they extend
        assert ns.put(turn, tkv[:, :, 64:], start=64) == 2
        assert ns.lookup(turn) == 128 and ns.get(turn).tobytes() == tkv.tobytes()


def test_put_refuses_wrong_shape_dtype_and_tokens(url):
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        with pytest.raises(InvalidInput, match="shape"):
            ns.put(prompt(10), rand_kv(SPEC, 11))
        with pytest.raises(InvalidInput, match="dtype"):
            ns.put(prompt(10), np.zeros(SPEC.chunk_shape(10), np.float32))
        with pytest.raises(InvalidInput, match="empty"):
            ns.put([], rand_kv(SPEC, 0))
        with pytest.raises(InvalidInput):
            ns.put([-5] * 10, rand_kv(SPEC, 10))
        assert store.ls() == []


def test_torch_tensors_in_and_out(url):
    import torch

    toks = prompt(40)
    kv = torch.randn(SPEC.chunk_shape(40), dtype=torch.bfloat16)
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        ns.put(torch.tensor(toks), kv)
        out = torch.empty_like(kv)
        ns.get(toks, out=out)
        assert torch.equal(out, kv)


def test_reopen_in_another_process_returns_the_same_kv(tmp_path):
    url = f"lmdb://{tmp_path}/store"
    toks, kv = prompt(300), rand_kv(SPEC, 300)
    with kvfs.open(url) as store:
        store.namespace(SPEC).put(toks, kv)
    np.save(tmp_path / "kv.npy", kv.view(np.uint16))
    code = textwrap.dedent(f"""
        import json, numpy as np, kvfs
        spec = kvfs.KVSpec.from_manifest({SPEC.manifest_bytes().decode()!r})
        toks = json.load(open({str(tmp_path / 'toks.json')!r}))
        with kvfs.open({url!r}) as store:
            ns = store.namespace(spec)
            n = ns.lookup(toks)
            out = ns.get(toks)
        ref = np.load({str(tmp_path / 'kv.npy')!r})
        print(n, out.view(np.uint16).tobytes() == ref.tobytes())
    """)
    (tmp_path / "toks.json").write_text(json.dumps(toks))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["300", "True"]


def test_namespaces_are_isolated(url):
    other = kvfs.KVSpec("test/llama-tiny", num_layers=4, num_kv_heads=2, head_dim=16, dtype="bfloat16",
                        chunk_tokens=32, revision="v2")
    toks = prompt(64)
    with kvfs.open(url) as store:
        store.namespace(SPEC).put(toks, rand_kv(SPEC, 64))
        ns2 = store.namespace(other)
        assert ns2.lookup(toks) == 0
        with pytest.raises(CacheMiss):
            ns2.get(toks)


def test_foreign_chunk_copied_into_a_namespace_is_a_miss(tmp_path, caplog):
    """A chunk of namespace A written at the path namespace B would use for the same tokens."""
    other = kvfs.KVSpec("test/llama-tiny", num_layers=4, num_kv_heads=2, head_dim=16, dtype="bfloat16",
                        chunk_tokens=32, revision="v2")
    toks = prompt(32)
    with kvfs.open(f"lmdb://{tmp_path}/s") as store:
        a, b = store.namespace(SPEC), store.namespace(other)
        a.put(toks, rand_kv(SPEC, 32))
        b.put(toks, rand_kv(other, 32, seed=1))
        backend = store.tiers[0].backend
        foreign = bytes(backend.get(a.keys(toks)[0].path))
        backend.put(b.keys(toks)[0].path, foreign)
        store._headers.clear()
        with pytest.raises(CacheMiss):
            b.get(toks)
        assert "failed its checks" in caplog.text
        assert b.lookup(toks) == 0  # quarantined: gone from the catalog and the tier
        assert a.get(toks).shape == SPEC.chunk_shape(32)


@pytest.mark.parametrize("where", ["data", "metadata", "length", "truncate"])
def test_corrupted_chunk_is_a_miss_never_data(tmp_path, where, caplog):
    toks, kv = prompt(64), rand_kv(SPEC, 64)
    with kvfs.open(f"lmdb://{tmp_path}/s") as store:
        ns = store.namespace(SPEC)
        ns.put(toks, kv)
        key = ns.keys(toks)[1]
        backend = store.tiers[0].backend
        raw = bytearray(backend.get(key.path))
        if where == "data":
            raw[-100] ^= 0x01
        elif where == "metadata":
            i = bytes(raw).index(b'"tokens":"[') + 12
            raw[i] = ord("9") if raw[i] != ord("9") else ord("8")
        elif where == "length":
            raw[0] ^= 0x10
        else:
            raw = raw[: len(raw) // 2]
        backend.put(key.path, bytes(raw))
        store._headers.clear()
        with pytest.raises(CacheMiss):
            ns.get(toks)
        assert ns.lookup(toks) == 32
        n, got = ns.get_prefix(toks)
        assert n == 32 and got.tobytes() == kv[:, :, :32].tobytes()
        assert key.path in store.catalog.quarantined()
        assert "quarantined" in caplog.text


def test_ls_stat_cat_and_manifest(url):
    toks = prompt(70)
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        ns.put(toks, rand_kv(SPEC, 70))
        assert [e.path for e in store.ls()] == [SPEC.model_dir]
        (nse,) = store.ls(SPEC.model_dir)
        assert nse.path == SPEC.path and nse.kind == "namespace" and nse.tokens == 70 and nse.chunks == 3
        listing = store.ls(SPEC.path)
        assert listing[0].path == f"{SPEC.path}/manifest.json"
        assert {e.kind for e in listing[1:]} == {"shard"}
        assert json.loads(store.cat(f"{SPEC.path}/manifest.json")) == SPEC.manifest()
        k = ns.keys(toks)[2]
        e = store.stat(k.path)
        assert (e.kind, e.tokens, e.pins) == ("chunk", 6, 0) and e.size == len(store.cat(k.path))
        assert all(x.kind == "chunk" for x in store.ls(SPEC.path, recursive=True) if x.kind != "manifest")
        with pytest.raises(NotFound):
            store.stat(f"{SPEC.path}/00/{'0' * 64}.safetensors")
        with pytest.raises(NotFound):
            store.ls("no-such-model")
        with pytest.raises(InvalidInput):
            store.ls("a/../b")


def test_pins_and_eviction(url):
    t1, t2 = prompt(64, 1), prompt(64, 2)
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        ns.put(t1, rand_kv(SPEC, 64))
        ns.put(t2, rand_kv(SPEC, 64, 1))
        assert ns.pin(t1) == 2
        dry = store.evict(all=True, dry_run=True)
        assert len(dry.evicted) == 2 and len(dry.refused) == 2 and ns.lookup(t2) == 64
        res = store.evict(all=True)
        assert sorted(res.refused) == sorted(k.path for k in ns.keys(t1))
        assert ns.lookup(t1) == 64 and ns.lookup(t2) == 0
        ns.unpin(t1)
        assert store.evict(all=True).evicted and ns.lookup(t1) == 0
        assert store.du()["bytes"] == 0


def test_capacity_evicts_least_recently_used(tmp_path):
    size = None
    with kvfs.open(f"lmdb://{tmp_path}/probe") as probe:
        probe.namespace(SPEC).put(prompt(32), rand_kv(SPEC, 32))
        size = probe.du()["bytes"]
    cap = int(size * 3.5)
    with kvfs.open(f"lmdb://{tmp_path}/s?capacity={cap}") as store:
        ns = store.namespace(SPEC)
        prompts = [prompt(32, i) for i in range(6)]
        ns.put(prompts[0], rand_kv(SPEC, 32))
        ns.pin(prompts[0])
        for p in prompts[1:]:
            ns.put(p, rand_kv(SPEC, 32))
            ns.get(prompts[1]) if ns.lookup(prompts[1]) else None  # keep prompt 1 hot
        assert store.du()["bytes"] <= cap
        assert ns.lookup(prompts[0]) == 32  # pinned
        assert ns.lookup(prompts[-1]) == 32  # newest
        assert sum(ns.lookup(p) == 32 for p in prompts) <= 3


def test_fsck_rebuilds_a_lost_catalog(tmp_path):
    url = f"lmdb://{tmp_path}/s"
    toks = prompt(100)
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        ns.put(toks, rand_kv(SPEC, 100))
        ns.pin(toks[:32])
        assert store.fsck().clean
        store.catalog.remove([r.key for r in store.catalog.scan()])
        assert ns.lookup(toks) == 100  # found by asking the tier, and re-entered
        store.catalog.remove([r.key for r in store.catalog.scan()])
        rep = store.fsck()
        assert not rep.clean and len(rep.added) == 4
        assert store.fsck().clean
        assert ns.lookup(toks) == 100


def test_bad_urls_are_clear(tmp_path):
    for bad, match in [("nope", "not a store URL"), ("zzz://x", "unknown storage scheme"),
                       ("lmdb://", "needs a directory"), ("memory://?capacity=lots", "capacity: not a size"),
                       (f"lmdb://{tmp_path}/ms?map_size=big", "map_size: not a size: 'big'"),
                       ("memory://::", "empty tier"), ("memory://?capacity=1GiB&capacity=2GiB", "twice"),
                       # a misspelt boolean is an error, not false (an lmdb store meant read-only was opened
                       # writable)
                       (f"lmdb://{tmp_path}/ro?readonly=ture", "readonly='ture': use true or false"),
                       (f"lmdb://{tmp_path}/sh?shared=maybe", "shared='maybe': use true or false"),
                       # 0 is not "no limit" (it was read so, the opposite of what it says): refused
                       ("memory://?capacity=0", "capacity=0 must be positive"),
                       ("memory://?capacity=0GiB", "capacity=0GiB must be positive"),
                       (f"lmdb://{tmp_path}/mz?map_size=0", "map_size=0 must be positive")]:
        with pytest.raises(InvalidURL, match=match):
            kvfs.open(bad)
    assert not os.path.exists(tmp_path / "ro")  # refused before anything was created
    assert not os.path.exists(tmp_path / "ms")


def test_booleans_are_parsed_strictly():
    from kvfs.units import parse_bool

    for v in ("1", "true", "Yes", " ON ", True, 1):
        assert parse_bool(v, "x") is True
    for v in ("0", "false", "No", "off", False, 0):
        assert parse_bool(v, "x") is False
    for v in ("", "ture", "2", None):
        with pytest.raises(InvalidInput, match="use true or false"):
            parse_bool(v, "x")


def test_closed_store_refuses_work(tmp_path):
    store = kvfs.open(f"lmdb://{tmp_path}/s")
    ns = store.namespace(SPEC)
    store.close()
    store.close()
    with pytest.raises(OSError, match="closed"):
        ns.lookup(prompt(10))


def test_two_stores_on_one_lmdb_in_one_process(tmp_path):
    url = f"lmdb://{tmp_path}/s"
    toks, kv = prompt(64), rand_kv(SPEC, 64)
    with kvfs.open(url) as a, kvfs.open(url) as b:
        a.namespace(SPEC).put(toks, kv)
        assert b.namespace(SPEC).get(toks).tobytes() == kv.tobytes()


def test_read_only_store(tmp_path):
    url = f"lmdb://{tmp_path}/s"
    toks, kv = prompt(40), rand_kv(SPEC, 40)
    with kvfs.open(url) as s:
        s.namespace(SPEC).put(toks, kv)
    with kvfs.open(url, read_only=True) as s:
        ns = s.namespace(SPEC)
        assert ns.get(toks).tobytes() == kv.tobytes()
        with pytest.raises(OSError, match="read-only"):
            ns.put(prompt(40, 3), kv)


def test_memory_tiers_are_private_to_their_process(tmp_path):
    """A chunk held only by another store's memory tier is not a hit here, and dies with its process."""
    cat = str(tmp_path / "catalog")
    toks, kv = prompt(64), rand_kv(SPEC, 64)
    with kvfs.open("memory://a", catalog=cat) as a, kvfs.open("memory://b", catalog=cat) as b:
        a.namespace(SPEC).put(toks, kv)
        assert a.namespace(SPEC).lookup(toks) == 64
        assert b.namespace(SPEC).lookup(toks) == 0
    code = textwrap.dedent(f"""
        import os, signal, numpy as np, kvfs
        spec = kvfs.KVSpec.from_manifest({SPEC.manifest_bytes().decode()!r})
        s = kvfs.open("memory://", catalog={cat!r})
        s.namespace(spec).put(list(range(64)), np.zeros(spec.chunk_shape(64), spec.numpy_dtype))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    subprocess.run([sys.executable, "-c", code])
    from kvfs.catalog import Catalog

    c = Catalog(cat)
    assert c.count() == 2 and c.volatile_slots()
    c.close()
    with kvfs.open("memory://", catalog=cat) as s:  # opening reaps the dead process's memory tier
        assert s.catalog.count() == 0
        assert s.namespace(SPEC).lookup(list(range(64))) == 0


def test_a_missing_manifest_never_costs_data(tmp_path):
    url = f"lmdb://{tmp_path}/s"
    toks, kv = prompt(40), rand_kv(SPEC, 40)
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        ns.put(toks, kv)
        path = ns.keys(toks)[0].path
        store.catalog.forget_namespace(SPEC.path)
        store.tiers[0].backend.delete_many([f"{SPEC.path}/manifest.json"])
    with kvfs.open(url) as store:
        with pytest.raises(NotFound, match=r"no manifest\.json in any tier .* copy .*manifest\.json"):
            store.cat(path)
        rep = store.fsck(verify=True)
        # named for what it is (a chunk whose namespace lacks its manifest), not "not a kvfs chunk"
        assert not rep.corrupt and not rep.foreign and not rep.orphans
        assert any(path in o for o in rep.unmanifested)
        assert store.tiers[0].backend.exists_many([path]) == [True]
        # the namespace's owner comes back: everything is still there
        assert store.namespace(SPEC).get(toks).tobytes() == kv.tobytes()


def test_a_put_larger_than_a_tier_fills_it_instead_of_skipping_it(tmp_path):
    one = SPEC.bytes_per_token * SPEC.chunk_tokens + 4096
    url = f"memory://?capacity={3 * one}::lmdb://{tmp_path}/s"
    toks, kv = prompt(32 * 6), rand_kv(SPEC, 32 * 6)
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        ns.put(toks, kv)  # six chunks into a three-chunk memory tier
        store.flush()
        mem = store.tiers[0]
        assert 0 < store.catalog.used(mem.slot) <= 3 * one
        assert ns.get(toks).tobytes() == kv.tobytes()


def test_a_model_name_too_long_for_a_directory_is_refused_before_anything_is_registered(tmp_path):
    with pytest.raises(kvfs.InvalidInput, match="at most 255 bytes"):
        kvfs.KVSpec("org/" + "m" * 300, num_layers=2, num_kv_heads=2, head_dim=8)
    with kvfs.open(f"lmdb://{tmp_path}/s") as store:
        assert store.ls("") == []


def test_a_segment_is_never_stitched_from_two_computations(url):
    """Segment keys do not include positions: a segment stored again at other positions after part of it was
    evicted is written whole again, and a read of chunks from two computations is a miss, never a mix."""
    toks = prompt(64, seed=7)
    kv0, kv500 = rand_kv(SPEC, 64, seed=1), rand_kv(SPEC, 64, seed=2)
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        ns.put_segment(toks, kv0, positions=0)
        assert ns.get_segment(toks)[1] == 0
        second = ns.segment_keys(toks)[1]
        store.evict([second.path])
        assert ns.put_segment(toks, kv500, positions=500) == 2  # both chunks: one computation
        got, pos = ns.get_segment(toks)  # the headers cached by earlier reads are not used for the new chunks
        assert pos == 500 and got.tobytes() == kv500.tobytes()
        # a mixed segment behind kvfs's back (two writers racing, a copy from another store): a miss
        first = ns.segment_keys(toks)[0]
        store.evict([first.path])
        other = kvfs.open("memory://")
        o = other.namespace(SPEC)
        o.put_segment(toks, kv0, positions=0)
        store.import_chunk(first.path, other.cat(first.path), manifest=SPEC.manifest_bytes())
        other.close()
        with pytest.raises(CacheMiss, match="different positions"):
            ns.get_segment(toks)


@pytest.mark.parametrize("bad", [1.5, None, "5", -1, True])
def test_a_segment_position_must_be_a_whole_number(tmp_path, bad):
    toks, kv = prompt(32, seed=3), rand_kv(SPEC, 32)
    with kvfs.open(f"lmdb://{tmp_path}/s") as store:
        ns = store.namespace(SPEC)
        with pytest.raises(kvfs.InvalidInput, match="positions"):
            ns.put_segment(toks, kv, positions=bad)
        assert store.ls("") == []  # nothing stored
        assert ns.put_segment(toks, kv, positions=np.int64(7)) == 1
        assert ns.get_segment(toks)[1] == 7


def test_a_prefix_is_only_stored_as_computed_from_position_zero(url):
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        with pytest.raises(InvalidInput, match="put_segment"):
            ns.put(prompt(40), rand_kv(SPEC, 40), positions=1000)
        assert ns.put(prompt(40), rand_kv(SPEC, 40), positions=0) == 2
        assert ns.lookup(prompt(40)) == 40


def test_a_partial_chunk_must_extend_the_prefix_it_is_read_after(tmp_path):
    """A partly used chunk is found through the catalog's children index; its own header must name the prefix
    it is read after as its parent (a wrong index entry is a miss, not KV computed after another prefix)."""
    from kvfs.catalog import _child_key

    with kvfs.open(f"file://{tmp_path}/s") as store:
        ns = store.namespace(SPEC)
        p1, p2, x = prompt(32, seed=1), prompt(32, seed=2), prompt(5, seed=3)
        ns.put(p1 + x, rand_kv(SPEC, 37, seed=1))
        ns.put(p2, rand_kv(SPEC, 32, seed=2))
        kx, kp2 = ns.keys(p1 + x)[1], ns.keys(p2)[0]
        with store.catalog.env.write() as txn:  # one wrong children entry: "x's chunk extends p2"
            txn.put(_child_key(f"{kx.namespace}/{kx.hex}", kp2.hex, x[0]), np.asarray(x, "<u4").tobytes(),
                    db=store.catalog._children)
        with pytest.raises(CacheMiss):
            ns.get(p2 + x[:3])
        n, got = ns.get_prefix(p2 + x[:3])
        assert n == 32


def test_a_chunk_is_promoted_only_once_every_layer_is_checked(tmp_path):
    url = f"memory://::file://{tmp_path}/cold"
    toks, kv = prompt(32), rand_kv(SPEC, 32)
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        ns.put(toks, kv)
        store.flush()
        key = ns.keys(toks)[0]
        store.evict([key.path], tier=0)
        path = f"{tmp_path}/cold/{key.path}"
        from bitrot import flip_bit
        from kvfs.chunk import parse_header

        lo, _ = parse_header(open(path, "rb").read()).layer_range(3)
        flip_bit(path, lo + 5, 0xFF)  # layer 3 only
        dest = np.empty(SPEC.chunk_shape(32), np.uint16)
        assert ns.read(ns.plan(toks), dest[0:2], layers=range(0, 2)) == [True]  # layers 0-1 are intact
        assert store.tiers[0].backend.get(key.path) is None  # the corrupt layer 3 went nowhere
        with pytest.raises(CacheMiss):
            ns.get(toks)


RO_SCRIPT = """
import sys, numpy as np, kvfs
spec = kvfs.KVSpec("test/llama-tiny", num_layers=4, num_kv_heads=2, head_dim=16, dtype="bfloat16", chunk_tokens=32)
url, toks = sys.argv[1], list(range(100))
with kvfs.open(url, read_only=True) as st:
    ns = st.namespace(spec)
    assert ns.lookup(toks) == 100, ns.lookup(toks)
    assert all(r["ok"] for r in st.verify_chunks(""))  # what the catalog knows (nothing, once reset)
    print(ns.get(toks).view(np.uint16).sum())
    st.flush()  # nothing to flush, and nothing written
with kvfs.open("memory://::" + url, read_only=True) as st:  # a memory tier in front: its bit is this process's
    assert st.namespace(spec).lookup(toks) == 100
try:
    kvfs.open(url)
except kvfs.errors.ReadOnlyStore as e:
    print("refused:", e)
"""


@pytest.mark.parametrize("forgot", [False, True, "lower-tier"], ids=["catalog", "catalog-reset", "no-catalog"])
@pytest.mark.parametrize("scheme", ["lmdb", "file"])
def test_a_store_on_a_read_only_filesystem_is_read(tmp_path, scheme, forgot):
    """A read-only bind mount (as a container's read-only volume): read_only=True reads it, a writable open
    is refused with a clear error. Needs a private mount namespace (root); skipped where there is none."""
    import shutil

    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    kv = rand_kv(SPEC, 100)
    if forgot == "lower-tier":  # written as the lower tier of another store: no catalog of its own
        with kvfs.open(f"lmdb://{tmp_path}/hot::{scheme}://{src}/s") as store:
            store.namespace(SPEC).put(list(range(100)), kv)
            store.flush()
    else:
        with kvfs.open(f"{scheme}://{src}/s") as store:
            store.namespace(SPEC).put(list(range(100)), kv)
            if forgot:  # a catalog that does not know the chunks: lookups must find them in the storage itself
                store.catalog.reset()
    script = tmp_path / "ro.py"
    script.write_text(RO_SCRIPT)
    cmd = (f"mount --bind {src} {ro} && mount -o remount,bind,ro {ro} || exit 99; "
           f"exec {sys.executable} {script} {scheme}://{ro}/s")
    p = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True, timeout=120)
    if p.returncode == 99 or "Operation not permitted" in p.stderr:
        pytest.skip(f"cannot make a read-only mount here: {p.stderr.strip()[:200]}")
    assert p.returncode == 0, p.stderr
    assert "cannot clean up" not in p.stderr and "Traceback" not in p.stderr, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == str(kv.view(np.uint16).sum())
    assert lines[1].startswith("refused:") and "read-only filesystem" in lines[1]


@pytest.mark.parametrize("grows", [False, True], ids=["same-size", "header-grows"])
@pytest.mark.parametrize("scheme", ["lmdb", "file"])
def test_a_chunk_replaced_behind_a_cached_header_is_read_again_not_quarantined(tmp_path, scheme, grows):
    """Process A has a chunk's header cached; B evicts the chunk and stores the same tokens again with other
    bytes (recomputed KV need not be bit-identical). A's next read fails its cached checksums: the chunk is read
    once more by its own header and served; the good new chunk is never quarantined as corrupt."""
    url = f"{scheme}://{tmp_path}/s"  # two stores on one storage and one catalog, as two processes
    toks = prompt(64)
    a, b = kvfs.open(url), kvfs.open(url)
    try:
        na, nb = a.namespace(SPEC), b.namespace(SPEC)
        na.put_segment(toks, rand_kv(SPEC, 64, seed=1))
        na.get_segment(toks)  # A caches the headers
        b.evict(all=True)
        again = rand_kv(SPEC, 64, seed=2)
        # stored again with other bytes; with more metadata, the header (and the file) grows by a page
        nb.put_segment(toks, again, extra={"note": "x" * 5000} if grows else None)
        got, _ = na.get_segment(toks)  # the new chunks, read again by their own headers: no miss, no quarantine
        assert got.tobytes() == again.tobytes()
        assert nb.has_segment(toks) and not a.catalog.quarantined() and not b.catalog.quarantined()
    finally:
        a.close()
        b.close()


def test_an_old_catalog_opened_first_through_another_path_keeps_working_through_its_own(tmp_path):
    """A catalog made before kvfs kept its home tier by path: opened once through a symlink, the original path
    must still find every chunk (the home is not guessed)."""
    real, link = tmp_path / "real", tmp_path / "link"
    toks, kv = prompt(64), rand_kv(SPEC, 64)
    with kvfs.open(f"lmdb://{real}") as store:
        store.namespace(SPEC).put(toks, kv)
        with store.catalog.env.write() as txn:  # as a catalog written before homes
            txn.delete(b"home", db=store.catalog._meta)
    os.symlink(real, link)
    with kvfs.open(f"lmdb://{link}"):
        pass  # opened only (a lookup would find the chunks in the storage and record them under this path)
    for _ in range(2):
        with kvfs.open(f"lmdb://{real}") as store:
            # the catalog says the tier holds them (checked before any lookup, which would find them anyway)
            assert store.du("")["tiers"][f"lmdb://{real}"]["chunks"] == 2
            ns = store.namespace(SPEC)
            assert ns.lookup(toks) == 64 and ns.get(toks).tobytes() == kv.tobytes()
    with kvfs.open(f"lmdb://{link}") as store:  # the home is known now: the symlink finds them too
        assert store.namespace(SPEC).lookup(toks) == 64


def test_a_store_whose_path_holds_a_hash_sign_keeps_its_catalog(tmp_path):
    """Process-local memory tiers are named '...#<pid>...' in the catalog and cleaned up when their process is
    gone; a directory whose path holds a '#' is not one of them."""
    url = f"lmdb://{tmp_path}/run#999999"
    toks, kv = prompt(64), rand_kv(SPEC, 64)
    with kvfs.open(url) as store:
        store.namespace(SPEC).put(toks, kv)
    with kvfs.open(url) as store:
        assert store.du("")["tiers"][url]["chunks"] == 2


def test_a_chunk_recorded_before_its_size_was_known_counts_in_every_tier_once_it_is(tmp_path):
    """A lookup's probe records a chunk another node wrote with size 0; when a copy in another tier records its
    real size, the tier that held it first counts it too (du and capacity would drift low)."""
    from kvfs.catalog import Catalog, ChunkRecord

    cat = Catalog(str(tmp_path / "cat"))
    try:
        rec = ChunkRecord("m/ns/" + "ab" * 32, 0, 16, 0, 1.0, 1.0, 0, 0, 0, False, "")
        cat.add([(rec, None)], 1)  # found in the bucket (slot 1) by a probe: size unknown
        assert cat.used(1) == 0
        cat.add([(ChunkRecord(rec.key, 4096 + 100, 16, 0, 2.0, 2.0, 0, 0, 0, False, ""), None)], 0)  # promoted
        assert cat.used(0) == cat.used(1) == 4196 and cat.get(rec.key).size == 4196
        cat.remove_from([rec.key], 1)
        cat.remove_from([rec.key], 0)
        assert cat.used(0) == cat.used(1) == 0
    finally:
        cat.close()


_LAZY_DB_WHILE_WRITING = """
import sys, threading, tempfile
from kvfs import _lmdbenv
env = _lmdbenv.acquire(tempfile.mkdtemp(), 1 << 30)
db = env.db("data")
stop = threading.Event()
def writer():
    i = 0
    while not stop.is_set():
        with env.write() as txn:
            txn.put(b"k%d" % (i % 100), b"x" * 100000, db=db)
        i += 1
threads = [threading.Thread(target=writer, daemon=True) for _ in range(3)]
for t in threads:
    t.start()
for n in range(2000):  # a named database opened (again) while other threads commit puts
    env._dbs.pop(f"lazy{n % 8}", None)
    env.db(f"lazy{n % 8}")
stop.set()
for t in threads:
    t.join(10)
sys.exit(0 if not any(t.is_alive() for t in threads) else 3)
"""


def test_opening_a_named_database_while_other_threads_write_does_not_deadlock():
    """py-lmdb's open_db without a transaction waits for LMDB's write lock holding the GIL, while a thread that
    holds the lock waits for the GIL: the first eviction of a process (which opens a database lazily) hung
    threads putting side by side. Databases are opened inside a write transaction of kvfs's own."""
    import subprocess
    import sys

    try:
        p = subprocess.run([sys.executable, "-c", _LAZY_DB_WHILE_WRITING], capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        raise AssertionError("deadlocked: a named database opened while other threads write") from None
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("layers", [range(2, 6), range(0, 2, 2), range(-1, 1)])
def test_a_layer_range_a_read_cannot_serve_is_refused_and_quarantines_nothing(tmp_path, layers):
    """``Namespace.read`` (and the layer-wise reader under prefetches) with layers past the namespace's last
    one, or with a step, used to take every good chunk for a truncated one and quarantine (delete) it."""
    from kvfs._layers import LayerReader
    from kvfs.errors import InvalidInput

    spec = kvfs.KVSpec("m/layers", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", chunk_tokens=16)
    toks = list(range(32))
    kv = np.random.default_rng(0).standard_normal(spec.chunk_shape(32)).astype(np.float16)
    with kvfs.open(f"lmdb://{tmp_path}/s") as store:
        ns = store.namespace(spec)
        ns.put(toks, kv)
        plan = ns.plan(toks)
        dest = np.zeros((4, 2, 32, 2, 8), dtype=np.uint16)
        with pytest.raises((IndexError, InvalidInput)):
            ns.read(plan, dest, layers=layers)
        reader = LayerReader(store, spec, plan)
        with pytest.raises((IndexError, InvalidInput)):
            reader.read(layers, [dest[:, :, :16], dest[:, :, 16:]])
        reader.close()
        assert ns.lookup(toks) == 32 and not store.catalog.quarantined()
        np.testing.assert_array_equal(ns.get(toks), kv)


def test_recursive_ls_lists_what_is_under_the_path_only(tmp_path):
    """``ls(recursive=True)`` matched namespaces by string prefix: a model name's prefix listed another model's
    manifest, a shard listed its namespace's manifest, and a manifest's own path listed nothing."""
    a = kvfs.KVSpec("team/m", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float16", chunk_tokens=16)
    b = kvfs.KVSpec("team/m-large", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float16", chunk_tokens=16)
    with kvfs.open(f"lmdb://{tmp_path}/s") as store:
        for spec in (a, b):
            store.namespace(spec).put(list(range(16)), np.zeros(spec.chunk_shape(16), np.float16))
        model_a = a.path.split("/")[0]
        assert all(e.path.startswith(model_a + "/") for e in store.ls(model_a, recursive=True))
        assert {e.kind for e in store.ls(model_a, recursive=True)} == {"chunk", "manifest"}
        chunk = next(e for e in store.ls(a.path, recursive=True) if e.kind == "chunk")
        shard = chunk.path.rsplit("/", 1)[0]
        assert [e.path for e in store.ls(shard, recursive=True)] == [chunk.path]
        manifest = f"{a.path}/manifest.json"
        assert [(e.path, e.kind) for e in store.ls(manifest, recursive=True)] == [(manifest, "manifest")]
        assert len(store.ls("", recursive=True)) == 4


@pytest.mark.parametrize("dry_run", [True, False])
def test_fsck_reports_a_corrupt_chunk_as_corrupt_only(tmp_path, dry_run):
    """A corrupt chunk was also reported (and counted) as a stale catalog entry."""
    from bitrot import flip_bit

    with kvfs.open(f"file://{tmp_path}/s") as store:
        ns = store.namespace(SPEC)
        toks = list(range(2 * SPEC.chunk_tokens))
        ns.put(toks, rand_kv(SPEC, len(toks)))
        bad = ns.keys(toks)[1]
        flip_bit(str(tmp_path / "s" / bad.path), -9, 0x10)
        report = store.fsck(verify=True, repair=not dry_run)
        assert [c.split(":", 1)[1] for c in report.corrupt] == [bad.path]
        assert report.stale == [], report.to_dict()
        assert ns.lookup(toks) == (2 * SPEC.chunk_tokens if dry_run else SPEC.chunk_tokens)


def test_fsck_recounts_a_tier_usage_counter_that_drifted(tmp_path):
    """A tier's usage counter (du, capacity) that disagrees with the chunks recorded in it survived fsck."""
    from kvfs.catalog import _U64, _enc

    with kvfs.open(f"lmdb://{tmp_path}/s") as store:
        ns = store.namespace(SPEC)
        ns.put(prompt(64), rand_kv(SPEC, 64))
        slot = store.tiers[0].slot
        right = store.catalog.used(slot)
        assert right > 0 and store.fsck().usage_fixed == 0
        with store.catalog.env.write() as txn:
            txn.put(_enc(f"used/{slot}"), _U64.pack(right - 1000), db=store.catalog._meta)
        dry = store.fsck(repair=False)
        assert dry.usage_fixed == 1 and not dry.clean and store.catalog.used(slot) == right - 1000
        report = store.fsck()
        assert report.usage_fixed == 1 and store.catalog.used(slot) == right
        assert store.fsck().clean


def test_fsck_recount_of_usage_holds_no_write_transaction_when_the_counters_agree(tmp_path, monkeypatch):
    """Recounting the usage counters scans every record (seconds for millions): a write transaction held for it
    stalls every writer of every process on the node, though a clean catalog has nothing to set."""
    with kvfs.open(f"lmdb://{tmp_path}/s") as store:
        ns = store.namespace(SPEC)
        ns.put(prompt(64), rand_kv(SPEC, 64))
        store.flush()
        cat = store.catalog
        real_write, writes = cat.env.write, []

        def counting_write():
            writes.append(1)
            return real_write()

        monkeypatch.setattr(cat.env, "write", counting_write)
        assert cat.recount_used([t.slot for t in store.tiers], repair=True) == 0
        assert writes == []
        monkeypatch.undo()
        slot = store.tiers[0].slot
        right = cat.used(slot)
        from kvfs.catalog import _U64, _enc

        with cat.env.write() as txn:
            txn.put(_enc(f"used/{slot}"), _U64.pack(right + 7), db=cat._meta)
        assert cat.recount_used([slot], repair=True) == 1 and cat.used(slot) == right
