"""Starting a mount in the background and stopping it: ``kvfs mount`` / ``kvfs umount``.

``mount`` starts ``python -m kvfs.fuse`` detached (a new session, stdin
closed, output to a log file), hands it the store URL on a pipe (never on
the command line, where ``ps`` would show credentials in it) and waits on a
second pipe until the server says it answers requests, or why it could not
mount. ``unmount`` unmounts with ``fusermount3 -u`` and waits until the
server process has closed its store and exited.

Each mount has a small state directory entry keyed by its mount point
(``$XDG_RUNTIME_DIR/kvfs`` or ``/tmp/kvfs-<uid>``): ``<id>.pid`` and
``<id>.log``.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import subprocess
import sys
import time

from .._proc import process_alive
from ..errors import StoreError

READY_TIMEOUT = 120.0


def state_dir() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR")
    d = os.path.join(base, "kvfs") if base and os.path.isdir(base) else os.path.join("/tmp", f"kvfs-{os.getuid()}")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def mount_id(mountpoint: str) -> str:
    return hashlib.blake2b(os.path.abspath(mountpoint).encode(), digest_size=8).hexdigest()


def pid_file(mountpoint: str) -> str:
    return os.path.join(state_dir(), mount_id(mountpoint) + ".pid")


def default_log_file(mountpoint: str) -> str:
    return os.path.join(state_dir(), mount_id(mountpoint) + ".log")


def _unescape(s: str) -> str:
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mounted_fstype(mountpoint: str) -> str | None:
    """The filesystem type mounted at ``mountpoint`` (``fuse.kvfs`` for ours), or None."""
    target = os.path.abspath(mountpoint)
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                if _unescape(fields[4]) == target:
                    found = fields[sep + 1]  # the last mount on a path is the visible one
    except (OSError, ValueError):
        return None
    return found


def _read_pid(mountpoint: str) -> int | None:
    try:
        with open(pid_file(mountpoint)) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def write_pid_file(mountpoint: str) -> str:
    path = pid_file(mountpoint)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n{os.path.abspath(mountpoint)}\n")
    os.replace(tmp, path)
    return path


def remove_pid_file(mountpoint: str) -> None:
    if _read_pid(mountpoint) == os.getpid():
        try:
            os.unlink(pid_file(mountpoint))
        except OSError:
            pass


def mount(
    url: str,
    mountpoint: str,
    *,
    read_write: bool = False,
    allow_other: bool = False,
    debug: bool = False,
    log_file: str | None = None,
    io_timeout: float = 120.0,
    timeout: float = READY_TIMEOUT,
) -> tuple[int, str]:
    """Mount in the background; returns ``(server pid, log file)`` once the mount answers requests.

    Raises ``OSError`` with the server's reason if it could not mount.
    """
    mountpoint = os.path.abspath(mountpoint)
    if not os.path.isdir(mountpoint):
        raise StoreError(20, f"mount point {mountpoint} is not a directory; create it first (mkdir -p)")
    if mounted_fstype(mountpoint) is not None:
        raise StoreError(16, f"{mountpoint} is already a mount point ({mounted_fstype(mountpoint)}); "
                             f"unmount it first: kvfs umount {mountpoint}")  # EBUSY
    log_file = os.path.abspath(log_file or default_log_file(mountpoint))
    config = {"url": url, "mountpoint": mountpoint, "read_write": read_write, "allow_other": allow_other,
              "debug": debug, "io_timeout": io_timeout, "log_file": log_file}
    ready_r, ready_w = os.pipe()
    with open(log_file, "ab") as log:
        start = log.tell()
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvfs.fuse", "--ready-fd", str(ready_w)],
            stdin=subprocess.PIPE, stdout=log, stderr=log, pass_fds=(ready_w,), start_new_session=True,
            close_fds=True,
        )
    os.close(ready_w)
    try:
        proc.stdin.write(json.dumps(config).encode())
        proc.stdin.close()
        message = _wait_ready(ready_r, proc, timeout)
    finally:
        os.close(ready_r)
    if message.startswith("ready"):
        # the server outlives this process: nobody will wait() for it here, and that is intended
        proc.returncode = 0
        return proc.pid, log_file
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    tail = _log_tail(log_file, start)
    reason = message[len("error "):] if message.startswith("error ") else "the mount server exited"
    raise StoreError(5, f"cannot mount {_redacted(url)} at {mountpoint}: {reason}" + (f"\n{tail}" if tail else ""))


def _redacted(url: str) -> str:
    """The store URL as errors may show it: secret-looking option values hidden (as in the server's log)."""
    from ..url import parse_url

    try:
        return "::".join(t.redacted() for t in parse_url(url))
    except Exception:  # noqa: BLE001 - a URL that does not parse: show no option of it
        return "::".join(t.split("?", 1)[0] for t in url.split("::"))


def _wait_ready(fd: int, proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return f"error no answer within {timeout:.0f} s"
        r, _, _ = select.select([fd], [], [], min(left, 0.5))
        if not r:
            if proc.poll() is not None:
                return f"error the mount server exited with status {proc.returncode}"
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace").strip()


def _log_tail(log_file: str, start: int, lines: int = 15) -> str:
    try:
        with open(log_file, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def unmount(mountpoint: str, *, timeout: float = 60.0, lazy: bool = False) -> int | None:
    """Unmount a kvfs mount and wait until its server has exited; returns the server's pid if known."""
    mountpoint = os.path.abspath(mountpoint)
    pid = _read_pid(mountpoint)
    fstype = mounted_fstype(mountpoint)
    if pid is None and fstype == "fuse.kvfs":
        try:  # mounted with another state directory (another $XDG_RUNTIME_DIR): the server says who it is
            pid = int(os.getxattr(mountpoint, "user.kvfs.pid"))
        except (OSError, ValueError):
            pid = None
    if fstype is None:
        if pid is not None and process_alive(pid):
            _wait_exit(pid, mountpoint, timeout)  # being unmounted already: wait for it
            return pid
        _forget_pid_file(mountpoint)
        raise StoreError(22, f"{mountpoint} is not mounted")  # EINVAL, as umount(8) says
    if fstype != "fuse.kvfs":
        raise StoreError(22, f"{mountpoint} is a {fstype} mount, not a kvfs mount")
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise StoreError(2, "fusermount3 not found: install fuse3 (apt-get install fuse3)")
    res = subprocess.run([tool, "-u"] + (["-z"] if lazy else []) + [mountpoint], capture_output=True, text=True)
    if res.returncode != 0:
        why = (res.stderr or res.stdout).strip()
        if "busy" in why.lower():
            raise StoreError(16, f"{mountpoint} is busy (a process has a file or directory open there); "
                                 f"close it, or unmount lazily: kvfs umount --lazy {mountpoint}")
        raise StoreError(5, f"cannot unmount {mountpoint}: {why}")
    if pid is not None and not lazy:  # lazily detached: the server exits when its last file closes
        _wait_exit(pid, mountpoint, timeout)
    _forget_pid_file(mountpoint)
    return pid


def _wait_exit(pid: int, mountpoint: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        if time.monotonic() > deadline:
            raise StoreError(62, f"the kvfs server of {mountpoint} (pid {pid}) did not exit within {timeout:.0f} s "
                                 f"of the unmount (still writing back?); see its log {default_log_file(mountpoint)}")
        time.sleep(0.02)


def _forget_pid_file(mountpoint: str) -> None:
    pid = _read_pid(mountpoint)
    if pid is not None and not process_alive(pid):
        try:
            os.unlink(pid_file(mountpoint))
        except OSError:
            pass
