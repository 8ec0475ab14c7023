"""Extended attributes of the mount: ``user.kvfs.*`` shows a chunk's catalog record, ``pinned`` sets pins."""

from __future__ import annotations

import errno
import os

import pyfuse3
from pyfuse3 import FUSEError

from . import _tree
from ._boundary import boundary
from ._tree import XATTR_PREFIX


class XattrOps:
    """getxattr, listxattr, setxattr, removexattr of :class:`kvfs.fuse._ops.KVFSOperations`."""

    @boundary
    async def getxattr(self, ino, name, ctx):
        name_s = os.fsdecode(name)
        if self._staged_ino.get(ino) is not None or not name_s.startswith(XATTR_PREFIX):
            raise FUSEError(pyfuse3.ENOATTR)
        node = self._node(ino)
        key = name_s[len(XATTR_PREFIX):]
        if node.kind == "root" and key == "pid":
            return str(os.getpid()).encode()
        if key not in _tree.xattr_names(node.kind):
            raise FUSEError(pyfuse3.ENOATTR)
        values = await self._io(_tree.xattrs, self.store, node.path, node.kind)
        return values[key].encode()

    @boundary
    async def listxattr(self, ino, ctx):
        if self._staged_ino.get(ino) is not None:
            return []
        node = self._node(ino)
        names = [(XATTR_PREFIX + n).encode() for n in _tree.xattr_names(node.kind)]
        if node.kind == "root":
            names.append(b"user.kvfs.pid")
        return names

    def _set_pin_sync(self, path: str, kind: str, pin: bool) -> None:
        if kind == "chunk" and pin:
            if self.store.stat(path).pins == 0:  # a boolean view of the pin count: setting 1 twice pins once
                self.store.pin(path)
        elif pin:
            self.store.pin(path)
        else:
            self.store.unpin(path, all_pins=True)

    @boundary
    async def setxattr(self, ino, name, value, ctx):
        name_s = os.fsdecode(name)
        staged = self._staged_ino.get(ino)
        if not name_s.startswith(XATTR_PREFIX):
            raise FUSEError(errno.ENOTSUP)  # kvfs keeps no other attributes
        key = name_s[len(XATTR_PREFIX):]
        if staged is not None:
            if key == "pinned":
                staged.pin = _tree.parse_bool(value)  # applied once the file is stored
            return  # the others follow from the bytes, which the import checks
        node = self._node(ino)
        if key not in _tree.xattr_names(node.kind):
            raise FUSEError(errno.ENOTSUP)
        if key == "pinned":
            pin = _tree.parse_bool(value)
            if node.kind == "root":
                raise FUSEError(errno.EPERM)  # pinning everything is `kvfs pin /`, not an accident of setfattr
            await self._io(self._set_pin_sync, node.path, node.kind, pin)
            self._forget_dir_cache(node.path)
            return
        # read-only attributes: setting the value they already have is fine (cp -a, rsync -X)
        values = await self._io(_tree.xattrs, self.store, node.path, node.kind)
        if values[key].encode() != bytes(value).rstrip(b"\x00"):
            raise FUSEError(errno.EPERM)

    @boundary
    async def removexattr(self, ino, name, ctx):
        name_s = os.fsdecode(name)
        staged = self._staged_ino.get(ino)
        if staged is not None:  # a new file (not in the tree yet): `-x pinned` takes back a pin set on it
            if name_s != XATTR_PREFIX + "pinned":
                raise FUSEError(pyfuse3.ENOATTR)
            staged.pin = False
            return
        node = self._node(ino)
        if name_s == XATTR_PREFIX + "pinned" and node.kind in ("chunk", "model", "namespace", "shard"):
            await self._io(self._set_pin_sync, node.path, node.kind, False)
            return
        raise FUSEError(errno.EPERM if name_s.startswith(XATTR_PREFIX) else pyfuse3.ENOATTR)
