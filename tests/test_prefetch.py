"""kvfs.gpu on CPU: loads, the layer-wise Prefetcher, the LayerSaver, the pinned pool.

Real stores throughout (memory, LMDB files, file://, moto S3); the only
wrapper is a slow storage tier (a backend wrapped by composition, like
zarr's LatencyStore) to make the loader lag behind the consumer.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
import weakref

import numpy as np
import pytest
import torch

import kvfs
from kvfs import KVSpec
from kvfs.chunk import encode
from kvfs.errors import InvalidInput
from kvfs.gpu import ChunkBuilder, LayerSaver, PinnedPool, PrefetchCancelled, StagingPool, load, load_layer
from s3servers import moto_server, s3_bucket_url  # noqa: F401 - fixtures

L, H, D, C = 4, 2, 16, 32  # layers, kv heads, head dim, chunk tokens
SPEC = KVSpec("prefetch-test", num_layers=L, num_kv_heads=H, head_dim=D, chunk_tokens=C)


def _kv(ntok: int, seed: int = 0, spec: KVSpec = SPEC) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(spec.chunk_shape(ntok), generator=g).to(torch.bfloat16)


def _toks(n: int, base: int = 0) -> np.ndarray:
    return np.arange(base, base + n, dtype=np.uint32)


@pytest.fixture(params=["memory", "lmdb", "file"])
def url(request, tmp_path):
    return {"memory": f"memory://pf-{tmp_path.name}", "lmdb": f"lmdb://{tmp_path}/db",
            "file": f"file://{tmp_path}/files"}[request.param]


class SlowTier:
    """A backend wrapped to be slow: every read waits ``delay`` seconds and is logged with its time."""

    def __init__(self, inner, delay: float) -> None:
        self.inner = inner
        self.delay = delay
        self.log: list[tuple[str, float]] = []  # (what, time the read finished)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @contextlib.contextmanager
    def views(self, keys):
        time.sleep(self.delay)
        with self.inner.views(keys) as v:
            yield v  # the store copies out of the views inside this block
        self.log.append(("views", time.monotonic()))

    def readinto_ranges(self, key, parts):
        time.sleep(self.delay)
        out = self.inner.readinto_ranges(key, parts)
        self.log.append(("ranges", time.monotonic()))
        return out


def _slow(store, delay: float, monkeypatch) -> SlowTier:
    # every layer read takes its views again (and waits), instead of keeping them across reads
    monkeypatch.setattr("kvfs._layers.HOLD_SECONDS", 0)
    slow = SlowTier(store.tiers[0].backend, delay)
    store.tiers[0].backend = slow
    return slow


# ---------------------------------------------------------------------------------------------- loads
def test_load_returns_exactly_the_stored_prefix(url):
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        kv = _kv(100)
        ns.put(_toks(100), kv)
        n, got = load(ns, _toks(130))  # 30 tokens more than stored
        assert n == 100 and got.dtype == torch.bfloat16 and torch.equal(got, kv)
        n, one = load_layer(ns, _toks(100), 2)
        assert n == 100 and torch.equal(one, kv[2])
        n, some = load(ns, _toks(100), layers=range(1, 3))
        assert torch.equal(some, kv[1:3])
        # token-granular reuse: a prompt that diverges inside the third chunk reuses its first tokens
        other = _toks(100)
        other[70] = 9999
        n, got = load(ns, other)
        assert n == 70 and torch.equal(got, kv[:, :, :70])
        assert load(ns, _toks(10, base=5000))[0] == 0


def test_a_layer_range_load_cannot_read_is_refused_and_destroys_nothing(url):
    """Layers past the model's, or a range with a step, are the caller's mistake: an error before any read,
    never good chunks quarantined as truncated, never layers 0 and 1 handed out as layers 0 and 2."""
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        kv = _kv(2 * C + 5, seed=3)
        ns.put(_toks(2 * C + 5), kv)
        for bad in (range(2, L + 2), range(-1, 2)):
            with pytest.raises(IndexError, match="out of range"):
                load(ns, _toks(2 * C + 5), layers=bad)
        with pytest.raises(InvalidInput, match="step"):
            load(ns, _toks(2 * C + 5), layers=range(0, L, 2))
        assert ns.lookup(_toks(2 * C + 5)) == 2 * C + 5 and not store.catalog.quarantined()
        n, some = load(ns, _toks(2 * C + 5), layers=range(L - 2, L))
        assert n == 2 * C + 5 and torch.equal(some, kv[L - 2 :])


def test_cpu_load_reads_into_the_callers_memory():
    with kvfs.open("memory://zero-copy") as store:
        ns = store.namespace(SPEC)
        kv = _kv(64)
        ns.put(_toks(64), kv)
        out = torch.empty(SPEC.chunk_shape(64), dtype=torch.bfloat16)
        n, got = load(ns, _toks(64), out=out)
        assert got.data_ptr() == out.data_ptr() and torch.equal(out, kv)
        with ns.prefetch(_toks(64)) as pf:
            k, v = pf.wait_layer(1)
            n, whole = pf.result()
            # the layer handed out is a view of the buffer the store read into: no staging copy
            assert k.data_ptr() == whole[1, 0].data_ptr() and torch.equal(whole, kv)


# ---------------------------------------------------------------------------------------------- prefetch
def test_prefetch_layer_by_layer_is_exact(url):
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        kv = _kv(5 * C + 7, seed=1)
        ns.put(_toks(5 * C + 7), kv)
        with ns.prefetch(_toks(5 * C + 7 + 40), device="cpu") as pf:
            assert pf.num_tokens == 5 * C + 7
            for i in range(L):
                k, v = pf.wait_layer(i)
                assert torch.equal(k, kv[i, 0]) and torch.equal(v, kv[i, 1])
            assert pf.wait() == pf.valid_tokens == 5 * C + 7
            # one full read (tiers, headers, access times) then per-layer reads straight from the tier
            assert pf._reader.reader.fast_reads == L - 1


def test_later_layers_skip_catalog_and_header_work(tmp_path):
    """After the first layer, a layer read costs no catalog lookup, no header parse, no access-time write."""
    with kvfs.open(f"lmdb://{tmp_path}/db") as store:
        ns = store.namespace(SPEC)
        kv = _kv(8 * C, seed=13)
        ns.put(_toks(8 * C), kv)
        calls = {"get_many": 0, "touch": 0, "parse": 0}
        cat = store.catalog
        for name in ("get_many", "touch"):
            orig = getattr(cat, name)

            def counted(*a, _orig=orig, _name=name, **k):
                calls[_name] += 1
                return _orig(*a, **k)

            setattr(cat, name, counted)
        store._headers.clear()
        import kvfs.store as store_mod

        orig_parse = store_mod.parse_header

        def parse(*a, **k):
            calls["parse"] += 1
            return orig_parse(*a, **k)

        store_mod.parse_header = parse
        try:
            with ns.prefetch(_toks(8 * C)) as pf:
                n, got = pf.result()
        finally:
            store_mod.parse_header = orig_parse
        assert n == 8 * C and torch.equal(got, kv)
        # lookups: the plan, the first layer's read, learning the tiers; one access-time update; 8 headers.
        # Nothing more for the other layers (a read per layer through the store would add L-1 of each)
        assert calls == {"get_many": 3, "touch": 1, "parse": 8}, calls


def test_wait_layer_never_returns_a_layer_before_it_is_read(monkeypatch):
    """The loader is made much slower than the consumer; every layer must still arrive complete."""
    with kvfs.open("memory://slow") as store:
        ns = store.namespace(SPEC)
        kv = _kv(6 * C, seed=2)
        ns.put(_toks(6 * C), kv)
        slow = _slow(store, 0.05, monkeypatch)
        with ns.prefetch(_toks(6 * C)) as pf:
            for i in range(L):
                k, v = pf.wait_layer(i)
                returned = time.monotonic()
                # the read of layer i (the (i+1)-th pass over the chunks) had finished before we got it
                assert len(slow.log) >= i + 1
                assert slow.log[i][1] <= returned
                assert torch.equal(k, kv[i, 0]) and torch.equal(v, kv[i, 1]), f"layer {i} handed out early"
            # the consumer really was ahead of the loader (otherwise the test proves nothing)
            assert pf.done


def test_prefetch_overlaps_with_the_callers_work(monkeypatch):
    delay = 0.05
    with kvfs.open("memory://overlap") as store:
        ns = store.namespace(SPEC)
        ns.put(_toks(4 * C), _kv(4 * C))
        slow = _slow(store, delay, monkeypatch)
        t0 = time.monotonic()
        with ns.prefetch(_toks(4 * C)) as pf:
            assert time.monotonic() - t0 < delay * L / 2  # starting does not wait for the loads
            time.sleep(delay * L * 3)  # the engine computing
            before = time.monotonic()
            for i in range(L):
                pf.wait_layer(i)
            assert time.monotonic() - before < delay  # already loaded meanwhile
        assert len(slow.log) == L


def _flip_stored_byte(store, path: str, offset: int) -> None:
    """Corrupt one byte of a stored chunk in place, through the backend (a bit rot on the medium)."""
    backend = store.tiers[0].backend
    data = bytearray(bytes(backend.get(path)))
    data[offset] ^= 0x40
    backend.put_many({path: bytes(data)})


@pytest.mark.parametrize("where", ["memory", "lmdb"])
def test_corrupt_chunk_mid_prefetch_is_a_miss_from_that_chunk_on(where, tmp_path):
    url = "memory://corrupt" if where == "memory" else f"lmdb://{tmp_path}/db"
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        ntok = 5 * C
        kv = _kv(ntok, seed=3)
        ns.put(_toks(ntok), kv)
        bad = ns.plan(_toks(ntok))[2]  # the third chunk, tokens [2C, 3C)
        header = store._read_header(bad.key.path)
        _flip_stored_byte(store, bad.key.path, header.layer_range(2)[0] + 100)  # in layer 2's bytes
        with ns.prefetch(_toks(ntok)) as pf:
            got = [pf.wait_layer_kv(i).clone() for i in range(L)]
            assert pf.wait() == pf.valid_tokens == 2 * C
        # layers 0 and 1 were verified whole before the corruption showed: handed out whole, or (if the loader
        # had reached layer 2 by then) already cut to the valid prefix; from layer 2 on only the valid prefix
        for i in (0, 1):
            assert got[i].shape[1] in (ntok, 2 * C) and torch.equal(got[i], kv[i, :, : got[i].shape[1]])
        for i in (2, 3):
            assert got[i].shape[1] == 2 * C and torch.equal(got[i], kv[i, :, : 2 * C])
        # quarantined: the next lookup stops before it, and nothing wrong is ever served
        assert ns.lookup(_toks(ntok)) == 2 * C
        n, again = load(ns, _toks(ntok))
        assert n == 2 * C and torch.equal(again, kv[:, :, : 2 * C])


@pytest.mark.parametrize("bounded", [False, True])
def test_prefetch_skips_the_chunks_the_caller_holds(bounded):
    """``skip``: an engine holding the first tokens in its own cache reads only the chunks past them. A chunk
    before them is not read (corrupt here: no miss); ``valid_tokens`` counts from token 0, the layers hold the
    tokens from ``first`` (the first chunk read) on, and a failure past ``skip`` still cuts them."""
    with kvfs.open("memory://skip") as store:
        ns = store.namespace(SPEC)
        ntok = 5 * C + 7
        kv = _kv(ntok, seed=6)
        ns.put(_toks(ntok), kv)
        plan = ns.plan(_toks(ntok))
        _flip_stored_byte(store, plan[0].key.path, store._read_header(plan[0].key.path).data_offset + 1)
        opts = {"max_bytes": 2 * ntok * SPEC.bytes_per_token // L} if bounded else {}
        with ns.prefetch(_toks(ntok), skip=2 * C + 5, **opts) as pf:  # inside the third chunk
            assert pf.first == 2 * C and pf.num_tokens == ntok
            for i in range(L):
                got = pf.wait_layer_kv(i, release_previous=bounded)
                assert torch.equal(got, kv[i, :, 2 * C :])
            assert pf.wait() == pf.valid_tokens == ntok
            if not bounded:
                n, all_layers = pf.result()
                assert n == ntok and torch.equal(all_layers, kv[:, :, 2 * C :])
        assert ns.lookup(_toks(ntok)) == ntok  # the corrupt chunk was never read, so never quarantined
        with ns.prefetch(_toks(ntok), skip=2 * C) as pf:  # a chunk ending at skip is not read either
            assert pf.first == 2 * C
        with ns.prefetch(_toks(ntok), skip=ntok) as pf:  # every chunk held: nothing to read
            assert pf.wait() == ntok and pf.wait_layer_kv(0).shape[1] == 0 and pf.result()[1].shape[2] == 0
        bad = plan[3]
        _flip_stored_byte(store, bad.key.path, store._read_header(bad.key.path).layer_range(0)[0] + 100)
        with ns.prefetch(_toks(ntok), skip=C) as pf:
            assert pf.first == C
            got = pf.wait_layer_kv(L - 1)
            assert pf.wait() == pf.valid_tokens == 3 * C and torch.equal(got, kv[L - 1, :, C : 3 * C])
        with pytest.raises(InvalidInput, match="skip"):
            ns.prefetch(_toks(ntok), skip=-1)
        with pytest.raises(InvalidInput, match="skip and out"):
            ns.prefetch(_toks(ntok), skip=C, out=torch.empty((L,) + SPEC.chunk_shape(ntok)[1:], dtype=torch.bfloat16))


@pytest.mark.parametrize("skip", [2 * C + 5, 5 * C + 7])
def test_chunks_skipped_are_used_all_the_same_for_eviction(skip):
    """The chunks ``skip`` does not read become the most recently used, as a read makes them: else the first
    chunks of a prefix every engine holds would be the first an LRU eviction takes, cutting off the rest."""
    with kvfs.open("memory://skip-lru") as store:
        ns = store.namespace(SPEC)
        ntok = 5 * C + 7
        ns.put(_toks(ntok), _kv(ntok, seed=7))
        ckeys = [f"{p.key.namespace}/{p.key.hex}" for p in ns.plan(_toks(ntok))]
        store.catalog.touch(ckeys, now=1.0)  # long ago
        with ns.prefetch(_toks(ntok), skip=skip, max_bytes=ntok * SPEC.bytes_per_token) as pf:
            assert pf.wait() == ntok
        assert all(r.last_access > 1.0 for r in store.catalog.get_many(ckeys))


def test_corrupt_first_layer_means_nothing_from_that_chunk():
    with kvfs.open("memory://corrupt0") as store:
        ns = store.namespace(SPEC)
        kv = _kv(3 * C, seed=4)
        ns.put(_toks(3 * C), kv)
        first = ns.plan(_toks(3 * C))[0]
        _flip_stored_byte(store, first.key.path, store._read_header(first.key.path).data_offset + 1)
        with ns.prefetch(_toks(3 * C)) as pf:
            k, v = pf.wait_layer(0)
            assert k.shape == (0, H, D) and pf.valid_tokens == 0
            assert pf.wait_layer(L - 1)[0].shape[0] == 0


def test_chunk_evicted_mid_prefetch_is_a_miss(tmp_path, monkeypatch):
    with kvfs.open(f"lmdb://{tmp_path}/db") as store:
        ns = store.namespace(SPEC)
        kv = _kv(4 * C, seed=5)
        ns.put(_toks(4 * C), kv)
        slow = _slow(store, 0.05, monkeypatch)
        with ns.prefetch(_toks(4 * C)) as pf:
            pf.wait_layer(0)
            victim = pf.plan[3].key.path
            slow.inner.delete_many([victim])  # gone from storage behind the loader's back
            for i in range(1, L):
                pf.wait_layer(i)
            assert pf.valid_tokens in (3 * C, 4 * C)  # layer 1 may already have been read
            n, whole = pf.result()
            assert torch.equal(whole, kv[:, :, :n])


def test_cancel_and_close_free_the_buffers(monkeypatch):
    with kvfs.open("memory://cancel") as store:
        ns = store.namespace(SPEC)
        ns.put(_toks(8 * C), _kv(8 * C))
        _slow(store, 0.2, monkeypatch)  # the loader needs 0.8 s for all layers: the cancel below comes well before
        pf = ns.prefetch(_toks(8 * C))
        assert pf.bytes_held == L * pf.layer_bytes
        buf = weakref.ref(pf._all)
        pf.wait_layer(0)
        pf.cancel()
        with pytest.raises(PrefetchCancelled):
            pf.wait_layer(L - 1)
        pf.close()
        assert not pf._thread.is_alive()
        assert pf.bytes_held == 0
        gc.collect()
        assert buf() is None  # the layer tensor itself is gone
        with pytest.raises(PrefetchCancelled):
            pf.wait_layer(L - 1)


def test_a_cancelled_prefetch_never_hands_out_layers_it_did_not_load(monkeypatch):
    """wait() and result() on a prefetch cancelled before its last layer raise: the layers not loaded are
    uninitialized memory, never KV; after close() even a loaded layer's wait raises (its buffer is gone)."""
    with kvfs.open("memory://cancel-result") as store:
        ns = store.namespace(SPEC)
        ns.put(_toks(4 * C), _kv(4 * C))
        pf = ns.prefetch(_toks(4 * C), start=False)  # nothing loaded yet
        pf.cancel()
        with pytest.raises(PrefetchCancelled):
            pf.wait()
        with pytest.raises(PrefetchCancelled):
            pf.result()
        pf.close()
        _slow(store, 0.2, monkeypatch)
        with ns.prefetch(_toks(4 * C)) as pf:
            pf.wait_layer(0)
            pf.cancel()  # layer 0 is loaded; the last layer will not be
            with pytest.raises(PrefetchCancelled):
                pf.result()
            assert pf.wait_layer(0)[0].shape[0] == 4 * C  # what is loaded stays readable until close
        with pytest.raises(PrefetchCancelled):
            pf.wait_layer(0)


