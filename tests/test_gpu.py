"""kvfs.gpu and kvfs.connectors.paged on a CUDA device (``pytest -m gpu``; skipped without CUDA).

Covers the two device paths (pinned staging + side-stream copies; kvikio
reads straight into device memory, verified on a host copy), the prefetcher's
stream ordering, bounded prefetch, saving from device tensors and paged
scatter/gather with device slot mappings.
"""

from __future__ import annotations

import contextlib

import time

import numpy as np
import pytest
import torch

import kvfs
from kvfs import KVSpec
from kvfs.connectors.paged import PagedCache, slot_mapping
from kvfs.gpu import DeviceReader, PinnedPool, load

from bitrot import flip_bit

pytestmark = pytest.mark.gpu

L, H, D, C = 4, 4, 64, 64
SPEC = KVSpec("gpu-test", num_layers=L, num_kv_heads=H, head_dim=D, chunk_tokens=C)


def _kv(ntok: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SPEC.chunk_shape(ntok), generator=g).to(torch.bfloat16)


def _toks(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.uint32)


def _kvikio_usable() -> bool:
    from kvfs.backends._file import kvikio_status

    return kvikio_status()[0] is not None


@pytest.fixture(params=["memory", "lmdb", "file"])
def url(request, tmp_path):
    return {"memory": f"memory://gpu-{tmp_path.name}", "lmdb": f"lmdb://{tmp_path}/db",
            "file": f"file://{tmp_path}/files"}[request.param]


def test_pinned_pool_pins():
    pool = PinnedPool(1 << 20, 2)
    buf = pool.acquire()
    assert buf.tensor.is_pinned()
    buf.release()
    pool.close()


def test_load_to_device_is_exact(url):
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        kv = _kv(3 * C + 11)
        ns.put(_toks(3 * C + 11), kv)
        n, got = load(ns, _toks(4 * C), device="cuda")
        assert n == 3 * C + 11 and got.is_cuda
        assert torch.equal(got.cpu(), kv)
        n, two = load(ns, _toks(3 * C + 11), device="cuda", layers=range(2, 4))
        assert torch.equal(two.cpu(), kv[2:4])


@contextlib.contextmanager
def _kvikio_file_store(tmp_path, ntokens: int, seed: int):
    """A ``file://`` store (read through kvikio) holding ``ntokens`` of seeded KV: ``(store, ns, kv)``."""
    if not _kvikio_usable():
        pytest.skip("kvikio is not installed or not usable here")
    with kvfs.open(f"file://{tmp_path}/files") as store:
        ns = store.namespace(SPEC)
        kv = _kv(ntokens, seed=seed)
        ns.put(_toks(ntokens), kv)
        yield store, ns, kv


def test_file_backend_reads_straight_into_device_memory(tmp_path):
    with _kvikio_file_store(tmp_path, 4 * C, seed=1) as (store, ns, kv):
        plan = ns.plan(_toks(4 * C))
        reader = DeviceReader(ns, plan, "cuda")
        dest = torch.empty((1,) + SPEC.chunk_shape(4 * C)[1:], dtype=torch.bfloat16, device="cuda")
        ok, ev = reader.fill(range(0, 1), dest)  # the first read opens the chunks (through staging)
        assert all(ok)
        ok, ev = reader.fill(range(1, 2), dest)
        torch.cuda.current_stream().wait_event(ev)
        assert all(ok) and reader.direct_items == set(range(4))
        assert torch.equal(dest.cpu()[0], kv[1])
        reader.close()


def test_direct_read_of_a_corrupt_layer_is_a_miss(tmp_path):
    with _kvikio_file_store(tmp_path, 3 * C, seed=2) as (store, ns, kv):
        bad = ns.plan(_toks(3 * C))[1]
        header = store._read_header(bad.key.path)
        path = f"{tmp_path}/files/{bad.key.path}"
        flip_bit(path, header.layer_range(2)[0] + 7, 0x01)  # bit rot in layer 2 of the second chunk
        with ns.prefetch(_toks(3 * C), device="cuda") as pf:
            layers = [pf.wait_layer_kv(i).cpu() for i in range(L)]
            assert pf.wait() == C
        assert torch.equal(layers[0], kv[0]) and torch.equal(layers[1], kv[1])
        assert torch.equal(layers[3], kv[3, :, :C])
        assert ns.lookup(_toks(3 * C)) == C


def test_prefetch_on_a_side_stream_orders_the_consumer(url):
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        kv = _kv(5 * C, seed=3)
        ns.put(_toks(5 * C), kv)
        consumer = torch.cuda.Stream()
        with torch.cuda.stream(consumer), ns.prefetch(_toks(5 * C), device="cuda") as pf:
            outs = []
            for i in range(L):
                k, v = pf.wait_layer(i)
                outs.append(torch.stack([k, v]) * 1)  # a kernel on the consumer stream reads the layer
            consumer.synchronize()
            for i in range(L):
                assert torch.equal(outs[i].cpu(), kv[i])


