"""``memory://`` : process memory. The hot CPU tier, and the backend of tests.

``memory://`` is private to the store that opens it; ``memory://NAME`` is
shared by every store of this process that names it (until the last one
closes it).
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

from kvfs._buffers import PooledMap, release

from ._base import Backend, Buffer, ObjectInfo, check_key

_SHARED: dict[str, tuple["_Data", int]] = {}
_SHARED_LOCK = threading.Lock()


def _view(v: "memoryview | PooledMap") -> memoryview:
    # a kept PooledMap gets a fresh read-only view per read: each one holds a reference to the map,
    # so _recycle can tell when no reader is left
    return v if type(v) is memoryview else memoryview(v).toreadonly()


def _recycle(maps: list) -> None:
    """Give dropped encode buffers back to kvfs._buffers (warm memory for the next puts) if unreferenced."""
    while maps:
        m = maps.pop()
        if sys.getrefcount(m) == 2:  # this frame's `m` and getrefcount's argument: no view is left
            release(m)


class _Data:
    def __init__(self) -> None:
        self.values: dict[str, memoryview | PooledMap] = {}
        self.mtimes: dict[str, float] = {}
        self.lock = threading.Lock()


class MemoryBackend(Backend):
    scheme = "memory"
    supports_views = True
    retains_buffers = True
    volatile = True

    def __init__(self, location: str = "", **options: str) -> None:
        if options:
            raise TypeError(f"memory:// takes no options, got {', '.join(options)}")
        self.name = location.strip("/")
        self.url = f"memory://{self.name}"
        if self.name:
            with _SHARED_LOCK:
                data, refs = _SHARED.get(self.name, (None, 0))
                if data is None:
                    data = _Data()
                _SHARED[self.name] = (data, refs + 1)
            self._data = data
        else:
            self._data = _Data()
        self._closed = False
        self.dropped = False  # set by close() when this was the last holder of the data

    def get_many(self, keys: Sequence[str]) -> list[Buffer | None]:
        values = self._data.values
        out: list[Buffer | None] = []
        for k in keys:
            v = values.get(check_key(k))
            out.append(None if v is None else _view(v))
        return out

    @contextmanager
    def views(self, keys: Sequence[str]) -> Iterator[list[memoryview | None]]:
        yield self.get_many(keys)

    def readinto(self, key: str, buffer: Buffer, offset: int = 0) -> int | None:
        v = self._data.values.get(check_key(key))
        if v is None:
            return None
        dst = memoryview(buffer).cast("B")
        src = _view(v)[offset : offset + len(dst)]
        dst[: len(src)] = src
        return len(src)

    def put_many(self, items: Mapping[str, Buffer]) -> None:
        now = time.time()
        staged: dict[str, memoryview | PooledMap] = {}
        for k, v in items.items():
            mv = memoryview(v)
            if mv.ndim != 1 or mv.itemsize != 1:
                mv = mv.cast("B")
            owner = mv.obj
            if type(owner) is PooledMap and mv.contiguous and mv.nbytes == len(owner):
                staged[check_key(k)] = owner  # an encode buffer: kept whole, recycled once dropped
            else:
                staged[check_key(k)] = mv.toreadonly()
        replaced = []
        with self._data.lock:
            values = self._data.values
            for k, v in staged.items():
                old = values.get(k)
                if type(old) is PooledMap and old is not v:
                    replaced.append(old)
                values[k] = v
                self._data.mtimes[k] = now
            old = v = None  # no stray reference may keep a replaced buffer from being recycled
        _recycle(replaced)

    def delete_many(self, keys: Sequence[str]) -> None:
        dropped = []
        with self._data.lock:
            for k in keys:
                v = self._data.values.pop(check_key(k), None)
                self._data.mtimes.pop(k, None)
                if type(v) is PooledMap:
                    dropped.append(v)
            v = None
        _recycle(dropped)

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        values = self._data.values
        return [check_key(k) in values for k in keys]

    def list(self, prefix: str = "") -> Iterator[str]:
        with self._data.lock:
            keys = [k for k in self._data.values if k.startswith(prefix)]
        return iter(keys)

    def stat(self, key: str) -> ObjectInfo | None:
        v = self._data.values.get(check_key(key))
        if v is None:
            return None
        return ObjectInfo(key, len(v), self._data.mtimes.get(key))

    def usage(self) -> tuple[int | None, int | None]:
        with self._data.lock:
            return sum(len(v) for v in self._data.values.values()), None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.name:
            with _SHARED_LOCK:
                data, refs = _SHARED[self.name]
                if refs <= 1:
                    del _SHARED[self.name]
                    self.dropped = True
                else:
                    _SHARED[self.name] = (data, refs - 1)
        else:
            self.dropped = True
        if self.dropped:
            with self._data.lock:
                maps = [v for v in self._data.values.values() if type(v) is PooledMap]
                self._data.values.clear()
                self._data.mtimes.clear()
            _recycle(maps)