def test_bounded_prefetch_holds_at_most_max_bytes(monkeypatch):
    with kvfs.open("memory://bounded") as store:
        ns = store.namespace(SPEC)
        kv = _kv(6 * C, seed=6)
        ns.put(_toks(6 * C), kv)
        _slow(store, 0.01, monkeypatch)
        layer_bytes = 6 * C * SPEC.bytes_per_token // L
        with ns.prefetch(_toks(6 * C), max_bytes=2 * layer_bytes) as pf:
            assert pf.max_layers == 2
            peak = 0
            for i in range(L):
                k, v = pf.wait_layer(i, release_previous=True)
                peak = max(peak, pf.bytes_held)
                assert torch.equal(k, kv[i, 0]) and torch.equal(v, kv[i, 1])
            assert peak <= 2 * layer_bytes
        assert pf.bytes_held == 0


def test_bounded_prefetches_recycle_their_layer_buffers_through_a_slot_pool():
    with kvfs.open("memory://slots") as store:
        ns = store.namespace(SPEC)
        kv, kv2 = _kv(6 * C, seed=7), _kv(5 * C, seed=8)
        ns.put(_toks(6 * C), kv)
        ns.put(_toks(5 * C, base=10_000), kv2)
        layer_bytes = 6 * C * SPEC.bytes_per_token // L
        slots = StagingPool(1 << 30)
        # every layer released: the buffers go back to the pool at close, and the next prefetch (a shorter
        # prompt, whose buffers are filled with other KV first) reuses them and still returns exact KV
        for toks, want in ((_toks(6 * C), kv), (_toks(5 * C, base=10_000), kv2), (_toks(6 * C), kv)):
            with ns.prefetch(toks, max_bytes=2 * layer_bytes, slot_pool=slots) as pf:
                for i in range(L):
                    k, v = pf.wait_layer(i, release_previous=True)
                    assert torch.equal(k, want[i, 0]) and torch.equal(v, want[i, 1])
                pf.release_layer(L - 1)
            assert slots.lent_bytes == 0 and slots.kept_bytes > 0
        # three prefetches of one or two buffers each (two unless the consumer releases a layer before the
        # loader wants the next buffer), from at most two buffers in all
        assert 1 <= slots.allocated <= 2
        # a layer still held at close may be read through its view: its buffer leaves the pool for good
        with ns.prefetch(_toks(6 * C), max_bytes=2 * layer_bytes, slot_pool=slots) as pf:
            for i in range(L):
                held = pf.wait_layer_kv(i, release_previous=True)
        assert slots.lent_bytes == 0
        assert all(b.data_ptr() != held.data_ptr() for b in slots._free)
        with ns.prefetch(_toks(5 * C, base=10_000), max_bytes=2 * layer_bytes, slot_pool=slots) as pf:
            for i in range(L):
                k, v = pf.wait_layer(i, release_previous=True)
                assert held.data_ptr() not in (k.data_ptr(), v.data_ptr())
        assert torch.equal(held[0], kv[L - 1, 0]) and torch.equal(held[1], kv[L - 1, 1])  # not overwritten
        # a cancelled prefetch gives back what its loader took
        with ns.prefetch(_toks(6 * C), max_bytes=2 * layer_bytes, slot_pool=slots) as pf:
            pf.wait_layer(0)
            pf.cancel()
        assert slots.lent_bytes == 0
        with pytest.raises(InvalidInput, match="slot_pool"):
            ns.prefetch(_toks(6 * C), slot_pool=slots)  # unbounded: its buffer is the caller's result
        with pytest.raises(InvalidInput, match="slot_pool"):
            ns.prefetch(_toks(6 * C), slot_pool=slots, out=torch.empty((L, 2, 6 * C, H, D), dtype=torch.bfloat16))


