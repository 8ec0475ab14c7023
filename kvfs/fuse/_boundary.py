"""Errors to errnos, in one place, and the small types the operations share.

Every handler of the mount is wrapped in :func:`boundary`: whatever it
raises becomes ``FUSEError(errno)``, so that no exception ever reaches
pyfuse3's loop (which would end the mount). The store's ``OSError``
subclasses keep the errno a filesystem would give; a corrupt chunk and any
backend failure are ``EIO`` plus a log line.
"""

from __future__ import annotations

import errno
import functools
import logging
from dataclasses import dataclass

from pyfuse3 import FUSEError

from ..errors import ChunkFormatError, InvalidInput, NotFound
from ._reader import ChunkReader, StaleChunk
from ._staging import StagedFile

log = logging.getLogger("kvfs.fuse")

#: errnos the store raises with a filesystem meaning (no such chunk, read-only store, full tier,
#: bad input); any other OSError is a backend failure: EIO plus a log line. Handlers raise
#: FUSEError(EPERM/EISDIR/...) themselves where they mean it.
PASS_THROUGH = frozenset((errno.ENOENT, errno.EROFS, errno.ENOSPC, errno.EINVAL, errno.EFBIG, errno.ENAMETOOLONG))


def errno_of(exc: BaseException, what: str) -> int:
    """The errno a FUSE caller gets for an exception raised while doing ``what``."""
    if isinstance(exc, FUSEError):
        return exc.errno
    if isinstance(exc, (NotFound, FileNotFoundError)):
        return errno.ENOENT
    if isinstance(exc, StaleChunk):
        log.warning("kvfs mount: %s: the chunk was evicted while open", what)
        return errno.ESTALE
    if isinstance(exc, ChunkFormatError):  # a corrupt or foreign chunk read from the store
        log.error("kvfs mount: %s: %s", what, exc)
        return errno.EIO
    if isinstance(exc, InvalidInput):
        return errno.EINVAL
    if isinstance(exc, OSError) and exc.errno in PASS_THROUGH:
        return exc.errno
    if isinstance(exc, OSError):
        log.error("kvfs mount: %s: backend failure: %s", what, exc)
    else:
        log.error("kvfs mount: %s: unexpected error", what, exc_info=exc)
    return errno.EIO


def boundary(fn):
    """Turn any exception of a handler into ``FUSEError(errno)``: a handler never kills the loop."""

    @functools.wraps(fn)
    async def handler(self, *args):
        try:
            return await fn(self, *args)
        except FUSEError:
            raise
        except Exception as e:  # noqa: BLE001 - this is the one boundary
            raise FUSEError(errno_of(e, f"{fn.__name__}{self._describe(args, fn.__name__)}")) from None

    return handler


@dataclass(eq=False)
class Node:
    """An inode the kernel knows (its lookup count says how many references it holds)."""

    ino: int
    path: str
    kind: str
    lookups: int = 0
    st: object = None  # the attributes last shown (what an open file shows once its chunk is gone)


class Handle:
    """One open file: a verified chunk reader, fixed bytes (a manifest) or a staged new file."""

    __slots__ = ("ino", "reader", "data", "staged", "failed")

    def __init__(self, ino: int, reader: ChunkReader | None = None, data: bytes | None = None,
                 staged: StagedFile | None = None) -> None:
        self.ino = ino
        self.reader = reader
        self.data = data
        self.staged = staged
        self.failed = False
