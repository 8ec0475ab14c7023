"""A bounded pool of host staging buffers, page-locked when CUDA is present.

Page-locked ("pinned") host memory is what lets a host->device copy run
asynchronously on a stream at full PCIe speed, but allocating it is slow
(``cudaHostAlloc`` maps and locks every page) and it is taken away from the
rest of the machine. So kvfs allocates a few buffers of one size on first
use, hands them out, and takes them back; never more than ``count`` at once,
never freed before :meth:`PinnedPool.close`.

A buffer given back with a CUDA event (the copy that still reads it) is not
handed out again before that event has completed.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch

from kvfs.errors import InvalidInput

DEFAULT_BUFFER_BYTES = int(os.environ.get("KVFS_PINNED_BUFFER_BYTES", str(32 << 20)))
DEFAULT_BUFFERS = int(os.environ.get("KVFS_PINNED_BUFFERS", "4"))


class PinnedBuffer:
    """One staging buffer of a :class:`PinnedPool` (``tensor``: uint8, ``nbytes`` long)."""

    __slots__ = ("pool", "tensor", "index", "_event")

    def __init__(self, pool: "PinnedPool", tensor: torch.Tensor, index: int) -> None:
        self.pool = pool
        self.tensor = tensor
        self.index = index
        self._event: Any = None

    @property
    def nbytes(self) -> int:
        return self.tensor.numel()

    def release(self, after: Any = None) -> None:
        """Give the buffer back; ``after``: a CUDA event that must complete before it is reused."""
        self.pool.release(self, after)

    def __enter__(self) -> "PinnedBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class PinnedPool:
    """At most ``count`` host buffers of ``buffer_bytes`` each, pinned when CUDA is available."""

    def __init__(self, buffer_bytes: int = DEFAULT_BUFFER_BYTES, count: int = DEFAULT_BUFFERS, *,
                 pin: bool | None = None) -> None:
        if buffer_bytes <= 0 or count <= 0:
            raise InvalidInput(f"a pinned pool needs buffer_bytes > 0 and count > 0 (got {buffer_bytes}, {count})")
        self.buffer_bytes = int(buffer_bytes)
        self.count = int(count)
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._cond = threading.Condition()
        self._all: list[PinnedBuffer] = []
        self._free: list[PinnedBuffer] = []
        self._closed = False

    def __repr__(self) -> str:
        return (f"PinnedPool({self.count} x {self.buffer_bytes} bytes, pinned={self.pin}, "
                f"allocated={len(self._all)}, in use={self.in_use})")

    @property
    def allocated(self) -> int:
        """Buffers allocated so far (they are kept until close)."""
        return len(self._all)

    @property
    def allocated_bytes(self) -> int:
        return len(self._all) * self.buffer_bytes

    @property
    def in_use(self) -> int:
        """Buffers handed out and not given back."""
        with self._cond:
            return len(self._all) - len(self._free)

    def acquire(self, timeout: float | None = None) -> PinnedBuffer:
        """A free buffer (allocating one while fewer than ``count`` exist); waits while all are in use."""
        with self._cond:
            while True:
                if self._closed:
                    raise InvalidInput("the pinned buffer pool is closed")
                if self._free:
                    buf = self._free.pop()
                    break
                if len(self._all) < self.count:
                    t = torch.empty(self.buffer_bytes, dtype=torch.uint8, pin_memory=self.pin)
                    buf = PinnedBuffer(self, t, len(self._all))
                    self._all.append(buf)
                    break
                if not self._cond.wait(timeout):
                    raise TimeoutError(f"no pinned staging buffer free after {timeout} s ({self!r})")
        ev, buf._event = buf._event, None
        if ev is not None:
            ev.synchronize()  # the async copy that still read this buffer
        return buf

    def release(self, buf: PinnedBuffer, after: Any = None) -> None:
        with self._cond:
            if buf.pool is not self or buf in self._free:
                raise InvalidInput("buffer released twice or to the wrong pool")
            buf._event = after
            self._free.append(buf)
            self._cond.notify()

    def close(self) -> None:
        """Wait for pending copies and free every buffer (buffers still handed out are dropped too)."""
        with self._cond:
            self._closed = True
            for b in self._all:
                if b._event is not None:
                    b._event.synchronize()
            self._all.clear()
            self._free.clear()
            self._cond.notify_all()


_default: PinnedPool | None = None
_default_lock = threading.Lock()


def default_pool() -> PinnedPool:
    """The process-wide pool (``KVFS_PINNED_BUFFER_BYTES`` x ``KVFS_PINNED_BUFFERS``, 32 MiB x 4 by default)."""
    global _default
    with _default_lock:
        if _default is None or _default._closed:
            _default = PinnedPool()
        return _default