def test_bounded_prefetch_that_is_never_released_is_an_error_not_a_hang():
    with kvfs.open("memory://deadlock") as store:
        ns = store.namespace(SPEC)
        ns.put(_toks(2 * C), _kv(2 * C))
        layer_bytes = 2 * C * SPEC.bytes_per_token // L
        with ns.prefetch(_toks(2 * C), max_bytes=layer_bytes) as pf:
            pf.wait_layer(0)
            with pytest.raises(InvalidInput, match="release_layer"):
                pf.wait_layer(1, timeout=10)
            pf.release_layer(0)
            assert pf.wait_layer(1, timeout=10)[0].shape == (2 * C, H, D)
            with pytest.raises(InvalidInput, match="released"):
                pf.wait_layer(0)
        with pytest.raises(InvalidInput, match="cannot hold one layer"):
            ns.prefetch(_toks(2 * C), max_bytes=layer_bytes - 1)


def test_nothing_cached_and_mla():
    spec = KVSpec("prefetch-mla", num_layers=3, num_kv_heads=1, head_dim=24, chunk_tokens=16, mla=True)
    with kvfs.open("memory://mla") as store:
        ns = store.namespace(spec)
        with ns.prefetch(_toks(10)) as pf:
            assert pf.num_tokens == 0 and pf.wait_layer(2)[0].shape == (0, 1, 24)
        kv = _kv(40, seed=7, spec=spec)
        ns.put(_toks(40), kv)
        with ns.prefetch(_toks(40)) as pf:
            lat, none = pf.wait_layer(1)
            assert none is None and torch.equal(lat, kv[1, 0])


