"""StagingPool: the vLLM connector's recycled host buffers for KV copied out of the paged cache."""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")

from kvfs.gpu.hostpool import StagingPool, size_class  # noqa: E402

MiB = 1 << 20


def test_size_classes_are_quarter_octaves_of_at_least_one_mib():
    assert size_class(1) == MiB and size_class(MiB) == MiB
    assert size_class(MiB + 1) == 5 * MiB // 4
    assert size_class(512 * MiB) == 512 * MiB
    assert size_class(512 * MiB + 1) == 640 * MiB
    for n in (3 * MiB + 7, 100 * MiB, 700 * MiB + 3, (1 << 33) + 5):
        c = size_class(n)
        assert n <= c <= n * 1.25 + MiB


def test_a_buffer_given_back_is_handed_out_again_and_holds_the_shape_asked_for():
    pool = StagingPool(64 * MiB)
    a = pool.take((4, 2, 100, 8, 128), torch.float16)
    assert a.shape == (4, 2, 100, 8, 128) and a.dtype == torch.float16 and a.is_contiguous()
    a.fill_(3.0)
    ptr = a.data_ptr()
    pool.give(a)
    b = pool.take((4, 2, 90, 8, 128), torch.float16)  # a little shorter: same size class, same buffer
    assert b.data_ptr() == ptr and pool.allocated == 1
    c = pool.take((4, 2, 100, 8, 128), torch.float16)  # while b is lent: a buffer of its own
    assert c.data_ptr() != ptr and pool.allocated == 2
    pool.give(b)
    pool.give(c)
    assert pool.lent_bytes == 0 and pool.kept_bytes == 2 * size_class(a.numel() * 2)


def test_best_fit_and_never_a_buffer_more_than_twice_the_size():
    pool = StagingPool(256 * MiB)
    big = pool.take((40 * MiB,), torch.uint8)
    small = pool.take((3 * MiB,), torch.uint8)
    big_ptr, small_ptr = big.data_ptr(), small.data_ptr()
    pool.give(big)
    pool.give(small)
    assert pool.take((2 * MiB,), torch.uint8).data_ptr() == small_ptr
    tiny = pool.take((MiB,), torch.uint8)  # the 40 MiB buffer is free but 40x too big: a new one
    assert tiny.data_ptr() != big_ptr and pool.allocated == 3
    assert pool.take((30 * MiB,), torch.uint8).data_ptr() == big_ptr


def test_kept_and_lent_bytes_stay_under_the_limit_and_an_oversized_buffer_is_not_kept():
    pool = StagingPool(10 * MiB)
    bufs = [pool.take((4 * MiB,), torch.uint8) for _ in range(2)]
    for b in bufs:
        pool.give(b)
    assert pool.kept_bytes == 8 * MiB
    # a new 5 MiB class buffer: kept ones are dropped, oldest first, to make room
    c = pool.take((5 * MiB,), torch.uint8)
    assert pool.kept_bytes + pool.lent_bytes <= 10 * MiB
    pool.give(c)
    huge = pool.take((20 * MiB,), torch.uint8)  # larger than the limit: lent anyway
    assert huge.shape == (20 * MiB,)
    pool.give(huge)
    assert pool.kept_bytes <= 10 * MiB and pool.lent_bytes == 0
    pool.give(torch.empty(4))  # not the pool's: ignored
    pool.clear()
    assert pool.kept_bytes == 0


def test_no_buffer_is_lent_twice_at_once_across_threads():
    pool = StagingPool(64 * MiB)
    lent: set[int] = set()
    lock = threading.Lock()
    errors: list[str] = []

    def worker(seed: int) -> None:
        for i in range(200):
            t = pool.take(((seed + i) % 5 + 1, MiB // 2), torch.uint8)
            with lock:
                if t.data_ptr() in lent:
                    errors.append("lent twice")
                lent.add(t.data_ptr())
            t.fill_(seed)
            if not bool((t == seed).all()):
                errors.append("overwritten while lent")
            with lock:
                lent.discard(t.data_ptr())
            pool.give(t)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and pool.lent_bytes == 0
