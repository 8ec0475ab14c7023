"""The write side of a ``--read-write`` mount: new files, validated and imported when closed.

``create`` stages a new file (see :mod:`kvfs.fuse._staging`), ``write``
fills its buffer, ``flush``/``fsync`` (``close(2)``) validate and import it,
returning ``EINVAL`` when it is not a valid chunk of its namespace, and
``rename`` of a temporary file onto a chunk name (rsync) imports it there.
Written bytes never enter the kernel's page cache (``direct_io``), and the
kernel is told to drop an inode's cached size and pages after every import
attempt: only verified bytes are ever read back.
"""

from __future__ import annotations

import errno
import logging
import os

import pyfuse3
import trio
from pyfuse3 import FUSEError

from ..errors import ChunkFormatError
from ._boundary import Handle, Node, boundary
from ._staging import StagedFile, check_manifest, chunk_limit, classify_new_name, import_staged

log = logging.getLogger("kvfs.fuse")


class WriteOps:
    """create, write, flush, fsync and rename of :class:`kvfs.fuse._ops.KVFSOperations`."""

    @boundary
    async def create(self, parent_ino, name, mode, flags, ctx):
        parent = self._node(parent_ino)
        if not self.read_write:
            raise FUSEError(errno.EROFS)
        if parent.kind not in ("namespace", "shard"):
            raise FUSEError(errno.EPERM)  # files live in namespace directories only
        name_s = os.fsdecode(name)
        kind, path = classify_new_name(parent.kind, parent.path, name_s)
        nsp = "/".join(parent.path.split("/")[:2])
        limit = await self._io(chunk_limit, self.store, nsp, self._manifests.get(nsp))
        if kind == "manifest":
            limit = 1 << 20
        ino = self._ino_of(path)
        staged = StagedFile(ino, parent_ino, name_s, kind, path, limit=limit)
        staged.lookups = staged.opens = 1
        self._staged[(parent_ino, name_s)] = staged
        self._staged_ino[ino] = staged
        fh = self._new_fh(Handle(ino, staged=staged))
        # direct_io: written bytes, checked only at close, never sit in the kernel's page cache,
        # where a later reader of this inode (chunks are opened with keep_cache) could be served them
        return pyfuse3.FileInfo(fh=fh, direct_io=True), self._attrs(ino, self._staged_stat(staged))

    @boundary
    async def write(self, fh, off, buf):
        h = self._handles.get(fh)
        if h is None or h.staged is None:
            raise FUSEError(errno.EBADF)
        return h.staged.write(off, buf)

    def _commit_sync(self, staged: StagedFile, kind: str, path: str, manifest: bytes | None):
        nsp = "/".join(path.split("/")[:2])
        if kind == "manifest":
            data = check_manifest(self.store, nsp, bytes(staged.data))
            return "manifest", None if self.store.spec_of(nsp) is not None else data
        stored = import_staged(self.store, staged, path, manifest)
        if staged.pin:
            self.store.pin(path)
        return "chunk", stored

    async def _commit(self, staged: StagedFile, *, kind: str | None = None, path: str | None = None) -> None:
        """Validate a closed new file and store it; the error (EINVAL: not a valid chunk) goes to close(2)."""
        kind = kind or staged.kind
        path = path or staged.path
        if kind == "temp":
            return
        nsp = "/".join(path.split("/")[:2])
        staged.dirty = False
        try:
            what, result = await self._io(self._commit_sync, staged, kind, path, self._manifests.get(nsp))
        except ChunkFormatError as e:
            log.warning("kvfs mount: refused %s: %s (nothing stored)", path, e)
            raise FUSEError(errno.EINVAL) from None
        if what == "manifest":
            if result is not None:
                self._manifests[nsp] = result  # visible now, stored with the namespace's first chunk
        else:
            log.info("kvfs mount: %s %s", "stored" if result else "already held", path)
            self._manifests.pop(nsp, None)
            for p in list(self._pending):
                if path.startswith(p + "/"):
                    del self._pending[p]  # real now
        self._forget_dir_cache(path)
        staged.data = bytearray()  # stored: the bytes live in the store now
        self._adopt(staged, path, kind)

    def _adopt(self, staged: StagedFile, path: str, kind: str) -> None:
        """A new file was stored: its inode (and the kernel's references to it) now name the stored file."""
        if self._staged.get((staged.parent_ino, staged.name)) is staged:
            del self._staged[(staged.parent_ino, staged.name)]
        if self._staged_ino.get(staged.ino) is staged:
            del self._staged_ino[staged.ino]
        if staged.lookups > 0:
            node = self._nodes.get(staged.ino)
            if node is None or node.path != path:
                node = self._nodes[staged.ino] = Node(staged.ino, path, kind)
            node.lookups += staged.lookups
            staged.lookups = 0

    def _finish_staged(self, h: Handle) -> None:
        """After a commit (or its failure) the new file's name is no longer a staged file."""
        staged = h.staged
        if self._staged.get((staged.parent_ino, staged.name)) is staged:
            del self._staged[(staged.parent_ino, staged.name)]
        self._drop_staged_if_unused(staged)

    def _drop_staged_if_unused(self, staged: StagedFile) -> None:
        if (staged.opens <= 0 and self._staged.get((staged.parent_ino, staged.name)) is not staged
                and self._staged_ino.get(staged.ino) is staged):
            del self._staged_ino[staged.ino]

    def _forget_cached(self, ino: int) -> None:
        """After an import attempt: the kernel re-asks for this inode's size and bytes (a background task)."""
        if self.nursery is not None:
            self.nursery.start_soon(self._forget_cached_task, ino)

    async def _forget_cached_task(self, ino: int) -> None:
        # from a worker thread, after the reply: the kernel may wait for requests on the inode in flight
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, abandon_on_cancel=True)
        except OSError:
            pass  # the kernel no longer knows the inode: nothing cached

    async def _close_write(self, h: Handle, *, report: bool) -> None:
        staged = h.staged
        if staged.kind == "temp" or not staged.dirty or staged.removed:
            return
        if h.failed:  # written to again after its import failed: still nothing stored
            staged.dirty = False
            if report:
                raise FUSEError(errno.EINVAL)
            return
        if report and not staged.data:
            # the close of one descriptor of a file nothing was written to yet: `cmd > FILE` in a shell opens
            # FILE, dup2s it and closes the first descriptor before cmd writes. Nothing to check, nothing
            # dropped: the last close (release) refuses the file if it is still empty
            log.info("kvfs mount: %s closed while empty: not a chunk (yet)", staged.path)
            raise FUSEError(errno.EINVAL)
        try:
            await self._commit(staged)
        except Exception as e:  # refused (EINVAL), or the store could not take it (ENOSPC, EIO): nothing stored
            h.failed = True
            self._finish_staged(h)
            await self._drop_name(staged)
            if report:
                raise
            if not isinstance(e, FUSEError):
                log.warning("kvfs mount: could not store %s: %s (nothing stored)", staged.path, e)
            return
        finally:
            self._forget_cached(h.ino)
        self._finish_staged(h)

    async def _drop_name(self, staged: StagedFile) -> None:
        """A new file was refused: have the kernel forget its name before close(2) returns the error,
        so that the next open of that name creates a new file. From a worker thread: the kernel holds
        no lock of the directory while it waits for this flush/fsync."""
        with trio.move_on_after(5):
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_entry, staged.parent_ino,
                                              os.fsencode(staged.name), abandon_on_cancel=True)
            except OSError:
                pass  # the kernel did not know the name

    @boundary
    async def flush(self, fh):
        h = self._handles.get(fh)
        if h is not None and h.staged is not None:
            await self._close_write(h, report=True)

    @boundary
    async def fsync(self, fh, datasync):
        await self.flush(fh)

    @boundary
    async def rename(self, p_old, name_old, p_new, name_new, flags, ctx):
        if not self.read_write:
            raise FUSEError(errno.EROFS)
        old = os.fsdecode(name_old)
        new = os.fsdecode(name_new)
        staged = self._staged.get((p_old, old))
        if staged is None:
            raise FUSEError(errno.EPERM)  # stored chunks are named by their content: never renamed
        parent = self._node(p_new)
        if parent.kind not in ("namespace", "shard"):
            raise FUSEError(errno.EPERM)
        kind, path = classify_new_name(parent.kind, parent.path, new)
        if kind != "temp":
            # rsync writes .name.XXXXXX, closes it, then renames it: this is where it becomes a chunk
            try:
                await self._commit(staged, kind=kind, path=path)
            finally:
                self._forget_cached(staged.ino)
            return
        del self._staged[(p_old, old)]
        staged.parent_ino, staged.name, staged.path = p_new, new, path
        self._staged[(p_new, new)] = staged