def test_tiered_store_reads_later_layers_from_the_promoted_copy(tmp_path):
    lower = f"lmdb://{tmp_path}/db"
    kv = _kv(3 * C, seed=8)
    with kvfs.open(lower) as store:
        store.namespace(SPEC).put(_toks(3 * C), kv)
    with kvfs.open(f"memory://promo-{tmp_path.name}::{lower}") as store:
        ns = store.namespace(SPEC)
        with ns.prefetch(_toks(3 * C)) as pf:
            n, got = pf.result()
            assert n == 3 * C and torch.equal(got, kv)
            assert {pf._reader.reader.source(i)[0].index for i in range(3)} == {0}  # the memory tier


def test_prefetch_from_s3(s3_bucket_url):  # noqa: F811 - fixture
    with kvfs.open(s3_bucket_url) as store:
        ns = store.namespace(SPEC)
        kv = _kv(3 * C + 5, seed=9)
        ns.put(_toks(3 * C + 5), kv)
        store.flush()
        with ns.prefetch(_toks(3 * C + 5)) as pf:
            for i in range(L):
                k, v = pf.wait_layer(i)
                assert torch.equal(k, kv[i, 0]) and torch.equal(v, kv[i, 1])


def test_prefetch_validates_device():
    with kvfs.open("memory://dev") as store:
        ns = store.namespace(SPEC)
        if not torch.cuda.is_available():
            with pytest.raises(InvalidInput, match="CUDA is not available"):
                ns.prefetch(_toks(4), device="cuda")
        with pytest.raises(InvalidInput, match="'cpu' or 'cuda"):
            ns.prefetch(_toks(4), device="meta")


