"""Large host buffers that are cheap to fill, and recycled.

A fresh 32 MiB buffer costs more in page faults than in the copy that fills
it (``bytearray(n)`` zero-fills 4 KiB pages one fault at a time; a process's
first touch of new memory is slower still). Buffers are anonymous maps
(page aligned, which also keeps copies out of them fast), and buffers that a
backend did not keep (LMDB and files copy what they are given) go back to a
small free list, so sustained puts fill warm memory.

``KVFS_HUGEPAGES=1`` advises the maps for transparent huge pages. It is off
by default: where the kernel has no free huge pages at hand (measured on a
2-core VM, THP "madvise"), the advice made a fresh process's first 512 MiB
of puts 2-3x slower (0.8-1.4 GB/s against 2.6-3.1 GB/s without it).
"""

from __future__ import annotations

import mmap
import os
import threading

import numpy as np

MAP_MIN = 4 << 20  # buffers this large or larger are pooled anonymous maps
_HUGEPAGES = os.environ.get("KVFS_HUGEPAGES", "0") == "1"
_POOL_BYTES = int(os.environ.get("KVFS_BUFFER_POOL_BYTES", str(512 << 20)))

_lock = threading.Lock()
_free: dict[int, list[mmap.mmap]] = {}
_free_bytes = 0


class PooledMap(mmap.mmap):
    """A buffer made by :func:`alloc`. A backend that keeps one (``memory://``) may hand it back to
    :func:`release` when it drops it, provided nothing else still references it."""


def _new_map(nbytes: int) -> mmap.mmap:
    m = PooledMap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if _HUGEPAGES and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return m


def alloc(nbytes: int) -> memoryview:
    """A writable byte buffer of ``nbytes`` (contents undefined)."""
    global _free_bytes
    if nbytes >= MAP_MIN:
        with _lock:
            lst = _free.get(nbytes)
            if lst:
                _free_bytes -= nbytes
                return memoryview(lst.pop())
        try:
            return memoryview(_new_map(nbytes))
        except (OSError, ValueError):
            pass
    return memoryview(np.empty(nbytes, dtype=np.uint8))


def release(buf) -> None:
    """Give back a buffer from :func:`alloc` that nothing references any more (optional)."""
    global _free_bytes
    obj = buf.obj if isinstance(buf, memoryview) else buf
    if not isinstance(obj, mmap.mmap):
        return
    n = len(obj)
    with _lock:
        if _free_bytes + n > _POOL_BYTES:
            return
        _free.setdefault(n, []).append(obj)
        _free_bytes += n


def empty(shape, dtype) -> np.ndarray:
    """``np.empty`` through :func:`alloc`."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    if n < MAP_MIN:
        return np.empty(shape, dtype=dtype)
    return np.frombuffer(alloc(n), dtype=dtype).reshape(shape)
