"""Verified random-access reads of one chunk file, for the FUSE mount.

A FUSE reader asks for arbitrary byte ranges; kvfs must never hand it bytes
that fail the chunk's checks. The unit of verification is one layer: the
header carries an xxh3-64 checksum per layer (one layer's K and V are one
contiguous byte range), so a read fetches the layers that overlap the range
asked for with one ranged backend read, checks each layer's checksum, and
keeps them for the reads that follow. A small read costs one layer, not the
whole chunk. Sequential readers get a growing read-ahead window.

Opening a chunk reads and checks its header (namespace, key, token ids
hashed back to the key, file size) before any byte is served; header bytes
are served from that verified copy. With a signing key configured the
signature covers the whole tensor, so the chunk is read and verified whole
at open instead.

Backends that lend zero-copy views (LMDB, memory) are not copied at all:
the reader keeps one view of the whole chunk (for LMDB, a read transaction)
while the file is read, checks each layer's checksum in place, and serves
slices of the mapped bytes, which the kernel copies straight out of the
store's map. The view is let go when the file is released, or after
``HOLD_SECONDS`` (a long-open file must not keep an old LMDB snapshot alive:
LMDB cannot reuse pages a reader may still see), and only ever on the event
loop between reads, or by the last worker using it: no slice handed to the
kernel outlives it.

Nothing here touches pyfuse3 or trio: the FUSE operations call these
methods from worker threads (``fetch``) or directly on the event loop
(``read_cached``, which never does I/O).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np

from .. import _buffers
from ..catalog import key_of_path
from ..chunk import ChunkHeader, check_expected, check_layer
from ..errors import ChunkFormatError, IntegrityError, NotFound
from ..store import _readinto_ranges, read_header

#: bytes a sequential reader's fetches read ahead (one ranged read each)
READAHEAD = 8 << 20
#: bytes of verified layers one open file keeps (copied windows; a mapped chunk costs no memory)
MAX_CACHED = 32 << 20
#: how long one open file may keep a backend's view of its chunk (an LMDB read transaction)
HOLD_SECONDS = 1.0
#: open files that may keep a view at once (each holds an LMDB reader slot; the others copy, as before)
MAX_MAPPED = 64

log = logging.getLogger("kvfs.fuse")


class StaleChunk(Exception):
    """The chunk vanished from every tier while open (evicted by someone else)."""


def readinto(backend: Any, key: str, offset: int, buf) -> int | None:
    """Read ``len(buf)`` bytes of ``key`` at ``offset`` with the backend's ranged read."""
    got = _readinto_ranges(backend, key, [(offset, buf)])
    return None if got is None else got[0]


def candidate_tiers(store: Any, path: str) -> list:
    """Tiers that may hold ``path``, fastest first (as ``Store.read_range`` picks them)."""
    rec = store.catalog.get(key_of_path(path))
    return [t for t in store.tiers if rec is None or rec.tiers & t.bit or t.shared]


def open_header(store: Any, path: str, tiers: list) -> tuple[Any, ChunkHeader, bytes]:
    """``(tier, header, raw header bytes)`` of ``path`` from the first of ``tiers`` holding it, checked
    against the path and the file's size (:class:`ChunkFormatError` if it fails, :class:`NotFound` if no
    tier holds it). Backend errors propagate."""
    for tier in tiers:
        got = read_header(tier.backend, path)
        if got is None:
            continue
        header, raw = got
        check_header(store, path, header)
        info = tier.backend.stat(path)
        if info is not None and info.size != header.file_size:
            raise ChunkFormatError(f"{path} is {info.size} bytes but its header describes "
                                   f"{header.file_size}: truncated or padded")
        return tier, header, raw
    raise NotFound(path)


