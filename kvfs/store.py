"""The store: one namespace of KV chunks over a chain of storage tiers.

``kvfs.open(url)`` returns a :class:`Store`. It owns the backends (one per
tier, fastest first), the catalog, the write-back queue, pins and eviction,
and the verified read path: every chunk read is parsed, checked against what
was asked for (namespace, key, token ids) and checksummed before a single
byte reaches the caller. A chunk that fails is a miss, a warning and a
quarantine, never data.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import json
import logging
import math
import os
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from . import _buffers, _pool
from ._lmdbenv import read_only_fs
from ._proc import process_alive
from .catalog import Catalog, ChunkRecord, key_of_path
from .chunk import (
    ChunkHeader,
    PendingChunk,
    check_expected,
    check_layer,
    copy_verified,
    header_length,
    parse_header,
    verify_data,
)
from .chunk import resign as resign_chunk
from .errors import (
    ChunkFormatError,
    KVFSError,
    ForeignChunk,
    IntegrityError,
    SignatureError,
    UnsupportedVersion,
    InvalidInput,
    InvalidURL,
    NoSpace,
    NotFound,
    PinnedError,
    ReadOnlyStore,
    StoreError,
)
from .keys import DIGEST_SIZE, SEGMENT_TAG, ChunkKey, chunk_path, next_digest
from .spec import KVSpec
from .tiers import Tier, WriteBack, WriteJob
from .units import parse_duration, parse_size
from .url import default_url, parse_url

log = logging.getLogger("kvfs")

DEFAULT_WRITEBACK_BYTES = 1 << 30
HEADER_PROBE = 4096
CLOSE_WAIT_S = 30.0  # how long close() waits for reads in flight
RESYNC_INTERVAL_S = 60.0  # copies owed to a tier that came back are queued again at most this often
UNSIGNED_REMEMBERED = 65536  # chunks without a valid signature a store remembers (to replace them on put)
ROOM_WAIT_S = 30.0  # how long a write waits for room held by other writes in flight in a full tier
PENDING_BATCH_BYTES = 256 << 20  # puts written straight from the caller's KV: bytes a batch
DIRECT_READ_BYTES = 2 << 20  # direct reads: bytes read per call, then hashed while in cache
PREFETCH_BATCH_BYTES = 256 << 20  # prefetch: chunks read side by side from a lower tier, at most these bytes...
PREFETCH_BATCH_CHUNKS = 64  # ...and this many at once
MANIFEST_NAME = "manifest.json"
_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def open(url: str | None = None, **options: Any) -> "Store":  # noqa: A001 - kvfs.open is the entry point
    """Open a store. ``url=None``: ``$KVFS_URL``, else the embedded LMDB store in ``~/.cache/kvfs``.

    Options: ``catalog`` (directory of the catalog), ``writeback_bytes``
    (bound of the write-back queue), ``read_only``, ``signing_key``
    (bytes, or ``$KVFS_SIGNING_KEY``/``$KVFS_SIGNING_KEY_FILE``).
    """
    return Store(url, **options)


@dataclass(frozen=True)
class Entry:
    """One item of the virtual namespace, as ``ls`` and ``stat`` show it."""

    path: str
    kind: str  # "model" | "namespace" | "shard" | "chunk" | "manifest"
    size: int = 0
    tokens: int = 0
    pins: int = 0
    last_access: float | None = None
    created: float | None = None
    hits: int = 0
    tiers: tuple[str, ...] = ()
    chunks: int = 0

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def is_dir(self) -> bool:
        return self.kind in ("model", "namespace", "shard")

    @property
    def pinned(self) -> bool:
        return self.pins > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "name": self.name,
            "type": self.kind,
            "size": self.size,
            "tokens": self.tokens,
            "pinned": self.pins > 0,
            "pins": self.pins,
            "last_access": self.last_access,
            "created": self.created,
            "hits": self.hits,
            "tiers": list(self.tiers),
            "chunks": self.chunks,
        }


@dataclass
class EvictResult:
    evicted: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # pinned, not forced
    freed_bytes: int = 0
    #: evicting only some tiers: chunks whose only copy is there, still owed to another tier of the store (its
    #: write-back failing, or in flight in another process): kept, since evicting them would lose them
    not_copied: list[str] = field(default_factory=list)
    dry_run: bool = False


@dataclass
class FsckReport:
    chunks: int = 0
    namespaces: int = 0
    added: list[str] = field(default_factory=list)  # present in a tier, missing from the catalog
    stale: list[str] = field(default_factory=list)  # in the catalog, gone from the tier
    corrupt: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)  # keys that are neither chunks nor manifests
    newer: list[str] = field(default_factory=list)  # chunks in a newer format (kept: a newer kvfs reads them)
    unmanifested: list[str] = field(default_factory=list)  # chunks in a namespace no manifest.json describes
    #: chunks without a valid signature for a signing store's key (kept: other nodes may hold that key)
    unsigned: list[str] = field(default_factory=list)
    size_fixed: int = 0
    #: tiers whose usage counter (``du``, capacity) disagreed with the sizes of the chunks recorded in them
    usage_fixed: int = 0

    @property
    def clean(self) -> bool:
        return not (self.added or self.stale or self.corrupt or self.foreign or self.size_fixed or self.usage_fixed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "chunks": self.chunks,
            "namespaces": self.namespaces,
            "added": self.added,
            "stale": self.stale,
            "corrupt": self.corrupt,
            "foreign": self.foreign,
            "orphans": self.orphans,
            "newer": self.newer,
            "unmanifested": self.unmanifested,
            "unsigned": self.unsigned,
            "size_fixed": self.size_fixed,
            "usage_fixed": self.usage_fixed,
        }


@dataclass(eq=False)
class ReadItem:
    """One chunk to read: the first ``take`` tokens of some ``layers``, into ``dest``."""

    key: ChunkKey
    take: int
    dest: np.ndarray  # raw-typed, [len(layers), planes, take, heads, dim], any strides
    layers: range
    expect: np.ndarray | None = None  # token ids the first `take` tokens must be
    expect_full: bool = True  # the chunk must hold exactly `take` tokens

    @property
    def path(self) -> str:
        return self.key.path

    @property
    def ckey(self) -> str:
        return f"{self.key.namespace}/{self.key.hex}"


class _Source:
    """Where one chunk's bytes are read from during a tier read."""

    def __init__(self, header: ChunkHeader, data=None, backend=None, path: str = "") -> None:
        self.header = header
        self.data = data  # memoryview of the whole file, or None for direct reads
        self.backend = backend
        self.path = path

    def copy(self, item: ReadItem, layers: range, dest: np.ndarray, verify: bool) -> None:
        h = self.header
        lb = h.layer_bytes
        if self.data is not None:
            start = h.data_offset + layers.start * lb
            copy_verified(h, self.data[start : start + len(layers) * lb], dest, layers=layers, take=item.take,
                          verify=verify)
            return
        # direct: read straight into the destination planes, then hash them while hot
        raw = dest
        planes = h.shape[1]
        plane_bytes = lb // planes
        if item.take == h.shape[2] and all(raw[i, p].flags.c_contiguous for i in range(len(layers))
                                           for p in range(planes)):
            # a few layers (~2 MiB) per read, hashed at once while still in cache: one pass over memory
            step = max(1, DIRECT_READ_BYTES // lb)
            for g in range(0, len(layers), step):
                sub = range(g, min(len(layers), g + step))
                parts = []
                for i in sub:
                    off = h.data_offset + layers[i] * lb
                    for p in range(planes):
                        parts.append((off + p * plane_bytes, raw[i, p].reshape(-1).view(np.uint8)))
                got = self.backend.readinto_ranges(self.path, parts)
                if got is None:
                    raise _Missing()
                if any(n != len(buf) for n, (_, buf) in zip(got, parts)):
                    raise ChunkFormatError(f"{self.path} is truncated")
                if verify:
                    for i in sub:
                        check_layer(h, layers[i], *(raw[i, p] for p in range(planes)))
            return
        scratch = bytearray(len(layers) * lb)
        got = self.backend.readinto_ranges(self.path, [(h.data_offset + layers.start * lb, scratch)])
        if got is None:
            raise _Missing()
        if got[0] != len(scratch):
            raise ChunkFormatError(f"{self.path} is truncated")
        copy_verified(h, scratch, dest, layers=layers, take=item.take, verify=verify)


class _Missing(Exception):
    pass


def _readinto_ranges(backend, key: str, parts) -> list[int] | None:
    fn = getattr(backend, "readinto_ranges", None)
    if fn is not None:
        return fn(key, parts)
    out = []
    for off, buf in parts:
        n = backend.readinto(key, buf, off)
        if n is None:
            return None
        out.append(n)
    return out


def read_header(backend, path: str) -> tuple[ChunkHeader, bytes] | None:
    """A chunk's parsed header and its raw bytes, read from ``backend`` (``None`` if it does not hold the
    chunk). Raises the backend's ``OSError``, and :class:`ChunkFormatError` for a header that is truncated
    or does not parse (the whole file is not checked here)."""
    buf = bytearray(HEADER_PROBE)
    got = _readinto_ranges(backend, path, [(0, buf)])
    if got is None:
        return None
    n = got[0]
    hlen = header_length(memoryview(buf)[: min(n, 8)])
    if hlen > n:
        if n < HEADER_PROBE:
            raise ChunkFormatError(f"{path} is truncated inside its header")
        buf = bytearray(hlen)
        got = _readinto_ranges(backend, path, [(0, buf)])
        if got is None:
            return None
        if got[0] < hlen:
            raise ChunkFormatError(f"{path} is truncated inside its header")
    raw = bytes(memoryview(buf)[:hlen])
    return parse_header(raw), raw


class Store:
    """A chain of tiers holding the chunks of any number of namespaces. Use as a context manager."""

    def __init__(
        self,
        url: str | None = None,
        *,
        catalog: str | None = None,
        writeback_bytes: int | str = DEFAULT_WRITEBACK_BYTES,
        read_only: bool = False,
        signing_key: bytes | str | bool | None = None,
        verify: bool = True,
    ) -> None:
        from kvfs.backends import backend_class

        self.url = url if url is not None else default_url()
        tier_urls = parse_url(self.url)
        self.read_only = read_only
        self.verify = verify
        self._closed = False
        self._warned: set[str] = set()
        #: chunks found without a valid signature for this store's key (left in place, see _quarantine) -> the
        #: tiers' bits: lookups and puts treat them as absent there, so that storing them again replaces them
        self._unsigned: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._lock = threading.RLock()
        self._evict_lock = threading.Lock()
        #: room made in a tier with a capacity for a write still in flight is reserved in the catalog (per
        #: process, shared by every process on the node) until the write is recorded; this wakes the writes of
        #: this process waiting for such room when one is given back (others' are polled)
        self._room = threading.Condition()
        self._unreleased: dict[int, int] = {}  # tier index -> room a failed release still holds (see _release_room)
        #: parsed headers of chunks read before (chunks are immutable: a path's header never changes
        #: while the chunk exists; entries are dropped on eviction and quarantine)
        self._headers: _HeaderCache = _HeaderCache(8192)
        #: layer-wise readers keeping backend views across reads (kvfs._layers), closed before the backends
        self._view_holders: weakref.WeakSet = weakref.WeakSet()
        self._reads = 0  # reads in flight (see reading())
        self._reads_cv = threading.Condition()
        self._specs: dict[str, KVSpec] = {}
        self._manifests_written: set[tuple[int, str]] = set()
        from .signing import Signer

        self.signer = Signer.from_config(signing_key)
        backends = []
        try:
            for t in tier_urls:
                opts = {}
                if read_only and t.scheme in ("lmdb", "file") and "readonly" not in t.backend_options:
                    d = os.path.abspath(os.path.expanduser(t.location))
                    # a read-only filesystem (a read-only volume, a snapshot); for files, also a directory this
                    # user may not write (LMDB readers need its lock file: there the owner's permission counts)
                    if os.path.isdir(d) and (read_only_fs(d) or t.scheme == "file" and not _may_write(d)):
                        opts["readonly"] = "true"
                backends.append(backend_class(t.scheme).from_url(t, **opts))
            home = None if catalog else next((i for i, b in enumerate(backends) if b.catalog_dir()), None)
            cat_dir = catalog or (backends[home].catalog_dir() if home is not None else None)
            if cat_dir is None and any(t.scheme != "memory" for t in tier_urls):
                ident = "::".join(t.identity for t in tier_urls if t.scheme != "memory")
                cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
                cat_dir = os.path.join(cache, "kvfs", "catalogs", hashlib.blake2b(ident.encode(), digest_size=8).hexdigest())
            self.catalog = _open_catalog(cat_dir, read_only)
        except BaseException:
            for b in backends:
                b.close()
            raise
        self._reap_volatile_slots()
        self.tiers: list[Tier] = []
        for i, (t, b) in enumerate(zip(tier_urls, backends)):
            shared = t.shared if t.shared is not None else bool(getattr(b, "shared", False))
            ident = t.identity
            if getattr(b, "volatile", False):
                # process-local storage: its catalog bit must mean nothing to other processes
                ident += f"#{os.getpid()}." + (t.location or uuid.uuid4().hex[:12])
                private = True
            else:
                private = False
            # the tier holding the catalog keeps its bit wherever it is reached from (moved, copied, symlinked)
            slot = self.catalog.home_slot(ident) if i == home else self.catalog.tier_slot(ident)
            if private:
                self.catalog.private_slots.add(slot)  # room made in it is this process's business only
            self.tiers.append(Tier(i, t, b, slot, t.capacity, t.watermark, shared))
            self.tiers[-1].identity = ident
        #: the catalog bits of the tiers this store can read
        self.mask = sum(t.bit for t in self.tiers)
        self._writeback = WriteBack(self._writeback_one, parse_size(writeback_bytes, "writeback_bytes"),
                                    on_recovered=lambda _ti: self._start_resync(min_interval=RESYNC_INTERVAL_S))
        #: copies to lower tiers that a crash, an outage or an exited process left owed are queued again: at open
        #: (in the background), after a tier that failed comes back, and by flush()
        self._resync_lock = threading.Lock()
        self._resync_thread: threading.Thread | None = None
        self._resync_stop = False
        self._resync_last = 0.0
        if not self.read_only and len(self.tiers) > 1 and self.catalog.owed():
            self._start_resync()

    # ---------------------------------------------------------------------------------- life
    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({'::'.join(t.url.redacted() for t in self.tiers)})"

    @property
    def redacted_url(self) -> str:
        return "::".join(t.url.redacted() for t in self.tiers) if not self._closed else "<closed>"

    def flush(self) -> None:
        """Wait for write-back, then make everything written durable. Raises if a write-back failed.

        Copies owed to lower tiers that failed before (a tier that was down) or that another process left
        (it crashed before its write-back) are queued again first."""
        self._check_open()
        self.resync()
        errors = self._writeback.flush()
        for t in self.tiers:
            t.backend.flush()
        self.catalog.flush()
        if errors:
            path, ti, e = errors[0]
            # a copy that failed before this flush was queued again by its resync and may have failed twice
            n = len({p for p, _, _ in errors})
            raise StoreError(
                errno.EIO,
                f"{n} chunk(s) could not be written back to lower tiers (first: {path} to "
                f"{self.tiers[ti].url.redacted()}: {e}); they stay readable from the tiers above",
            ) from e

    def close(self) -> None:
        """Flush, then release every backend and the catalog. Idempotent."""
        if self._closed:
            return
        errors: list = []
        try:
            with self._lock:  # (the write-back thread may be starting one: it checks _resync_stop under the lock)
                self._resync_stop = True
                th = self._resync_thread
            if th is not None:
                th.join()  # it stops between chunks (a queued chunk is written by the close below)
            errors = self._writeback.close()
            for t in self.tiers:
                try:
                    t.backend.flush()
                except OSError as e:
                    log.warning("kvfs: flushing %s failed: %s", t, e)
        finally:
            with self._reads_cv:
                self._closed = True  # no new read starts; wait for those in flight
                if not self._reads_cv.wait_for(lambda: not self._reads, timeout=CLOSE_WAIT_S):
                    log.warning("kvfs: closing with %d read(s) still in flight after %.0f s", self._reads,
                                CLOSE_WAIT_S)
            for reader in list(self._view_holders):
                reader.close()  # waits for a read in flight, then ends its read transaction
            for t in self.tiers:
                t.backend.close()
                if getattr(t.backend, "dropped", False):
                    try:
                        self.catalog.drop_slot(t.identity, t.slot)
                    except OSError as e:
                        log.warning("kvfs: cannot clean up the catalog of %s: %s", t, e)
            self.catalog.close()
        if errors:
            log.warning("kvfs: %d chunk(s) were not written back before close (first: %s: %s)",
                        len({p for p, _, _ in errors}), errors[0][0], errors[0][2])

    # ---------------------------------------------------------------------------------- owed copies
    def _start_resync(self, min_interval: float = 0.0) -> bool:
        """:meth:`resync` on a thread of its own, unless one runs (or ran less than ``min_interval`` ago); whether
        one was started (else the write-back asks again after its next write to the tier that came back: copies
        that failed since the last pass must not wait for the next outage, or for this process to exit)."""
        with self._lock:
            if self._resync_stop or self._closed:
                return True  # closing: nothing to ask again
            if self._resync_thread is not None and self._resync_thread.is_alive():
                return False
            if time.monotonic() - self._resync_last < min_interval:
                return False
            self._resync_last = time.monotonic()
            self._resync_thread = threading.Thread(target=self._resync_quietly, name="kvfs-resync", daemon=True)
            self._resync_thread.start()
            return True

    def _resync_quietly(self) -> None:
        try:
            self.resync()
        except Exception as e:  # noqa: BLE001 - a background pass; flush() runs one that raises
            if not self._closed:
                log.warning("kvfs: queueing owed copies to lower tiers again failed: %s", e)

    def resync(self) -> int:
        """Queue again every copy to a lower tier that is owed and not on its way: write-backs lost to a crash
        (of this or another process on this node) or that failed while a tier was down. Returns how many chunks
        were queued (write-back writes them; :meth:`flush` waits for them)."""
        if self.read_only or len(self.tiers) < 2 or self._closed:
            return 0
        with self._resync_lock:
            owed = self.catalog.owed()
            if not owed:
                return 0
            me = os.getpid()
            by_slot = {t.slot: t for t in self.tiers}
            queued = self._writeback.queued_paths()
            recs = self.catalog.get_many([k for k, _, _ in owed])
            todo, paid = [], []
            for (key, bits, pid), rec in zip(owed, recs):
                if rec is None:
                    paid.append((key, -1))  # gone: nothing left to copy
                    continue
                if pid != me and process_alive(pid):
                    continue  # still that process's to write
                if rec.path in queued:
                    continue
                if bits & rec.tiers:
                    paid.append((key, bits & rec.tiers))  # recorded there since (by fsck, a read's promotion)
                targets = sorted(by_slot[sl].index for sl in by_slot if bits >> sl & 1 and not rec.tiers >> sl & 1)
                if targets and any(rec.tiers & t.bit for t in self.tiers[: targets[0]]):
                    todo.append((key, pid, rec, targets))
                elif targets and not rec.tiers & ~self.mask:
                    # every copy is in this chain and none above the tiers owed (evicted from there by hand):
                    # nothing is left to copy down
                    paid.append((key, bits & ~rec.tiers))
                # else: the slots owed belong to another tier chain, or a tier of another chain holds the chunk
            for key, slots in paid:
                self.catalog.forgive([key], slots)
            n = 0
            claimed = self.catalog.claim_owed([(key, pid) for key, pid, _, _ in todo], me)
            for ok, (key, _pid, rec, targets) in zip(claimed, todo):
                if not ok:
                    continue  # another process queued it meanwhile
                if self._resync_stop or self._closed:
                    break
                try:
                    data = self.cat(rec.path)  # verified (a copy failing its checks is quarantined)
                except (NotFound, ChunkFormatError):
                    self.catalog.forgive([key])  # no good copy left to send
                    continue
                except OSError as e:
                    self._warn_once(f"resync:{key}", f"kvfs: cannot read {rec.path} to copy it to lower tiers: {e}")
                    continue
                try:
                    self._writeback.submit(WriteJob(
                        rec.path, data, targets,
                        lambda ti, rec=rec: self.catalog.add([(rec, None)], self.tiers[ti].slot)))
                except StoreError:
                    break  # closing
                n += 1
            if n:
                log.info("kvfs: %d chunk(s) owed to lower tiers queued again", n)
            return n

    def _reap_volatile_slots(self) -> None:
        """Forget the memory tiers of processes that have exited (their chunks died with them)."""
        for ident, slot in self.catalog.volatile_slots():
            try:
                pid = int(ident.rsplit("#", 1)[1].split(".", 1)[0])
            except ValueError:
                continue
            if pid == os.getpid() or process_alive(pid):
                continue
            try:
                self.catalog.drop_slot(ident, slot)
            except OSError as e:
                log.warning("kvfs: cannot clean up the memory tier of exited process %d: %s", pid, e)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(errno.EBADF, "the store is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self.read_only:
            raise ReadOnlyStore(f"store {self.redacted_url} was opened read-only")

    # ---------------------------------------------------------------------------------- namespaces
    def namespace(self, spec: KVSpec) -> "Namespace":
        """The namespace of one KV configuration (see :class:`kvfs.KVSpec`)."""
        from .namespace import Namespace

        if not isinstance(spec, KVSpec):
            raise InvalidInput(f"store.namespace() takes a kvfs.KVSpec, got {type(spec).__name__}")
        self._check_open()
        self._specs[spec.path] = spec
        return Namespace(self, spec)

    def spec_of(self, ns_path: str) -> KVSpec | None:
        """The spec of a namespace path (``model/ns-id``), from this process or the stored manifest."""
        spec = self._specs.get(ns_path)
        if spec is not None:
            return spec
        raw = self.catalog.manifest(ns_path)
        if raw is None:
            raw = self._read_manifest_from_tiers(ns_path)
        if raw is None:
            return None
        try:
            spec = KVSpec.from_manifest(bytes(raw))
        except InvalidInput:
            return None
        if spec.path != ns_path:
            return None
        self._specs[ns_path] = spec
        return spec

    def _read_manifest_from_tiers(self, ns_path: str) -> bytes | None:
        for t in self.tiers:
            try:
                v = t.backend.get(f"{ns_path}/{MANIFEST_NAME}")
            except OSError:
                continue
            if v is not None:
                return bytes(v)
        return None

    def _ensure_manifest(self, spec: KVSpec, tier_index: int) -> None:
        """Write ``<model>/<ns-id>/manifest.json`` to a tier once (and register it in the catalog)."""
        key = (tier_index, spec.path)
        if key in self._manifests_written:
            return
        manifest = spec.manifest_bytes()
        self.catalog.register_namespace(spec.path, manifest)
        backend = self.tiers[tier_index].backend
        mpath = f"{spec.path}/{MANIFEST_NAME}"
        existing = backend.get(mpath)
        if existing is None:
            backend.put(mpath, manifest)
        elif bytes(existing) != manifest and not _describes(bytes(existing), manifest):
            # the namespace's directory name is a hash of its manifest: a manifest there that says otherwise
            # is damaged or planted, and would make every chunk in it unreadable once the catalog is rebuilt
            log.warning("kvfs: %s in %s did not describe namespace %s (damaged or foreign); rewritten",
                        mpath, self.tiers[tier_index].url.redacted(), spec.path)
            backend.put(mpath, manifest)
        self._manifests_written.add(key)

    # ---------------------------------------------------------------------------------- lookup
    def _records(self, keys: Sequence[ChunkKey]) -> list[ChunkRecord | None]:
        return self.catalog.get_many([f"{k.namespace}/{k.hex}" for k in keys])

    def _probe(self, keys: Sequence[ChunkKey], tokens_of) -> int:
        """How many of ``keys`` (in order) some tier holds though the catalog does not know them.

        Asks the tiers in growing batches (4, 16, 64...), one batched query per
        tier per batch, so a cold prompt costs a few requests, not one per chunk.
        """
        found_n = 0
        window = 4
        while found_n < len(keys):
            batch = keys[found_n : found_n + window]
            found = self._exists_anywhere(batch, tokens_of)
            n_ok = next((i for i, f in enumerate(found) if not f), len(found))
            found_n += n_ok
            if n_ok < len(batch):
                break
            window *= 4
        return found_n

    def _held_bits(self, rec: ChunkRecord | None) -> int:
        """The tiers of this store holding a chunk it can serve, by its catalog record (not those where it was
        found without a valid signature for this store's key)."""
        if rec is None:
            return 0
        bits = rec.tiers & self.mask
        if self._unsigned and bits:
            bits &= ~self._unsigned.get(rec.path, 0)
        return bits

    def _exists_anywhere(self, keys: Sequence[ChunkKey], tokens_of) -> list[bool]:
        """Whether some tier holds each key (one batched query per tier); found ones enter the catalog."""
        masks = [0] * len(keys)
        for t in self.tiers:
            todo = [i for i, m in enumerate(masks) if not m]
            if not todo:
                break
            try:
                exists = t.backend.exists_many([keys[i].path for i in todo])
            except OSError as e:
                self._warn_once(f"probe:{t.index}", f"kvfs: cannot query {t.url.redacted()}: {e}")
                continue
            for i, ok in zip(todo, exists):
                if ok and not (self._unsigned and self._unsigned.get(keys[i].path, 0) & t.bit):
                    masks[i] |= 1 << t.index
        now = time.time()
        for k, m in zip(keys, masks):
            if not m:
                continue
            rec = ChunkRecord(f"{k.namespace}/{k.hex}", 0, k.num_tokens, k.start, now, now, 0, 0, 0, k.segment,
                              k.parent_hex if not k.segment else "")
            toks = tokens_of(k)
            for t in self.tiers:
                if m & (1 << t.index):
                    self.catalog.add([(rec, toks)], t.slot)
        return [bool(m) for m in masks]

    # ---------------------------------------------------------------------------------- reads
    def _read(self, spec: KVSpec, items: Sequence[ReadItem], *, promote: bool = True) -> list[bool]:
        """Fill each item's ``dest``; ``True`` where the chunk was found and passed every check."""
        with self.reading():
            return self._read_open(spec, items, promote)

    @contextmanager
    def reading(self) -> Iterator[None]:
        """A read in flight: :meth:`close` waits for it before it releases the backends (whose zero-copy
        views the read may be copying from)."""
        with self._reads_cv:
            self._check_open()
            self._reads += 1
        try:
            yield
        finally:
            with self._reads_cv:
                self._reads -= 1
                if not self._reads:
                    self._reads_cv.notify_all()

    def _read_open(self, spec: KVSpec, items: Sequence[ReadItem], promote: bool) -> list[bool]:
        n = len(items)
        ok = [False] * n
        if not n:
            return ok
        recs = self.catalog.get_many([it.ckey for it in items])
        remaining = list(range(n))
        promotions: list[tuple[int, int, Any]] = []
        for tier in self.tiers:
            if not remaining:
                break
            todo = [i for i in remaining if recs[i] is None or recs[i].tiers & tier.bit or tier.shared]
            if not todo:
                continue
            want_bytes = promote and tier.index > 0 and not self.read_only
            stale: list[str] = []
            replaced: list[int] = []
            for attempt in (0, 1):
                idx = todo if attempt == 0 else replaced
                if not idx:
                    break
                results = self._read_tier(tier, spec, [items[i] for i in idx], want_bytes)
                replaced = []
                for i, (status, payload) in zip(idx, results):
                    if status == "ok":
                        ok[i] = True
                        if payload is not None:
                            promotions.append((i, tier.index, payload))
                    elif status == "corrupt":
                        # a failed layer checksum names the header it was checked against (maybe cached from an
                        # earlier read); a failed header check, none: the bytes read are the chunk's own. A chunk
                        # replaced since that header was cached is read once more, by its own header
                        if self._quarantine(tier, items[i].path, payload, getattr(payload, "header", None)):
                            replaced.append(i)
                    elif status == "missing" and recs[i] is not None and recs[i].tiers & tier.bit:
                        stale.append(items[i].ckey)
            if stale:
                self.catalog.remove_from(stale, tier.slot)
            remaining = [i for i in remaining if not ok[i]]
        for i in range(n):
            if ok[i] and recs[i] is not None and recs[i].size == 0:
                h = self._headers.get(items[i].path)
                if h is not None:
                    self.catalog.set_size(items[i].ckey, h.file_size)
        self._touch([items[i].ckey for i in range(n) if ok[i]])
        for i, tier_index, data in promotions:
            self._promote(items[i], data, tier_index)
        return ok

    def _touch(self, keys: list[str]) -> None:
        """Record that these chunks (catalog keys) were used now: the LRU order eviction follows. Best effort:
        a full or read-only catalog must not fail a read."""
        if not keys or self.read_only:
            return
        try:
            self.catalog.touch(list(dict.fromkeys(keys)))
        except OSError as e:
            self._warn_once("touch", f"kvfs: cannot record access times: {e}")

    def _read_tier(self, tier: Tier, spec: KVSpec, items: list[ReadItem], want_bytes: bool):
        """Read items from one tier: a list of (status, payload) with status ok/missing/corrupt/error."""
        backend = tier.backend
        paths = [it.path for it in items]
        results: list[tuple[str, Any]] = [("missing", None)] * len(items)
        try:
            if backend.supports_views:
                with backend.views(paths) as views:
                    self._copy_from_buffers(spec, items, views, results, keep=want_bytes)
            elif backend.direct_reads and not want_bytes:  # promotion needs the whole file's bytes
                self._copy_direct(spec, backend, items, results)
            else:
                datas = backend.get_many(paths)
                self._copy_from_buffers(spec, items, [None if d is None else memoryview(d) for d in datas],
                                        results, keep=want_bytes)
        except OSError as e:
            self._warn_once(f"read:{tier.index}", f"kvfs: reading from {tier.url.redacted()} failed: {e}; "
                                                  "treating its chunks as misses")
            return [("error", e) if s == "missing" else (s, p) for s, p in results]
        return results

    def _check_header(self, spec: KVSpec, item: ReadItem, header: ChunkHeader) -> None:
        check_expected(header, spec, key=item.key.hex, path=item.path)
        key = item.key
        kind = "segment" if key.segment else "prefix"
        if header.kind != kind or header.start != key.start or header.parent != key.parent_hex:
            # the chunk must be the one at this place of this chain: a chunk found through the children
            # index (a partial one) is otherwise bound to its key by its own header only
            raise IntegrityError(f"{item.path} is the {header.kind} chunk at token {header.start} after "
                                 f"{header.parent[:16] or 'the start'}, not the {kind} chunk at {key.start} "
                                 f"after {key.parent_hex[:16] or 'the start'} asked for")
        _check_prefix_positions(header, item.path)
        if self.signer is not None:
            # the signature covers the metadata and its per-layer BLAKE2b digests: each layer read is
            # then authenticated by check_layer, whole chunks and layer-wise loads alike
            self.signer.verify(header, item.path)
        t = header.shape[2]
        if item.expect_full and t != item.take:
            raise IntegrityError(f"{item.path} holds {t} tokens, expected {item.take}")
        if item.take > t:
            raise IntegrityError(f"{item.path} holds {t} tokens, fewer than the {item.take} asked for")
        if item.expect is not None and not np.array_equal(header.tokens[: item.take], item.expect[: item.take]):
            raise IntegrityError(f"{item.path}: token ids do not match the tokens asked for")
        if item.expect is None or not item.expect_full:
            # the tokens were not compared in full: bind them to the key through the hash chain
            self._check_key_chain(spec, header, item.path)

    def _check_key_chain(self, spec: KVSpec, header: ChunkHeader, path: str) -> None:
        if header.kind == "segment":
            parent = bytes.fromhex(header.parent) if header.parent else spec.seed + SEGMENT_TAG
        else:
            parent = bytes.fromhex(header.parent) if header.parent else spec.seed
        if next_digest(parent, header.tokens).hex() != header.key:
            raise IntegrityError(f"{path}: key does not hash from its parent and token ids")

    def _header_from(self, buf, path: str) -> ChunkHeader:
        header = self._headers.get(path)
        if header is None or len(buf) != header.file_size:
            # not cached, or the chunk is not the one cached (replaced since with one of another size, or
            # truncated): its own header decides, and parse_header checks the size against it
            header = parse_header(buf)
            self._headers[path] = header
        return header

    def _copy_from_buffers(self, spec, items, buffers, results, keep: bool) -> None:
        sources: dict[int, _Source] = {}
        for i, (item, buf) in enumerate(zip(items, buffers)):
            if buf is None:
                continue
            try:
                if buf.ndim != 1 or buf.itemsize != 1:
                    buf = buf.cast("B")
                header = self._header_from(buf, item.path)
                self._check_header(spec, item, header)
            except ChunkFormatError as e:
                self._headers.pop(item.path, None)
                results[i] = ("corrupt", e)
                continue
            sources[i] = _Source(header, data=buf)
        self._run_copies(items, sources, results)
        if keep:
            for i in sources:
                if results[i][0] == "ok":
                    results[i] = ("ok", bytes(buffers[i]))

    def _copy_direct(self, spec, backend, items, results) -> None:
        def header_of(i: int):
            item = items[i]
            cached = self._headers.get(item.path)
            if cached is not None:
                return cached
            got = read_header(backend, item.path)
            if got is None:
                raise _Missing()
            header = got[0]
            # the file must end where its header says: one byte read at that offset must find nothing
            # (data short of it shows as a short read of the layers later)
            tail = _readinto_ranges(backend, item.path, [(header.file_size, bytearray(1))])
            if tail is None:
                raise _Missing()
            if tail[0]:
                raise ChunkFormatError(f"{item.path} is longer than its header describes: not a valid chunk")
            self._headers[item.path] = header
            return header

        def guarded(i: int):
            try:
                header = header_of(i)
                self._check_header(spec, items[i], header)
                return header
            except _Missing:
                return "missing"
            except ChunkFormatError as e:
                self._headers.pop(items[i].path, None)
                return e

        headers = _pool.run_all([lambda i=i: guarded(i) for i in range(len(items))])
        sources: dict[int, _Source] = {}
        for i, h in enumerate(headers):
            if isinstance(h, ChunkHeader):
                sources[i] = _Source(h, backend=_DirectReader(backend), path=items[i].path)
            elif isinstance(h, Exception):
                results[i] = ("corrupt", h)
        self._run_copies(items, sources, results)

    def _run_copies(self, items, sources: dict[int, _Source], results) -> None:
        """Copy+verify every source into its item's dest, split in layer groups over the pool."""
        if not sources:
            return
        workers = _pool.workers()
        per_item = max(1, math.ceil(2 * workers / len(sources)))
        tasks = []
        owners = []
        for i, src in sources.items():
            item = items[i]
            layers = item.layers
            groups = min(per_item, len(layers)) or 1
            size = math.ceil(len(layers) / groups) if len(layers) else 0
            for g in range(groups):
                sub = range(layers.start + g * size, min(layers.stop, layers.start + (g + 1) * size))
                if len(sub) == 0 and len(layers):
                    continue
                lo = g * size
                dest = item.dest[lo : lo + len(sub)]
                tasks.append(lambda src=src, item=item, sub=sub, dest=dest: _guard(src.copy, item, sub, dest, self.verify))
                owners.append(i)
        outcomes = _pool.run_all(tasks)
        status: dict[int, tuple[str, Any]] = {i: ("ok", None) for i in sources}
        for i, out in zip(owners, outcomes):
            if out is not None and status[i][0] == "ok":
                if out[0] == "corrupt":
                    out[1].header = sources[i].header  # the header the failed check used (see _quarantine)
                status[i] = out
        for i, st in status.items():
            results[i] = st

    def _promote(self, item: ReadItem, data, from_tier: int) -> None:
        """Copy a chunk read from a lower tier into the tiers above it."""
        header = self._headers.get(item.path)
        if header is None:
            return
        unread = [i for i in range(header.shape[0]) if i not in item.layers]
        if unread and self.verify:
            # the read checked only the layers it asked for: the tiers above get only a chunk checked whole
            mv = memoryview(data)[header.data_offset :]
            lb = header.layer_bytes
            try:
                for i in unread:
                    check_layer(header, i, mv[i * lb : (i + 1) * lb])
            except ChunkFormatError as e:
                self._quarantine(self.tiers[from_tier], item.path, e, header)
                return
        rec = self._record_for(item.key, header, len(data))
        try:
            self._write_new([(rec, header.tokens if header.kind == "prefix" else None, item.path, data)],
                            tiers=list(range(from_tier)))
        except OSError as e:
            self._warn_once(f"promote:{from_tier}", f"kvfs: promoting chunks out of tier {from_tier} failed: {e}")

    # ---------------------------------------------------------------------------------- writes
    def _entry_of(self, header: ChunkHeader, namespace: str, path: str, data) -> tuple:
        """What :meth:`_write_new` takes for a whole chunk file already checked (``header`` parsed from it)."""
        key = ChunkKey(bytes.fromhex(header.key), bytes.fromhex(header.parent) if header.parent else None,
                       header.start, header.start + header.num_tokens, namespace, header.kind == "segment")
        return (self._record_for(key, header, len(data)), header.tokens if header.kind == "prefix" else None, path,
                data)

    def _record_for(self, key: ChunkKey, header_or_tokens, size: int) -> ChunkRecord:
        now = time.time()
        ntok = header_or_tokens.shape[2] if isinstance(header_or_tokens, ChunkHeader) else len(header_or_tokens)
        start = header_or_tokens.start if isinstance(header_or_tokens, ChunkHeader) else key.start
        return ChunkRecord(f"{key.namespace}/{key.hex}", size, ntok, start, now, now, 0, 0, 0, key.segment,
                           key.parent_hex if not key.segment else "")

    def _encode_one(self, spec: KVSpec, chunk: tuple[ChunkKey, np.ndarray, np.ndarray, dict]):
        """Encode one chunk: ``(key, tokens, raw kv view, options)`` -> its file bytes."""
        return self._pending_one(spec, chunk).materialize()

    def _pending_one(self, spec: KVSpec, chunk: tuple[ChunkKey, np.ndarray, np.ndarray, dict]) -> PendingChunk:
        """One chunk's layout and metadata, its bytes produced as it is written."""
        key, toks, kv, opts = chunk
        return PendingChunk(
            spec,
            key=key.hex,
            parent=key.parent_hex,
            tokens=toks,
            kv=kv,
            start=opts.get("start", key.start),
            kind="segment" if key.segment else "prefix",
            positions=opts.get("positions"),
            extra=opts.get("extra"),
            signer=self.signer,
        )

    def _encode_many(self, spec: KVSpec, chunks: Sequence[tuple[ChunkKey, np.ndarray, np.ndarray, dict]]):
        """Encode chunks on the pool -> encoded buffers, in order."""
        return _pool.run_all([lambda c=c: self._encode_one(spec, c) for c in chunks])

    def _put_encoded(self, spec: KVSpec, chunks, segment: bool = False) -> int:
        """Encode chunks on the pool while this thread writes the finished ones, in order.

        Encoding (a copy and checksums, on the workers) overlaps the first
        tier's write (LMDB's and the kernel's copies, GIL released) of the
        chunks before; at most a few chunks are in flight. Into a backend
        that writes a batch side by side (``file://``, object stores),
        finished chunks go as many at a time as the pool has workers (and
        the catalog takes them in one transaction). Returns how many were
        written.
        """
        from collections import deque

        backend = self.tiers[0].backend
        if len(self.tiers) == 1 and backend.pending_puts:
            return self._put_pending(spec, chunks, segment)
        pool = _pool.pool()
        it = iter(chunks)
        pending: deque = deque()
        for c in it:
            pending.append((c, pool.submit(self._encode_one, spec, c)))
            if len(pending) >= 2 * _pool.workers():
                break
        written = 0
        batch: list = []
        # chunks written together: as many as the pool has workers where the first tier writes a batch side by
        # side; one at a time into a single writer (LMDB), whose write then overlaps the next chunk's encode
        per_write = _pool.workers() if backend.parallel_puts else 1
        try:
            while pending:
                c, fut = pending.popleft()
                buf = fut.result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(self._encode_one, spec, nxt)))
                key, toks = c[0], c[1]
                batch.append((self._record_for(key, toks, len(buf)), None if segment else toks, key.path, buf))
                if len(batch) >= per_write or not pending:
                    self._write_new(batch, recycle=True)
                    written += len(batch)
                    batch = []
        finally:
            for _, fut in pending:  # an error: let the encodes in flight finish before the caller moves on
                fut.cancel()
                try:
                    fut.result()
                except BaseException:  # noqa: BLE001 - the first error is the one raised
                    pass
        return written

    def _put_pending(self, spec: KVSpec, chunks, segment: bool) -> int:
        """Write chunks into a one-tier store whose backend writes straight from the caller's KV (``file://``).

        No encoded copy: each file is written from the caller's arrays, every
        layer hashed just before the kernel copies it into the page cache.
        Files are written side by side on the pool (``put_many``), in batches
        of up to ``4 x workers`` chunks and 256 MiB, each batch recorded in
        the catalog in one transaction once its files are in place.
        """
        most = 4 * _pool.workers()
        written = 0
        batch: list = []
        size = 0
        for c in chunks:
            pc = self._pending_one(spec, c)
            key, toks = c[0], c[1]
            batch.append((self._record_for(key, toks, len(pc)), None if segment else toks, key.path, pc))
            size += len(pc)
            if len(batch) >= most or size >= PENDING_BATCH_BYTES:
                self._write_new(batch)
                written += len(batch)
                batch, size = [], 0
        if batch:
            self._write_new(batch)
            written += len(batch)
        return written

    def _write_new(self, entries: list[tuple[ChunkRecord, np.ndarray | None, str, Any]],
                   tiers: list[int] | None = None, *, recycle: bool = False) -> None:
        """Write encoded chunks to the first tier (of ``tiers``) with room, and queue the tiers below.

        ``entries``: (record, token ids, path, encoded buffer). ``recycle``: the
        buffers came from :func:`kvfs._buffers.alloc` and nothing else holds
        them: give them back once no backend or queue needs them.
        """
        self._check_writable()
        if not entries:
            return
        if tiers is None:  # new bytes (a put, an import), not a copy of a chunk read here (a promotion)
            for _, _, path, _ in entries:
                self._headers.pop(path, None)  # a chunk written again (a segment replaced whole): a new header
        targets = list(range(len(self.tiers))) if tiers is None else list(tiers)
        if not targets:
            return
        total = sum(len(e[3]) for e in entries)
        if len(entries) > 1 and any(self.tiers[ti].capacity is not None and total > self.tiers[ti].capacity
                                    for ti in targets):
            # a batch larger than a tier: chunk by chunk, so that the tier takes what fits
            for e in entries:
                self._write_new([e], tiers, recycle=recycle)
            return
        spec_paths = {e[0].namespace for e in entries}
        first = None
        for pos, ti in enumerate(targets):
            # reserves `total` bytes of the tier until recorded; only a write with no tier left waits for room
            # held by other writes in flight (an upper tier's write goes on to the next tier at once)
            if self._make_room(self.tiers[ti], total, wait=tiers is None and pos == len(targets) - 1):
                first = pos
                break
            if pos == len(targets) - 1:
                if tiers is not None:
                    return  # promotion into full tiers is skipped, not an error
                raise NoSpace(
                    f"tier {self.tiers[ti].url.redacted()} is full ({self.catalog.used(self.tiers[ti].slot)} of "
                    f"{self.tiers[ti].capacity} bytes) and nothing in it can be evicted (pinned, or not yet "
                    "copied to a lower tier); unpin or evict chunks, or raise its capacity"
                )
        assert first is not None
        tier = self.tiers[targets[first]]
        reservation = [total]  # released once the chunks are recorded (or the write failed)
        try:
            for nsp in spec_paths:
                spec = self.spec_of(nsp)
                if spec is not None:
                    self._ensure_manifest(spec, tier.index)
            rest = targets[first + 1 :]
            try:
                tier.backend.put_many({path: buf for _, _, path, buf in entries})
            except BaseException:
                # (the room goes back first: recording queues copies, which may wait for the write-back thread)
                self._release_room(tier, reservation)
                if len(entries) > 1:
                    self._record_written(tier, entries, rest)
                raise
            # a buffer goes back to the pool only if no tier it is written to keeps a reference to it
            recyclable = recycle and not any(self.tiers[ti].backend.retains_buffers for ti in targets[first:])
            self._written(tier, entries, rest, recyclable, reservation)
        finally:
            self._release_room(tier, reservation)

    def _written(self, tier: Tier, entries: list, rest: list[int], recyclable: bool,
                 reservation: list[int] | None = None) -> None:
        """Chunks now in ``tier``: record them, and queue their copies to the tiers ``rest`` below.
        ``reservation``: the room made for them in ``tier``, released once they count in its usage (before
        queueing the copies, which may wait for the write-back thread, itself perhaps making room there)."""
        owed = 0
        for ti in rest:
            owed |= self.tiers[ti].bit
        if self._unsigned:
            with self._lock:
                for _, _, path, _ in entries:  # replaced by a chunk signed with this store's key
                    self._unsigned.pop(path, None)
        room = reservation[0] if reservation and tier.capacity is not None else 0
        self.catalog.add([(rec, toks) for rec, toks, _, _ in entries], tier.slot, owed, room=room)
        if room:
            reservation[0] = 0  # given back by the transaction that counted the chunks
            with self._room:
                self._room.notify_all()
        for rec, toks, path, buf in entries:
            if rest:
                self._writeback.submit(
                    WriteJob(path, buf, list(rest),
                             lambda ti, rec=rec, toks=toks: self.catalog.add([(rec, toks)], self.tiers[ti].slot),
                             release=recyclable)
                )
            elif recyclable:
                _buffers.release(buf)

    def _record_written(self, tier: Tier, entries: list, rest: list[int]) -> None:
        """A batch write failed part-way (a full disk, an I/O error): record the chunks already in place.

        Backends put each key atomically (a file renamed into place, an object
        PUT, one LMDB transaction for the batch), so a chunk present with its
        encoded size is complete. Recording it (and queueing its copies to the
        tiers below, as for any chunk written) keeps the tier's space
        accounting true, leaves it evictable and lets a retry skip it; the
        original error is still raised. Reads verify such a chunk like any other.
        """
        try:
            done = []
            for entry in entries:
                info = tier.backend.stat(entry[2])
                if info is not None and info.size == len(entry[3]):
                    done.append(entry)
            if done:
                self._written(tier, done, rest, recyclable=False)
        except Exception as e:  # noqa: BLE001 - the write's own error is the one to raise
            log.warning("kvfs: after a failed batch write to %s, recording the chunks already written failed: %s",
                        tier.url.redacted(), e)

    def _writeback_one(self, job: WriteJob, tier_index: int) -> bool:
        """Copy a queued chunk into a lower tier and record it there (returns True: recorded)."""
        tier = self.tiers[tier_index]
        if not self._make_room(tier, job.nbytes):
            if tier_index < len(self.tiers) - 1 and self._copied_below(job, tier_index):
                # a cache tier with no room (full of pinned chunks, or of chunks not yet copied down) is passed
                # over, as a put passes it over for the next tier: the chunk is in (or on its way to) a tier
                # below, so nothing is owed to this one (else every flush() would report it, forever)
                self.catalog.forgive([key_of_path(job.path)], tier.bit)
                log.debug("kvfs: %s not copied to %s: full", job.path, tier.url.redacted())
                return True
            raise NoSpace(f"tier {tier.url.redacted()} is full and nothing in it can be evicted (pinned, or not yet "
                          "copied to a lower tier, or its room is held by writes in flight)")
        reservation = [job.nbytes]
        try:
            nsp = key_of_path(job.path).rsplit("/", 1)[0]
            spec = self.spec_of(nsp)
            if spec is not None:
                self._ensure_manifest(spec, tier_index)
            tier.backend.put(job.path, job.data)
            job.on_written(tier_index)  # counted in the tier's usage before its reservation goes
        finally:
            self._release_room(tier, reservation)
        return True

    def _copied_below(self, job: WriteJob, tier_index: int) -> bool:
        """Whether a queued chunk is written to a tier below ``tier_index`` after it, or recorded there."""
        if any(ti > tier_index for ti in job.targets):
            return True
        rec = self.catalog.get(key_of_path(job.path))
        return rec is not None and any(rec.tiers & t.bit for t in self.tiers[tier_index + 1 :])

    def _release_room(self, tier: Tier, reservation: list[int]) -> None:
        """Give back the room :meth:`_make_room` reserved (once; ``reservation`` is emptied)."""
        n = reservation[0] if reservation else 0
        if not n or tier.capacity is None:
            return
        reservation[0] = 0
        with self._room:
            n += self._unreleased.pop(tier.index, 0)
        try:
            self.catalog.release(tier.slot, n)
        except Exception as e:  # noqa: BLE001 - the catalog cannot be written (full, closed): never hides the
            # write's own error; the room is given back with this process's next release that works
            with self._room:
                self._unreleased[tier.index] = self._unreleased.get(tier.index, 0) + n
            log.warning("kvfs: could not give back %d bytes of room reserved in %s: %s", n, tier.url.redacted(), e)
            return
        with self._room:
            self._room.notify_all()

    def _make_room(self, tier: Tier, incoming: int, *, wait: bool = True) -> bool:
        """Evict LRU unpinned chunks from ``tier`` down to its watermark if ``incoming`` would overflow it.

        On ``True`` the ``incoming`` bytes are reserved in the tier for the caller, who gives them back with
        :meth:`_release_room` once its chunks are recorded: writers running side by side (threads, the
        write-back, other processes on the node sharing the catalog) then never count the same free space
        twice, and the tier stays within its capacity. ``wait``: when the room is held by such writes in
        flight, wait (a while) for them to be recorded and evict again, rather than answer ``False`` (for a
        write that has no other tier to go to).
        """
        if tier.capacity is None:
            return True
        if incoming > tier.capacity:
            return False
        deadline = time.monotonic() + ROOM_WAIT_S
        while True:
            if self.catalog.reserve(tier.slot, incoming, tier.capacity):
                return True  # the common case: no eviction, one short catalog transaction
            with self._evict_lock:  # one eviction at a time in this process (the catalog orders processes)
                freed = self._evict_for(tier, incoming, self.catalog.reserved(tier.slot))
            if self.catalog.reserve(tier.slot, incoming, tier.capacity):
                return True
            if freed and time.monotonic() < deadline:
                continue  # other writes took the room it made or found (and are recorded): evict again
            if not wait or not self.catalog.reserved(tier.slot) or time.monotonic() >= deadline:
                return False
            # the rest of the room is held by writes in flight: once they are recorded, their chunks (or older
            # ones) can be evicted in turn (a release in this process wakes this; other processes' are polled)
            with self._room:
                self._room.wait(max(0.0, min(0.25, deadline - time.monotonic())))

    def _evict_for(self, tier: Tier, incoming: int, reserved: int) -> int:
        """Under the eviction lock: evict down to the watermark, leaving room for ``incoming`` bytes besides the
        ``reserved`` ones, if they do not fit; returns the bytes freed (``-1``: it fits, nothing to evict)."""
        used = self.catalog.used(tier.slot)
        if used + reserved + incoming <= tier.capacity:
            return -1
        target = max(0, int(tier.capacity * tier.watermark) - incoming - reserved)
        lower = 0
        for t in self.tiers[tier.index + 1 :]:
            lower |= t.bit
        last = tier.index == len(self.tiers) - 1
        candidates = [r for r in self.catalog.scan() if r.tiers & tier.bit and r.pins == 0
                      and (last or r.tiers & lower)]
        candidates.sort(key=lambda r: r.last_access)
        victims = []
        for r in candidates:
            if used <= target:
                break
            victims.append(r)
            used -= r.size
        if victims:
            kept = self._drop_from_tier(tier, victims, keep_pinned=True)
            victims = [r for r in victims if r.key not in kept]
        return sum(r.size for r in victims)

    def _drop_from_tier(self, tier: Tier, records: Sequence[ChunkRecord], *, keep_pinned: bool = False) -> set[str]:
        """Remove chunks from a tier; ``keep_pinned``: leave those pinned since they were chosen (an eviction
        picks its victims from a scan: a pin taken meanwhile must hold). Returns the keys left for their pins."""
        kept: list[str] | None = [] if keep_pinned else None
        # catalog first: a crash in between leaves an orphan (fsck finds it), never a dangling entry
        self.catalog.remove_from([r.key for r in records], tier.slot, kept=kept)
        kept_keys = set(kept or ())
        paths = [r.path for r in records if r.key not in kept_keys]
        for p in paths:
            self._headers.pop(p, None)
        if paths:
            tier.backend.delete_many(paths)
        return kept_keys

    # ---------------------------------------------------------------------------------- integrity
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    def _quarantine(self, tier: Tier, path: str, reason: str | BaseException,
                    header: ChunkHeader | None = None) -> bool:
        """A chunk failed its checks: drop it from the tier and the catalog, and say so once.

        A chunk in a newer format is only a miss: a newer kvfs wrote it, and it is kept for it.
        A read-only store reports and deletes nothing. ``header``: the header the failed check used,
        when it was not parsed from the bytes that failed (a cached one): if the chunk now there has
        another header, it was replaced since (evicted and stored again, by this process or another,
        with other bytes: recomputed KV need not be bit-identical), and the new chunk is left alone:
        the read is only a miss. Returns whether that was the case (nothing quarantined).
        """
        self._headers.pop(path, None)
        if header is not None and not isinstance(reason, UnsupportedVersion):
            now = self._header_in(tier, path)
            if now is not None and now.metadata.get("meta_checksum") != header.metadata.get("meta_checksum"):
                log.debug("kvfs: chunk %s in %s was replaced while read", path, tier.url.redacted())
                return True
        if isinstance(reason, UnsupportedVersion):
            self._warn_once(f"v:{path}", f"kvfs: chunk {path} in {tier.url.redacted()} is in a newer format "
                                         f"({reason}); treated as a miss and left in place")
            return False
        if isinstance(reason, SignatureError):
            # a miss, never deleted: the chunk may be good for the nodes that wrote it (a node given another key
            # would otherwise delete every chunk it reads from a shared bucket). It stays in the catalog (space,
            # eviction, ls); this store's lookups no longer count it and a put of the same chunk replaces it
            self._warn_once(f"sig:{tier.index}", f"kvfs: chunk {path} in {tier.url.redacted()} has no valid "
                            f"signature for this store's key ({reason}); treated as a miss and left in place (a "
                            "put of the same tokens replaces it). If every chunk fails so, this node's signing key "
                            "is not the one the chunks were written with: check $KVFS_SIGNING_KEY")
            log.debug("kvfs: chunk %s in %s: %s", path, tier.url.redacted(), reason)
            with self._lock:
                self._unsigned[path] = self._unsigned.get(path, 0) | tier.bit
                self._unsigned.move_to_end(path)
                while len(self._unsigned) > UNSIGNED_REMEMBERED:
                    self._unsigned.popitem(last=False)
            return False
        reason = str(reason)
        if self.read_only:
            self._warn_once(f"q:{path}", f"kvfs: chunk {path} in {tier.url.redacted()} failed its checks "
                                         f"({reason}); treated as a miss (read-only store: left in place)")
            return False
        self._warn_once(f"q:{path}", f"kvfs: chunk {path} in {tier.url.redacted()} failed its checks ({reason}); "
                                     "quarantined, treated as a miss")
        try:
            self.catalog.remove_from([key_of_path(path)], tier.slot)
            self.catalog.quarantine(path, reason, tier.url.redacted())
            tier.backend.delete_many([path])
        except OSError as e:
            self._warn_once(f"qfail:{path}", f"kvfs: could not remove corrupt chunk {path}: {e}")
        return False

    # ---------------------------------------------------------------------------------- the virtual namespace
    @staticmethod
    def _split(path: str) -> list[str]:
        if not isinstance(path, str):
            raise InvalidInput(f"a path is a string, got {type(path).__name__}")
        if "\x00" in path:
            raise InvalidInput("paths cannot contain NUL bytes")
        parts = [p for p in path.strip().strip("/").split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise InvalidInput(f"path {path!r}: '.' and '..' are not allowed in kvfs paths")
        if any(len(p.encode("utf-8", "surrogateescape")) > 255 for p in parts):
            raise InvalidInput(f"path {path[:60]!r}...: a component is longer than 255 bytes")
        if len(parts) > 4:
            raise NotFound(path, "kvfs paths are <model>/<namespace>/<hh>/<hash>.safetensors")
        return parts

    def _tier_names(self, mask: int) -> tuple[str, ...]:
        return tuple(t.url.redacted() for t in self.tiers if mask & t.bit)

    def _entry(self, rec: ChunkRecord) -> Entry:
        return Entry(rec.path, "chunk", rec.size, rec.ntokens, rec.pins, rec.last_access, rec.created, rec.hits,
                     self._tier_names(rec.tiers))

    def _all_namespaces(self) -> list[str]:
        names = set(self.catalog.namespaces())
        names.update(r.namespace for r in self._scan_unique_namespaces())
        return sorted(names)

    def _scan_unique_namespaces(self):
        seen = set()
        for r in self.catalog.scan():
            if r.namespace not in seen:
                seen.add(r.namespace)
                yield r

    def records(self, path: str = "") -> list[ChunkRecord]:
        """Catalog records of every chunk at or under ``path``."""
        parts = self._split(path)
        if len(parts) == 4:
            rec = self.catalog.get(key_of_path("/".join(parts)))
            if rec is None or not parts[3].startswith(parts[2]):
                raise NotFound(path)
            return [rec]
        if len(parts) == 3:
            if parts[2] == MANIFEST_NAME:
                return []
            return [r for r in self.catalog.scan(f"{parts[0]}/{parts[1]}/{parts[2]}")]
        prefix = "/".join(parts) + "/" if parts else ""
        return self.catalog.scan(prefix)

    def ls(self, path: str = "", recursive: bool = False) -> list[Entry]:
        """List a directory of the namespace: models, a model's namespaces, a namespace, a shard."""
        self._check_open()
        parts = self._split(path)
        if recursive:
            if len(parts) == 4 or len(parts) == 3 and parts[2] == MANIFEST_NAME:
                return [self.stat(path)]
            recs = self.records(path)
            out = [self._entry(r) for r in recs]
            if len(parts) <= 2:  # manifests live in namespaces, not in shards
                under = "/".join(parts)
                nss = {r.namespace for r in recs} | {
                    n for n in self.catalog.namespaces() if not under or n == under or n.startswith(under + "/")
                }
                out += [Entry(f"{n}/{MANIFEST_NAME}", "manifest", len(self.catalog.manifest(n) or b""))
                        for n in sorted(nss) if self.catalog.manifest(n) is not None]
            return sorted(out, key=lambda e: e.path)
        if len(parts) == 0:
            groups: dict[str, list[ChunkRecord]] = {}
            for n in self._all_namespaces():
                groups.setdefault(n.split("/")[0], [])
            for r in self.catalog.scan():
                groups.setdefault(r.namespace.split("/")[0], []).append(r)
            return [self._dir_entry(m, "model", recs) for m, recs in sorted(groups.items())]
        if len(parts) == 1:
            groups = {n: [] for n in self._all_namespaces() if n.split("/")[0] == parts[0]}
            for r in self.catalog.scan(parts[0] + "/"):
                groups.setdefault(r.namespace, []).append(r)
            if not groups:
                raise NotFound(path, "see `kvfs ls` for the models stored")
            return [self._dir_entry(n, "namespace", recs) for n, recs in sorted(groups.items())]
        if len(parts) == 2:
            nsp = "/".join(parts)
            recs = self.catalog.scan(nsp + "/")
            if not recs and self.catalog.manifest(nsp) is None:
                raise NotFound(path)
            shards: dict[str, list[ChunkRecord]] = {}
            for r in recs:
                shards.setdefault(r.hex[:2], []).append(r)
            out = []
            if self.catalog.manifest(nsp) is not None:
                out.append(Entry(f"{nsp}/{MANIFEST_NAME}", "manifest", len(self.catalog.manifest(nsp))))
            out += [self._dir_entry(f"{nsp}/{s}", "shard", rs) for s, rs in sorted(shards.items())]
            return out
        if len(parts) == 3:
            if parts[2] == MANIFEST_NAME:
                return [self.stat(path)]
            recs = self.catalog.scan(f"{parts[0]}/{parts[1]}/{parts[2]}")
            if not recs:
                raise NotFound(path)
            return [self._entry(r) for r in recs]
        return [self.stat(path)]

    def _dir_entry(self, path: str, kind: str, recs: Sequence[ChunkRecord]) -> Entry:
        mask = 0
        for r in recs:
            mask |= r.tiers
        return Entry(
            path,
            kind,
            sum(r.size for r in recs),
            sum(r.ntokens for r in recs),
            sum(1 for r in recs if r.pins),
            max((r.last_access for r in recs), default=None),
            min((r.created for r in recs), default=None),
            sum(r.hits for r in recs),
            self._tier_names(mask),
            len(recs),
        )

    def stat(self, path: str) -> Entry:
        """What the catalog knows of one path (chunk, manifest, shard, namespace or model)."""
        self._check_open()
        parts = self._split(path)
        if len(parts) == 4:
            return self._entry(self.records(path)[0])
        if len(parts) == 3 and parts[2] == MANIFEST_NAME:
            m = self.catalog.manifest(f"{parts[0]}/{parts[1]}")
            if m is None:
                raise NotFound(path)
            return Entry("/".join(parts), "manifest", len(m))
        if not parts:
            recs = self.catalog.scan()
            return self._dir_entry("", "root", recs)
        kind = {1: "model", 2: "namespace", 3: "shard"}[len(parts)]
        recs = self.records(path)
        if not recs and not (len(parts) == 2 and self.catalog.manifest("/".join(parts)) is not None) and not (
            len(parts) == 1 and any(n.startswith(parts[0] + "/") for n in self.catalog.namespaces())
        ):
            raise NotFound(path)
        return self._dir_entry("/".join(parts), kind, recs)

    def info(self, path: str, verify: bool = False) -> dict[str, Any]:
        """Everything known about a path: catalog entry, and for chunks the header (and checksum state)."""
        entry = self.stat(path)
        out = entry.to_dict()
        parts = self._split(path)
        if entry.kind == "namespace" or entry.kind == "manifest":
            nsp = "/".join(parts[:2])
            m = self.catalog.manifest(nsp)
            out["manifest"] = json.loads(m) if m else None
            if m:
                out["bytes_per_token"] = KVSpec.from_manifest(bytes(m)).bytes_per_token
        if entry.kind == "chunk":
            rec = self.records(path)[0]
            out["parent"] = rec.parent
            out["segment"] = rec.segment
            out["start"] = rec.start
            from .chunk import describe

            try:
                data = self.cat(path) if verify else None
                header = parse_header(data) if data is not None else self._read_header(path)
                out["header"] = describe(header)
                out["checksum"] = "verified" if verify else "not verified (use --verify)"
            except (ChunkFormatError, NotFound) as e:
                out["header"] = None
                out["checksum"] = f"failed: {e}"
        return out

    def _header_in(self, tier: Tier, path: str) -> ChunkHeader | None:
        """The header of the chunk at ``path`` in ``tier`` as it is now; None if gone or not parseable."""
        try:
            got = read_header(tier.backend, path)
        except (OSError, ChunkFormatError):
            return None
        return None if got is None else got[0]

    def _read_header(self, path: str) -> ChunkHeader:
        rec = self.catalog.get(key_of_path(path))
        for t in self.tiers:
            if rec is not None and not rec.tiers & t.bit and not t.shared:
                continue
            try:
                got = read_header(t.backend, path)
            except OSError:
                continue
            if got is not None:
                return got[0]
        raise NotFound(path)

    def cat(self, path: str) -> bytes:
        """The bytes of a chunk file (verified) or of a namespace's ``manifest.json``.

        :class:`NotFound` if no tier holds it; if every copy fails its checks, the
        :class:`ChunkFormatError` (``IntegrityError``...) of the first, naming the tier (the bad copies
        are quarantined unless the store is read-only); if no tier had a good copy and one could not be
        read (a server down), that tier's ``OSError``.
        """
        self._check_open()
        parts = self._split(path)
        if len(parts) == 3 and parts[2] == MANIFEST_NAME:
            m = self.catalog.manifest(f"{parts[0]}/{parts[1]}") or self._read_manifest_from_tiers(
                f"{parts[0]}/{parts[1]}")
            if m is None:
                raise NotFound(path)
            return bytes(m)
        if len(parts) != 4:
            raise IsADirectoryError(errno.EISDIR, f"{path!r} is a directory, not a chunk")
        path = "/".join(parts)
        nsp = f"{parts[0]}/{parts[1]}"
        spec = self.spec_of(nsp)
        if spec is None:
            # without the manifest a chunk cannot be checked: an error, not a reason to delete it
            raise NotFound(path, f"namespace {nsp} has no {MANIFEST_NAME} in any tier of this store, so its chunks "
                                 f"cannot be checked: copy {nsp}/{MANIFEST_NAME} from the store that wrote them "
                                 "(`kvfs cp`), then run `kvfs fsck`")
        rec = self.catalog.get(key_of_path(path))
        failure: ChunkFormatError | None = None
        unreadable: OSError | None = None
        for t in self.tiers:
            if rec is not None and not rec.tiers & t.bit and not t.shared:
                continue
            try:
                data = t.backend.get(path)
            except OSError as e:
                self._warn_once(f"read:{t.index}", f"kvfs: reading {path} from {t.url.redacted()} failed: {e}")
                unreadable = unreadable or e
                continue
            if data is None:
                continue
            data = bytes(data)
            try:
                self.validate_chunk(data, path, spec)
            except ChunkFormatError as e:
                self._quarantine(t, path, e)
                if failure is None:
                    # what the caller is told when no tier has a good copy: the reason, not "no such chunk"
                    kept = self.read_only or isinstance(e, (UnsupportedVersion, SignatureError))
                    failure = type(e)(f"{path} in {t.url.redacted()} failed its checks: {e}"
                                      + ("" if kept else " (quarantined)"))
                continue
            return data
        if failure is not None:
            raise failure
        if unreadable is not None:
            # a tier that could not be read may hold it: its error (a server down, access denied), not "no such
            # chunk" (`kvfs cp` would report every chunk of an unreachable source as missing)
            raise unreadable
        raise NotFound(path)

    def validate_chunk(self, data, path: str, spec: KVSpec | None = None, *,
                       check_signature: bool = True) -> ChunkHeader:
        """Check that ``data`` is a whole, valid chunk that belongs at ``path``; raise ChunkFormatError if not."""
        parts = self._split(path)
        if len(parts) != 4 or not parts[3].endswith(".safetensors"):
            raise ChunkFormatError(f"{path!r} is not a chunk path (<model>/<ns>/<hh>/<hash>.safetensors)")
        hexd = parts[3][: -len(".safetensors")]
        if len(hexd) != 2 * DIGEST_SIZE or parts[2] != hexd[:2]:
            raise ChunkFormatError(f"{path!r}: the file name must be the chunk's 64-hex key inside its 2-hex shard")
        header = parse_header(data)
        spec = spec or self.spec_of(f"{parts[0]}/{parts[1]}")
        if spec is None:
            raise ChunkFormatError(f"{path!r}: namespace {parts[0]}/{parts[1]} is unknown (no manifest)")
        check_expected(header, spec, key=hexd, path=path)
        self._check_key_chain(spec, header, path)
        _check_prefix_positions(header, path)
        mv = memoryview(data)
        verify_data(header, mv[header.data_offset :])
        out = np.empty(header.shape, dtype=_RAW[spec.itemsize])
        copy_verified(header, mv[header.data_offset :], out)  # per-layer sums too
        if self.signer is not None and check_signature:
            self.signer.verify(header, path)
        return header

    def held(self, paths: Sequence[str]) -> list[bool]:
        """Whether each chunk is known to the catalog *and* its copy is confirmed by a backend.

        Catalog entries whose copy is gone (evicted by another node from a
        shared tier, deleted by hand) are dropped, as a read miss would drop
        them, so that :meth:`import_chunk` writes those chunks again
        (``kvfs cp`` skips only what is really there).
        """
        self._check_open()
        paths = list(paths)
        keys = [key_of_path(p) for p in paths]
        recs = self.catalog.get_many(keys)
        out = [False] * len(paths)
        for t in self.tiers:
            idx = [i for i, r in enumerate(recs) if not out[i] and r is not None and r.tiers & t.bit]
            if not idx:
                continue
            found = t.backend.exists_many([paths[i] for i in idx])
            stale = [keys[i] for i, ok in zip(idx, found) if not ok]
            for i, ok in zip(idx, found):
                out[i] = out[i] or bool(ok)
            if stale and not self.read_only:
                self.catalog.remove_from(stale, t.slot)
        return out

    def import_chunk(self, path: str, data, *, manifest: bytes | None = None, resign: bool = False) -> bool:
        """Store a chunk file's bytes at ``path`` after full validation. ``False`` if already stored.

        ``manifest``: the namespace's manifest if this store does not know it
        yet (``kvfs cp`` passes the source's). ``resign``: the caller vouches
        for the chunk (it verified it in its source, with the source's key if
        any); a store with a signing key then signs it with its own key
        instead of requiring the signature it came with.
        """
        self._check_writable()
        parts = self._split(path)
        if len(parts) != 4:
            raise ChunkFormatError(f"{path!r} is not a chunk path")
        nsp = f"{parts[0]}/{parts[1]}"
        spec = self.spec_of(nsp)
        if spec is None and manifest is not None:
            spec = KVSpec.from_manifest(manifest)
            if spec.path != nsp:
                raise ChunkFormatError(f"manifest describes {spec.path}, not {nsp}")
            self._specs[nsp] = spec
        resigning = resign and self.signer is not None
        header = self.validate_chunk(data, path, spec, check_signature=not resigning)
        rec = self.catalog.get(key_of_path("/".join(parts)))
        if self._held_bits(rec):
            return False
        if resigning:
            try:
                self.signer.verify(header, path)  # already signed with this store's key: keep the bytes
            except IntegrityError:
                data = resign_chunk(data, spec or self.spec_of(nsp), self.signer)
        self._write_new([self._entry_of(header, nsp, "/".join(parts), bytes(data))])
        return True

    # ---------------------------------------------------------------------------------- pins and eviction
    def pin(self, path: str = "", *, unpin: bool = False, all_pins: bool = False) -> int:
        """Pin every chunk at or under ``path`` (one more pin each); returns how many chunks changed."""
        self._check_writable()
        recs = self.records(path)
        if not recs:
            raise NotFound(path, "nothing stored there to pin")
        changed = self.catalog.pin([r.key for r in recs], -1 if unpin else 1, reset=all_pins and unpin)
        return len(changed)

    def unpin(self, path: str = "", *, all_pins: bool = False) -> int:
        return self.pin(path, unpin=True, all_pins=all_pins)

    def evict(
        self,
        paths: Iterable[str] = (),
        *,
        all: bool = False,  # noqa: A002 - mirrors the CLI flag
        to_size: int | str | None = None,
        older_than: float | str | None = None,
        force: bool = False,
        dry_run: bool = False,
        tier: int | None = None,
    ) -> EvictResult:
        """Remove chunks from every tier (or only ``tier``). Pinned chunks are refused unless ``force``.

        Selection: explicit paths (chunks or directories), ``all``, those not
        read for ``older_than`` (``"7d"``), or least-recently-used ones until
        the store holds at most ``to_size`` (``"100GiB"``).

        With ``tier``, a chunk whose only copy is in that tier and which is still owed to another tier (its
        write-back failing, or in flight in another process) is kept and listed in ``not_copied``: evicting it
        there would lose it. Evicting from every tier removes it.
        """
        self._check_open()
        if not dry_run:
            self._check_writable()
        paths = [paths] if isinstance(paths, str) else list(paths)
        if not (paths or all or to_size is not None or older_than is not None):
            raise InvalidInput("say what to evict: paths, all=True, to_size=... or older_than=...")
        for p in paths:
            if not isinstance(p, str):
                raise InvalidInput(f"paths are strings (chunk or directory paths), got {type(p).__name__}")
            if not p.strip().strip("/"):  # "" or "/": an unset variable, not a request to empty the store
                raise InvalidInput(f"path {p!r} is the whole store; to evict every chunk pass all=True")
        if tier is not None and not 0 <= tier < len(self.tiers):
            raise InvalidInput(f"tier {tier} does not exist (this store has {len(self.tiers)})")
        if not dry_run:
            # copies still queued for the tiers below land first: else one landing after the eviction would be
            # recorded again (an evicted chunk back in a lower tier), and evicting only an upper tier would
            # find no lower copy yet
            self._writeback.flush(take_errors=False)
        chosen: dict[str, ChunkRecord] = {}
        for p in paths:
            for r in self.records(p):
                chosen[r.key] = r
        if all:
            for r in self.catalog.scan():
                chosen[r.key] = r
        if older_than is not None:
            cutoff = time.time() - parse_duration(older_than)
            for r in self.catalog.scan():
                if r.last_access < cutoff:
                    chosen[r.key] = r
        if to_size is not None:
            limit = parse_size(to_size, "to_size")
            recs = sorted(self.catalog.scan(), key=lambda r: r.last_access)
            total = sum(r.size for r in recs)
            passed = []
            for r in recs:
                if total <= limit:
                    break
                if r.pins and not force:
                    passed.append(r)
                    continue
                chosen[r.key] = r
                total -= r.size
            if total > limit:  # the pinned chunks are what keeps the store above the size: refused, and said
                for r in passed:
                    chosen[r.key] = r
        result = EvictResult(dry_run=dry_run)
        victims = []
        tiers = self.tiers if tier is None else [self.tiers[tier]]
        others = self.mask & ~sum(t.bit for t in tiers)
        owed = {k for k, bits, _pid in self.catalog.owed() if bits & others} if others and chosen else set()
        for r in chosen.values():
            if not any(r.tiers & t.bit or t.shared for t in tiers):
                continue  # not in the tier(s) evicted from: nothing to remove, nothing to report
            if r.key in owed and not r.tiers & others:
                result.not_copied.append(r.path)  # its only copy: evicting it from here would lose it
            elif r.pins and not force:
                result.refused.append(r.path)
            else:
                victims.append(r)
                result.evicted.append(r.path)
                result.freed_bytes += r.size
        if dry_run or not victims:
            return result
        kept: set[str] = set()
        for t in tiers:
            held = [r for r in victims if r.tiers & t.bit or t.shared]
            if held:
                kept |= self._drop_from_tier(t, held, keep_pinned=not force)
        if kept:  # pinned since they were chosen: left in place (in every tier it reached after the pin)
            for r in victims:
                if r.key in kept:
                    result.evicted.remove(r.path)
                    result.refused.append(r.path)
                    result.freed_bytes -= r.size
        return result

    # ---------------------------------------------------------------------------------- usage
    def du(self, path: str = "") -> dict[str, Any]:
        """Bytes and tokens per model, namespace and tier at or under ``path``."""
        recs = self.records(path)
        out: dict[str, Any] = {"path": path.strip("/"), "bytes": 0, "tokens": 0, "chunks": 0, "models": {},
                               "tiers": {}}
        for t in self.tiers:
            out["tiers"][t.url.redacted()] = {"bytes": 0, "chunks": 0, "capacity": t.capacity}
        for r in recs:
            model, ns = r.namespace.split("/", 1)
            out["bytes"] += r.size
            out["tokens"] += r.ntokens
            out["chunks"] += 1
            m = out["models"].setdefault(model, {"bytes": 0, "tokens": 0, "chunks": 0, "namespaces": {}})
            m["bytes"] += r.size
            m["tokens"] += r.ntokens
            m["chunks"] += 1
            n = m["namespaces"].setdefault(ns, {"bytes": 0, "tokens": 0, "chunks": 0})
            n["bytes"] += r.size
            n["tokens"] += r.ntokens
            n["chunks"] += 1
            for t in self.tiers:
                if r.tiers & t.bit:
                    out["tiers"][t.url.redacted()]["bytes"] += r.size
                    out["tiers"][t.url.redacted()]["chunks"] += 1
        return out

    def usage(self) -> list[dict[str, Any]]:
        """Per tier: bytes used by chunks (catalog), capacity, and the device's free space where known."""
        out = []
        for t in self.tiers:
            used_dev, avail = t.backend.usage()
            out.append({"tier": t.url.redacted(), "used": self.catalog.used(t.slot), "capacity": t.capacity,
                        "device_used": used_dev, "available": avail})
        return out

    # ---------------------------------------------------------------------------------- maintenance
    def fsck(self, *, verify: bool = False, repair: bool = True) -> FsckReport:
        """Rebuild the catalog from what the tiers hold; optionally verify every chunk's checksums.

        Pins, access times and hit counts of chunks still present are kept.
        Corrupt and foreign chunks are quarantined when ``repair``.
        """
        self._check_open()
        if repair:
            self._check_writable()
        report = FsckReport()
        known = {r.key: r for r in self.catalog.scan()}
        present: dict[str, int] = {}
        info: dict[str, tuple[ChunkHeader, int]] = {}
        failed: dict[str, int] = {}  # catalog key -> tiers whose copy was reported failing (not stale as well)
        listings: list[tuple[Tier, list[str]]] = []
        for t in self.tiers:
            try:
                listings.append((t, list(t.backend.list(""))))
            except OSError as e:
                raise StoreError(e.errno or errno.EIO, f"fsck cannot list {t.url.redacted()}: {e}") from e
        # manifests first (from every tier): a chunk is judged against its namespace's manifest
        for t, keys in listings:
            for k in keys:
                if not (k.endswith("/" + MANIFEST_NAME) and k.count("/") == 2):
                    continue
                nsp = k.rsplit("/", 1)[0]
                raw = t.backend.get(k)
                try:
                    spec = KVSpec.from_manifest(bytes(raw)) if raw is not None else None
                except InvalidInput:
                    spec = None
                if spec is None or spec.path != nsp:
                    report.orphans.append(f"{t.index}:{k}")
                    continue
                if repair:
                    self.catalog.register_namespace(nsp, spec.manifest_bytes())
                self._specs.setdefault(nsp, spec)
        for t, keys in listings:
            for k in keys:
                if k.endswith("/" + MANIFEST_NAME) and k.count("/") == 2:
                    continue
                parts = k.split("/")
                if len(parts) != 4 or not parts[3].endswith(".safetensors"):
                    report.orphans.append(f"{t.index}:{k}")
                    continue
                spec = self.spec_of(f"{parts[0]}/{parts[1]}")
                if spec is None:
                    # no manifest anywhere: nothing to judge the chunk by; report it, never delete it
                    report.unmanifested.append(f"{t.index}:{k}")
                    continue
                problem = None
                try:
                    if verify:
                        data = t.backend.get(k)
                        if data is None:
                            continue
                        header = self.validate_chunk(bytes(data), k, spec)
                        size = len(data)
                    else:
                        header = self._read_header_from(t, k)
                        size = (t.backend.stat(k) or None)
                        size = size.size if size else header.file_size
                        check_expected(header, spec, key=parts[3][: -len(".safetensors")], path=k)
                        if size != header.file_size:
                            raise ChunkFormatError(f"{k} is {size} bytes, header says {header.file_size}")
                except ForeignChunk as e:
                    problem = ("foreign", e)
                except UnsupportedVersion as e:
                    problem = ("newer", e)
                except SignatureError as e:
                    # well formed, only not signed with this store's key: left in place and kept in the catalog
                    # (space, eviction), never served here
                    report.unsigned.append(f"{t.index}:{k}")
                    self._quarantine(t, k, e)
                    header, size = parse_header(memoryview(bytes(data))), len(data)
                except ChunkFormatError as e:
                    problem = ("corrupt", e)
                if problem is not None:
                    {"foreign": report.foreign, "newer": report.newer, "corrupt": report.corrupt}[problem[0]].append(
                        f"{t.index}:{k}")
                    if problem[0] != "newer":  # (quarantined with repair: reported once, as what it is)
                        failed[key_of_path(k)] = failed.get(key_of_path(k), 0) | t.bit
                    if repair:
                        self._quarantine(t, k, problem[1])
                    continue
                ck = key_of_path(k)
                present[ck] = present.get(ck, 0) | t.bit
                info[ck] = (header, size)
        report.chunks = len(present)
        report.namespaces = len({k.rsplit("/", 1)[0] for k in present})
        now = time.time()
        for ck, mask in present.items():
            header, size = info[ck]
            rec = known.get(ck)
            missing_bits = mask & ~(rec.tiers if rec else 0)
            if rec is None or missing_bits:
                report.added.append(ck)
            elif rec.size != size:
                report.size_fixed += 1
            if not repair:
                continue
            if rec is None:
                rec = ChunkRecord(ck, size, header.num_tokens, header.start, now, now, 0, 0, 0,
                                  header.kind == "segment", header.parent if header.kind == "prefix" else "")
            for t in self.tiers:
                if missing_bits & t.bit:
                    self.catalog.add([(rec, header.tokens if header.kind == "prefix" else None)], t.slot)
            if rec.size != size:
                self.catalog.set_size(ck, size)
        for ck, rec in known.items():
            stale_bits = rec.tiers & ~present.get(ck, 0) & ~failed.get(ck, 0)
            own = sum(t.bit for t in self.tiers)
            stale_bits &= own
            if stale_bits:
                report.stale.append(ck)
                if repair:
                    for t in self.tiers:
                        if stale_bits & t.bit:
                            self.catalog.remove_from([ck], t.slot)
        # the usage counters (du, capacity) against the records just checked: a counter that drifted (a crash
        # between two transactions, a bug) would otherwise keep a tier over its capacity or evicting early
        report.usage_fixed = self.catalog.recount_used([t.slot for t in self.tiers], repair=repair)
        return report

    def _read_header_from(self, tier: Tier, path: str) -> ChunkHeader:
        buf = bytearray(HEADER_PROBE)
        got = _readinto_ranges(tier.backend, path, [(0, buf)])
        if got is None:
            raise ChunkFormatError(f"{path} vanished")
        hlen = header_length(memoryview(buf)[: min(8, got[0])])
        if hlen > got[0]:
            buf = bytearray(hlen)
            got = _readinto_ranges(tier.backend, path, [(0, buf)])
            if got is None or got[0] < hlen:
                raise ChunkFormatError(f"{path} is truncated inside its header")
        return parse_header(memoryview(buf)[:hlen])

    def verify_chunks(self, path: str = "", *, quarantine: bool = False, progress=None) -> list[dict[str, Any]]:
        """Read and fully check every copy of every chunk at or under ``path``.

        Returns one entry per copy: ``{"path", "tier", "ok", "error", "problem"}``; ``problem`` is None for a
        good copy, else ``"corrupt"`` (failed its checks: removed with ``quarantine``), ``"unsigned"`` (no valid
        signature for this store's key: never removed), ``"newer"`` (a newer format: never removed),
        ``"missing"`` (the catalog lists it, the tier does not hold it) or ``"io"`` (could not be read).
        """
        self._check_open()
        out = []
        for rec in self.records(path):
            for t in self.tiers:
                if not rec.tiers & t.bit:
                    continue
                err = problem = None
                try:
                    data = t.backend.get(rec.path)
                    if data is None:
                        err, problem = "missing from the tier", "missing"
                    else:
                        self.validate_chunk(bytes(data), rec.path)
                except ChunkFormatError as e:
                    err = str(e)
                    problem = ("unsigned" if isinstance(e, SignatureError) else
                               "newer" if isinstance(e, UnsupportedVersion) else "corrupt")
                    if quarantine:
                        self._quarantine(t, rec.path, e)
                except OSError as e:
                    err, problem = f"I/O error: {e}", "io"
                out.append({"path": rec.path, "tier": t.url.redacted(), "ok": err is None, "error": err,
                            "problem": problem})
                if progress is not None:
                    progress(rec.size)
        return out

    def prefetch(self, paths: Iterable[str] = ("",), *, progress=None) -> dict[str, int]:
        """Bring chunks at or under ``paths`` into the fastest tier (verified on the way).

        Returns counts: ``{"fetched", "already", "failed", "bytes", "evicted"}``; ``evicted``: chunks
        fetched, then evicted again to make room for later ones (the fastest tier is smaller than the
        selection).
        """
        self._check_writable()
        paths = [paths] if isinstance(paths, str) else list(paths)
        recs: dict[str, ChunkRecord] = {}
        for p in paths:
            for r in self.records(p):
                recs[r.key] = r
        counts = {"fetched": 0, "already": 0, "failed": 0, "bytes": 0, "evicted": 0}
        top = self.tiers[0]
        fetched: list[str] = []
        down: set[int] = set()  # tiers that timed out or refused the connection: not asked again by this call
        wanted: list[ChunkRecord] = []
        for r in recs.values():
            if r.tiers & top.bit:
                counts["already"] += 1
                if progress is not None:
                    progress(r.size)
            else:
                wanted.append(r)
        # batches read side by side (a bucket answers one GET in tens of milliseconds: one at a time, a namespace
        # took that per chunk), bounded in bytes held at once
        batch: list[ChunkRecord] = []
        held = 0
        for i, r in enumerate(wanted):
            batch.append(r)
            held += r.size
            if held >= PREFETCH_BATCH_BYTES or len(batch) >= PREFETCH_BATCH_CHUNKS or i == len(wanted) - 1:
                self._prefetch_batch(batch, counts, fetched, down, progress)
                batch, held = [], 0
        if fetched:
            counts["evicted"] = sum(1 for rec in self.catalog.get_many(fetched)
                                    if rec is None or not rec.tiers & top.bit)
        return counts

    def _prefetch_batch(self, batch: list[ChunkRecord], counts: dict[str, int], fetched: list[str], down: set[int],
                        progress) -> None:
        """Fetch a batch of chunks from the lower tiers (one batched read per tier) into the tiers above."""
        pending = {r.key: r for r in batch}
        for t in self.tiers[1:]:
            if t.index in down:
                continue
            want = [r for r in pending.values() if r.tiers & t.bit or t.shared]
            if not want:
                continue
            try:
                datas = t.backend.get_many([r.path for r in want])
            except OSError as e:
                self._warn_once(f"read:{t.index}", f"kvfs: reading from {t.url.redacted()}: {e}")
                if isinstance(e, (TimeoutError, ConnectionError)):
                    # the tier itself is failing: every other batch would wait out the same deadline
                    # (hours for a namespace behind a server that stopped answering)
                    down.add(t.index)
                    continue
                datas = [self._get_or_none(t, r.path) for r in want]  # one key's error fails only that key
            for r, data in zip(want, datas):
                if data is None:
                    continue
                data = bytes(data)
                try:
                    header = self.validate_chunk(data, r.path)
                    self._headers[r.path] = header  # the chunk now in the tiers above (a replaced one, too)
                except ChunkFormatError as e:
                    self._quarantine(t, r.path, e)
                    continue
                self._write_new([self._entry_of(header, r.namespace, r.path, data)], tiers=list(range(t.index)))
                counts["fetched"] += 1
                counts["bytes"] += len(data)
                fetched.append(r.key)
                del pending[r.key]
            datas = data = None
        counts["failed"] += len(pending)
        if progress is not None:
            for r in batch:
                progress(r.size)

    def _get_or_none(self, t: Tier, path: str):
        try:
            return t.backend.get(path)
        except OSError as e:
            self._warn_once(f"read:{t.index}", f"kvfs: reading {path} from {t.url.redacted()}: {e}")
            return None

    def read_range(self, path: str, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset+size)`` of a chunk file from the first tier holding it (unverified)."""
        self._check_open()
        from kvfs.backends import ByteRange

        rec = self.catalog.get(key_of_path(path))
        for t in self.tiers:
            if rec is not None and not rec.tiers & t.bit and not t.shared:
                continue
            try:
                (data,) = t.backend.get_ranges([ByteRange(path, offset, offset + size)])
            except OSError as e:
                raise StoreError(e.errno or errno.EIO, f"reading {path}: {e}") from e
            if data is not None:
                return bytes(data)
        raise NotFound(path)


def _check_prefix_positions(header: ChunkHeader, path: str) -> None:
    """A prefix chunk is KV computed at its place in the prefix: its key does not include positions."""
    if header.kind == "prefix" and header.positions != header.start:
        raise IntegrityError(f"{path} was computed at positions from {header.positions}, not at its place in "
                             f"the prefix ({header.start})")


def _open_catalog(cat_dir: str | None, read_only: bool) -> Catalog:
    """The store's catalog; for a read-only store whose catalog directory cannot be written (a read-only
    filesystem), opened read-only, or a temporary one if it does not exist (lookups then find chunks in the
    tiers themselves)."""
    if not read_only or cat_dir is None:
        return Catalog(cat_dir)
    where = cat_dir
    while where and not os.path.isdir(where):
        where = os.path.dirname(where) if os.path.dirname(where) != where else ""
    if not where or not read_only_fs(where) and _may_write(where):
        return Catalog(cat_dir)
    if os.path.isdir(cat_dir) and read_only_fs(cat_dir):
        try:
            return Catalog(cat_dir, readonly=True)  # nothing can write there: read without LMDB's lock
        except (OSError, KVFSError) as e:  # e.g. an LMDB store never given a catalog (a lower tier elsewhere)
            reason = f"its catalog at {cat_dir} cannot be opened read-only ({e})"
    elif os.path.isdir(cat_dir):
        # another user's store: reading its catalog safely needs its lock file, which this user may not write
        reason = f"this user may not write its catalog's lock file at {cat_dir}"
    else:
        reason = f"it has no catalog at {cat_dir}, and none can be made there"
    log.warning("kvfs: the store is read-only here and %s: using a temporary catalog (lookups ask the storage "
                "itself)", reason)
    return Catalog(None)


def _may_write(path: str) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def _describes(raw: bytes, manifest: bytes) -> bool:
    """Whether the manifest bytes ``raw`` (any JSON formatting) describe the same namespace as ``manifest``."""
    try:
        return KVSpec.from_manifest(raw).manifest_bytes() == manifest
    except InvalidInput:
        return False


class _HeaderCache(dict):
    """A dict that forgets its least recently inserted entries beyond ``limit`` (thread-safe enough:
    a lost entry is only re-read)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        if len(self) > self.limit:
            try:
                for k in list(self)[: len(self) - self.limit + self.limit // 8]:
                    self.pop(k, None)
            except RuntimeError:  # resized by another thread while listing: trim next time
                pass


class _DirectReader:
    """Adapts a backend to ``readinto_ranges`` (native when the backend has it)."""

    def __init__(self, backend) -> None:
        self.backend = backend

    def readinto_ranges(self, key, parts):
        return _readinto_ranges(self.backend, key, parts)


def _guard(fn, *args):
    """Run a copy task; return None on success or a (status, error) pair for integrity failures."""
    try:
        fn(*args)
    except _Missing:
        return ("missing", None)
    except ChunkFormatError as e:
        return ("corrupt", e)
    except OSError as e:
        return ("error", e)
    return None