# ---------------------------------------------------------------------------------------------- saver
def test_saver_writes_what_put_would(tmp_path):
    toks = _toks(3 * C + 9, base=100)
    kv = _kv(len(toks), seed=10)
    with kvfs.open(f"lmdb://{tmp_path}/a") as a, kvfs.open(f"lmdb://{tmp_path}/b") as b:
        a.namespace(SPEC).put(toks, kv)
        saver = b.namespace(SPEC).saver(toks)
        assert isinstance(saver, LayerSaver)
        for i in range(L):
            saver.save_layer(i, kv[i, 0], kv[i, 1])
        assert saver.finish() == 4
        for p in a.namespace(SPEC).plan(toks):
            ra, rb = bytes(a.tiers[0].backend.get(p.key.path)), bytes(b.tiers[0].backend.get(p.key.path))
            ha, hb = a._read_header(p.key.path), b._read_header(p.key.path)
            # the same tensor bytes and the same metadata (checksums included)
            assert ra[ha.data_offset:] == rb[hb.data_offset:]
            assert ha.metadata == hb.metadata
        assert torch.equal(load(b.namespace(SPEC), toks)[1], kv)


def test_chunk_builder_is_byte_identical_to_encode():
    ns_toks = _toks(C, base=7)
    kv = _kv(C, seed=11)
    with kvfs.open("memory://builder") as store:
        key = store.namespace(SPEC).keys(ns_toks)[0]
    raw = kv.view(torch.int16).numpy().view(np.uint16)
    want = bytes(encode(SPEC, key=key.hex, parent=key.parent_hex, tokens=ns_toks, kv=raw, start=key.start))
    b = ChunkBuilder(SPEC, key, ns_toks)
    for i in reversed(range(L)):  # layers may arrive in any order
        np.copyto(b.layer(i), raw[i])
        b.done(i)
    assert bytes(b.finish()) == want


