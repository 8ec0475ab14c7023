"""The one storage interface every kvfs backend implements.

Batch-first and bytes in, bytes out. Rules shared by every backend:

* a missing key is ``None`` from ``get``/``get_many``/``stat``/``readinto`` and
  a no-op for ``delete_many``;
* every other failure is an ``OSError`` (a :class:`kvfs.errors.StoreError`)
  with an errno, mapped from the client library's errors in one table per
  backend;
* ``put_many`` is atomic per key: a reader sees the old value, nothing, or the
  whole new value, never part of one;
* keys are ``/``-separated relative paths (see :func:`check_key`).
"""

from __future__ import annotations

import errno
import re
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Mapping, Sequence

from kvfs.errors import StoreError

Buffer = Any  # bytes, bytearray, memoryview or anything exporting the buffer protocol

MAX_KEY_BYTES = 480  # leaves room under LMDB's 511-byte key limit
_BAD_COMPONENT = re.compile(r"[\x00-\x1f\x7f]")


class InvalidKey(StoreError, ValueError):
    """A key that is not a clean relative path."""

    def __init__(self, key: object, why: str) -> None:
        super().__init__(errno.EINVAL, f"invalid key {key!r}: {why}")


def check_key(key: str) -> str:
    """Validate a backend key: relative, no ``.``/``..``/empty parts, no control bytes, bounded length."""
    if not isinstance(key, str):
        raise InvalidKey(key, "keys are strings")
    if not key:
        raise InvalidKey(key, "empty")
    if key.startswith("/"):
        raise InvalidKey(key, "keys are relative paths (no leading '/')")
    if _BAD_COMPONENT.search(key):
        raise InvalidKey(key, "control characters and NUL bytes are not allowed")
    encoded = key.encode("utf-8", "surrogateescape")
    if len(encoded) > MAX_KEY_BYTES:
        raise InvalidKey(key[:60] + "...", f"longer than {MAX_KEY_BYTES} bytes")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise InvalidKey(key, "empty, '.' and '..' path components are not allowed")
        if len(part.encode("utf-8", "surrogateescape")) > 255:
            raise InvalidKey(key[:60] + "...", "a path component is longer than 255 bytes")
    return key


@dataclass(frozen=True, slots=True)
class ByteRange:
    """Bytes ``[start, end)`` of one key; ``end=None`` reads to the end."""

    key: str
    start: int = 0
    end: int | None = None

    def __post_init__(self) -> None:
        if self.start < 0 or (self.end is not None and self.end < self.start):
            raise ValueError(f"bad byte range [{self.start}, {self.end}) of {self.key!r}")


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float | None = None


class Backend(ABC):
    """A flat key -> bytes store. Subclasses set ``scheme`` and implement the abstract methods."""

    scheme: ClassVar[str] = ""
    #: ``views()`` hands out zero-copy memory (memory, LMDB): read by copying out of it
    supports_views: ClassVar[bool] = False
    #: ``readinto()`` lands bytes straight in the caller's buffer (local files): prefer it
    direct_reads: ClassVar[bool] = False
    #: other nodes may write this storage: the local catalog is not the whole truth
    shared: bool = False
    #: ``put_many`` keeps references to the buffers it is given (instead of copying them)
    retains_buffers: ClassVar[bool] = False
    #: the contents live only as long as this process (memory): never recorded for other processes
    volatile: ClassVar[bool] = False
    #: ``put_many`` of several values writes them side by side (files, object stores): a put hands it
    #: batches; a single-writer backend (LMDB) gets one value at a time, overlapping the next one's encode
    parallel_puts: ClassVar[bool] = False
    #: ``put_many`` also takes :class:`kvfs.chunk.PendingChunk` values and writes them straight from the
    #: caller's KV (``write_to``), with no encoded copy; others get encoded buffers
    pending_puts: ClassVar[bool] = False

    url: str = ""

    @classmethod
    def from_url(cls, tier: Any, **options: Any) -> "Backend":
        """Build from a parsed tier URL (:class:`kvfs.url.TierURL`); keyword options win over the query."""
        opts = dict(tier.backend_options)
        opts.update(options)
        try:
            return cls(tier.location, **opts)
        except TypeError as e:
            from kvfs.errors import InvalidURL

            raise InvalidURL(f"bad option for {tier.scheme}://: {e}") from None

    # -- reads ----------------------------------------------------------------------------
    @abstractmethod
    def get_many(self, keys: Sequence[str]) -> list[Buffer | None]:
        """Whole values, ``None`` for missing keys. The buffers stay valid after the call."""

    def get(self, key: str) -> Buffer | None:
        return self.get_many([key])[0]

    def get_ranges(self, ranges: Sequence[ByteRange]) -> list[Buffer | None]:
        """Byte ranges of several keys (layer-wise loads). Short when a range passes the end."""
        keys = list(dict.fromkeys(r.key for r in ranges))
        values = dict(zip(keys, self.get_many(keys)))
        out: list[Buffer | None] = []
        for r in ranges:
            v = values[r.key]
            out.append(None if v is None else memoryview(v)[r.start : r.end])
        return out

    def readinto(self, key: str, buffer: Buffer, offset: int = 0) -> int | None:
        """Read ``len(buffer)`` bytes of ``key`` from ``offset`` into ``buffer``.

        Returns the number of bytes read (less at the end of the value), or
        ``None`` if the key is missing.
        """
        dst = memoryview(buffer).cast("B")
        (src,) = self.get_ranges([ByteRange(key, offset, offset + len(dst))])
        if src is None:
            return None
        n = len(src)
        dst[:n] = src
        return n

    @contextmanager
    def views(self, keys: Sequence[str]) -> Iterator[list[memoryview | None]]:
        """Read-only views of whole values, valid only inside the ``with`` block."""
        yield [None if v is None else memoryview(v) for v in self.get_many(keys)]

    # -- writes ---------------------------------------------------------------------------
    @abstractmethod
    def put_many(self, items: Mapping[str, Buffer]) -> None:
        """Store values, atomically per key. The backend may keep references to the buffers
        given: callers must not modify them afterwards."""

    def put(self, key: str, value: Buffer) -> None:
        self.put_many({key: value})

    @abstractmethod
    def delete_many(self, keys: Sequence[str]) -> None:
        """Remove keys; missing keys are ignored."""

    # -- metadata -------------------------------------------------------------------------
    @abstractmethod
    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key starting with ``prefix`` (a plain string prefix), in no promised order."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo | None:
        ...

    def usage(self) -> tuple[int | None, int | None]:
        """``(bytes used, bytes available)`` of the underlying storage where known."""
        return None, None

    def catalog_dir(self) -> str | None:
        """A local directory where the store may keep its catalog next to this backend's data."""
        return None

    # -- lifetime -------------------------------------------------------------------------
    def flush(self) -> None:
        """Make completed puts durable."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
