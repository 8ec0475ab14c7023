"""memory:// gives dropped encode buffers back for reuse, never while a reader still holds one; a put into a
full tier keeps the chunks of its own prompt that were already stored."""

from __future__ import annotations

import weakref

import numpy as np

import kvfs
from kvfs import _buffers
from kvfs.backends._memory import MemoryBackend

BIG = _buffers.MAP_MIN + 4096  # large enough to come from the mmap pool


def _pooled(fill: int) -> memoryview:
    mv = _buffers.alloc(BIG)
    assert type(mv.obj) is _buffers.PooledMap
    np.frombuffer(mv, dtype=np.uint8)[:] = fill
    return mv


def _in_pool(ref: weakref.ref) -> bool:
    m = ref()
    return m is not None and any(x is m for lst in _buffers._free.values() for x in lst)


def test_deleted_encode_buffer_goes_back_to_the_pool():
    be = MemoryBackend()
    mv = _pooled(7)
    owner = weakref.ref(mv.obj)  # a strong reference here would itself block the reuse
    be.put_many({"a/b/c": mv})
    del mv
    assert bytes(be.get("a/b/c")[:4]) == b"\x07" * 4
    be.delete_many(["a/b/c"])
    assert _in_pool(owner)
    assert be.get("a/b/c") is None
    be.close()


def test_buffer_a_reader_still_holds_is_not_reused():
    be = MemoryBackend()
    mv = _pooled(9)
    owner = weakref.ref(mv.obj)
    be.put_many({"a/b/c": mv})
    del mv
    held = be.get("a/b/c")  # a reader keeps its view past the delete
    assert held.readonly
    be.delete_many(["a/b/c"])
    assert owner() is not None and not _in_pool(owner)
    other = _buffers.alloc(BIG)  # the next allocation of that size must not hand out the held memory
    assert other.obj is not owner()
    np.frombuffer(other, dtype=np.uint8)[:] = 1
    assert bytes(held[:4]) == b"\x09" * 4
    be.close()


def test_replaced_and_closed_buffers_are_recycled_and_reads_stay_correct():
    be = MemoryBackend()
    first, second = _pooled(1), _pooled(2)
    o1, o2 = weakref.ref(first.obj), weakref.ref(second.obj)
    be.put_many({"k/1": first})
    del first
    be.put_many({"k/1": second})  # overwrite: the first buffer is dropped
    del second
    assert _in_pool(o1)
    with be.views(["k/1"]) as (v,):
        assert bytes(v[:2]) == b"\x02\x02"
    del v  # a view still bound here would (rightly) keep the buffer out of the pool
    buf = bytearray(8)
    assert be.readinto("k/1", buf, 16) == 8 and bytes(buf) == b"\x02" * 8
    be.close()
    assert _in_pool(o2)


def test_put_into_full_tier_keeps_the_prompts_own_stored_chunks():
    spec = kvfs.KVSpec("t/recycle", num_layers=2, num_kv_heads=1, head_dim=64, dtype="float16", chunk_tokens=16)
    n = 16 * 8
    kv = np.ones(spec.chunk_shape(n), dtype=np.float16)
    chunk = spec.bytes_per_token * 16 + 4096
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 50_000, n).tolist() for _ in range(2))
    # room for 1.25 prompts: storing b evicts most of a; storing a again must not evict a's survivors
    with kvfs.open(f"memory://?capacity={int(chunk * 8 * 1.25)}") as store:
        ns = store.namespace(spec)
        for prompt in (a, b, a, b, a):
            ns.put(prompt, kv)
            assert ns.lookup(prompt) == n
        np.testing.assert_array_equal(ns.get(a), kv)
