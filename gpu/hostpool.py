"""Host buffers for KV on its way between kvfs and an engine, kept for the next request.

A connector that saves a prompt first copies its KV out of the paged cache
into host memory (the engine reuses the blocks as soon as the step ends),
then writes that copy to kvfs; a bounded :class:`~kvfs.gpu.Prefetcher` on the
CPU reads each layer into a host buffer before the engine scatters it into
its paged cache. A new buffer per prompt costs more than the
copy: the first touch of freshly mapped memory runs at a third of the copy's
speed (measured on the CPU install of vLLM: a 4096-token Llama-3-8B prompt,
0.54 GB, gathered in 172-178 ms into a new buffer, 56-68 ms into one filled
before), and torch hands large buffers straight back to the kernel when they
are freed. :class:`StagingPool` keeps the buffers of finished saves and hands
them out again: best fit among kept buffers at most twice the size asked for,
otherwise a new one rounded up to a size class (a quarter octave), so that
prompts of similar lengths share buffers. A buffer is kept only while kept
plus lent bytes stay within ``limit`` (the oldest kept buffers go first when
room is needed); a request larger than the limit still gets a buffer, which
is freed when it comes back.

Buffers are page-locked (``pin=True``) when the paged cache is on a GPU, so
that the copy out of it is a DMA, not a staged copy through pageable memory.
"""

from __future__ import annotations

import math
import mmap
import threading

import torch

_MIN_CLASS = 1 << 20


def size_class(nbytes: int) -> int:
    """``nbytes`` rounded up to 1, 1.25, 1.5 or 1.75 times a power of two (at least 1 MiB)."""
    if nbytes <= _MIN_CLASS:
        return _MIN_CLASS
    step = 1 << max(0, nbytes.bit_length() - 3)  # a quarter of the power of two below nbytes
    return -(-nbytes // step) * step


class StagingPool:
    """Recycled host buffers for staged KV; thread-safe (taken on the engine's thread, given back by a writer)."""

    def __init__(self, limit: int, *, pin: bool = False) -> None:
        self.limit = int(limit)
        self.pin = pin
        self._lock = threading.Lock()
        self._free: list[torch.Tensor] = []  # uint8 base buffers, oldest first
        self._lent: dict[int, torch.Tensor] = {}  # data_ptr -> base buffer
        self._free_bytes = 0
        self._lent_bytes = 0
        self.allocated = 0  # buffers made (for tests and diagnostics)

    @property
    def kept_bytes(self) -> int:
        with self._lock:
            return self._free_bytes

    @property
    def lent_bytes(self) -> int:
        with self._lock:
            return self._lent_bytes

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A CPU tensor of ``shape`` and ``dtype`` (contents undefined); give it back with :meth:`give`."""
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        cap = size_class(n)
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if n <= b.numel() <= 2 * max(n, _MIN_CLASS)]
            base = self._free.pop(min(fits, key=lambda i: self._free[i].numel())) if fits else None
            if base is not None:
                self._free_bytes -= base.numel()
            else:
                # room for the new buffer: drop kept ones, oldest first
                while self._free and self._free_bytes + self._lent_bytes + cap > self.limit:
                    self._free_bytes -= self._free.pop(0).numel()
        fresh = base is None
        if fresh:
            # pinned memory is page aligned; pageable buffers are anonymous maps, page aligned too, so that
            # reads into them may bypass the page cache (file:// ?direct=)
            base = (torch.empty(cap, dtype=torch.uint8, pin_memory=True) if self.pin
                    else torch.frombuffer(mmap.mmap(-1, cap, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS),
                                          dtype=torch.uint8))
        view = base[:n].view(dtype).view(shape)
        with self._lock:
            self.allocated += fresh
            self._lent[view.data_ptr()] = base
            self._lent_bytes += base.numel()
        return view

    def give(self, tensor: torch.Tensor) -> None:
        """Take back a tensor from :meth:`take` that nothing reads or writes any more."""
        with self._lock:
            base = self._lent.pop(tensor.data_ptr(), None)
            if base is None:
                return
            self._lent_bytes -= base.numel()
            if self._free_bytes + self._lent_bytes + base.numel() > self.limit:
                return  # larger than what may be kept (it was lent anyway): freed
            self._free.append(base)
            self._free_bytes += base.numel()

    def forget(self, tensor: torch.Tensor) -> None:
        """Stop tracking a tensor from :meth:`take` that may still be in use: it is never handed out
        again (freed once its last reference goes)."""
        with self._lock:
            base = self._lent.pop(tensor.data_ptr(), None)
            if base is not None:
                self._lent_bytes -= base.numel()

    def clear(self) -> None:
        """Free every kept buffer (lent ones are freed when they come back)."""
        with self._lock:
            self._free.clear()
            self._free_bytes = 0
            self.limit = 0
