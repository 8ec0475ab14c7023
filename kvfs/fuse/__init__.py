"""A store's namespace as a FUSE filesystem (``kvfs mount URL DIR``). See ``docs/fuse.md``.

    from kvfs.fuse import mount, unmount
    pid, log = mount("lmdb:///var/cache/kvfs", "/mnt/kv")     # returns once the mount answers
    ...
    unmount("/mnt/kv")                                        # returns once the server has exited

Importing this package is light: pyfuse3 and trio are imported by the mount
server only (:func:`serve`, ``python -m kvfs.fuse``).
"""

from __future__ import annotations

from typing import Any

from ._control import mount, mounted_fstype, process_alive, unmount

__all__ = ["mount", "unmount", "serve", "mounted_fstype", "process_alive"]


def serve(url: str, mountpoint: str, **options: Any) -> None:
    """Mount and serve in this process until unmounted (``kvfs mount --foreground``)."""
    from ._serve import serve as _serve

    _serve(url, mountpoint, **options)
