"""The pyfuse3 operations of a kvfs mount: the tree, attributes, directories, removal, reads.

Writes (``--read-write``) are in :mod:`kvfs.fuse._writes`, extended
attributes in :mod:`kvfs.fuse._xattrs`; one class holds them all.

Rules every handler follows:

* the handlers run on one trio event loop and own all the mount's state;
  store and backend I/O runs in worker threads (:meth:`KVFSOperations._io`),
  bounded by a limiter and a timeout, so that a slow or hung backend answers
  ``EIO`` instead of hanging the mount;
* errors become errnos in one place (:func:`kvfs.fuse._boundary.boundary`):
  the store's ``OSError`` subclasses keep the errno a filesystem would give,
  corrupt chunks and backend failures are ``EIO`` plus a log line;
* the kernel caches entries and attributes for ``attr_timeout`` seconds
  only, so chunks stored or evicted by other processes appear and vanish
  without a remount.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat as stat_m
import time
from typing import Any

import pyfuse3
import trio
from pyfuse3 import FUSEError

from ..catalog import key_of_path
from ..errors import ChunkFormatError, NotFound
from . import _tree
from ._boundary import Handle, Node, boundary
from ._reader import HOLD_SECONDS, ChunkReader
from ._staging import MANIFEST_NAME, SHARD_NAME, StagedFile, chunk_limit
from ._tree import DIR_KINDS, Stat, child_of, inode_of
from ._writes import WriteOps
from ._xattrs import XattrOps

log = logging.getLogger("kvfs.fuse")

BLKSIZE = 1 << 20  # tells cp & co. to read in 1 MiB requests
DIR_TTL = 2.0  # directory sizes/times are sums over chunks: recompute at most this often
#: handlers whose first argument is a file handle (what the log names is the file it is open on)
_FH_FIRST = frozenset(("read", "write", "flush", "fsync", "release", "readdir", "releasedir"))


class KVFSOperations(WriteOps, XattrOps, pyfuse3.Operations):
    """A store's namespace as a filesystem. See ``docs/fuse.md``."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, store: Any, *, read_write: bool = False, io_timeout: float = 120.0,
                 attr_timeout: float = 1.0, threads: int = 16) -> None:
        super().__init__()
        self.store = store
        self.read_write = read_write
        self.io_timeout = io_timeout
        self.attr_timeout = attr_timeout
        self.uid, self.gid = os.getuid(), os.getgid()
        self.started = time.time()
        self.nursery: trio.Nursery | None = None
        self._limiter = trio.CapacityLimiter(threads)
        self._ahead_limiter = trio.CapacityLimiter(4)  # read-ahead never takes the threads reads need
        self._nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: Node(pyfuse3.ROOT_INODE, "", "root", 1)}
        self._handles: dict[int, Handle] = {}
        self._dirs: dict[int, list] = {}
        self._next_fh = 1
        self._pending: dict[str, str] = {}  # directories made by mkdir or emptied by rm: path -> kind
        self._manifests: dict[str, bytes] = {}  # manifests of namespaces made through the mount, not stored yet
        self._staged: dict[tuple[int, str], StagedFile] = {}
        self._staged_ino: dict[int, StagedFile] = {}
        self._dir_cache: dict[str, tuple[float, Stat]] = {}

    # ------------------------------------------------------------------------------ plumbing
    def _describe(self, args, op: str = "") -> str:
        parts = []
        if op in _FH_FIRST and args and isinstance(args[0], int):  # a file handle, not an inode (fh 1 is no root)
            h = self._handles.get(args[0])
            node = self._nodes.get(h.ino) if h is not None else None
            path = h.staged.path if h is not None and h.staged is not None else node.path if node else None
            parts.append(path if path is not None else f"fh {args[0]}")
            args = ()  # offsets, sizes and data are not paths
        for a in args[:2]:
            if isinstance(a, int) and a in self._nodes:
                parts.append(self._nodes[a].path or "/")
            elif isinstance(a, int) and a in self._handles:
                node = self._nodes.get(self._handles[a].ino)
                parts.append(node.path if node else f"fh {a}")
            elif isinstance(a, bytes):
                parts.append(os.fsdecode(a))
        return "(" + ", ".join(parts) + ")"

    async def _io(self, fn, *args):
        """Run blocking store work in a worker thread; a call past ``io_timeout`` answers EIO."""
        with trio.move_on_after(self.io_timeout):
            return await trio.to_thread.run_sync(functools.partial(fn, *args), abandon_on_cancel=True,
                                                 limiter=self._limiter)
        what = ", ".join(a if isinstance(a, str) else getattr(a, "path", type(a).__name__) for a in args[:2])
        log.error("kvfs mount: %s(%s) took more than %.0f s (backend hung?); answering EIO",
                  getattr(fn, "__name__", fn).lstrip("_"), what, self.io_timeout)
        raise FUSEError(errno.EIO)

    def _node(self, ino: int) -> Node:
        node = self._nodes.get(ino)
        if node is None:
            raise FUSEError(errno.ENOENT)
        return node

    def _remember(self, path: str, kind: str) -> Node:
        ino = inode_of(path)
        node = self._nodes.get(ino)
        while node is not None and node.path != path:  # a 63-bit hash collision: probe on
            ino += 1
            node = self._nodes.get(ino)
        if node is None:
            node = self._nodes[ino] = Node(ino, path, kind)
        node.kind = kind
        return node

    def _ino_of(self, path: str) -> int:
        """The inode a path has (or will have) in this mount."""
        ino = inode_of(path)
        node = self._nodes.get(ino)
        while node is not None and node.path != path:
            ino += 1
            node = self._nodes.get(ino)
        return ino

    def _refuse(self) -> int:
        """The errno for a change this mount does not make: EROFS unless mounted --read-write."""
        return errno.EPERM if self.read_write else errno.EROFS

    def _new_fh(self, handle: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    def _forget_dir_cache(self, path: str) -> None:
        parts = path.split("/")
        for i in range(len(parts) + 1):
            self._dir_cache.pop("/".join(parts[:i]), None)

    def _invalidate(self, parent_path: str, name: str) -> None:
        """Tell the kernel that ``parent/name`` is gone (if it knows the directory)."""
        parent = self._nodes.get(self._ino_of(parent_path))
        if parent is not None:
            pyfuse3.invalidate_entry_async(parent.ino, os.fsencode(name), ignore_enoent=True)

    # ------------------------------------------------------------------------------ attributes
    def _attrs(self, ino: int, st: Stat) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = self.attr_timeout
        a.attr_timeout = self.attr_timeout
        if st.is_dir:
            a.st_mode = stat_m.S_IFDIR | 0o755
            a.st_nlink = 2
            a.st_blocks = 0
        else:
            a.st_mode = stat_m.S_IFREG | (0o644 if st.kind == "staged" else 0o444)
            a.st_nlink = 1
            a.st_blocks = (st.size + 511) // 512
        a.st_uid, a.st_gid, a.st_rdev = self.uid, self.gid, 0
        # a directory's bytes are in user.kvfs.bytes: a size here would be counted twice by `du -b`
        a.st_size = 0 if st.is_dir else st.size
        a.st_blksize = BLKSIZE
        a.st_atime_ns = int(st.atime * 1e9)
        a.st_mtime_ns = int(st.mtime * 1e9)
        a.st_ctime_ns = int(st.ctime * 1e9)
        return a

    def _staged_stat(self, staged: StagedFile) -> Stat:
        return Stat("staged", len(staged.data), staged.modified, staged.modified, staged.created)

    def _stat_sync(self, path: str, kind: str, pending_kind: str | None, pending_manifest: bytes | None) -> Stat:
        """Attributes of a path (worker thread). Directories made through the mount count too."""
        if kind == "manifest" and pending_manifest is not None:
            try:
                return _tree.stat_path(self.store, path, kind, self.started)
            except NotFound:
                return Stat("manifest", len(pending_manifest), self.started, self.started, self.started)
        try:
            return _tree.stat_path(self.store, path, kind, self.started)
        except NotFound:
            if pending_kind == kind:
                return Stat(kind, 0, self.started, self.started, self.started)
            raise

    async def _stat(self, path: str, kind: str) -> Stat:
        if kind in DIR_KINDS and kind != "root":
            hit = self._dir_cache.get(path)
            if hit is not None and hit[0] > time.monotonic():
                return hit[1]
        st = await self._io(self._stat_sync, path, kind, self._pending.get(path),
                            self._manifests.get(path.rsplit("/", 1)[0]) if kind == "manifest" else None)
        if kind in DIR_KINDS and kind != "root":
            self._dir_cache[path] = (time.monotonic() + DIR_TTL, st)
        return st

    # ------------------------------------------------------------------------------ lookups
    @boundary
    async def lookup(self, parent_ino, name, ctx=None):
        parent = self._node(parent_ino)
        name_s = os.fsdecode(name)
        if name_s in (".", ".."):  # only asked for with export support, which is off; answered anyway
            path = parent.path if name_s == "." or not parent.path else parent.path.rpartition("/")[0]
            node = self._remember(path, ("root", "model", "namespace", "shard")[path.count("/") + 1 if path else 0])
            st = await self._stat(node.path, node.kind)
            node.lookups += 1
            return self._attrs(node.ino, st)
        staged = self._staged.get((parent_ino, name_s))
        if staged is not None:
            staged.lookups += 1
            return self._attrs(staged.ino, self._staged_stat(staged))
        try:
            path, kind = child_of(parent.path, parent.kind, name_s)
        except NotADirectoryError:
            raise FUSEError(errno.ENOTDIR) from None
        st = await self._stat(path, kind)
        node = self._remember(path, kind)
        node.lookups += 1
        node.st = st
        return self._attrs(node.ino, st)

    @boundary
    async def forget(self, inode_list):
        for ino, n in inode_list:
            node = self._nodes.get(ino)
            if node is not None and ino != pyfuse3.ROOT_INODE:
                node.lookups -= n
                if node.lookups <= 0:
                    del self._nodes[ino]
            staged = self._staged_ino.get(ino)
            if staged is not None:
                staged.lookups -= n
                self._drop_staged_if_unused(staged)

    @boundary
    async def getattr(self, ino, ctx=None):
        staged = self._staged_ino.get(ino)
        if staged is not None:
            return self._attrs(ino, self._staged_stat(staged))
        node = self._node(ino)
        try:
            node.st = await self._stat(node.path, node.kind)
        except (NotFound, FileNotFoundError):
            # evicted by someone else while open here: an open file keeps its attributes (as an unlinked file
            # does), so that its reads answer ESTALE (or a copy left in another tier) instead of ENOENT
            if node.st is None or not any(h.ino == ino and h.reader is not None for h in self._handles.values()):
                raise
        return self._attrs(ino, node.st)

    @boundary
    async def setattr(self, ino, attr, fields, fh, ctx):
        staged = self._staged_ino.get(ino)
        if staged is not None:
            if fields.update_size:
                staged.truncate(attr.st_size)
            return self._attrs(ino, self._staged_stat(staged))  # mode and times of a new file do not matter
        node = self._node(ino)
        if fields.update_size or fields.update_mode or fields.update_uid or fields.update_gid:
            raise FUSEError(self._refuse())
        if (fields.update_atime or fields.update_mtime) and node.kind == "chunk" and not self.store.read_only:
            # `touch chunk`: the chunk was used now (LRU). Chunk times come from the catalog, not from callers.
            await self._io(self.store.catalog.touch, [key_of_path(node.path)])
        return self._attrs(ino, await self._stat(node.path, node.kind))

    @boundary
    async def statfs(self, ctx):
        usage = await self._io(self.store.usage)
        nchunks = await self._io(self.store.catalog.count)
        total = used = 0
        for u in usage:
            t_used = u["used"] or 0
            used += t_used
            if u["capacity"] is not None:
                total += max(u["capacity"], t_used)
            elif u["available"] is not None:
                total += max(t_used, u["device_used"] or 0) + u["available"]
            else:
                total += t_used
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = (total + 4095) // 4096
        s.f_bfree = s.f_bavail = max(0, total - used) // 4096
        s.f_files = nchunks
        s.f_ffree = s.f_favail = 1 << 32
        s.f_namemax = 255
        return s

    # ------------------------------------------------------------------------------ directories
    def _list_sync(self, path: str, kind: str):
        return _tree.list_dir(self.store, path, kind, self.started)

    @boundary
    async def opendir(self, ino, ctx):
        node = self._node(ino)
        if node.kind not in DIR_KINDS:
            raise FUSEError(errno.ENOTDIR)
        entries = await self._io(self._list_sync, node.path, node.kind)
        names = {e[0] for e in entries}
        prefix = node.path + "/" if node.path else ""
        for path, kind in sorted(self._pending.items()):  # made by mkdir, or emptied by rm
            if path.startswith(prefix) and "/" not in path[len(prefix):] and path[len(prefix):] not in names:
                entries.append((path[len(prefix):], path, kind, Stat(kind, 0, self.started, self.started,
                                                                     self.started)))
        if node.kind == "namespace" and MANIFEST_NAME not in names and node.path in self._manifests:
            m = self._manifests[node.path]
            entries.append((MANIFEST_NAME, f"{node.path}/{MANIFEST_NAME}", "manifest",
                            Stat("manifest", len(m), self.started, self.started, self.started)))
        for (p_ino, name), staged in sorted(self._staged.items(), key=lambda kv: kv[0][1]):
            if p_ino == ino and name not in names:
                entries.append((name, None, "staged", staged))
        entries.sort(key=lambda e: e[0])
        return self._new_dir(entries)

    def _new_dir(self, entries) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = entries
        return fh

    @boundary
    async def readdir(self, fh, start_id, token):
        entries = self._dirs.get(fh, [])
        for i in range(start_id, len(entries)):
            name, path, kind, st = entries[i]
            if kind == "staged":
                staged = st
                if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(staged.ino,
                                                                                    self._staged_stat(staged)), i + 1):
                    return
                staged.lookups += 1
                continue
            ino = self._ino_of(path)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(ino, st), i + 1):
                return
            node = self._remember(path, kind)
            node.lookups += 1
            node.st = st

    @boundary
    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    @boundary
    async def mkdir(self, parent_ino, name, mode, ctx):
        parent = self._node(parent_ino)
        if not self.read_write:
            raise FUSEError(errno.EROFS)
        name_s = os.fsdecode(name)
        if parent.kind not in ("root", "model", "namespace"):
            raise FUSEError(errno.EPERM)
        if parent.kind == "namespace" and not SHARD_NAME.match(name_s):
            raise FUSEError(errno.EINVAL)  # a namespace holds manifest.json and <hh> shards only
        if name_s.startswith(".") or "\\" in name_s:
            raise FUSEError(errno.EINVAL)
        path, kind = child_of(parent.path, parent.kind, name_s)
        try:
            await self._stat(path, kind)
        except FUSEError:
            raise
        except (NotFound, FileNotFoundError):
            pass
        else:
            raise FUSEError(errno.EEXIST)
        self._pending[path] = kind
        self._forget_dir_cache(path)
        node = self._remember(path, kind)
        node.lookups += 1
        return self._attrs(node.ino, Stat(kind, 0, self.started, self.started, self.started))

    def _dir_busy_sync(self, path: str, kind: str) -> bool:
        return _tree.has_children(self.store, path, kind)

    @boundary
    async def rmdir(self, parent_ino, name, ctx):
        parent = self._node(parent_ino)
        name_s = os.fsdecode(name)
        path, kind = child_of(parent.path, parent.kind, name_s)
        if kind not in DIR_KINDS:
            raise FUSEError(errno.ENOTDIR)
        prefix = path + "/"
        busy = await self._io(self._dir_busy_sync, path, kind)
        busy = busy or any(p.startswith(prefix) for p in self._pending) or (kind == "namespace" and path in
                                                                             self._manifests)
        child_ino = self._ino_of(path)
        busy = busy or any(p_ino == child_ino for p_ino, _ in self._staged)
        if busy:
            raise FUSEError(errno.ENOTEMPTY)
        if path not in self._pending:
            # nothing stored there and not made here: it does not exist (any more)
            raise FUSEError(errno.ENOENT)
        del self._pending[path]
        self._forget_dir_cache(path)

    # ------------------------------------------------------------------------------ removal
    def _evict_sync(self, path: str) -> tuple[list[str], list[str], bool]:
        res = self.store.evict([path])
        shard = path.rsplit("/", 1)[0]
        return res.evicted, res.refused, not _tree.has_children(self.store, shard, "shard")

    @boundary
    async def unlink(self, parent_ino, name, ctx):
        parent = self._node(parent_ino)
        name_s = os.fsdecode(name)
        staged = self._staged.pop((parent_ino, name_s), None)
        if staged is not None:  # a new file not stored yet: forget it (a writer that still has it open too)
            staged.removed = True
            self._drop_staged_if_unused(staged)
            return
        path, kind = child_of(parent.path, parent.kind, name_s)
        if kind == "manifest":
            raise FUSEError(errno.EPERM)  # a namespace's manifest goes when its last chunk does: never alone
        if kind != "chunk":
            raise FUSEError(errno.EISDIR)
        evicted, refused, shard_empty = await self._io(self._evict_sync, path)
        if refused:
            log.info("kvfs mount: rm %s refused: pinned", path)
            raise FUSEError(errno.EPERM)
        if not evicted:
            raise FUSEError(errno.ENOENT)
        shard = path.rsplit("/", 1)[0]
        if shard_empty:
            self._pending[shard] = "shard"  # like any filesystem: the directory stays until rmdir
        self._forget_dir_cache(path)
        # the chunk has two names (shard/<hash> and its alias ns/<hash>): the kernel forgets the one removed
        other = shard.rsplit("/", 1)[0] if parent.kind == "shard" else shard
        self._invalidate(other, name_s)

    @boundary
    async def link(self, ino, new_parent_ino, new_name, ctx):
        raise FUSEError(self._refuse())  # a chunk has one name (and its alias in the namespace directory)

    @boundary
    async def symlink(self, parent_ino, name, target, ctx):
        raise FUSEError(self._refuse())

    @boundary
    async def mknod(self, parent_ino, name, mode, rdev, ctx):
        raise FUSEError(self._refuse())

    # ------------------------------------------------------------------------------ reading
    def _open_chunk_sync(self, path: str) -> ChunkReader:
        reader = ChunkReader(self.store, path)
        try:
            reader.open()
        except ChunkFormatError:
            if self.store.spec_of("/".join(path.split("/")[:2])) is not None:  # corrupt, not just unknown
                self._quarantine_sync(path)
            raise
        if not self.store.read_only:
            try:
                self.store.catalog.touch([key_of_path(path)])
            except OSError as e:
                log.warning("kvfs mount: cannot record the access to %s: %s", path, e)
        return reader

    def _quarantine_sync(self, path: str) -> None:
        """A copy failed its checks: let the store verify every copy and drop the bad ones."""
        if self.store.read_only:
            return
        try:
            bad = [r for r in self.store.verify_chunks(path, quarantine=True) if not r["ok"]]
            for r in bad:
                log.warning("kvfs mount: quarantined %s in %s: %s", path, r["tier"], r["error"])
        except Exception as e:  # noqa: BLE001 - best effort, the read already failed
            log.warning("kvfs mount: could not quarantine %s: %s", path, e)

    def _manifest_sync(self, path: str) -> bytes:
        return self.store.cat(path)

    @boundary
    async def open(self, ino, flags, ctx):
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY
        staged = self._staged_ino.get(ino)
        if staged is not None:
            if writing and flags & os.O_TRUNC:
                staged.truncate(0)
            staged.opens += 1
            return pyfuse3.FileInfo(fh=self._new_fh(Handle(ino, staged=staged)), direct_io=True)
        node = self._node(ino)
        if node.kind in DIR_KINDS:
            raise FUSEError(errno.EISDIR)
        if writing:
            if not self.read_write:
                raise FUSEError(errno.EROFS)
            if not flags & os.O_TRUNC:
                raise FUSEError(errno.EPERM)  # stored files are never changed in place
            # cp onto an existing chunk: take the new bytes, check them at close (a no-op if already stored)
            parent_path, name = node.path.rsplit("/", 1)
            limit = await self._io(chunk_limit, self.store, "/".join(node.path.split("/")[:2]),
                                   self._manifests.get("/".join(node.path.split("/")[:2])))
            staged = StagedFile(ino, self._ino_of(parent_path), name, node.kind, node.path, limit=limit)
            staged.opens = 1
            return pyfuse3.FileInfo(fh=self._new_fh(Handle(ino, staged=staged)), direct_io=True)
        if node.kind == "manifest":
            nsp = node.path.rsplit("/", 1)[0]
            data = self._manifests.get(nsp)
            if data is None:
                data = await self._io(self._manifest_sync, node.path)
            return pyfuse3.FileInfo(fh=self._new_fh(Handle(ino, data=data)), keep_cache=False)
        reader = await self._io(self._open_chunk_sync, node.path)
        # chunks never change under a name: the kernel may keep their pages across opens
        # (a chunk evicted and stored again has a new mtime, which drops them)
        return pyfuse3.FileInfo(fh=self._new_fh(Handle(ino, reader=reader)), keep_cache=True)

    def _fill_sync(self, reader: ChunkReader, off: int, size: int):
        with reader.lock:
            for _ in range(3):  # a window can be retired between fetch and use by concurrent readers: refetch
                rng = reader.plan(off, size)
                if rng is not None:
                    try:
                        reader.fetch(rng[0], rng[1], need=rng[2])
                    except ChunkFormatError:
                        self._quarantine_sync(reader.path)
                        raise
                data = reader.read_cached(off, size)
                if data is not None:
                    # no copy: while this read waits (reader.busy), no window is recycled or let go
                    return data
        raise OSError(errno.EIO, f"{reader.path}: layers for bytes {off}..{off + size} could not be kept in memory")

    @boundary
    async def read(self, fh, off, size):
        h = self._handles.get(fh)
        if h is None:
            raise FUSEError(errno.EBADF)
        if h.staged is not None:
            return bytes(h.staged.data[off : off + size])
        if h.data is not None:
            return h.data[off : off + size]
        if h.failed:
            raise FUSEError(errno.EIO)
        reader = h.reader
        reader.release_retired()
        reader.expire()
        data = reader.read_cached(off, size)
        if data is None:
            reader.busy += 1
            try:
                data = await self._io(self._fill_sync, reader, off, size)
            except ChunkFormatError:
                h.failed = True  # a corrupt copy: this open file serves nothing more
                raise
            finally:
                reader.busy -= 1
        # from here to the reply nothing awaits: the slice is copied to the kernel before any window it may
        # come from is recycled or its view let go (both happen only on this loop, between reads)
        reader.advance(off, len(data))
        ahead = reader.prefetch_plan()
        if ahead is not None and self.nursery is not None:
            self.nursery.start_soon(self._read_ahead, reader, *ahead)
        return data

    async def expire_views(self) -> None:
        """Forever: let go of the backend views that open files have held past ``HOLD_SECONDS`` (an idle open
        file must not pin an old LMDB snapshot). Runs on the event loop, so never under a read's feet."""
        while True:
            await trio.sleep(HOLD_SECONDS / 2)
            now = time.monotonic()
            for h in list(self._handles.values()):
                if h.reader is not None:
                    h.reader.expire(now)

    async def _read_ahead(self, reader: ChunkReader, first: int, last: int) -> None:
        try:
            with trio.move_on_after(self.io_timeout):
                await trio.to_thread.run_sync(reader.fetch_ahead, first, last, abandon_on_cancel=True,
                                              limiter=self._ahead_limiter)
        except Exception:  # noqa: BLE001 - the read that needs these layers fetches them again and reports
            pass

    @boundary
    async def release(self, fh):
        h = self._handles.pop(fh, None)
        if h is None:
            return
        if h.reader is not None:
            h.reader.close()  # recycles the windows unless a read-ahead is still running
        if h.staged is not None:
            await self._close_write(h, report=False)  # nobody to tell: the log says it
            h.staged.opens -= 1
            self._drop_staged_if_unused(h.staged)
