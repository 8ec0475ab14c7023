"""One LMDB environment per path per process, shared and reference counted.

LMDB forbids opening the same environment twice in one process (its locks
are per process), yet a process may hold several stores, and a store's
catalog may live in the same environment as its LMDB tier. Everything that
opens LMDB goes through :func:`acquire`.

Environments are opened with a large sparse map (1 TiB unless told
otherwise; reopening with a larger ``map_size`` grows it), readahead on,
``writemap`` off (``ENOSPC`` is an error, not a SIGBUS) and without a sync
per commit: a killed process loses nothing LMDB committed, and
:meth:`Env.sync` (``Store.flush``/``close``) makes commits durable against
power loss.
"""

from __future__ import annotations

import errno
import os
import threading
from contextlib import contextmanager
from typing import Iterator

import lmdb

from .errors import NoSpace, PermissionDenied, ReadOnlyStore, StoreError, oserror
from .units import format_size

DEFAULT_MAP_SIZE = 1 << 40
MAX_DBS = 16

_lock = threading.Lock()
_envs: dict[str, "Env"] = {}


class Env:
    def __init__(self, path: str, env: lmdb.Environment, map_size: int, explicit_size: bool) -> None:
        self.path = path
        self.env = env
        self.map_size = map_size
        self.explicit_size = explicit_size
        self.refs = 0
        self._dbs: dict[str, object] = {}
        self._db_lock = threading.Lock()
        self.pid = os.getpid()

    def db(self, name: str):
        """A named database, created on first use."""
        d = self._dbs.get(name)
        if d is None:
            with self._db_lock:
                d = self._dbs.get(name)
                if d is None:
                    d = self._call(lambda: self._open_db(name.encode()))
                    self._dbs[name] = d
        return d

    def _open_db(self, name: bytes):
        if self.env.flags()["readonly"]:
            return self.env.open_db(name)
        # inside a write transaction of our own: ``open_db`` without one begins a write transaction while
        # holding the GIL, and waits for LMDB's write lock that way; a thread holding that lock (committing a
        # put) then waits for the GIL forever. ``begin`` waits for the lock with the GIL released.
        with self.write() as txn:
            return self.env.open_db(name, txn=txn)

    def _call(self, fn):
        try:
            return fn()
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)  # adopt the size another process grew the map to
            return fn()
        except lmdb.Error as e:
            raise lmdb_error(e, self) from e

    @contextmanager
    def read(self, buffers: bool = False) -> Iterator[lmdb.Transaction]:
        self._check_pid()
        try:
            txn = self.env.begin(buffers=buffers)
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)
            txn = self.env.begin(buffers=buffers)
        except lmdb.Error as e:
            raise lmdb_error(e, self) from e
        try:
            yield txn
        finally:
            txn.abort()

    @contextmanager
    def write(self) -> Iterator[lmdb.Transaction]:
        """A write transaction, committed at the end of the block, aborted on error."""
        self._check_pid()
        try:
            txn = self.env.begin(write=True)
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)
            txn = self.env.begin(write=True)
        except lmdb.Error as e:
            raise lmdb_error(e, self) from e
        try:
            yield txn
        except lmdb.Error as e:
            txn.abort()
            raise lmdb_error(e, self) from e
        except BaseException:
            txn.abort()
            raise
        try:
            txn.commit()
        except lmdb.Error as e:
            raise lmdb_error(e, self) from e

    def sync(self) -> None:
        self._check_pid()
        try:
            self.env.sync(True)
        except lmdb.Error as e:
            raise lmdb_error(e, self) from e

    def _check_pid(self) -> None:
        if os.getpid() != self.pid:
            raise StoreError(
                errno.EBADF,
                f"LMDB environment {self.path} was opened before a fork; open the store again in the child process",
            )