def test_saver_skips_stored_chunks_and_copies_in_the_background():
    with kvfs.open("memory://saver2") as store:
        ns = store.namespace(SPEC)
        toks = _toks(4 * C)
        kv = _kv(4 * C, seed=12)
        ns.put(toks[: 2 * C], kv[:, :, : 2 * C])
        saver = ns.saver(toks)
        assert saver.ranges == [(2 * C, 3 * C), (3 * C, 4 * C)]
        for i in range(L):
            saver.save_layer(i, kv[i])  # one [planes, tokens, heads, dim] tensor works too
        assert saver.finish() == 2
        assert torch.equal(load(ns, toks)[1], kv)


def test_saver_refuses_bad_input_and_writes_nothing_on_abort():
    with kvfs.open("memory://saver3") as store:
        ns = store.namespace(SPEC)
        toks = _toks(2 * C)
        kv = _kv(2 * C)
        saver = ns.saver(toks)
        with pytest.raises(InvalidInput, match="expected K and V"):
            saver.save_layer(0, kv[0, 0, :5], kv[0, 1, :5])
        with pytest.raises(InvalidInput, match="dtype"):
            saver.save_layer(0, kv[0, 0].float(), kv[0, 1].float())
        with pytest.raises(IndexError):
            saver.save_layer(L, kv[0, 0], kv[0, 1])
        saver.save_layer(0, kv[0, 0], kv[0, 1])
        with pytest.raises(InvalidInput, match="already saved"):
            saver.save_layer(0, kv[0, 0], kv[0, 1])
        with pytest.raises(InvalidInput, match=r"layers \[1, 2, 3\]"):
            saver.finish()
        assert ns.lookup(toks) == 0
        with ns.saver(toks) as s2:
            s2.save_layer(0, kv[0, 0], kv[0, 1])
            s2.abort()
        assert ns.lookup(toks) == 0


