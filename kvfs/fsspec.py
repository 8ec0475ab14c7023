"""``kvfs://``: a kvfs store as an fsspec filesystem.

The same virtual namespace as ``kvfs ls`` and the FUSE mount: models,
namespaces, 2-hex shards, and chunks as read-only safetensors files::

    import fsspec
    fs = fsspec.filesystem("kvfs", url="s3://bucket/kv?endpoint_url=http://127.0.0.1:9000")
    fs.ls("")                                   # models
    data = fs.cat("llama-3.1-8b/bf16-.../9f/9f3a....safetensors")   # == store.cat(path), verified
    with fsspec.open("kvfs://llama-3.1-8b/.../9f/9f3a....safetensors", url="lmdb:///var/cache/kvfs") as f:
        header = f.read(4096)                    # ranged reads, each layer they touch verified
    fs.rm(path)                                  # evicts; a pinned chunk raises PermissionError
    fs.close()                                   # closes (and flushes) the store

The store is named by ``url=`` (any kvfs store URL, tiers included), else
``$KVFS_URL``, else the embedded default. fsspec URL chaining works for
storage that fsspec itself knows: ``kvfs::s3://bucket/kv``,
``kvfs::file:///nvme/kvfs``, ``kvfs://<chunk path>::s3://bucket/kv``, with
the inner filesystem's options under its protocol (``s3={"endpoint_url":
...}``). kvfs-only schemes (``lmdb://``) and multi-tier URLs (which use
``::`` themselves) cannot be chained, because fsspec resolves every link of
a chain as an fsspec protocol: give them as ``url=``.

Instances are not cached by fsspec (``cachable = False``): each
``fsspec.filesystem("kvfs", ...)`` opens its own store, which lives until
:meth:`KVFileSystem.close` (or the filesystem is garbage collected). Pass
``store=`` to wrap a store you already have; it is then yours to close.
"""

from __future__ import annotations

import errno
import hashlib
import io
import weakref
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from .errors import ChunkFormatError, InvalidInput, PinnedError, ReadOnlyStore, StoreError

_READ_ONLY_HINT = (
    "kvfs:// is read-only apart from rm (eviction): write KV with kvfs.Namespace.put, "
    "copy chunks between stores with `kvfs cp`"
)
_MANIFEST = "manifest.json"


def chained_url(target_protocol: str | tuple | list, fo: str, target_options: dict[str, Any] | None) -> str:
    """The kvfs store URL of an fsspec chain link (``kvfs::s3://bucket/kv``)."""
    proto = target_protocol[0] if isinstance(target_protocol, (list, tuple)) else target_protocol
    proto = str(proto)
    loc = fo or ""
    if proto in ("file", "local"):
        url = f"file://{loc if loc.startswith('/') else '/' + loc}"
    elif proto == "memory":
        url = f"memory://{loc.strip('/')}"
    else:
        url = f"{proto}://{loc}"
    opts = []
    for k, v in (target_options or {}).items():
        if isinstance(v, bool):
            v = "true" if v else "false"
        if not isinstance(v, (str, int, float)):
            raise InvalidInput(
                f"option {k!r} of the chained {proto}:// filesystem is a {type(v).__name__}; a store URL holds "
                "only text options: pass the store as url='...' with ?name=value options instead"
            )
        opts.append(f"{quote(str(k))}={quote(str(v), safe='/:.,@')}")
    if opts:
        url += ("&" if "?" in url else "?") + "&".join(opts)
    return url