def check_header(store: Any, path: str, header: ChunkHeader) -> None:
    """Raise :class:`ChunkFormatError` unless ``header`` is the chunk that belongs at ``path``."""
    parts = path.split("/")
    nsp = f"{parts[0]}/{parts[1]}"
    spec = store.spec_of(nsp)
    if spec is None:
        raise ChunkFormatError(f"{path}: namespace {nsp} has no manifest")
    hexd = parts[3].removesuffix(".safetensors")
    check_expected(header, spec, key=hexd, path=path)
    store._check_key_chain(spec, header, path)  # bind the token ids to the key (the file name)
    if store.signer is not None:
        store.signer.verify(header, path)  # then every layer served is checked against its signed digest


_slots_lock = threading.Lock()
_slots_used = 0


def _take_slot() -> bool:
    global _slots_used
    with _slots_lock:
        if _slots_used >= MAX_MAPPED:
            return False
        _slots_used += 1
        return True


def _give_slot() -> None:
    global _slots_used
    with _slots_lock:
        _slots_used -= 1


class _Mapped:
    """A backend's view of one whole chunk, kept across reads, holding one of ``MAX_MAPPED`` slots. ``close``
    is idempotent and thread-safe; the store closes it too (it is registered as a view holder), before it
    closes the backend."""

    def __init__(self, tier: Any, cm: Any, view: memoryview) -> None:
        self.tier = tier
        self.view = view
        self.since = time.monotonic()
        self.open = True
        self._cm = cm
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if not self.open:
                return
            self.open = False
            self.view = None
            try:
                self._cm.__exit__(None, None, None)
            except Exception as e:  # noqa: BLE001 - ending a read transaction of a backend going away
                log.debug("kvfs mount: releasing a view failed: %s", e)
            finally:
                _give_slot()

    def __del__(self) -> None:  # a reader dropped without close (an abandoned fetch): its slot comes back
        self.close()


def _layer_ok(header: ChunkHeader, layer: int, data) -> bool:
    try:
        check_layer(header, layer, data)
    except IntegrityError:
        return False
    return True


