"""Layer-wise reads of one fixed list of chunks: the loader behind :mod:`kvfs.gpu`'s prefetch.

A layer-wise loader reads layer 0 of every chunk, then layer 1, and so on.
Going through :meth:`Store._read` for each layer would redo, per layer and
chunk, the catalog lookup, the tier search, the header checks against the
request and the access-time update (a catalog write). :class:`LayerReader`
does all of that once, on its first read, through the store's full read path
(tier search, promotion of lower-tier hits, quarantine, access times). Later
reads go straight to the tier each chunk was found in, with the header kept
from the first read, and still verify every layer read against its xxh3
checksum; a chunk that fails is quarantined and is a miss from then on.

Backends that lend views (LMDB, memory) are asked for them once for all the
plan's chunks in a tier, and the views are kept across layer reads for up to
``HOLD_SECONDS`` (then taken again) or until :meth:`LayerReader.close`: py-lmdb
touches every page of a value each time it hands one out (80 µs for a 32 MiB
chunk here), which per layer doubled a 32-layer load. Held LMDB views are a
read transaction's snapshot: a chunk evicted meanwhile is still read whole
and intact from it, and its pages are reused only once the views are dropped.

With chunk signing on, the signature (over the whole tensor and the header,
layer checksums included) is checked on the first read; later layers are
checked against the signed layer checksums.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Sequence

import numpy as np

from . import _pool
from .chunk import ChunkHeader, copy_verified
from .errors import ChunkFormatError
from .store import ReadItem, Store, _DirectReader, _guard, _Source
from .spec import KVSpec

log = logging.getLogger("kvfs")

#: how long a LayerReader keeps one set of backend views (an LMDB read transaction) before taking them
#: again; 0 takes and drops them for every read
HOLD_SECONDS = 1.0


class _Held:
    """Views of some chunks of one tier, taken at once and kept (see the module doc)."""

    def __init__(self, backend, paths: list[str]) -> None:
        self._cm = backend.views(paths)
        views = self._cm.__enter__()
        self.views = dict(zip(paths, views))
        self.since = time.monotonic()

    def close(self) -> None:
        cm, self._cm = self._cm, None
        self.views = {}
        if cm is not None:
            cm.__exit__(None, None, None)


class LayerReader:
    """Read any layers of the chunks of a plan (``Namespace.plan``), many times, cheaply.

    The first read of an item goes through the store's full read path; later ones do not.

    ``read(layers, dests)`` fills ``dests[i]`` (raw-typed ``[len(layers), planes, take_i, heads, dim]``,
    any strides; ``None`` skips item ``i``) and returns one ok flag per item. An item that failed once
    (missing, corrupt, unreadable) stays failed: its flag is ``False`` and nothing is read for it.
    """

    def __init__(self, store: Store, spec: KVSpec, plan: Sequence[Any]) -> None:
        self.store = store
        self.spec = spec
        self.plan = list(plan)
        n = len(self.plan)
        self.failed = [False] * n
        self._opened = [False] * n  # read once through the store's full path
        self._tier: list[Any] = [None] * n  # the Tier each chunk is read from after the first read
        self._header: list[ChunkHeader | None] = [None] * n
        #: reads that went through the fast path (tests and benchmarks look at it)
        self.fast_reads = 0
        self._held: dict[int, _Held] = {}  # tier index -> views kept across reads
        self._io = threading.Lock()  # a read in flight; close() waits for it before dropping the views

    def close(self) -> None:
        """Drop the views kept across reads (an LMDB read transaction); the reader stays usable while its
        store is open. Called by the store's own close too: held views never outlive the backend."""
        with self._io:
            for index in list(self._held):
                self._drop_held(index)
            self.store._view_holders.discard(self)

    def _views(self, tier, paths: list[str]) -> list:
        held = self._held.get(tier.index)
        if held is not None and (time.monotonic() - held.since > HOLD_SECONDS
                                 or any(p not in held.views for p in paths)):
            self._drop_held(tier.index)
            held = None
        if held is None:
            # every chunk of the plan read from this tier, so later layers find theirs in the same views
            want = list(dict.fromkeys(paths + [self.plan[i].key.path for i in range(len(self.plan))
                                               if self._tier[i] is tier and not self.failed[i]]))
            held = _Held(tier.backend, want)
            self._held[tier.index] = held
            self.store._view_holders.add(self)
        return [held.views[p] for p in paths]

    def __len__(self) -> int:
        return len(self.plan)

    def source(self, i: int) -> tuple[Any, ChunkHeader] | None:
        """``(tier, header)`` item ``i`` is read from once opened, or None (failed or not resolvable)."""
        if self.failed[i] or self._header[i] is None:
            return None
        return self._tier[i], self._header[i]

    def fail(self, i: int, reason: str, *, corrupt: bool = True) -> None:
        """Mark item ``i`` failed (a caller's own check failed); quarantine it where it is when corrupt."""
        if self.failed[i]:
            return
        self.failed[i] = True
        if corrupt and self._tier[i] is not None:
            self.store._quarantine(self._tier[i], self.plan[i].key.path, reason, self._header[i])

    # ------------------------------------------------------------------------------------------ reads
    def read(self, layers: range, dests: Sequence[np.ndarray | None]) -> list[bool]:
        with self._io, self.store.reading():  # a closed store's backends (and any views of them) are gone
            return self._read(layers, dests)

    def _read(self, layers: range, dests: Sequence[np.ndarray | None]) -> list[bool]:
        self.spec.check_layers(layers)
        if len(dests) != len(self.plan):
            raise ValueError(f"{len(dests)} destinations for {len(self.plan)} chunks")
        ok = [False] * len(self.plan)
        want = [i for i, d in enumerate(dests) if d is not None and not self.failed[i]]
        if not want:
            return ok
        fresh = {i for i in want if not self._opened[i]}
        if fresh:
            self._open(layers, dests, sorted(fresh), ok)
        groups: dict[int, list[int]] = {}
        slow: list[int] = []
        for i in want:
            if not self._opened[i] or i in fresh:
                continue
            if self._header[i] is None:
                slow.append(i)
            else:
                groups.setdefault(self._tier[i].index, []).append(i)
        for idxs in groups.values():
            self._read_tier(self._tier[idxs[0]], idxs, layers, dests, ok)
        if slow:
            self._slow(slow, layers, dests, ok)
        return ok

    def _items(self, idxs: Sequence[int], layers: range, dests) -> list[ReadItem]:
        return [ReadItem(self.plan[i].key, self.plan[i].take, dests[i], layers, self.plan[i].tokens,
                         self.plan[i].whole) for i in idxs]

    def _open(self, layers: range, dests, want: list[int], ok: list[bool]) -> None:
        """The first read of these items: the store's full read path, then remember where each was found."""
        store = self.store
        got = store._read(self.spec, self._items(want, layers, dests))
        for i in want:
            self._opened[i] = True
        recs = store.catalog.get_many([f"{self.plan[i].key.namespace}/{self.plan[i].key.hex}" for i in want])
        for i, good, rec in zip(want, got, recs):
            if not good:
                self.failed[i] = True
                continue
            ok[i] = True
            header = store._headers.get(self.plan[i].key.path)
            tier = None
            if rec is not None:
                tier = next((t for t in store.tiers if rec.tiers & t.bit), None)
            if header is not None and tier is not None:
                self._header[i], self._tier[i] = header, tier
            # else: read through the store's own path every time (correct, slower)

    def _slow(self, idxs: list[int], layers: range, dests, ok: list[bool]) -> None:
        got = self.store._read(self.spec, self._items(idxs, layers, dests), promote=False)
        for i, good in zip(idxs, got):
            ok[i] = good
            self.failed[i] = self.failed[i] or not good

    def _drop_held(self, tier_index: int) -> None:
        held = self._held.pop(tier_index, None)
        if held is not None:
            try:
                held.close()
            except Exception as e:  # noqa: BLE001 - releasing a snapshot must not fail the caller
                log.debug("kvfs: releasing held views failed: %s", e)

    def _read_tier(self, tier, idxs: list[int], layers: range, dests, ok: list[bool]) -> None:
        store = self.store
        backend = tier.backend
        items = self._items(idxs, layers, dests)
        headers = [self._header[i] for i in idxs]
        results: list[tuple[str, Any]] = [("missing", None)] * len(idxs)
        try:
            if backend.supports_views:
                try:
                    views = self._views(tier, [it.path for it in items])
                except BaseException:
                    self._drop_held(tier.index)
                    raise
                sources = {}
                for j, (h, buf) in enumerate(zip(headers, views)):
                    if buf is None:
                        continue
                    if buf.ndim != 1 or buf.itemsize != 1:
                        buf = buf.cast("B")
                    if len(buf) != h.file_size:
                        results[j] = ("corrupt", ChunkFormatError(
                            f"{items[j].path} is {len(buf)} bytes, expected {h.file_size}"))
                        continue
                    sources[j] = _Source(h, data=buf)
                try:
                    store._run_copies(items, sources, results)
                finally:
                    if HOLD_SECONDS <= 0:  # holding off: the views last one read, as through the store
                        self._drop_held(tier.index)
            elif backend.direct_reads:
                reader = _DirectReader(backend)
                sources = {j: _Source(h, backend=reader, path=it.path) for j, (h, it) in enumerate(zip(headers, items))}
                store._run_copies(items, sources, results)
            else:
                self._read_ranges(backend, items, headers, layers, results)
        except OSError as e:
            store._warn_once(f"read:{tier.index}", f"kvfs: reading from {tier.url.redacted()} failed: {e}; "
                                                   "treating its chunks as misses")
            results = [("error", e) if s == "missing" else (s, p) for s, p in results]
        self.fast_reads += 1
        for j, i in enumerate(idxs):
            status, payload = results[j]
            if status == "ok":
                ok[i] = True
                continue
            self.failed[i] = True
            if status == "corrupt":
                store._quarantine(tier, items[j].path, payload, headers[j])
            elif status == "missing":
                store._warn_once(f"gone:{items[j].path}", f"kvfs: chunk {items[j].path} disappeared from "
                                                          f"{tier.url.redacted()} during a layer-wise read; a miss")

    def _read_ranges(self, backend, items, headers, layers: range, results) -> None:
        """Backends without views or direct reads (fsspec/S3): one batched ranged get per call."""
        from kvfs.backends import ByteRange

        ranges = []
        for it, h in zip(items, headers):
            lb = h.layer_bytes
            ranges.append(ByteRange(it.path, h.data_offset + layers.start * lb, h.data_offset + layers.stop * lb))
        datas = backend.get_ranges(ranges)
        tasks, owners = [], []
        for j, (it, h, data) in enumerate(zip(items, headers, datas)):
            if data is None:
                continue
            tasks.append(lambda h=h, data=data, it=it: _copy_guarded(h, data, it, layers, self.store.verify))
            owners.append(j)
        for j, out in zip(owners, _pool.run_all(tasks)):
            results[j] = ("ok", None) if out is None else out


def _copy_guarded(header: ChunkHeader, data, item: ReadItem, layers: range, verify: bool):
    def run() -> None:
        copy_verified(header, data, item.dest, layers=layers, take=item.take, verify=verify)

    return _guard(run)