class KVFileSystem(AbstractFileSystem):
    """A kvfs store as a read-only fsspec filesystem (``rm`` evicts). Protocol ``kvfs``."""

    protocol = "kvfs"
    root_marker = ""
    cachable = False  # a store holds files, locks and threads: never share one through fsspec's instance cache

    def __init__(
        self,
        url: str | None = None,
        *,
        store: Any = None,
        read_only: bool = False,
        fo: str | None = None,
        target_protocol: str | None = None,
        target_options: dict[str, Any] | None = None,
        **storage_options: Any,
    ) -> None:
        super().__init__(**storage_options)
        if target_protocol is not None:
            if url is not None or store is not None:
                raise InvalidInput("give the store either as url=/store= or by chaining (kvfs::s3://...), not both")
            url = chained_url(target_protocol, fo or "", target_options)
        self._owned = store is None
        if store is None:
            from .store import Store

            store = Store(url, read_only=read_only)
            self._finalizer = weakref.finalize(self, store.close)
        else:
            self._finalizer = None
        self.store = store

    # ---------------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Close (and flush) the store if this filesystem opened it. Idempotent."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> "KVFileSystem":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KVFileSystem({self.store.redacted_url})"

    # ---------------------------------------------------------------------------------- paths
    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        return super()._strip_protocol(path).strip("/")

    # ---------------------------------------------------------------------------------- listing
    @staticmethod
    def _as_info(entry) -> dict[str, Any]:
        d = entry.to_dict()
        kind = d.pop("type")
        d["name"] = entry.path
        d["kind"] = kind
        d["type"] = "directory" if entry.is_dir or kind == "root" else "file"
        if d["type"] == "directory":
            d["bytes"] = d["size"]  # what the chunks under it take; a directory itself has no size
            d["size"] = 0
        return d

    def _sized(self, entry):
        """A chunk the catalog learned of by probing a tier (written by another node) has no size yet: its
        size is read from its header (as the FUSE mount does), or reads of it would end at byte 0."""
        if entry.kind == "chunk" and not entry.size:
            from .fuse._tree import _fix_size

            try:
                entry = _fix_size(self.store, entry.path, entry)
            except ChunkFormatError as e:
                raise StoreError(errno.EIO, f"{entry.path}: {e}") from e
        return entry

    def ls(self, path: str = "", detail: bool = True, **kwargs: Any):
        path = self._strip_protocol(path)
        out = []
        for e in self.store.ls(path):
            try:
                out.append(self._as_info(self._sized(e)))
            except OSError:  # gone from every tier since the catalog listed it, or unreadable: left out (as
                continue  # the FUSE mount does), one bad chunk must not hide its whole directory
        return out if detail else [o["name"] for o in out]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        return self._as_info(self._sized(self.store.stat(self._strip_protocol(path))))

    def exists(self, path: str, **kwargs: Any) -> bool:
        try:
            self.store.stat(self._strip_protocol(path))
        except (FileNotFoundError, InvalidInput):
            return False
        return True

    def created(self, path: str) -> datetime:
        ts = self.info(path).get("created")
        if ts is None:
            raise FileNotFoundError(errno.ENOENT, f"no creation time recorded for {path!r}")
        return datetime.fromtimestamp(ts, tz=timezone.utc)

    def modified(self, path: str) -> datetime:
        """Chunks never change once written: their modification time is their creation time."""
        return self.created(path)

    def ukey(self, path: str) -> str:
        """A chunk's key (its content address); for anything else a hash of its bytes or listing."""
        path = self._strip_protocol(path)
        info = self.info(path)
        if info["kind"] == "chunk":
            return path.rsplit("/", 1)[-1].removesuffix(".safetensors")
        if info["kind"] == "manifest":
            return hashlib.sha256(self._cat(path)).hexdigest()
        return super().ukey(path)

    def checksum(self, path: str) -> int:
        return int(self.ukey(path)[:16], 16)

    # ---------------------------------------------------------------------------------- reading
    def _cat(self, path: str) -> bytes:
        """``store.cat``, a chunk that failed its checks raised as what a filesystem gives for a bad file (EIO)."""
        try:
            return self.store.cat(path)
        except ChunkFormatError as e:
            raise StoreError(errno.EIO, str(e)) from e

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        """A chunk's bytes, verified: a whole file as ``store.cat``, a range layer by layer (every layer it
        touches checked against its checksum, the header against the path, as the FUSE mount does)."""
        path = self._strip_protocol(path)
        if not start and end is None or path.endswith("/" + _MANIFEST):
            data = self._cat(path)
            return data if not start and end is None else data[start:end]
        info = self.info(path)
        if info["type"] == "directory":
            raise IsADirectoryError(errno.EISDIR, f"{path!r} is a directory, not a chunk")
        start, end = _clamp(start, end, info["size"])
        if end <= start:
            return b""
        return _VerifiedRanges(self.store, path).read(start, end)

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict | None = None,
        verify: bool = False,
        **kwargs: Any,
    ):
        """Open a chunk (or manifest) for reading; ``verify=True`` reads it whole and checks it first."""
        if mode != "rb":
            raise ReadOnlyStore(f"cannot open {path!r} with mode {mode!r}: {_READ_ONLY_HINT}")
        path = self._strip_protocol(path)
        info = self.info(path)
        if info["type"] == "directory":
            raise IsADirectoryError(errno.EISDIR, f"{path!r} is a directory, not a chunk")
        if verify or info["kind"] == "manifest":
            return io.BytesIO(self._cat(path))
        return KVFile(self, path, mode, block_size, autocommit, cache_options=cache_options, size=info["size"],
                      **kwargs)

    # ---------------------------------------------------------------------------------- eviction
    def rm(self, path, recursive: bool = False, maxdepth: int | None = None, force: bool = False) -> None:
        """Evict chunks (a directory needs ``recursive=True``). Pinned chunks raise PermissionError
        after the others are evicted, unless ``force``."""
        paths = [path] if isinstance(path, str) else list(path)
        targets = []
        for p in paths:
            p = self._strip_protocol(p)
            info = self.info(p)
            if info["kind"] == "manifest":
                raise PermissionError(errno.EPERM, f"{p}: a namespace's manifest stays while the store knows the "
                                                   "namespace; evict its chunks instead")
            if info["type"] == "directory":
                if not recursive:
                    raise IsADirectoryError(errno.EISDIR, f"{p!r} is a directory: use rm(path, recursive=True)")
                if maxdepth is not None:
                    targets += [f for f in self.find(p, maxdepth=maxdepth) if f.endswith(".safetensors")]
                    continue
            targets.append(p)
        if not targets:
            return
        root = [t for t in targets if not t.strip("/")]
        if root:  # rm("", recursive=True): the whole store, asked for in so many words
            result = self.store.evict(all=True, force=force)
        else:
            result = self.store.evict(targets, force=force)
        if result.refused:
            err = PinnedError(result.refused[0])
            if len(result.refused) > 1:
                err.strerror = f"{len(result.refused)} chunks are pinned (first: {err.strerror})"
                err.args = (err.errno, err.strerror)
            raise err

    def rm_file(self, path: str) -> None:
        self.rm(path)

    def _rm(self, path: str) -> None:
        self.rm(path)

    # ---------------------------------------------------------------------------------- not supported
    def _read_only(self, *args: Any, **kwargs: Any):
        raise ReadOnlyStore(_READ_ONLY_HINT)

    mkdir = makedirs = rmdir = pipe_file = put_file = touch = cp_file = mv = _read_only


