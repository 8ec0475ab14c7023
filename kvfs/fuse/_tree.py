"""The mount's directory tree, computed from the store's catalog.

::

    <mount>/<model>/<namespace-id>/manifest.json
    <mount>/<model>/<namespace-id>/<hh>/<hash>.safetensors

Everything here is plain synchronous store access (the FUSE operations run
it in worker threads): what a path is, its attributes, a directory's
listing, a path's extended attributes. A chunk's ``<hash>.safetensors`` is
also found directly in its namespace directory (not listed there): that is
where ``cp chunk.safetensors <mount>/<model>/<ns>/`` puts it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from ..errors import ChunkFormatError, InvalidInput, NotFound
from ._staging import CHUNK_NAME, MANIFEST_NAME, SHARD_NAME

log = logging.getLogger("kvfs.fuse")

DIR_KINDS = frozenset(("root", "model", "namespace", "shard"))
ROOT_INODE = 1


@dataclass(frozen=True, slots=True)
class Stat:
    """What ``stat(2)`` shows of one path (times in seconds since the epoch)."""

    kind: str
    size: int = 0
    atime: float = 0.0
    mtime: float = 0.0
    ctime: float = 0.0

    @property
    def is_dir(self) -> bool:
        return self.kind in DIR_KINDS


def inode_of(path: str) -> int:
    """A stable inode number for a store path (the same across mounts and processes)."""
    if not path:
        return ROOT_INODE
    n = int.from_bytes(hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")
    n &= (1 << 63) - 1
    return n if n > ROOT_INODE else n + 2


def child_of(parent_path: str, parent_kind: str, name: str) -> tuple[str, str]:
    """The store path and kind of ``name`` inside a directory; ``NotFound`` if it cannot exist there."""
    if parent_kind == "root":
        return name, "model"
    if parent_kind == "model":
        return f"{parent_path}/{name}", "namespace"
    if parent_kind == "namespace":
        if name == MANIFEST_NAME:
            return f"{parent_path}/{name}", "manifest"
        if SHARD_NAME.match(name):
            return f"{parent_path}/{name}", "shard"
        m = CHUNK_NAME.match(name)
        if m is not None:  # the chunk's alias in its namespace directory
            return f"{parent_path}/{m.group(1)[:2]}/{name}", "chunk"
        raise NotFound(f"{parent_path}/{name}")
    if parent_kind == "shard":
        m = CHUNK_NAME.match(name)
        if m is not None and m.group(1)[:2] == parent_path.rsplit("/", 1)[1]:
            return f"{parent_path}/{name}", "chunk"
        raise NotFound(f"{parent_path}/{name}")
    raise NotADirectoryError(20, f"{parent_path} is not a directory")


def _times(entry, default: float) -> tuple[float, float, float]:
    """(atime, mtime, ctime): last access, creation, creation."""
    created = entry.created if entry.created is not None else default
    last = entry.last_access if entry.last_access is not None else created
    return last, created, created


def stat_path(store: Any, path: str, kind: str, default_time: float) -> Stat:
    """Attributes of a stored path; raises ``NotFound`` if the store does not hold it."""
    if kind == "root":
        return Stat("root", 0, default_time, default_time, default_time)
    try:
        entry = store.stat(path)
    except InvalidInput:
        raise NotFound(path) from None
    if kind == "chunk" and entry.kind == "chunk" and entry.size == 0:
        entry = _fix_size(store, path, entry)
    if (entry.kind == "chunk") != (kind == "chunk"):
        raise NotFound(path)
    if kind == "manifest":
        return Stat("manifest", entry.size, default_time, default_time, default_time)
    return Stat(kind, entry.size, *_times(entry, default_time))


def _fix_size(store: Any, path: str, entry):
    """A chunk the catalog learned of by probing has no size yet: read it from the header."""
    from dataclasses import replace

    from ..catalog import key_of_path
    from ..store import read_header
    from ._reader import candidate_tiers

    for tier in candidate_tiers(store, path):
        got = read_header(tier.backend, path)
        if got is not None:
            size = got[0].file_size
            if not store.read_only:
                store.catalog.set_size(key_of_path(path), size)
            return replace(entry, size=size)
    raise NotFound(path)


def list_dir(store: Any, path: str, kind: str, default_time: float) -> list[tuple[str, str, str, Stat]]:
    """``(name, path, kind, stat)`` of each entry of a stored directory (``[]`` if it holds nothing)."""
    try:
        entries = store.ls(path)
    except (NotFound, InvalidInput):
        return []
    out = []
    child_kind = {"root": "model", "model": "namespace", "namespace": None, "shard": "chunk"}[kind]
    for e in entries:
        k = child_kind or ("manifest" if e.kind == "manifest" else "shard")
        if k == "chunk" and e.size == 0:
            try:
                e = _fix_size(store, e.path, e)
            except NotFound:
                continue
            except (ChunkFormatError, OSError) as err:  # one bad chunk must not hide its whole directory
                log.warning("kvfs mount: %s left out of its directory listing: %s", e.path, err)
                continue
        if k == "manifest":
            st = Stat("manifest", e.size, default_time, default_time, default_time)
        else:
            st = Stat(k, e.size, *_times(e, default_time))
        out.append((e.name, e.path, k, st))
    return out


def has_children(store: Any, path: str, kind: str) -> bool:
    """Whether a stored directory holds anything (chunks, a manifest, namespaces)."""
    try:
        return bool(store.ls(path))
    except (NotFound, InvalidInput):
        return False


# ------------------------------------------------------------------------------------------ xattrs
XATTR_PREFIX = "user.kvfs."
CHUNK_XATTRS = ("tokens", "parent", "pinned", "hits", "tier", "start")
DIR_XATTRS = ("tokens", "pinned", "hits", "tier", "chunks", "bytes")


def xattr_names(kind: str) -> tuple[str, ...]:
    if kind == "chunk":
        return CHUNK_XATTRS
    return DIR_XATTRS if kind in DIR_KINDS else ()


def xattrs(store: Any, path: str, kind: str) -> dict[str, str]:
    """The ``user.kvfs.*`` attributes of a path (names without the prefix), as strings."""
    if kind == "chunk":
        rec = store.records(path)[0]
        return {
            "tokens": str(rec.ntokens),
            "parent": rec.parent,
            "pinned": "1" if rec.pins else "0",
            "hits": str(rec.hits),
            "tier": ",".join(t.url.redacted() for t in store.tiers if rec.tiers & t.bit),
            "start": str(rec.start),
        }
    if kind in ("root", "model", "namespace", "shard"):
        e = store.stat(path)
        return {
            "tokens": str(e.tokens),
            "pinned": str(e.pins),  # chunks pinned under this directory
            "hits": str(e.hits),
            "tier": ",".join(e.tiers),
            "chunks": str(e.chunks),
            "bytes": str(e.size),  # chunk bytes under it (each chunk once, whatever tiers hold it)
        }
    return {}


def parse_bool(value: bytes) -> bool:
    v = value.strip(b"\x00 \n\t").lower()
    if v in (b"1", b"true", b"yes", b"on"):
        return True
    if v in (b"0", b"false", b"no", b"off", b""):
        return False
    raise InvalidInput(f"user.kvfs.pinned takes 1 or 0, got {value[:20]!r}")


def now() -> float:
    return time.time()