# ---------------------------------------------------------------------------------------------- pinned pool
def test_pinned_pool_is_bounded_reused_and_freed():
    pool = PinnedPool(1 << 16, 2, pin=False)
    a = pool.acquire()
    b = pool.acquire()
    assert (pool.allocated, pool.in_use) == (2, 2)
    with pytest.raises(TimeoutError):
        pool.acquire(timeout=0.05)
    ta = a.tensor
    a.release()
    c = pool.acquire()
    assert c.tensor.data_ptr() == ta.data_ptr() and pool.allocated == 2  # reused, not reallocated
    got = []
    t = threading.Thread(target=lambda: got.append(pool.acquire(timeout=5)))
    t.start()
    time.sleep(0.05)
    b.release()
    t.join()
    assert got and pool.in_use == 2
    got[0].release()
    with pytest.raises(InvalidInput, match="twice"):
        got[0].release()
    c.release()
    assert pool.in_use == 0
    pool.close()
    assert pool.allocated_bytes == 0
    with pytest.raises(InvalidInput, match="closed"):
        pool.acquire()


def test_prefetch_into_the_callers_buffer():
    with kvfs.open("memory://out") as store:
        ns = store.namespace(SPEC)
        kv = _kv(3 * C, seed=14)
        ns.put(_toks(3 * C), kv)
        out = torch.zeros(SPEC.chunk_shape(4 * C), dtype=torch.bfloat16)  # room for more than is cached
        with ns.prefetch(_toks(4 * C), out=out) as pf:
            n, got = pf.result()
            assert n == 3 * C and got.data_ptr() == out.data_ptr() and torch.equal(got, kv)
            assert pf.bytes_held == 0  # the caller's memory, not the prefetch's
        assert torch.equal(out[:, :, : 3 * C], kv) and not out[:, :, 3 * C:].float().any()
        with pytest.raises(InvalidInput, match="cannot hold"):
            ns.prefetch(_toks(3 * C), out=torch.zeros(SPEC.chunk_shape(C), dtype=torch.bfloat16))


