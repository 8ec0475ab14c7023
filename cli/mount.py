"""``kvfs mount`` and ``kvfs umount``: a store as a FUSE filesystem (docs/fuse.md)."""

from __future__ import annotations

import logging
import os

import click


@click.command()
@click.argument("url")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--foreground", "-f", is_flag=True, help="Serve in this process until unmounted (Ctrl-C unmounts).")
@click.option("--read-write", is_flag=True,
              help="Also store chunk files copied in (cp/rsync), after checking each one whole.")
@click.option("--allow-other", is_flag=True, help="Let other users see the mount (needs user_allow_other).")
@click.option("--log", "log_file", type=click.Path(dir_okay=False),
              help="Server log (default: $XDG_RUNTIME_DIR/kvfs/<id>.log or /tmp/kvfs-<uid>/<id>.log).")
@click.option("--io-timeout", type=float, default=120.0, show_default=True,
              help="Seconds a backend call may take before the request fails with EIO.")
@click.option("--debug", is_flag=True, help="Log every FUSE request.")
def mount(url: str, mountpoint: str, foreground: bool, read_write: bool, allow_other: bool, log_file: str | None,
          io_timeout: float, debug: bool) -> None:
    """Mount the store at URL on MOUNTPOINT (an existing directory).

    \b
    MOUNTPOINT/<model>/<namespace-id>/manifest.json
    MOUNTPOINT/<model>/<namespace-id>/<hh>/<hash>.safetensors

    Chunk files read back exactly the stored, verified bytes; `rm` evicts a
    chunk (not a pinned one); `setfattr -n user.kvfs.pinned -v 1|0` pins and
    unpins. Runs in the background and returns once the mount answers; stop
    it with `kvfs umount MOUNTPOINT`.
    """
    from kvfs.errors import InvalidURL, KVFSError
    from kvfs.fuse import mount as start

    from ._common import CommandError, refuse_missing_store

    if not read_write and os.path.isdir(mountpoint):
        # a read-only mount of a store that does not exist would show a new, empty store: a mistyped URL.
        # (A --read-write mount may start an empty store to copy chunk files into.)
        try:
            refuse_missing_store(url, "kvfs mount", "check the URL; --read-write mounts a new, empty store")
        except InvalidURL as e:
            raise click.UsageError(str(e)) from None
    if foreground:
        from kvfs.fuse import serve

        logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            filename=log_file)
        from kvfs.fuse._control import remove_pid_file, write_pid_file

        def ready() -> None:
            write_pid_file(mountpoint)
            click.echo(f"kvfs: mounted at {mountpoint}; Ctrl-C or `kvfs umount {mountpoint}` to stop", err=True)

        try:
            serve(url, mountpoint, read_write=read_write, allow_other=allow_other, debug=debug,
                  io_timeout=io_timeout, on_ready=ready)
        except (OSError, KVFSError, ImportError) as e:
            raise CommandError(_import_hint(e), 1, "kvfs mount") from None
        finally:
            remove_pid_file(mountpoint)
        return
    try:
        pid, log = start(url, mountpoint, read_write=read_write, allow_other=allow_other, debug=debug,
                         log_file=log_file, io_timeout=io_timeout)
    except (OSError, KVFSError) as e:
        raise CommandError(_message(e), 1, "kvfs mount") from None
    click.echo(f"kvfs: mounted at {mountpoint} (server pid {pid}, log {log})", err=True)


def _message(e: BaseException) -> str:
    """The words of an error, without ``[Errno N]`` (as every other kvfs command shows them)."""
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


def _import_hint(e: BaseException) -> str:
    if isinstance(e, ImportError):
        return (f"{e}; FUSE mounts need pyfuse3 and trio: apt-get install fuse3 libfuse3-dev pkg-config gcc, "
                "then pip install 'kvfs[fuse]' (pyfuse3 builds against libfuse 3)")
    return _message(e)


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds to wait for the server to finish writing back and exit.")
@click.option("--lazy", "-z", is_flag=True, help="Detach now even if busy; the server exits when the last file closes.")
def umount(mountpoint: str, timeout: float, lazy: bool) -> None:
    """Unmount a kvfs mount; returns once its server has closed the store and exited."""
    from kvfs.errors import KVFSError
    from kvfs.fuse import unmount

    from ._common import CommandError

    try:
        unmount(mountpoint, timeout=timeout, lazy=lazy)
    except (OSError, KVFSError) as e:
        raise CommandError(_message(e), 1, "kvfs umount") from None