def lmdb_error(e: lmdb.Error, env: Env | str) -> StoreError:
    """The one table from py-lmdb's exception types to errno-carrying OSErrors."""
    path = env.path if isinstance(env, Env) else env
    if isinstance(e, lmdb.MapFullError):
        size = env.map_size if isinstance(env, Env) else 0
        err: StoreError = NoSpace(
            f"LMDB map of {path} is full ({format_size(size)}); evict chunks, set a tier capacity, "
            f"or reopen with a larger map: lmdb://{path}?map_size=<bigger>"
        )
    elif isinstance(e, lmdb.DiskError):
        err = NoSpace(f"no space left on the device holding {path}")
    elif isinstance(e, lmdb.ReadonlyError):
        err = PermissionDenied(errno.EACCES, f"permission denied writing LMDB environment {path}")
    elif isinstance(e, (lmdb.CorruptedError, lmdb.PanicError, lmdb.InvalidError, lmdb.VersionMismatchError)):
        err = oserror(errno.EIO, f"LMDB environment {path} is unusable ({type(e).__name__}: {e}); "
                                 "move it aside and run `kvfs fsck`")
    elif isinstance(e, lmdb.ReadersFullError):
        err = oserror(errno.EMFILE, f"too many readers of LMDB environment {path}")
    elif isinstance(e, lmdb.MemoryError):
        err = oserror(errno.ENOMEM, f"out of memory in LMDB environment {path}")
    elif _nearly_full(path):
        # LMDB reports a write cut short by a full filesystem as EIO ("short write"): check the device
        err = NoSpace(f"no space left on the device holding {path} ({type(e).__name__}: {e})")
    else:
        err = oserror(errno.EIO, f"LMDB error on {path}: {type(e).__name__}: {e}")
    err.__cause__ = e
    return err


def _nearly_full(path: str) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    free = st.f_bavail * st.f_frsize
    return free < max(16 << 20, st.f_blocks * st.f_frsize // 100)


def read_only_fs(path: str) -> bool:
    """Whether the existing directory ``path`` is on a read-only filesystem (mounted read-only: no process
    can write there, unlike a directory this user may not write to)."""
    try:
        return bool(os.statvfs(path).f_flag & getattr(os, "ST_RDONLY", 1))
    except OSError:
        return False


def acquire(path: str, map_size: int | None = None, *, readonly: bool = False) -> Env:
    """Open (or share) the environment at directory ``path``, creating it if needed."""
    real = os.path.realpath(path)
    with _lock:
        env = _envs.get(real)
        if env is not None and env.pid != os.getpid():
            _envs.pop(real)  # opened by a parent process before fork: never reuse it
            env = None
        if env is None:
            env = _open(real, map_size, readonly)
            _envs[real] = env
        env.refs += 1
        return env


def _open(path: str, map_size: int | None, readonly: bool) -> Env:
    size = map_size or DEFAULT_MAP_SIZE
    try:
        if not readonly:
            os.makedirs(path, exist_ok=True)
            if read_only_fs(path):
                raise ReadOnlyStore(f"the LMDB store at {path} is on a read-only filesystem: it can only be read "
                                    "(kvfs.open(url, read_only=True); kvfs ls, stat, du, verify, cp from it)")
        elif not os.path.isdir(path):
            raise FileNotFoundError(errno.ENOENT, f"no LMDB store at {path}")
        e = lmdb.open(
            path,
            map_size=size,
            subdir=True,
            max_dbs=MAX_DBS,
            readahead=True,
            writemap=False,
            meminit=False,
            sync=False,
            metasync=False,
            # a read-only filesystem (a read-only volume, a snapshot) cannot take the lock file, and no process
            # can write there either: readers need no lock
            lock=not (readonly and read_only_fs(path)),
            max_readers=1024,
            readonly=readonly,
        )
    except ReadOnlyStore:
        raise
    except PermissionError as err:
        raise PermissionDenied(errno.EACCES, f"permission denied opening {path}: {err.strerror} (an LMDB store's "
                                             "readers, too, write its lock file lock.mdb: ask its owner for write "
                                             "access to the directory, or read a copy: kvfs cp)") from err
    except lmdb.Error as err:
        raise lmdb_error(err, path) from err
    except OSError as err:
        raise oserror(err.errno or errno.EIO, f"cannot open LMDB store at {path}: {err.strerror or err}", err)
    actual = e.info()["map_size"]
    return Env(path, e, actual, map_size is not None)


def release(env: Env) -> None:
    with _lock:
        env.refs -= 1
        if env.refs > 0:
            return
        if _envs.get(env.path) is env:
            del _envs[env.path]
    if env.pid == os.getpid():
        try:
            env.env.sync(True)
        except lmdb.Error:
            pass
        env.env.close()