class CountingViews:
    """A backend wrapped to count how often views are taken."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.taken = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @contextlib.contextmanager
    def views(self, keys):
        self.taken += 1
        with self.inner.views(keys) as v:
            yield v


def _active_lmdb_readers(backend) -> int:
    """Reader slots of this LMDB environment holding a snapshot (an open read transaction)."""
    rows = backend._env.env.readers().splitlines()[1:]
    return sum(1 for r in rows if r.split() and r.split()[-1] != "-")


def test_layer_reads_keep_their_lmdb_views_and_release_them_on_close(tmp_path):
    """py-lmdb touches every page of a value each time it lends one: a 32-layer load takes its views once."""
    with kvfs.open(f"lmdb://{tmp_path}/db") as store:
        ns = store.namespace(SPEC)
        kv = _kv(4 * C, seed=11)
        ns.put(_toks(4 * C), kv)
        inner = store.tiers[0].backend
        counting = CountingViews(inner)
        store.tiers[0].backend = counting
        with ns.prefetch(_toks(4 * C)) as pf:
            for i in range(L):
                k, v = pf.wait_layer(i)
                assert torch.equal(k, kv[i, 0]) and torch.equal(v, kv[i, 1])
            assert pf.wait() == 4 * C
        # the first layer goes through the store's full read path, every later one through one held set
        assert counting.taken == 2, counting.taken
        assert _active_lmdb_readers(inner) == 0  # closing the prefetch ended the read transaction


def test_chunks_evicted_while_views_are_held_are_read_from_the_snapshot(tmp_path):
    with kvfs.open(f"lmdb://{tmp_path}/db") as store:
        ns = store.namespace(SPEC)
        kv = _kv(4 * C, seed=12)
        ns.put(_toks(4 * C), kv)
        pf = ns.prefetch(_toks(4 * C), start=False)
        reader = pf._reader
        out = torch.zeros(SPEC.chunk_shape(4 * C), dtype=kv.dtype)
        ok, _ = reader.fill(range(0, 1), out[0:1])
        ok2, _ = reader.fill(range(1, 2), out[1:2])  # views now held
        assert all(ok) and all(ok2)
        store.evict(all=True, force=True)
        # overwrite the freed pages with other chunks: a reader without its snapshot would see them
        ns.put(_toks(4 * C, base=50_000), _kv(4 * C, seed=13))
        ok3, _ = reader.fill(range(2, L), out[2:])
        assert all(ok3)
        assert torch.equal(out, kv)  # whole and intact, from the snapshot the views belong to
        pf.close()
        assert _active_lmdb_readers(store.tiers[0].backend) == 0
        assert ns.lookup(_toks(4 * C)) == 0


def test_closing_the_store_under_a_prefetch_is_an_error_not_a_crash(tmp_path):
    """Held LMDB views must not outlive the store: its close ends them, later layer reads say it is closed."""
    store = kvfs.open(f"lmdb://{tmp_path}/db")
    ns = store.namespace(SPEC)
    kv = _kv(3 * C, seed=14)
    ns.put(_toks(3 * C), kv)
    pf = ns.prefetch(_toks(3 * C), start=False)
    out = torch.zeros(SPEC.chunk_shape(3 * C), dtype=kv.dtype)
    for i in (0, 1):  # the second read keeps its views
        ok, _ = pf._reader.fill(range(i, i + 1), out[i : i + 1])
        assert all(ok)
    backend = store.tiers[0].backend
    assert _active_lmdb_readers(backend) == 1
    store.close()  # would unmap what the held views point into: it releases them first
    with pytest.raises(kvfs.StoreError, match="closed"):
        pf._reader.fill(range(2, 3), out[2:3])
    pf.close()
    assert torch.equal(out[:2], kv[:2])


def test_prefetch_running_when_the_store_closes_reports_it(tmp_path):
    """Whatever the loader had read when the store closed is exact; the rest is a clear error, not a crash."""
    store = kvfs.open(f"lmdb://{tmp_path}/db")
    ns = store.namespace(SPEC)
    kv = _kv(4 * C, seed=15)
    ns.put(_toks(4 * C), kv)
    served = 0
    with ns.prefetch(_toks(4 * C)) as pf:
        k, v = pf.wait_layer(0)
        assert torch.equal(k, kv[0, 0]) and torch.equal(v, kv[0, 1])
        store.close()
        try:
            for i in range(1, L):
                k, v = pf.wait_layer(i)
                assert torch.equal(k, kv[i, 0]) and torch.equal(v, kv[i, 1])
                served = i
        except (kvfs.StoreError, kvfs.CacheMiss) as e:  # a failed prefetch is a miss that says why
            assert "the store is closed" in str(e) and served < L - 1
