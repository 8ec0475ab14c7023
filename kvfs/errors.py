"""kvfs's exceptions.

Filesystem-like failures are ``OSError`` subclasses carrying an errno, so that
callers (the CLI, the FUSE layer, engines) can map them without string
matching. A missing or unusable chunk is a :class:`CacheMiss`, which is a
``KeyError``: the engine recomputes, it never receives wrong KV.
"""

from __future__ import annotations

import errno as _errno


class KVFSError(Exception):
    """Base class of every error kvfs raises on purpose."""


class CacheMiss(KVFSError, KeyError):
    """The KV asked for is not stored, or failed its integrity checks."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep messages readable
        return str(self.args[0]) if self.args else "cache miss"


class ChunkFormatError(KVFSError, ValueError):
    """Bytes that are not a valid kvfs chunk (or not the chunk they claim to be)."""


class IntegrityError(ChunkFormatError):
    """A chunk whose checksum, signature, tokens, key or namespace do not match."""


class SignatureError(IntegrityError):
    """A well-formed chunk without a valid signature for this store's deployment key: unsigned, signed with
    another key, or altered. A miss, never deleted: a node given the wrong key must not wipe a shared bucket
    (storing the same chunk again replaces it)."""


class UnsupportedVersion(ChunkFormatError):
    """A chunk written in a newer format than this kvfs reads: a miss, never deleted (newer nodes use it)."""


class ForeignChunk(IntegrityError):
    """A chunk of another namespace (model, dtype, layout...) than the one it was read for."""


class InvalidURL(KVFSError, ValueError):
    """A store URL that cannot be parsed or names an unknown backend."""


class InvalidInput(KVFSError, ValueError):
    """Arguments of the wrong type, shape, dtype or range."""


class BackendUnavailable(KVFSError, ImportError):
    """A backend whose client library is not installed."""


class StoreError(KVFSError, OSError):
    """An ``OSError`` with an errno, raised by kvfs itself.

    ``StoreError(errno.ENOSPC, "message")`` sets ``.errno`` and ``.strerror``
    like any ``OSError``.
    """


class NotFound(StoreError, FileNotFoundError):
    """A path in the namespace that does not exist."""

    def __init__(self, path: str, hint: str = "") -> None:
        msg = f"no such chunk, namespace or model: {path!r}"
        if hint:
            msg += f" ({hint})"
        super().__init__(_errno.ENOENT, msg)
        self.filename = path


class PinnedError(StoreError, PermissionError):
    """Eviction of a pinned chunk without ``force``."""

    def __init__(self, path: str) -> None:
        super().__init__(
            _errno.EPERM,
            f"{path} is pinned; unpin it first or evict with force=True (CLI: --force)",
        )
        self.filename = path


class NoSpace(StoreError):
    """A tier or device is full."""

    def __init__(self, message: str) -> None:
        super().__init__(_errno.ENOSPC, message)


class ReadOnlyStore(StoreError):
    def __init__(self, message: str) -> None:
        super().__init__(_errno.EROFS, message)


class BackendIOError(StoreError):
    """A backend failure that is not a missing key (network, permissions, ...)."""


def oserror(code: int, message: str, cause: BaseException | None = None) -> StoreError:
    """Build the most specific ``StoreError`` subclass for an errno."""
    cls: type[StoreError]
    if code == _errno.ENOSPC:
        err: StoreError = NoSpace(message)
    elif code == _errno.EROFS:
        err = ReadOnlyStore(message)
    else:
        cls = _BY_ERRNO.get(code, BackendIOError)
        err = cls(code, message)
    if cause is not None:
        err.__cause__ = cause
    return err


class PermissionDenied(StoreError, PermissionError):
    pass


class Timeout(StoreError, TimeoutError):
    pass


class ConnectionFailed(StoreError, ConnectionError):
    pass


_BY_ERRNO: dict[int, type[StoreError]] = {
    _errno.EACCES: PermissionDenied,
    _errno.EPERM: PermissionDenied,
    _errno.ETIMEDOUT: Timeout,
    _errno.ECONNREFUSED: ConnectionFailed,
    _errno.ECONNRESET: ConnectionFailed,
    _errno.EHOSTUNREACH: ConnectionFailed,
}