def test_writes_into_device_memory_wait_for_the_callers_queued_work(url):
    """A caller's stream that still uses ``out`` (a previous request's kernels) when a load or prefetch into it
    starts: the side-stream copies and kvikio writes land after that work, not under it."""
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        kv = _kv(3 * C, seed=6)
        ns.put(_toks(3 * C), kv)
        out = torch.empty((L,) + SPEC.chunk_shape(3 * C)[1:], dtype=torch.bfloat16, device="cuda")
        caller = torch.cuda.Stream()
        with torch.cuda.stream(caller):
            torch.cuda._sleep(200_000_000)  # the caller's stream is busy for a while ...
            out.fill_(7)  # ... then the last use of out by its previous request
            n, got = load(ns, _toks(3 * C), out=out)
            assert n == 3 * C and torch.equal(got.cpu(), kv)
            torch.cuda._sleep(200_000_000)
            out.fill_(7)
            with ns.prefetch(_toks(3 * C), out=out) as pf:  # layer 0 staged, later ones direct on file://
                n, got = pf.result()
                assert n == 3 * C and torch.equal(got.cpu(), kv)
        assert ns.lookup(_toks(3 * C)) == 3 * C  # nothing was taken for corrupt


def test_a_layer_released_unread_is_not_overwritten_by_its_own_late_copy(tmp_path):
    """Bounded prefetch, one buffer: layer 0 (staged, its copy still queued on the side stream) is released
    without being read, and its buffer is reused for layer 1 (a kvikio write): the late copy of layer 0 must
    land first, or it overwrites layer 1 and the chunk is quarantined as corrupt although it is intact."""
    with _kvikio_file_store(tmp_path, 2 * C, seed=7) as (store, ns, kv):
        layer_bytes = 2 * C * SPEC.bytes_per_token // L
        with ns.prefetch(_toks(2 * C), device="cuda", max_bytes=layer_bytes, start=False) as pf:
            with torch.cuda.stream(pf._reader.stream):
                torch.cuda._sleep(200_000_000)  # the side stream is busy: layer 0's copy waits behind this
            pf.start()
            deadline = time.monotonic() + 10
            while pf._state[0] == 0 and time.monotonic() < deadline:  # layer 0 queued, not read by anyone
                time.sleep(0.001)
            k, v = pf.wait_layer(1, release_previous=True)
            assert torch.equal(torch.stack([k, v]).cpu(), kv[1])
            for i in range(2, L):
                pf.wait_layer(i, release_previous=True)
            assert pf.valid_tokens == 2 * C
        assert ns.lookup(_toks(2 * C)) == 2 * C


def test_bounded_prefetch_on_device_reuses_buffers():
    with kvfs.open("memory://gpu-bounded") as store:
        ns = store.namespace(SPEC)
        kv = _kv(4 * C, seed=4)
        ns.put(_toks(4 * C), kv)
        layer_bytes = 4 * C * SPEC.bytes_per_token // L
        with ns.prefetch(_toks(4 * C), device="cuda", max_bytes=2 * layer_bytes) as pf:
            for i in range(L):
                k, v = pf.wait_layer(i, release_previous=True)
                got = torch.stack([k, v]) * 1
                assert torch.equal(got.cpu(), kv[i])
                assert pf.bytes_held <= 2 * layer_bytes
        assert pf.bytes_held == 0


def test_saver_from_device_tensors():
    with kvfs.open("memory://gpu-saver") as store:
        ns = store.namespace(SPEC)
        kv = _kv(2 * C + 3, seed=5)
        dev = kv.cuda()
        saver = ns.saver(_toks(2 * C + 3))
        for i in range(L):
            saver.save_layer(i, dev[i, 0] * 1, dev[i, 1] * 1)  # produced on the current stream just now
        assert saver.finish() == 3
        n, back = load(ns, _toks(2 * C + 3))
        assert torch.equal(back, kv)


@pytest.mark.parametrize("layout", ["flash", "kv_concat", "mla", "sglang_page_first_direct"])
def test_paged_scatter_gather_on_device(layout):
    nb, bs = 32, 16
    if layout == "flash":
        cache = [torch.zeros(2, nb, bs, H, D, dtype=torch.bfloat16, device="cuda") for _ in range(L)]
        kv = _kv(40).cuda()
    elif layout == "kv_concat":
        cache = [torch.zeros(nb, H, bs, 2 * D, dtype=torch.bfloat16, device="cuda") for _ in range(L)]
        kv = _kv(40).cuda()
    elif layout == "mla":
        cache = [torch.zeros(nb, bs, 96, dtype=torch.bfloat16, device="cuda") for _ in range(L)]
        kv = torch.randn(L, 1, 40, 1, 96, device="cuda").to(torch.bfloat16)
    else:
        cache = torch.zeros(2, nb, L, bs, H, D, dtype=torch.bfloat16, device="cuda")
        kv = _kv(40).cuda()
    pc = PagedCache(cache, layout)
    slots = slot_mapping([5, 9, 1], bs, 0, 40, device="cuda")
    pc.scatter(kv, slots)
    assert torch.equal(pc.gather(slots), kv)
    padded = torch.cat([slots, torch.full((8,), -1, device="cuda", dtype=torch.int64)])
    out = torch.zeros((L,) + tuple(kv.shape[1:2]) + (48,) + tuple(kv.shape[3:]), dtype=kv.dtype, device="cuda")
    pc.gather(padded, out=out)
    assert torch.equal(out[:, :, :40], kv) and not out[:, :, 40:].any()