class ChunkReader:
    """One open chunk file: its verified header bytes and a cache of verified layers.

    ``fetch`` does backend I/O (call it from a worker thread); ``read_cached``
    only slices memory. One reader serves one open file handle; ``lock``
    serialises fetches so that concurrent kernel read-ahead requests do not
    fetch the same layers twice.

    Windows are ``(first layer, end layer, bytes, owned)``: owned ones are
    buffers from kvfs's pool, recycled once retired; the others are slices of
    the mapped chunk (``_mapped``), valid while it is held. ``busy`` counts the
    event loop's reads waiting on a fetch: while one waits, nothing is
    recycled or let go, since the slice it will be answered with may come from
    any window.
    """

    def __init__(self, store: Any, path: str) -> None:
        self.store = store
        self.path = path
        self.lock = threading.Lock()
        self.header: ChunkHeader | None = None
        self.header_bytes = b""
        self.size = 0
        self.whole: memoryview | None = None  # whole verified file (signed stores)
        self._tiers: list = []
        self._windows: list[tuple[int, int, memoryview, bool]] = []  # (first layer, end layer, bytes, owned)
        self._retired: list[memoryview] = []  # buffers of dropped windows, recycled by the event loop
        self._mapped: _Mapped | None = None  # a backend's view of the whole chunk, served from in place
        self._next = 0  # where the last read ended: detects sequential access (from the start, too)
        self._sequential = False
        self._mu = threading.Lock()  # guards _inflight and _closed together (see close)
        self._inflight = False  # a background read-ahead is running
        self._closed = False
        self.busy = 0  # event-loop reads waiting on a fetch (set by the FUSE operations)

    # ------------------------------------------------------------------------------ open
    def open(self) -> None:
        """Read and check the header from the first tier holding the chunk."""
        self._tiers = candidate_tiers(self.store, self.path)
        _, self.header, self.header_bytes = open_header(self.store, self.path, self._tiers)
        self.size = self.header.file_size

    # ------------------------------------------------------------------------------ reads
    def _layers_of(self, off: int, end: int) -> tuple[int, int]:
        """Layers overlapping data bytes ``[off, end)`` (file offsets, both past the header)."""
        h = self.header
        lb = h.layer_bytes
        return (off - h.data_offset) // lb, (end - 1 - h.data_offset) // lb + 1

    def read_cached(self, off: int, size: int) -> bytes | memoryview | None:
        """Bytes ``[off, off+size)`` if every layer they need is cached, else ``None``. No I/O."""
        end = min(off + size, self.size)
        if off >= end:
            return b""
        if self.whole is not None:
            return self.whole[off:end]
        h = self.header
        windows = self._usable()
        parts = []
        if off < h.data_offset:
            parts.append(memoryview(self.header_bytes)[off : min(end, h.data_offset)])
            off = h.data_offset
        lb = h.layer_bytes
        while off < end:
            layer = (off - h.data_offset) // lb
            win = next((w for w in windows if w[0] <= layer < w[1]), None)
            if win is None:
                return None
            base = h.data_offset + win[0] * lb
            stop = min(end, h.data_offset + win[1] * lb)
            parts.append(win[2][off - base : stop - base])
            off = stop
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    def _usable(self) -> tuple:
        """The windows that may be served: all but slices of a view that is no longer held."""
        windows = tuple(self._windows)
        m = self._mapped
        if m is not None and m.open:
            return windows
        return tuple(w for w in windows if w[3])

    def _cached_run(self, layer: int) -> int:
        """The end of the run of cached layers starting at ``layer`` (``layer`` if it is not cached)."""
        windows = self._usable()
        while True:
            w = next((w for w in windows if w[0] <= layer < w[1]), None)
            if w is None:
                return layer
            layer = w[1]

    def plan(self, off: int, size: int) -> tuple[int, int, int] | None:
        """``(first, last, need)``: layers ``[first, last)`` to fetch for a read at ``off``, of which
        ``[first, need)`` are the read's own (the rest is read-ahead); None if all are cached."""
        end = min(off + size, self.size)
        h = self.header
        if self.whole is not None or end <= h.data_offset or off >= end:
            return None
        first, last = self._layers_of(max(off, h.data_offset), end)
        first = self._cached_run(first)
        if first >= last:
            return None
        need = last
        # a read near where the last one ended (or at the start) is sequential: read a whole window ahead.
        # "near": the kernel's read-ahead sends several requests at once, which may arrive out of order
        self._sequential = abs(off - self._next) <= 4 * max(size, 128 << 10)
        if self._sequential:
            last = max(last, min(h.shape[0], first + max(1, READAHEAD // h.layer_bytes)))
        return first, last, need

    def prefetch_plan(self) -> tuple[int, int] | None:
        """After a sequential read: the next window to read in the background, if it is time to.

        Keeps up to two windows ahead of the reader, so that the several
        requests the kernel's own read-ahead sends at once find their layers
        verified and in memory.
        """
        if self.whole is not None or not self._sequential or self._inflight or self.header is None:
            return None
        h = self.header
        lb = h.layer_bytes
        cur = (max(self._next, h.data_offset) - h.data_offset) // lb
        end = self._cached_run(cur)
        # a mapped chunk's windows cost no memory: verify further ahead, in bigger steps
        ahead = READAHEAD if self._mapped is None else 2 * READAHEAD
        if end >= h.shape[0] or (end - cur) * lb > ahead:
            return None
        self._inflight = True
        return end, min(h.shape[0], end + max(1, ahead // lb))

    def fetch_ahead(self, first: int, last: int) -> None:
        """Background read-ahead (worker thread): fetch the layers a sequential reader needs next."""
        try:
            with self.lock:
                first = self._cached_run(first)
                if first < last and not self._closed:
                    self.fetch(first, last, need=first)  # nothing here is needed yet
        finally:
            with self._mu:
                self._inflight = False
                closed = self._closed
            if closed:  # the file was released while this ran: close() left the cleanup to us
                self._finish_close(blocking=True)

    def fetch(self, first: int, last: int, need: int | None = None) -> None:
        """Read layers ``[first, last)`` with one ranged read and verify each one's checksum.

        A corrupt layer raises :class:`IntegrityError` if it is one of the
        layers needed now (``[first, need)``, all by default); one read ahead
        ends the window there, and the read that needs it will fail on it.
        """
        need = last if need is None else need
        with self.store.reading():  # the store's close waits for this before it closes the backends
            for tier in self._tiers:
                if tier.backend.supports_views:
                    m = self._mapped
                    if m is None and _take_slot():
                        m = self._map(tier)
                        if m is None:
                            continue  # gone from this tier: the checksums tell whether another copy is the same
                    if m is not None and m.tier is tier and m.open:
                        self._verify_mapped(m.view, first, last, need)
                        return
                    # no slot free, or a view of another tier is held: copy this tier's bytes (a short view)
                if self._fetch_copy(tier, first, last, need):
                    return
        raise StaleChunk(self.path)

    def _map(self, tier: Any) -> _Mapped | None:
        """Take and keep a view of the whole chunk in ``tier`` (a slot is taken: given back here unless
        kept); None if the tier does not hold the chunk."""
        try:
            cm = tier.backend.views([self.path])
            (view,) = cm.__enter__()
        except BaseException:
            _give_slot()
            raise
        if view is None:
            _give_slot()
            cm.__exit__(None, None, None)
            return None
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        m = _Mapped(tier, cm, view)
        if len(view) < self.size:
            m.close()
            raise ChunkFormatError(f"{self.path} is truncated: {len(view)} bytes")
        self._mapped = m
        self.store._view_holders.add(m)  # the store ends it before closing the backend, if we have not
        return m

    def _verify_mapped(self, view: memoryview, first: int, last: int, need: int) -> None:
        """Check layers ``[first, last)`` of the mapped chunk in place and keep them as a window."""
        h = self.header
        lb = h.layer_bytes
        off = h.data_offset + first * lb
        for i in range(last - first):
            if not _layer_ok(h, first + i, view[off + i * lb : off + (i + 1) * lb]):
                last = self._corrupt(first, first + i, need)
                break
        if last > first:
            self._keep(first, last, view[off : off + (last - first) * lb], owned=False)

    def _fetch_copy(self, tier: Any, first: int, last: int, need: int) -> bool:
        """Read layers ``[first, last)`` of ``tier``'s copy into a pooled buffer, check and keep them."""
        h = self.header
        lb = h.layer_bytes
        mv = _buffers.alloc((last - first) * lb)  # page aligned, recycled (see release_retired)
        off = h.data_offset + first * lb
        kept = False
        try:
            if not self._copy_into(tier.backend, off, mv):
                return False
            for i in range(last - first):
                if not _layer_ok(h, first + i, mv[i * lb : (i + 1) * lb]):
                    last = self._corrupt(first, first + i, need)
                    break
            if last > first:
                self._keep(first, last, mv[: (last - first) * lb])
                kept = True
            return True
        finally:
            if not kept:
                _buffers.release(mv)

    def _copy_into(self, backend: Any, off: int, mv: memoryview) -> bool:
        """Copy the chunk's bytes at ``off`` into ``mv``; False if the backend does not hold the chunk."""
        if backend.supports_views:
            with backend.views([self.path]) as (view,):
                if view is None:
                    return False
                if view.ndim != 1 or view.itemsize != 1:
                    view = view.cast("B")
                if len(view) < off + len(mv):
                    raise ChunkFormatError(f"{self.path} is truncated: {len(view)} bytes")
                np.copyto(np.frombuffer(mv, np.uint8), np.frombuffer(view, np.uint8, len(mv), off))
            return True
        n = readinto(backend, self.path, off, mv)
        if n is None:
            return False
        if n != len(mv):
            lb = self.header.layer_bytes
            raise ChunkFormatError(f"{self.path} is truncated: layer {(off - self.header.data_offset + n) // lb} "
                                   "is short")
        return True

    def _corrupt(self, first: int, layer: int, need: int) -> int:
        """Layer ``layer`` failed its checksum: raise if it is needed now, else end the window before it."""
        if layer < need:
            raise IntegrityError(f"{self.path}: layer {layer} checksum mismatch: corrupt")
        return layer

    def _keep(self, first: int, last: int, mv: memoryview, owned: bool = True) -> None:
        """Add a verified window (under ``lock``); retire the oldest, and those a sequential reader passed.
        Slices of the mapped chunk cost no memory: only copied windows count towards ``MAX_CACHED``."""
        windows = self._windows + [(first, last, mv, owned)]
        keep = windows
        if self._sequential:
            h = self.header
            done = (self._next - h.data_offset) // h.layer_bytes if self._next > h.data_offset else 0
            keep = [w for w in windows if w[1] > done - 1]  # one layer of slack for reads in flight
        cached = sum(len(w[2]) for w in keep if w[3])
        while cached > MAX_CACHED and sum(w[3] for w in keep) > 1:
            i = next(i for i, w in enumerate(keep) if w[3])
            cached -= len(keep.pop(i)[2])
        self._retired.extend(w[2] for w in windows if w[3] and not any(w is k for k in keep))
        self._windows = keep  # one assignment: the event loop reads a consistent list

    def release_retired(self) -> None:
        """Recycle the buffers of retired windows. Call only from the event loop, between reads.

        Buffers are recycled (no page faults on the next window), so no slice
        of one may outlive the read that took it: slices taken on the event
        loop are copied to the kernel before the loop runs anything else, and
        while a read waits on a worker's fetch (``busy``) nothing is recycled.
        """
        if self.busy:
            return  # a read waiting on a fetch may be answered with a slice of one of them
        while self._retired:
            _buffers.release(self._retired.pop())

    def expire(self, now: float | None = None) -> bool:
        """Let go of a view held longer than ``HOLD_SECONDS`` (event loop only, between reads); True if it
        did. Skipped while a fetch may be using it: the next call retries."""
        m = self._mapped
        if m is None or (now if now is not None else time.monotonic()) - m.since <= HOLD_SECONDS:
            return False
        if self.busy or self._inflight or not self.lock.acquire(blocking=False):
            return False
        try:
            self._unmap()
        finally:
            self.lock.release()
        return True

    def _unmap(self) -> None:
        """End the held view and forget the windows sliced from it (under ``lock``, no slice in use)."""
        m = self._mapped
        if m is None:
            return
        self._mapped = None
        self._windows = [w for w in self._windows if w[3]]
        m.close()
        self.store._view_holders.discard(m)

    def advance(self, off: int, n: int) -> None:
        """Record that a read of ``n`` bytes at ``off`` was served (sequential-access detection)."""
        self._next = off + n

    def close(self) -> None:
        """Drop the cached windows and the held view. Called from the event loop once the file is released
        (every read of it has been answered): the windows go back to the buffer pool for the next file.
        If a background read-ahead is still running, it finishes the close when it ends."""
        self.whole = None
        with self._mu:
            self._closed = True
            if self._inflight:
                return
        self._finish_close(blocking=False)

    def _finish_close(self, *, blocking: bool) -> None:
        # not blocking (event loop): a fetch abandoned after its timeout may still hold the lock; then its
        # buffers go to the garbage collector and its view to the store's close (or the collector)
        if not self.lock.acquire(blocking=blocking):
            return
        try:
            buffers = [w[2] for w in self._windows if w[3]] + self._retired
            self._windows = []
            self._retired = []
            for b in buffers:
                _buffers.release(b)
            self._unmap()
        finally:
            self.lock.release()
