"""The mount server: open the store, mount, serve until unmounted, close the store.

Runs in the foreground (``kvfs mount --foreground``) or as the detached
process that ``kvfs mount`` starts (``python -m kvfs.fuse``). Either way it
answers the kernel until ``kvfs umount``/``fusermount3 -u`` unmounts it or
it gets SIGTERM/SIGINT/SIGHUP (then it unmounts itself), and it closes the
store before exiting, so write-back to lower tiers is finished when the
process is gone.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any, Callable

log = logging.getLogger("kvfs.fuse")

READAHEAD_KB = 1024


def mount_options(*, allow_other: bool = False, debug: bool = False) -> set[str]:
    """libfuse options of a kvfs mount.

    ``default_permissions``: the kernel checks modes (files 0444, directories
    0755, owned by the user who mounted), so other users can read but not
    evict; ``allow_other`` only when asked; chunks are data, never programs
    or devices.
    """
    opts = {"default_permissions", "fsname=kvfs", "subtype=kvfs", "nosuid", "nodev", "noexec"}
    if allow_other:
        opts.add("allow_other")
    if debug:
        opts.add("debug")
    return opts


def serve(
    url: str,
    mountpoint: str,
    *,
    read_write: bool = False,
    allow_other: bool = False,
    debug: bool = False,
    io_timeout: float = 120.0,
    attr_timeout: float = 1.0,
    on_ready: Callable[[], Any] | None = None,
    store_options: dict | None = None,
) -> None:
    """Mount ``url`` at ``mountpoint`` and serve it until unmounted. ``on_ready`` runs once it answers."""
    import pyfuse3
    import trio

    import kvfs

    from ._ops import KVFSOperations

    mountpoint = os.path.abspath(mountpoint)
    if not os.path.isdir(mountpoint):
        raise NotADirectoryError(20, f"mount point {mountpoint} is not a directory")
    store = kvfs.open(url, **(store_options or {}))
    try:
        ops = KVFSOperations(store, read_write=read_write, io_timeout=io_timeout, attr_timeout=attr_timeout)
        try:
            pyfuse3.init(ops, mountpoint, mount_options(allow_other=allow_other, debug=debug))
        except RuntimeError as e:
            raise OSError(f"cannot mount {mountpoint}: {e} (is /dev/fuse usable and fusermount3 installed? "
                          "the log above has libfuse's reason)") from None
        stopped_by_signal = True
        try:
            stopped_by_signal = trio.run(_run, ops, mountpoint, on_ready)
        finally:
            # unmounted by the kernel (umount): nothing to undo; stopped by a signal or an error: unmount
            pyfuse3.close(unmount=stopped_by_signal)
        log.info("kvfs: %s unmounted", mountpoint)
    finally:
        store.close()


def _raise_readahead(dev: int, kb: int = READAHEAD_KB) -> None:
    """Let the kernel read ahead further than its 128 KiB default on this mount (needs root).

    Larger read-ahead makes the kernel send 1 MiB read requests (the most a
    FUSE request carries) several at a time instead of one 128 KiB request
    after another: each request costs a round trip through this process, so
    sequential reads go about twice as fast. Harmless if not permitted.
    """
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
    except OSError as e:
        log.debug("kvfs: cannot raise the read-ahead of this mount (%s): %s", path, e)


async def _run(ops, mountpoint: str, on_ready) -> bool:
    """Serve until the kernel ends the session; True if a signal ended it."""
    import pyfuse3
    import trio

    stopped = False

    async def watch_signals() -> None:
        nonlocal stopped
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("kvfs: %s: unmounting", signal.Signals(signum).name)
                stopped = True
                pyfuse3.terminate()
                return

    async def announce_ready() -> None:
        # a stat of the mount point is answered by the loop below: once it returns, the mount works
        st = await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
        _raise_readahead(st.st_dev)
        log.info("kvfs: serving %s at %s (pid %d)", ops.store.redacted_url, mountpoint, os.getpid())
        if on_ready is not None:
            on_ready()

    async with trio.open_nursery() as nursery:
        ops.nursery = nursery
        nursery.start_soon(watch_signals)
        nursery.start_soon(announce_ready)
        nursery.start_soon(ops.expire_views)
        await pyfuse3.main(min_tasks=2, max_tasks=64)
        nursery.cancel_scope.cancel()
    return stopped
