"""The catalog: what this node's store holds, where, and how it is used.

An LMDB index per store (inside the store's LMDB environment when it has an
LMDB tier, else in a local directory) so that ``ls``, ``du``, lookups and
eviction never list a bucket, and nothing is forgotten on restart. Every
update is one LMDB transaction, shared safely by all processes on the node.

Named databases:

* ``kvfs.cat.chunks``    ``<model>/<ns-id>/<hex>`` -> packed :class:`ChunkRecord`
* ``kvfs.cat.children``  ``<model>/<ns-id>/<parent hex>/<first token>/<hex>`` -> token ids
  (finds stored chunks that extend a prefix by fewer tokens than a full chunk)
* ``kvfs.cat.ns``        ``<model>/<ns-id>`` -> manifest JSON
* ``kvfs.cat.meta``      tier slots (``tier/<identity>`` -> bit), bytes used per slot, and bytes reserved per
  slot and process for writes in flight (``room/<slot>/<pid>.<incarnation>``), so that processes sharing a
  tier with a capacity never count the same free space twice
* ``kvfs.cat.quarantine`` chunk path -> JSON reason (chunks that failed their checks)
* ``kvfs.cat.pending``   ``<model>/<ns-id>/<hex>`` -> tier slots a copy is still owed to, and the pid of the
  process that queued it (write-backs a crash or an outage lost are queued again: ``Store`` resyncs)

The catalog is an index, not the truth: a chunk it lists may have been
removed behind its back (a read then misses and fixes the entry), and
``Store.fsck`` rebuilds it from the backends.
"""

from __future__ import annotations

import binascii
import json
import logging
import os
import shutil
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import numpy as np

from . import _lmdbenv
from ._proc import process_alive as _alive

log = logging.getLogger("kvfs")

_REC = struct.Struct("<QIIddQIIB32s")
_U64 = struct.Struct("<Q")
_TIERS_AT = struct.calcsize("<QIIddQI")  # byte offset of the tiers bitmask in a packed record
_TIERS = struct.Struct("<I")
_FLAG_SEGMENT = 1
DB_CHUNKS = "kvfs.cat.chunks"
DB_CHILDREN = "kvfs.cat.children"
DB_NS = "kvfs.cat.ns"
DB_META = "kvfs.cat.meta"
DB_QUARANTINE = "kvfs.cat.quarantine"
DB_PENDING = "kvfs.cat.pending"
_PENDING = struct.Struct("<II")  # slots still owed a copy, pid of the process that queued the copy
_ROOM = struct.Struct("<Qd")  # bytes a process reserved in a tier for writes in flight, when it last changed
#: a reservation not changed for this long is left over by a process that died (or hung) mid-write; one whose
#: process is gone is dropped sooner. A write holds its reservation only until its chunks are recorded.
ROOM_STALE_S = 600.0
ROOM_DEAD_S = 30.0
MAX_TIERS = 32


def _new_incarnation() -> None:
    global _INCARNATION
    _INCARNATION = int.from_bytes(os.urandom(8), "little")


#: tells this process's reservations (``room/<slot>/<pid>.<incarnation>``) from those of another process with the
#: same pid: one that ran before (a container's server is pid 1 after every restart) and left some, or one in
#: another pid namespace; those age out as any other process's do
_new_incarnation()
os.register_at_fork(after_in_child=_new_incarnation)


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    key: str  # "<model>/<ns-id>/<hex>"
    size: int
    ntokens: int
    start: int
    created: float
    last_access: float
    hits: int
    pins: int
    tiers: int  # bitmask of catalog tier slots holding a copy
    segment: bool
    parent: str  # hex, "" for the first chunk of a chain

    @property
    def namespace(self) -> str:
        return self.key.rsplit("/", 1)[0]

    @property
    def hex(self) -> str:
        return self.key.rsplit("/", 1)[1]

    @property
    def path(self) -> str:
        h = self.hex
        return f"{self.namespace}/{h[:2]}/{h}.safetensors"

    def pack(self) -> bytes:
        return _REC.pack(
            self.size, self.ntokens, self.start, self.created, self.last_access, self.hits, self.pins,
            self.tiers, _FLAG_SEGMENT if self.segment else 0, bytes.fromhex(self.parent) if self.parent else b"",
        )

    @classmethod
    def unpack(cls, key: str, raw: bytes) -> "ChunkRecord":
        size, ntok, start, created, last, hits, pins, tiers, flags, parent = _REC.unpack(raw)
        return cls(key, size, ntok, start, created, last, hits, pins, tiers, bool(flags & _FLAG_SEGMENT),
                   parent.hex() if any(parent) else "")