class KVFile(AbstractBufferedFile):
    """A chunk opened for reading: its header checked at the first read, then each cache miss one ranged
    read of the layers it overlaps, each layer checked against its checksum before a byte of it is served."""

    _ranges: "_VerifiedRanges | None" = None

    def _fetch_range(self, start: int, end: int) -> bytes:
        start, end = _clamp(start, end, self.size)
        if end <= start:
            return b""
        if self._ranges is None:
            self._ranges = _VerifiedRanges(self.fs.store, self.path)
        return self._ranges.read(start, end)


class _VerifiedRanges:
    """Verified ranged reads of one chunk file, as the FUSE mount serves them (kvfs.fuse._reader).

    The header is read from the first tier holding the chunk and checked
    against the path (namespace, key, token ids hashed back to the key, the
    signature in a signed store, the file's size); a range is then read from
    that tier whole layers at a time, each layer checked against its
    checksum (and signed digest). A chunk that fails is quarantined (unless
    the store is read-only) and the read raises ``OSError(EIO)``: bytes that
    failed a check are never returned.
    """

    def __init__(self, store: Any, path: str) -> None:
        from .fuse._reader import candidate_tiers, open_header

        self.store, self.path = store, path
        try:
            self.tier, self.header, self.raw = open_header(store, path, candidate_tiers(store, path))
        except ChunkFormatError as e:
            self._failed(e)

    def read(self, start: int, end: int) -> bytes:
        from .chunk import check_layer
        from .fuse._reader import readinto

        h = self.header
        end = min(end, h.file_size)
        parts: list = []
        if start < h.data_offset:
            parts.append(self.raw[start : min(end, h.data_offset)])
            start = h.data_offset
        if start < end:
            lb = h.layer_bytes
            first, last = (start - h.data_offset) // lb, (end - 1 - h.data_offset) // lb + 1
            base = h.data_offset + first * lb
            buf = bytearray((last - first) * lb)
            try:
                n = readinto(self.tier.backend, self.path, base, buf)
            except OSError as e:
                raise StoreError(e.errno or errno.EIO, f"reading {self.path}: {e}") from e
            if n is None:
                raise FileNotFoundError(errno.ENOENT, f"{self.path} was evicted while open")
            mv = memoryview(buf)
            try:
                if n < len(buf):
                    raise ChunkFormatError(f"{self.path} is truncated: {n} of {len(buf)} bytes at {base}")
                for i in range(last - first):
                    check_layer(h, first + i, mv[i * lb : (i + 1) * lb])
            except ChunkFormatError as e:
                self._failed(e)
            parts.append(mv[start - base : end - base])
        return b"".join(parts)

    def _failed(self, e: ChunkFormatError):
        if not self.store.read_only:
            try:  # every copy checked whole; the bad ones quarantined (as the FUSE mount does)
                self.store.verify_chunks(self.path, quarantine=True)
            except Exception:  # noqa: BLE001 - best effort: the read fails either way
                pass
        raise StoreError(errno.EIO, f"{self.path} failed its checks: {e}") from e


def _clamp(start: int | None, end: int | None, size: int) -> tuple[int, int]:
    start = 0 if start is None else (max(0, size + start) if start < 0 else start)
    end = size if end is None else (size + end if end < 0 else min(end, size))
    return start, end
