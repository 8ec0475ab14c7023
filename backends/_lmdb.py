"""``lmdb:///path`` : the embedded default. One LMDB environment, zero-copy reads.

Options (URL query or keyword): ``map_size`` (default 1 TiB, sparse; reopen
with a larger one to grow), ``readonly``.

Safe for several processes reading and writing one environment at once
(LMDB's own locking); a write is one transaction, so a reader sees a chunk
whole or not at all, and a killed writer leaves nothing behind.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

from kvfs import _lmdbenv
from kvfs.errors import InvalidURL, NoSpace
from kvfs.units import parse_bool, parse_size

from ._base import Backend, Buffer, ByteRange, ObjectInfo, check_key

DATA_DB = "kvfs.data"
META_DB = "kvfs.lmdb.meta"
TXN_BYTES = 32 << 20


_malloc_tuned = False


def _tune_malloc() -> None:
    """Let glibc reuse freed large blocks instead of returning them to the kernel.

    LMDB (with ``writemap`` off, so that a full disk is ENOSPC rather than
    SIGBUS) copies each value into freshly ``malloc``'ed dirty pages before
    writing them. glibc serves a block over 32 MiB (a Llama-3-8B chunk is
    32 MiB + 4 KiB) with a new ``mmap`` each time, and faulting that memory
    in costs more than the write itself. Raising the mmap threshold to
    64 MiB and the trim threshold to 256 MiB keeps such blocks warm in the
    heap: LMDB puts run about 2.5x faster. Set ``KVFS_MALLOC_TUNE=0`` to
    leave the allocator alone.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    if os.environ.get("KVFS_MALLOC_TUNE", "1") in ("0", "false", "no") or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
            return  # not glibc
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 64 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)
    except (OSError, AttributeError):
        pass


class LMDBBackend(Backend):
    scheme = "lmdb"
    supports_views = True

    def __init__(self, location: str, map_size: str | int | None = None, readonly: str | bool = False) -> None:
        if not location:
            raise InvalidURL("lmdb:// needs a directory: lmdb:///path/to/store")
        self.path = os.path.abspath(os.path.expanduser(location))
        self.url = f"lmdb://{self.path}"
        self.readonly = parse_bool(readonly, "lmdb:// option readonly", InvalidURL)
        if not self.readonly:
            _tune_malloc()
        size = parse_size(map_size, "lmdb:// option map_size", InvalidURL) if map_size is not None else None
        if size is not None and size <= 0:
            raise InvalidURL(f"lmdb:// option map_size={map_size} must be positive (e.g. 64GiB); leave it out for "
                             "the default, 1TiB")
        if size is not None and size >= 1 << 63:  # (LMDB takes a size_t; an address space holds far less anyway)
            raise InvalidURL(f"lmdb:// option map_size={str(map_size)[:40]} is larger than any address space; use "
                             "a size such as 4TiB")
        self._env = _lmdbenv.acquire(self.path, size, readonly=self.readonly)
        self._db = self._env.db(DATA_DB)
        self._closed = False

    @property
    def env(self) -> _lmdbenv.Env:
        return self._env

    @staticmethod
    def _k(key: str) -> bytes:
        return check_key(key).encode("utf-8", "surrogateescape")

    def get_many(self, keys: Sequence[str]) -> list[Buffer | None]:
        bkeys = [self._k(k) for k in keys]
        with self._env.read() as txn:
            return [txn.get(k, db=self._db) for k in bkeys]

    @contextmanager
    def views(self, keys: Sequence[str]) -> Iterator[list[memoryview | None]]:
        bkeys = [self._k(k) for k in keys]
        with self._env.read(buffers=True) as txn:
            yield [txn.get(k, db=self._db) for k in bkeys]

    def get_ranges(self, ranges: Sequence[ByteRange]) -> list[Buffer | None]:
        """Only the bytes asked for leave the map (no whole-value copy for a small range)."""
        bkeys = [self._k(r.key) for r in ranges]
        with self._env.read(buffers=True) as txn:
            out: list[Buffer | None] = []
            for r, k in zip(ranges, bkeys):
                v = txn.get(k, db=self._db)
                out.append(None if v is None else bytes(v[r.start : r.end]))
            return out

    def readinto(self, key: str, buffer: Buffer, offset: int = 0) -> int | None:
        k = self._k(key)
        dst = memoryview(buffer).cast("B")
        with self._env.read(buffers=True) as txn:
            v = txn.get(k, db=self._db)
            if v is None:
                return None
            src = v[offset : offset + len(dst)]
            dst[: len(src)] = src
            return len(src)

    def put_many(self, items: Mapping[str, Buffer]) -> None:
        staged = [(self._k(k), v) for k, v in items.items()]
        # one transaction per ~TXN_BYTES: LMDB holds a transaction's dirty pages in malloc'ed memory until
        # commit; small transactions reuse the same warm memory instead of faulting in the whole batch
        batch: list = []
        size = 0
        for k, v in staged:
            batch.append((k, v))
            size += memoryview(v).nbytes
            if size >= TXN_BYTES:
                self._put_batch(batch)
                batch, size = [], 0
        if batch:
            self._put_batch(batch)

    def _put_batch(self, batch: list) -> None:
        def put() -> None:
            with self._env.write() as txn:
                for k, v in batch:
                    txn.put(k, v, db=self._db)

        try:
            put()
        except NoSpace:
            # pages freed by the last transaction become reusable only two transactions later:
            # advance once and retry before calling the map full
            self._advance()
            put()

    def delete_many(self, keys: Sequence[str]) -> None:
        bkeys = [self._k(k) for k in keys]
        with self._env.write() as txn:
            deleted = sum(bool(txn.delete(k, db=self._db)) for k in bkeys)
        if deleted:
            self._advance()  # so that the next put can reuse the pages just freed

    def _advance(self) -> None:
        """Commit a tiny transaction: LMDB reuses pages freed by transaction N from N+2 on."""
        meta = self._env.db(META_DB)  # open it outside the write transaction (open_db takes the write lock)
        with self._env.write() as txn:
            txn.put(b"txn-tick", str(time.time()).encode(), db=meta)

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        bkeys = [self._k(k) for k in keys]
        with self._env.read(buffers=True) as txn:
            return [txn.get(k, db=self._db) is not None for k in bkeys]

    def list(self, prefix: str = "") -> Iterator[str]:
        p = prefix.encode("utf-8", "surrogateescape")
        out = []
        with self._env.read(buffers=True) as txn:
            cur = txn.cursor(db=self._db)
            if cur.set_range(p):
                for k in cur.iternext(keys=True, values=False):
                    kb = bytes(k)
                    if not kb.startswith(p):
                        break
                    out.append(kb.decode("utf-8", "surrogateescape"))
        return iter(out)

    def stat(self, key: str) -> ObjectInfo | None:
        k = self._k(key)
        with self._env.read(buffers=True) as txn:
            v = txn.get(k, db=self._db)
            return None if v is None else ObjectInfo(key, len(v), None)

    def usage(self) -> tuple[int | None, int | None]:
        info = self._env.env.info()
        stat = self._env.env.stat()
        used = (info["last_pgno"] + 1) * stat["psize"]
        try:
            st = os.statvfs(self.path)
            avail = min(self._env.map_size - used, st.f_bavail * st.f_frsize)
        except OSError:
            avail = None
        return used, avail

    def catalog_dir(self) -> str | None:
        return self.path

    def flush(self) -> None:
        if not self.readonly:
            self._env.sync()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _lmdbenv.release(self._env)