def key_of_path(path: str) -> str:
    """``m/ns/hh/<hex>.safetensors`` -> catalog key ``m/ns/<hex>``."""
    ns, _, rest = path.rpartition("/")
    ns = ns.rpartition("/")[0]
    return f"{ns}/{rest.removesuffix('.safetensors')}"


def _enc(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _dec(b) -> str:
    return bytes(b).decode("utf-8", "surrogateescape")


def _room_key(slot: int) -> bytes:
    """This process's reservations in ``slot``."""
    return _enc(f"room/{slot}/{os.getpid()}.{_INCARNATION:016x}")


def _child_key(rec_key: str, parent: str, first_token: int) -> bytes:
    ns, _, hexd = rec_key.rpartition("/")
    return _enc(f"{ns}/{parent or '-'}/{first_token:08x}/{hexd}")


def _volatile(meta_key: bytes) -> bool:
    """A process-local (memory) tier's slot key: ``tier/memory://<name>#<pid>.<id>``. (A '#' alone is not
    enough: a directory's path may hold one.)"""
    return meta_key.startswith(b"tier/memory://") and b"#" in meta_key


class Catalog:
    """The per-store index. ``directory=None`` keeps it in a private temporary directory."""

    def __init__(self, directory: str | None, map_size: int | None = None, *, readonly: bool = False) -> None:
        self._tmp = None
        if directory is None:
            self._tmp = tempfile.mkdtemp(prefix="kvfs-catalog-")
            directory = self._tmp
            readonly = False
        self.directory = directory
        #: opened read-only (a store on a read-only filesystem): lookups work, the bookkeeping of reads
        #: (access times, sizes, stale records) is skipped, and tiers it has not seen get a bit for this
        #: process only
        self.readonly = readonly
        self._ephemeral: dict[str, int] = {}
        #: reservations no other process can share: every one of a read-only catalog, and those of the slots in
        #: ``private_slots`` (a memory tier: no other process writes into it)
        self._local_room: dict[int, int] = {}
        self._local_lock = threading.Lock()
        self.private_slots: set[int] = set()
        self.env = _lmdbenv.acquire(directory, map_size, readonly=readonly)
        try:
            self._chunks = self.env.db(DB_CHUNKS)
            self._children = self.env.db(DB_CHILDREN)
            self._ns = self.env.db(DB_NS)
            self._meta = self.env.db(DB_META)
            self._quarantine = self.env.db(DB_QUARANTINE)
        except BaseException:  # a read-only environment without these databases (never a catalog)
            _lmdbenv.release(self.env)
            raise
        try:
            self._pending = self.env.db(DB_PENDING)
        except Exception:  # noqa: BLE001 - a read-only catalog written by an older kvfs: nothing owed is known
            if not readonly:
                _lmdbenv.release(self.env)
                raise
            self._pending = None
        self._closed = False

    # -- tiers ----------------------------------------------------------------------------
    def tier_slot(self, identity: str) -> int:
        """The persistent bit of a tier, by its identity (the same storage keeps its bit across reopens)."""
        k = _enc(f"tier/{identity}")
        with self.env.read() as txn:
            v = txn.get(k, db=self._meta)
            if v is None and self.readonly:
                used = {int(val) for key, val in txn.cursor(db=self._meta) if bytes(key).startswith(b"tier/")}
        if v is not None:
            return int(v)
        if self.readonly:  # a tier this catalog never saw: a bit no record carries, for this process only
            if identity not in self._ephemeral:
                self._ephemeral[identity] = self._free_slot(used | set(self._ephemeral.values()))
            return self._ephemeral[identity]
        with self.env.write() as txn:
            v = txn.get(k, db=self._meta)
            if v is not None:
                return int(v)
            used = {int(val) for key, val in txn.cursor(db=self._meta) if bytes(key).startswith(b"tier/")}
            free = self._free_slot(used)
            txn.put(k, str(free).encode(), db=self._meta)
            return free

    def home_slot(self, identity: str) -> int:
        """The bit of the tier this catalog lives in (its directory is inside that tier's storage).

        Kept under ``home`` rather than by path alone, so that a store moved, copied or reached
        through another path (``mv``, ``cp -r``, a symlink, another mount point in a container) still
        finds its own chunks: the catalog moved with them. ``tier/<identity>`` follows the path the
        store was opened by, so that no other tier can take the same bit through the old path. A
        catalog made before homes gets one when opened by a path it knows (its own tier's); by another
        path the home is not guessed. One write transaction decides, so processes opening the same
        store at once (through different paths) agree.
        """
        k = _enc(f"tier/{identity}")
        with self.env.read() as txn:
            home = txn.get(b"home", db=self._meta)
            current = txn.get(k, db=self._meta)
        if home is not None and (self.readonly or current is not None and int(current) == int(home)):
            return int(home)
        if self.readonly:
            return self.tier_slot(identity)
        with self.env.write() as txn:
            home = txn.get(b"home", db=self._meta)
            current = txn.get(k, db=self._meta)
            if home is None:
                if current is not None:  # a catalog made before homes, by its own tier's path
                    txn.put(b"home", bytes(current), db=self._meta)
                    return int(current)
                keys = [(bytes(key), int(val)) for key, val in txn.cursor(db=self._meta)
                        if bytes(key).startswith(b"tier/")]
                slot = self._free_slot({v for _, v in keys})
                txn.put(k, str(slot).encode(), db=self._meta)
                # a fresh catalog (memory tiers, listed first, hold no catalog) gets its home now; an old one
                # reached by a path it does not know gets a new bit, as before homes
                if not any(not _volatile(key) for key, _ in keys):
                    txn.put(b"home", str(slot).encode(), db=self._meta)
                return slot
            slot = int(home)
            for key, val in list(txn.cursor(db=self._meta)):
                if bytes(key).startswith(b"tier/") and int(val) == slot and bytes(key) != k \
                        and not bytes(key).startswith(b"tier/orphaned:"):
                    txn.delete(bytes(key), db=self._meta)  # the path the store was reached by before
            if current is not None and int(current) != slot:
                # this path named another tier of this catalog before: its bit stays reserved (its records
                # still carry it) under a name no tier URL can have, so that no new tier takes it
                txn.put(_enc(f"tier/orphaned:{int(current)}:{identity}"), bytes(current), db=self._meta)
                log.warning("kvfs: the catalog at %s listed another tier at %s; the store itself is there now "
                            "(that tier's records are unreachable; kvfs fsck rebuilds the catalog)",
                            self.directory, identity)
            txn.put(k, str(slot).encode(), db=self._meta)
            return slot

    def _free_slot(self, used: set[int]) -> int:
        free = next((i for i in range(MAX_TIERS) if i not in used), None)
        if free is None:
            raise OverflowError(f"the catalog at {self.directory} has seen {MAX_TIERS} tiers; run fsck --reset")
        return free

    def volatile_slots(self) -> list[tuple[str, int]]:
        """Slots of process-local tiers (identities ``...#<pid>.<id>``): ``(identity, slot)``."""
        if self.readonly:
            return []  # nothing can be cleaned up in a catalog this process cannot write
        with self.env.read() as txn:
            return [(_dec(k)[5:], int(v)) for k, v in txn.cursor(db=self._meta) if _volatile(bytes(k))]

    def drop_slot(self, identity: str, slot: int) -> int:
        """Forget a tier whose contents are gone (a dead process's memory tier); returns records touched."""
        if self.readonly:
            return 0  # a read-only catalog recorded nothing under it
        bit = 1 << slot
        touched = 0
        with self.env.write() as txn:
            cur = txn.cursor(db=self._chunks)
            for k, v in list(cur.iternext()):
                rec = ChunkRecord.unpack(_dec(k), v)
                if not rec.tiers & bit:
                    continue
                touched += 1
                rest = rec.tiers & ~bit
                if rest:
                    txn.put(bytes(k), replace(rec, tiers=rest).pack(), db=self._chunks)
                else:
                    self._delete(txn, rec)
            txn.delete(_enc(f"used/{slot}"), db=self._meta)
            txn.delete(_enc(f"tier/{identity}"), db=self._meta)
        return touched

    def used(self, slot: int) -> int:
        with self.env.read() as txn:
            v = txn.get(_enc(f"used/{slot}"), db=self._meta)
        return _U64.unpack(v)[0] if v else 0

    @staticmethod
    def _add_used(txn, meta, slot: int, delta: int) -> None:
        k = _enc(f"used/{slot}")
        v = txn.get(k, db=meta)
        cur = _U64.unpack(v)[0] if v else 0
        txn.put(k, _U64.pack(max(0, cur + delta)), db=meta)

    def recount_used(self, slots: Sequence[int], *, repair: bool = True) -> int:
        """Check each slot's usage counter against the sizes of the chunks recorded in it; ``repair`` sets the
        counters that disagree. Returns how many disagreed.

        Checked in a read transaction (a scan of every record: seconds for millions, which a write transaction
        would hold every writer of every process for); only counters found wrong are counted again and set in
        one write transaction, so that writers in other processes cannot skew them."""
        if self.readonly:
            repair = False
        with self.env.read(buffers=True) as txn:
            wrong = self._wrong_used(txn, slots)
        if not wrong or not repair:
            return len(wrong)
        with self.env.write() as txn:
            for slot, total in self._wrong_used(txn, wrong).items():
                txn.put(_enc(f"used/{slot}"), _U64.pack(total), db=self._meta)
        return len(wrong)

    def _wrong_used(self, txn, slots: Sequence[int]) -> dict[int, int]:
        """The slots whose usage counter differs from the sizes of the records holding them, with those sums."""
        totals = dict.fromkeys(slots, 0)
        mask = 0
        for slot in totals:
            mask |= 1 << slot
        size_of, tiers_of = _U64.unpack_from, _TIERS.unpack_from
        for v in txn.cursor(db=self._chunks).iternext(keys=False, values=True):
            bits = tiers_of(v, _TIERS_AT)[0] & mask
            if bits:
                size = size_of(v, 0)[0]
                for slot in totals:
                    if bits >> slot & 1:
                        totals[slot] += size
        out = {}
        for slot, total in totals.items():
            v = txn.get(_enc(f"used/{slot}"), db=self._meta)
            if (_U64.unpack(v)[0] if v else 0) != total:
                out[slot] = total
        return out

    # -- room for writes in flight ---------------------------------------------------------
    def reserve(self, slot: int, nbytes: int, capacity: int) -> bool:
        """Reserve ``nbytes`` of tier ``slot`` for a write in flight if they fit in ``capacity`` beside the bytes
        it holds and those every process sharing this catalog reserved: one write transaction checks and
        reserves, so no two writers (threads or processes) count the same free space. Given back with
        :meth:`release` once the write's chunks are recorded (and so counted in :meth:`used`)."""
        if self._local(slot):  # reservations stay in this process
            with self._local_lock:
                if self.used(slot) + self._local_room.get(slot, 0) + nbytes > capacity:
                    return False
                self._local_room[slot] = self._local_room.get(slot, 0) + nbytes
                return True
        now = time.time()
        with self.env.write() as txn:
            v = txn.get(_enc(f"used/{slot}"), db=self._meta)
            used = _U64.unpack(v)[0] if v else 0
            if used + self._room_total(txn, slot, now, clean=True) + nbytes > capacity:
                return False
            k = _room_key(slot)
            v = txn.get(k, db=self._meta)
            mine = _ROOM.unpack(v)[0] if v else 0
            txn.put(k, _ROOM.pack(mine + nbytes, now), db=self._meta)
            return True

    def _local(self, slot: int) -> bool:
        """Whether reservations in ``slot`` stay in this process (see ``_local_room``)."""
        return self.readonly or slot in self.private_slots

    def release(self, slot: int, nbytes: int) -> None:
        """Give back ``nbytes`` this process reserved in tier ``slot``."""
        if self._local(slot):
            with self._local_lock:
                left = self._local_room.get(slot, 0) - nbytes
                if left > 0:
                    self._local_room[slot] = left
                else:
                    self._local_room.pop(slot, None)
            return
        with self.env.write() as txn:
            self._release(txn, slot, nbytes)

    def _release(self, txn, slot: int, nbytes: int) -> None:
        k = _room_key(slot)
        v = txn.get(k, db=self._meta)
        left = (_ROOM.unpack(v)[0] if v else 0) - nbytes
        if left > 0:
            txn.put(k, _ROOM.pack(left, time.time()), db=self._meta)
        elif v is not None:
            txn.delete(k, db=self._meta)

    def reserved(self, slot: int) -> int:
        """Bytes of tier ``slot`` reserved for writes in flight, by every process sharing this catalog."""
        if self._local(slot):
            return self._local_room.get(slot, 0)
        with self.env.read() as txn:
            return self._room_total(txn, slot, time.time(), clean=False)

    def _room_total(self, txn, slot: int, now: float, *, clean: bool) -> int:
        """The bytes reserved in ``slot``, leaving out (``clean``: deleting) what dead processes left."""
        prefix = _enc(f"room/{slot}/")
        total = 0
        me = _room_key(slot)
        cur = txn.cursor(db=self._meta)
        stale = []
        if cur.set_range(prefix):
            for k, v in cur:
                k = bytes(k)
                if not k.startswith(prefix):
                    break
                n, when = _ROOM.unpack(bytes(v))
                pid = int(k[len(prefix):].split(b".", 1)[0])
                age = now - when
                if k != me and (age > ROOM_STALE_S or age > ROOM_DEAD_S and not _alive(pid)):
                    stale.append(k)  # left by a process that died mid-write: never recorded
                    continue
                total += n
        if clean:
            for k in stale:
                txn.delete(k, db=self._meta)
        return total

    # -- records --------------------------------------------------------------------------
    def get_many(self, keys: Sequence[str]) -> list[ChunkRecord | None]:
        out: list[ChunkRecord | None] = []
        with self.env.read() as txn:
            for k in keys:
                v = txn.get(_enc(k), db=self._chunks)
                out.append(None if v is None else ChunkRecord.unpack(k, v))
        return out

    def count_present(self, namespace: str, digests: Sequence[bytes], mask: int = -1) -> int:
        """How many leading digests of a chain have a record held by a tier in ``mask`` (the lookup fast path)."""
        prefix = _enc(namespace + "/")
        n = 0
        hexlify, tiers_of = binascii.hexlify, _TIERS.unpack_from
        with self.env.read(buffers=True) as txn:
            db = self._chunks
            for d in digests:
                v = txn.get(prefix + hexlify(d), db=db)
                if v is None or not tiers_of(v, _TIERS_AT)[0] & mask:
                    break
                n += 1
        return n

    def get(self, key: str) -> ChunkRecord | None:
        return self.get_many([key])[0]

    def add(self, records: Iterable[tuple[ChunkRecord, np.ndarray | None]], slot: int,
            owed: int = 0, room: int = 0) -> list[bool]:
        """Record that tier ``slot`` holds these chunks; returns, per chunk, whether the bit was new.

        ``tokens`` (the chunk's token ids) feed the children index; give them
        for chunks this node writes or reads. ``owed``: a bitmask of tier slots
        a copy of these chunks was queued to (cleared slot by slot as each copy
        is recorded here), so that copies lost to a crash are queued again.
        ``room``: bytes this process reserved in ``slot`` for them (:meth:`reserve`),
        given back in the same transaction that counts them in :meth:`used`.
        """
        local_room = room if self._local(slot) else 0
        if local_room:
            room = 0  # not in the catalog: given back once the chunks count in used()
        out = self._add(records, slot, owed, room)
        if local_room:  # (on an error the caller still holds it, as for one in the catalog)
            self.release(slot, local_room)
        return out

    def _add(self, records: Iterable[tuple[ChunkRecord, np.ndarray | None]], slot: int, owed: int,
             room: int) -> list[bool]:
        if self.readonly:
            # a read-only store's lookups find chunks the catalog does not know in the tiers themselves
            # (Store._probe), every time: nothing is recorded
            return [False for _ in records]
        bit = 1 << slot
        out = []
        pid = os.getpid()
        with self.env.write() as txn:
            check_owed = self._pending is not None and txn.stat(self._pending)["entries"] > 0
            for rec, tokens in records:
                k = _enc(rec.key)
                v = txn.get(k, db=self._chunks)
                if v is None:
                    # only ``slot`` holds it as far as this transaction knows: a record read earlier (a resync's,
                    # whose copy lands after the chunk was evicted) names tiers that no longer hold it
                    new = replace(rec, tiers=bit, pins=0)  # (nor its pins: they went with its eviction)
                    added = True
                else:
                    old = ChunkRecord.unpack(rec.key, v)
                    added = not old.tiers & bit
                    new = replace(old, tiers=old.tiers | bit, size=old.size or rec.size,
                                  last_access=max(old.last_access, rec.last_access))
                    if not old.size and new.size:
                        # recorded before its size was known (found by a lookup's probe): the tiers that held
                        # it counted 0 bytes for it; they count its size now
                        for sl in range(MAX_TIERS):
                            if old.tiers >> sl & 1:
                                self._add_used(txn, self._meta, sl, new.size)
                txn.put(k, new.pack(), db=self._chunks)
                if added:
                    self._add_used(txn, self._meta, slot, new.size)
                if tokens is not None and len(tokens) and not rec.segment:
                    txn.put(_child_key(rec.key, rec.parent, int(tokens[0])), tokens.astype("<u4").tobytes(),
                            db=self._children)
                if owed or check_owed:
                    self._owe(txn, k, owed & ~new.tiers, bit, pid)
                out.append(added)
            if room:
                self._release(txn, slot, room)
        return out

    def _owe(self, txn, k: bytes, owed: int, paid: int, pid: int) -> None:
        """Add ``owed`` to a chunk's owed slots and clear ``paid`` from them."""
        v = txn.get(k, db=self._pending)
        if v is None and not owed:
            return
        bits, who = _PENDING.unpack(v) if v is not None else (0, pid)
        bits = (bits | owed) & ~paid
        if owed:
            who = pid
        if bits:
            txn.put(k, _PENDING.pack(bits, who), db=self._pending)
        elif v is not None:
            txn.delete(k, db=self._pending)

    def owed(self) -> list[tuple[str, int, int]]:
        """Chunks whose queued copies are not all recorded: ``(key, slots owed, pid that queued them)``."""
        if self._pending is None:
            return []
        with self.env.read() as txn:
            return [(_dec(k), *_PENDING.unpack(v)) for k, v in txn.cursor(db=self._pending).iternext()]

    def claim_owed(self, claims: Sequence[tuple[str, int]], pid: int) -> list[bool]:
        """Take over the owed copies of ``(key, pid that queued them)`` for ``pid``; ``False`` where another
        process changed the entry since it was listed (it queued them itself)."""
        if self.readonly or self._pending is None:
            return [False for _ in claims]
        out = []
        with self.env.write() as txn:
            for key, was in claims:
                k = _enc(key)
                v = txn.get(k, db=self._pending)
                if v is None or _PENDING.unpack(v)[1] != was:
                    out.append(False)
                    continue
                txn.put(k, _PENDING.pack(_PENDING.unpack(v)[0], pid), db=self._pending)
                out.append(True)
        return out

    def forgive(self, keys: Sequence[str], slots: int = -1) -> None:
        """Owe these chunks' copies to ``slots`` no more (no copy is left to send, or no such tier)."""
        if self.readonly or self._pending is None:
            return
        with self.env.write() as txn:
            for key in keys:
                self._owe(txn, _enc(key), 0, slots & 0xFFFFFFFF, 0)

    def remove_from(self, keys: Sequence[str], slot: int, *, kept: list[str] | None = None) -> list[ChunkRecord]:
        """Clear tier ``slot`` of these chunks; a chunk held nowhere any more leaves the catalog.

        ``kept``: an eviction that chose its victims unpinned: chunks pinned since (by this or another process)
        are left alone, checked in the same transaction that removes the others, and their keys appended to it.
        """
        if self.readonly:
            return []  # bookkeeping of reads (a stale record) is skipped in a read-only catalog
        bit = 1 << slot
        removed = []
        with self.env.write() as txn:
            for key in keys:
                k = _enc(key)
                v = txn.get(k, db=self._chunks)
                if v is None:
                    continue
                rec = ChunkRecord.unpack(key, v)
                if kept is not None and rec.pins:
                    kept.append(key)
                    continue
                if not rec.tiers & bit:
                    continue
                self._add_used(txn, self._meta, slot, -rec.size)
                rest = rec.tiers & ~bit
                if rest:
                    txn.put(k, replace(rec, tiers=rest).pack(), db=self._chunks)
                else:
                    self._delete(txn, rec)
                removed.append(rec)
        return removed

    def remove(self, keys: Sequence[str]) -> list[ChunkRecord]:
        """Forget chunks entirely (every tier)."""
        removed = []
        with self.env.write() as txn:
            for key in keys:
                v = txn.get(_enc(key), db=self._chunks)
                if v is None:
                    continue
                rec = ChunkRecord.unpack(key, v)
                for slot in range(MAX_TIERS):
                    if rec.tiers & (1 << slot):
                        self._add_used(txn, self._meta, slot, -rec.size)
                self._delete(txn, rec)
                removed.append(rec)
        return removed

    def _delete(self, txn, rec: ChunkRecord) -> None:
        txn.delete(_enc(rec.key), db=self._chunks)
        if self._pending is not None:
            txn.delete(_enc(rec.key), db=self._pending)  # nothing left to copy
        if rec.segment:
            return
        # the children entry's first-token part is unknown here: scan the (small) sibling range
        ns, _, hexd = rec.key.rpartition("/")
        prefix = _enc(f"{ns}/{rec.parent or '-'}/")
        cur = txn.cursor(db=self._children)
        if cur.set_range(prefix):
            for k in list(cur.iternext(keys=True, values=False)):
                kb = bytes(k)
                if not kb.startswith(prefix):
                    break
                if kb.endswith(_enc("/" + hexd)):
                    txn.delete(kb, db=self._children)
                    break

    def touch(self, keys: Sequence[str], now: float | None = None) -> None:
        """A read hit: bump last access and the hit count."""
        if self.readonly:
            return
        now = time.time() if now is None else now
        with self.env.write() as txn:
            for key in keys:
                k = _enc(key)
                v = txn.get(k, db=self._chunks)
                if v is not None:
                    rec = ChunkRecord.unpack(key, v)
                    txn.put(k, replace(rec, last_access=now, hits=rec.hits + 1).pack(), db=self._chunks)

    def set_size(self, key: str, size: int) -> None:
        if self.readonly:
            return
        with self.env.write() as txn:
            v = txn.get(_enc(key), db=self._chunks)
            if v is None:
                return
            rec = ChunkRecord.unpack(key, v)
            if rec.size == size:
                return
            for slot in range(MAX_TIERS):
                if rec.tiers & (1 << slot):
                    self._add_used(txn, self._meta, slot, size - rec.size)
            txn.put(_enc(key), replace(rec, size=size).pack(), db=self._chunks)

    def pin(self, keys: Sequence[str], delta: int = 1, *, reset: bool = False,
            leading: bool = False) -> list[ChunkRecord]:
        """Add ``delta`` pins (negative unpins, never below 0); ``reset`` sets them to 0. ``leading``: ``keys`` are
        a prompt's chunks in order, and only those before the first one no longer recorded are changed (a
        chunk evicted since they were planned cuts the prefix: pins past it could never be reached again)."""
        changed = []
        with self.env.write() as txn:
            for key in keys:
                k = _enc(key)
                v = txn.get(k, db=self._chunks)
                if v is None:
                    if leading:
                        break
                    continue
                rec = ChunkRecord.unpack(key, v)
                pins = 0 if reset else max(0, rec.pins + delta)
                if pins == rec.pins:
                    continue  # unpinning a chunk with no pins changes nothing, and is not counted
                new = replace(rec, pins=pins)
                txn.put(k, new.pack(), db=self._chunks)
                changed.append(new)
        return changed

    def children(self, namespace: str, parent: str, first_token: int) -> list[tuple[str, np.ndarray]]:
        """Chunks stored right after ``parent`` whose first token is ``first_token``: ``(hex, tokens)``."""
        prefix = _enc(f"{namespace}/{parent or '-'}/{first_token:08x}/")
        out = []
        with self.env.read() as txn:
            cur = txn.cursor(db=self._children)
            if cur.set_range(prefix):
                for k, v in cur:
                    kb = bytes(k)
                    if not kb.startswith(prefix):
                        break
                    out.append((_dec(kb[len(prefix):]), np.frombuffer(v, dtype="<u4")))
        return out

    def scan(self, prefix: str = "") -> list[ChunkRecord]:
        """Every record whose key starts with ``prefix`` (``model/`` or ``model/ns-id/``), in key order."""
        p = _enc(prefix)
        out = []
        with self.env.read() as txn:
            cur = txn.cursor(db=self._chunks)
            if cur.set_range(p):
                for k, v in cur:
                    kb = bytes(k)
                    if not kb.startswith(p):
                        break
                    out.append(ChunkRecord.unpack(_dec(kb), v))
        return out

    def count(self) -> int:
        with self.env.read() as txn:
            return txn.stat(self._chunks)["entries"]

    # -- namespaces -----------------------------------------------------------------------
    def register_namespace(self, ns_path: str, manifest: bytes) -> bool:
        k = _enc(ns_path)
        with self.env.read() as txn:
            if txn.get(k, db=self._ns) is not None or self.readonly:
                return False
        with self.env.write() as txn:
            if txn.get(k, db=self._ns) is not None:
                return False
            txn.put(k, manifest, db=self._ns)
            return True

    def manifest(self, ns_path: str) -> bytes | None:
        with self.env.read() as txn:
            return txn.get(_enc(ns_path), db=self._ns)

    def namespaces(self) -> list[str]:
        with self.env.read() as txn:
            return [_dec(k) for k in txn.cursor(db=self._ns).iternext(keys=True, values=False)]

    def forget_namespace(self, ns_path: str) -> None:
        with self.env.write() as txn:
            txn.delete(_enc(ns_path), db=self._ns)

    # -- quarantine -----------------------------------------------------------------------
    def quarantine(self, path: str, reason: str, tier: str) -> None:
        with self.env.write() as txn:
            txn.put(_enc(path), json.dumps({"reason": reason, "tier": tier, "time": time.time()}).encode(),
                    db=self._quarantine)

    def quarantined(self) -> dict[str, dict]:
        with self.env.read() as txn:
            return {_dec(k): json.loads(bytes(v)) for k, v in txn.cursor(db=self._quarantine)}

    # -- maintenance ----------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every chunk and usage counter (fsck rebuilds them); tier slots and namespaces stay."""
        with self.env.write() as txn:
            txn.drop(self._chunks, delete=False)
            txn.drop(self._children, delete=False)
            cur = txn.cursor(db=self._meta)
            for k in list(cur.iternext(keys=True, values=False)):
                if bytes(k).startswith((b"used/", b"room/")):
                    txn.delete(bytes(k), db=self._meta)

    def flush(self) -> None:
        if not self.readonly:
            self.env.sync()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _lmdbenv.release(self.env)
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
