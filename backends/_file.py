"""``file:///path`` : one file per chunk on a local filesystem (NVMe), read straight into caller buffers.

Layout: a key is a relative path, so a chunk lands at
``<root>/<model>/<ns-id>/<hh>/<hash>.safetensors`` and the hash-sharded
directories fall out of the store's keys. ``<root>/.kvfs/`` is reserved: the
store keeps its catalog in ``.kvfs/catalog`` and writes are staged in
``.kvfs/tmp`` (same filesystem, so the final ``rename`` is atomic: a reader
sees the old file, no file or the whole new one). A writer killed mid-put
leaves only a temporary file named ``<host>.<pid>.<random>.kvfs-tmp``, which
no listing shows and which the next open removes once its writer is gone.

Options (URL query or keyword):

``fsync``
    ``flush`` (default): puts go to the page cache; ``flush()`` (the store's
    ``flush``/``close``) makes every completed put durable with one
    ``syncfs``. ``always``: every put is fsynced (file and directory) before
    it returns. ``never``: no syncing (scratch caches).
``direct``
    ``false`` (default), ``true`` or ``auto``: read with ``O_DIRECT`` (no page
    cache) whenever the destination buffers, offsets and sizes are 4 KiB
    aligned, which chunk data is. Detected per filesystem at open; where the
    filesystem refuses it (ramfs, tmpfs before Linux 6.6, some overlayfs) reads stay buffered
    (``true`` logs a warning, ``auto`` an info line).
``kvikio``
    ``auto`` (default): when kvikio is installed *and usable* (it needs the
    CUDA driver), device buffers (anything with ``__cuda_array_interface__``)
    are read and written through ``kvikio.CuFile``, GPU-direct where GDS is
    present; host buffers always use POSIX ``preadv``. ``false``: never.
    ``true``: fail at open when kvikio cannot be used.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import socket
import stat as _stat
import threading
import time
import uuid
from typing import Any, Iterator, Mapping, Sequence

from kvfs.errors import BackendUnavailable, InvalidURL, NoSpace, PermissionDenied, ReadOnlyStore, StoreError, oserror

from ._base import Backend, Buffer, ByteRange, InvalidKey, ObjectInfo, check_key

log = logging.getLogger("kvfs")

RESERVED = ".kvfs"  # <root>/.kvfs: catalog and temporary files, never a key
TMP_SUFFIX = ".kvfs-tmp"
STALE_TMP_SECONDS = 24 * 3600  # a temporary file this old is garbage whoever wrote it
ALIGN = 4096  # O_DIRECT alignment of offsets, sizes and buffer addresses


def _iov_max() -> int:
    try:
        return max(16, int(os.sysconf("SC_IOV_MAX")))
    except (AttributeError, ValueError, OSError):
        return 1024


_IOV_MAX = _iov_max()
_HOST = socket.gethostname().replace(".", "_") or "host"
_FSYNC_POLICIES = ("flush", "always", "never")


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    v = str(value).lower()
    aliases = {"1": "true", "yes": "true", "on": "true", "0": "false", "no": "false", "off": "false"}
    v = aliases.get(v, v)
    if v not in allowed:
        raise InvalidURL(f"file:// option {name}={value!r}: use one of {', '.join(allowed)}")
    return v


def _is_device_buffer(buf: object) -> bool:
    return hasattr(buf, "__cuda_array_interface__") and not hasattr(buf, "__array_interface__")


def _byte_view(buf: Buffer, writable: bool) -> memoryview:
    mv = memoryview(buf)
    if mv.ndim != 1 or mv.itemsize != 1 or mv.format not in ("B", "b", "c"):
        mv = mv.cast("B")
    if writable and mv.readonly:
        raise TypeError("the destination buffer is read-only")
    return mv


def _address(mv: memoryview) -> int:
    """The address of a writable buffer (for O_DIRECT's alignment rules)."""
    if len(mv) == 0:
        return 0
    return ctypes.addressof(ctypes.c_char.from_buffer(mv))


# -------------------------------------------------------------------------------------- kvikio
_kvikio_lock = threading.Lock()
_kvikio_state: tuple[Any, str] | None = None  # (module or None, why)


def kvikio_status() -> tuple[Any, str]:
    """``(kvikio module or None, a sentence saying which I/O path is used and why)``; probed once per process.

    Importable is not enough: without the CUDA driver every kvikio read fails
    (``libcuda.so.1``), so a tiny write and read through ``CuFile`` decide.
    """
    global _kvikio_state
    if _kvikio_state is not None:
        return _kvikio_state
    with _kvikio_lock:
        if _kvikio_state is not None:
            return _kvikio_state
        try:
            import kvikio  # noqa: F401
        except Exception as e:  # noqa: BLE001 - ImportError, or a broken install
            state: tuple[Any, str] = (None, f"POSIX I/O (kvikio not importable: {e})")
        else:
            state = _probe_kvikio(kvikio)
        log.info("kvfs file backend: %s", state[1])
        _kvikio_state = state
        return state


def _probe_kvikio(kvikio) -> tuple[Any, str]:
    import tempfile

    import numpy as np

    path = None
    try:
        fd, path = tempfile.mkstemp(prefix="kvfs-kvikio-probe-")
        os.close(fd)
        a = np.arange(ALIGN, dtype=np.uint8)
        with kvikio.CuFile(path, "w") as f:
            f.write(a)
        b = np.zeros_like(a)
        with kvikio.CuFile(path, "r") as f:
            f.read(b)
        if not np.array_equal(a, b):
            return None, "POSIX I/O (kvikio read back wrong bytes in its self-test)"
    except Exception as e:  # noqa: BLE001 - typically libcuda.so.1 missing
        return None, f"POSIX I/O (kvikio is installed but unusable here: {e})"
    finally:
        if path:
            try:
                os.unlink(path)
            except OSError:
                pass
    mode = "unknown"
    try:
        d = kvikio.defaults
        compat = d.get("compat_mode") if hasattr(d, "get") else d.compat_mode()
        mode = f"compat mode {compat}"
    except Exception:  # noqa: BLE001 - the settings API moved between kvikio versions
        pass
    return kvikio, f"kvikio.CuFile for device buffers ({mode}), POSIX preadv for host buffers"


# -------------------------------------------------------------------------------------- syncfs
_libc = None
_sfr = None
PARALLEL_PUT_BYTES = 8 << 20


class _Writeback:
    """Starts the disk writing freshly written files early (``sync_file_range``), off the caller's thread.

    Submitting writeback can block while the device queue is full; doing it in
    a background thread keeps ``put`` at page-cache speed while the disk
    works, so a later ``flush()`` (``syncfs``) only waits for the tail. Best
    effort: when the queue is full a file is simply left to the kernel.
    """

    _lock = threading.Lock()
    _queue: list[int] = []
    _cond = threading.Condition(_lock)
    _thread: threading.Thread | None = None
    MAX_QUEUED = 64

    @classmethod
    def start(cls, fd: int) -> None:
        global _sfr
        if _sfr is None:
            try:
                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                _sfr = fn
            except (OSError, AttributeError):
                _sfr = False
        if not _sfr:
            return
        with cls._cond:
            if len(cls._queue) >= cls.MAX_QUEUED:
                return
            if cls._thread is None:
                cls._thread = threading.Thread(target=cls._run, name="kvfs-file-writeback", daemon=True)
                cls._thread.start()
            cls._queue.append(os.dup(fd))
            cls._cond.notify()

    @classmethod
    def _after_fork(cls) -> None:  # the child has no writeback thread, and a lock held at fork would never free
        cls._lock = threading.Lock()
        cls._cond = threading.Condition(cls._lock)
        cls._queue = []
        cls._thread = None

    @classmethod
    def _run(cls) -> None:
        while True:
            with cls._cond:
                while not cls._queue:
                    cls._cond.wait()
                fd = cls._queue.pop(0)
            try:
                _sfr(fd, 0, 0, 2)  # SYNC_FILE_RANGE_WRITE: start writing, do not wait for the disk
            finally:
                os.close(fd)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_Writeback._after_fork)


def _syncfs(fd: int) -> None:
    """Flush every dirty page and directory entry of the filesystem holding ``fd`` (Linux ``syncfs``)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.syncfs  # noqa: B018 - probe
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        os.sync()
        return
    if _libc.syncfs(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class FileBackend(Backend):
    """One file per key under a directory; atomic tmp+rename writes, ``preadv`` reads into caller buffers."""

    parallel_puts = True
    pending_puts = True
    scheme = "file"
    direct_reads = True

    def __init__(self, location: str, fsync: str = "flush", direct: str | bool = "false",
                 kvikio: str | bool = "auto", readonly: str | bool = "false") -> None:
        if not location:
            raise InvalidURL("file:// needs a directory: file:///path/to/store")
        self.root = os.path.abspath(os.path.expanduser(location))
        self.url = f"file://{self.root}"
        self.fsync = _choice("fsync", fsync, _FSYNC_POLICIES)
        direct_opt = _choice("direct", direct, ("false", "true", "auto"))
        kvikio_opt = _choice("kvikio", kvikio, ("false", "true", "auto"))
        self.readonly = _choice("readonly", readonly, ("false", "true")) == "true"
        self._tmp_dir = os.path.join(self.root, RESERVED, "tmp")
        if self.readonly:
            if not os.path.isdir(self.root):
                raise StoreError(errno.ENOENT, f"file:// store {self.root} does not exist (opened read-only)")
        else:
            try:
                os.makedirs(self._tmp_dir, exist_ok=True)
            except OSError as e:
                raise self._error(e, "creating the store directory", self.root) from e
            if os.statvfs(self.root).f_flag & getattr(os, "ST_RDONLY", 1):
                raise ReadOnlyStore(f"file:// store {self.root} is on a read-only filesystem: it can only be read "
                                    "(kvfs.open(url, read_only=True); kvfs ls, stat, du, verify, cp from it)")
            if not os.access(self.root, os.W_OK | os.X_OK):
                raise PermissionDenied(errno.EACCES, f"cannot write to the file:// store directory {self.root}: "
                                                     "check its owner and mode, choose another directory, or open "
                                                     "it with ?readonly=true")
            self._clean_tmp()
        self.direct = direct_opt != "false" and self._probe_direct(loud=direct_opt == "true")
        self._kvikio = None
        if kvikio_opt != "false":
            mod, why = kvikio_status()
            if mod is None and kvikio_opt == "true":
                raise BackendUnavailable(f"file:// kvikio=true but {why}; install 'kvfs[gpu]' on a CUDA machine "
                                         "or use kvikio=auto")
            self._kvikio = mod
        self._closed = False

    # ---------------------------------------------------------------------------------- paths
    def _path(self, key: str) -> str:
        check_key(key)
        if key == RESERVED or key.startswith(RESERVED + "/"):
            raise InvalidKey(key, f"'{RESERVED}/' is reserved for the store's catalog and temporary files")
        return os.path.join(self.root, key)

    def _tmp_name(self) -> str:
        return os.path.join(self._tmp_dir, f"{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")

    def _clean_tmp(self) -> None:
        """Remove temporary files left by writers that died (this host, dead pid) or that are very old."""
        now = time.time()
        try:
            entries = list(os.scandir(self._tmp_dir))
        except OSError:
            return
        for e in entries:
            parts = e.name.split(".")
            stale = False
            try:
                if len(parts) == 4 and e.name.endswith(TMP_SUFFIX) and parts[0] == _HOST and parts[1].isdigit():
                    pid = int(parts[1])
                    if pid != os.getpid():
                        try:
                            os.kill(pid, 0)
                        except ProcessLookupError:
                            stale = True
                        except PermissionError:
                            pass  # alive, someone else's
                if not stale:
                    stale = now - e.stat(follow_symlinks=False).st_mtime > STALE_TMP_SECONDS
                if stale:
                    os.unlink(e.path)
            except FileNotFoundError:
                pass
            except OSError as err:
                log.warning("kvfs: cannot remove the stale temporary file %s: %s", e.path, err)

    def _probe_direct(self, loud: bool) -> bool:
        """Whether this filesystem takes O_DIRECT reads (ramfs and older tmpfs refuse the open, others the read)."""
        flag = getattr(os, "O_DIRECT", 0)
        why = "this platform has no O_DIRECT"
        if flag:
            path = self._tmp_name()
            fd = -1
            try:
                with open(path, "wb") as f:
                    f.write(b"\0" * ALIGN)
                fd = os.open(path, os.O_RDONLY | flag | os.O_CLOEXEC)
                buf = mmap.mmap(-1, ALIGN)  # page aligned
                try:
                    if os.preadv(fd, [buf], 0) == ALIGN:
                        return True
                finally:
                    buf.close()
                why = "a test read came back short"
            except OSError as e:
                why = f"{e.strerror or e}"
            finally:
                if fd >= 0:
                    os.close(fd)
                try:
                    os.unlink(path)
                except OSError:
                    pass
        (log.warning if loud else log.info)("kvfs: %s does not support O_DIRECT (%s); reads use the page cache",
                                            self.root, why)
        return False

    def _error(self, e: OSError, what: str, path: str) -> StoreError:
        """One table from the OS's errors to kvfs's, with the path and what to do."""
        code = e.errno or errno.EIO
        if code in (errno.EACCES, errno.EPERM):
            err: StoreError = PermissionDenied(code, f"permission denied {what} {path}: check the owner and mode "
                                                     f"of {os.path.dirname(path) or path}")
        elif code in (errno.ENOSPC, errno.EDQUOT):
            err = NoSpace(f"no space left {what} {path} (file:// store {self.root}): evict chunks, lower the "
                          "tier's capacity or free space on the device")
        elif code == errno.EROFS:
            err = ReadOnlyStore(f"read-only filesystem: {what} {path}; open the store read-only or remount")
        else:
            err = oserror(code, f"{what} {path}: {e.strerror or e}", e)
        err.filename = path
        err.__cause__ = e
        return err

    # ---------------------------------------------------------------------------------- reads
    def _open_read(self, path: str, direct: bool = False) -> int | None:
        flags = os.O_RDONLY | os.O_CLOEXEC | (getattr(os, "O_DIRECT", 0) if direct else 0)
        try:
            return os.open(path, flags)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as e:
            raise self._error(e, "opening", path) from e

    def get_many(self, keys: Sequence[str]) -> list[Buffer | None]:
        paths = [self._path(k) for k in keys]
        out: list[Buffer | None] = []
        for path in paths:
            fd = self._open_read(path)
            if fd is None:
                out.append(None)
                continue
            try:
                st = os.fstat(fd)
                if not _stat.S_ISREG(st.st_mode):
                    out.append(None)
                    continue
                buf = bytearray(st.st_size)
                n = self._preadv(fd, [memoryview(buf)], 0, path)[0]
                out.append(buf if n == len(buf) else buf[:n])
            finally:
                os.close(fd)
        return out

    def get_ranges(self, ranges: Sequence[ByteRange]) -> list[Buffer | None]:
        out: list[Buffer | None] = [None] * len(ranges)
        by_key: dict[str, list[int]] = {}
        for i, r in enumerate(ranges):
            by_key.setdefault(r.key, []).append(i)
        for key, idxs in by_key.items():
            path = self._path(key)
            fd = self._open_read(path)
            if fd is None:
                continue
            try:
                size = os.fstat(fd).st_size
                for i in idxs:
                    r = ranges[i]
                    end = size if r.end is None else min(r.end, size)
                    buf = bytearray(max(0, end - r.start))
                    if buf:
                        n = self._preadv(fd, [memoryview(buf)], r.start, path)[0]
                        del buf[n:]
                    out[i] = buf
            finally:
                os.close(fd)
        return out

    def readinto(self, key: str, buffer: Buffer, offset: int = 0) -> int | None:
        got = self.readinto_ranges(key, [(offset, buffer)])
        return None if got is None else got[0]

    def readinto_ranges(self, key: str, parts: Sequence[tuple[int, Buffer]]) -> list[int] | None:
        """Read ``[(file offset, writable buffer), ...]`` of one key with one open file.

        Adjacent ranges (a layer's K and V planes, consecutive layers) become
        one ``preadv`` scattering into the buffers. Returns the bytes read per
        part (short at the end of the file), or ``None`` if the key is missing.
        """
        path = self._path(key)
        if self._kvikio is not None and any(_is_device_buffer(b) for _, b in parts):
            return self._kvikio_read(path, parts)
        views = [(off, _byte_view(b, writable=True)) for off, b in parts]
        direct = self.direct and all(off % ALIGN == 0 and len(v) % ALIGN == 0 and _address(v) % ALIGN == 0
                                     for off, v in views)
        fd = self._open_read(path, direct)
        if fd is None:
            return None
        try:
            out = [0] * len(views)
            i = 0
            while i < len(views):
                # gather the run of parts that are contiguous in the file
                j = i + 1
                end = views[i][0] + len(views[i][1])
                while j < len(views) and j - i < _IOV_MAX and views[j][0] == end:
                    end += len(views[j][1])
                    j += 1
                counts = self._preadv(fd, [v for _, v in views[i:j]], views[i][0], path)
                out[i:j] = counts
                i = j
            return out
        finally:
            os.close(fd)

    def _preadv(self, fd: int, bufs: list[memoryview], offset: int, path: str) -> list[int]:
        """Fill ``bufs`` from ``offset`` on; per buffer, the bytes read (fewer only at end of file)."""
        counts = [0] * len(bufs)
        pending = [(i, b) for i, b in enumerate(bufs) if len(b)]
        while pending:
            try:
                n = os.preadv(fd, [b for _, b in pending], offset)
            except InterruptedError:
                continue
            except OSError as e:
                raise self._error(e, "reading", path) from e
            if n == 0:
                break
            offset += n
            rest = []
            for i, b in pending:
                if n >= len(b):
                    counts[i] += len(b)
                    n -= len(b)
                elif n > 0:
                    counts[i] += n
                    rest.append((i, b[n:]))
                    n = 0
                else:
                    rest.append((i, b))
            pending = rest
        return counts

    def _kvikio_read(self, path: str, parts) -> list[int] | None:
        if not os.path.isfile(path):
            return None
        size = os.path.getsize(path)
        out = []
        try:
            with self._kvikio.CuFile(path, "r") as f:
                futures: list = []
                try:
                    for off, buf in parts:
                        nbytes = _nbytes(buf)
                        n = max(0, min(nbytes, size - off))
                        if _is_device_buffer(buf):
                            futures.append(f.pread(buf, n, off) if n else None)
                        else:
                            futures.append(None)
                            mv = _byte_view(buf, writable=True)
                            n = self._pread_host(path, mv[:n], off)
                        out.append(n)
                finally:
                    # every read started is waited for before the file closes (and before an error leaves),
                    # and counts what it read: the file may have been replaced by a shorter one since its stat
                    errors = []
                    for i, fut in enumerate(futures):
                        if fut is not None:
                            try:
                                out[i] = int(fut.get())
                            except (OSError, RuntimeError) as e:
                                errors.append(e)
                if errors:
                    raise errors[0]
        except OSError as e:
            raise self._error(e, "reading (kvikio)", path) from e
        except RuntimeError as e:
            raise oserror(errno.EIO, f"kvikio read of {path} failed: {e}", e) from e
        return out

    def _pread_host(self, path: str, mv: memoryview, off: int) -> int:
        fd = self._open_read(path)
        if fd is None:
            return 0
        try:
            return self._preadv(fd, [mv], off, path)[0]
        finally:
            os.close(fd)

    # ---------------------------------------------------------------------------------- writes
    def put_many(self, items: Mapping[str, Buffer]) -> None:
        staged = [(self._path(k), v) for k, v in items.items()]  # every key checked before any write
        self._check_writable()
        big = len(staged) > 1 and sum(_nbytes(v) for _, v in staged) >= PARALLEL_PUT_BYTES
        if big and not threading.current_thread().name.startswith("kvfs-io"):
            from kvfs import _pool

            # copies into the page cache run at one core's memcpy speed: write files side by side
            _pool.run_all([lambda p=p, v=v: self._write(p, v) for p, v in staged])
            return
        for path, value in staged:
            self._write(path, value)

    def _write(self, path: str, value: Buffer) -> None:
        tmp = self._tmp_name()
        try:
            if self._kvikio is not None and _is_device_buffer(value):
                self._kvikio_write(tmp, value)
            else:
                self._posix_write(tmp, value)
            try:
                os.replace(tmp, path)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                os.replace(tmp, path)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                # the key's directory is another mount: stage next to it instead
                os.unlink(tmp)
                tmp = os.path.join(os.path.dirname(path), os.path.basename(self._tmp_name()))
                self._posix_write(tmp, value)
                os.replace(tmp, path)
            if self.fsync == "always":
                self._fsync_dir(os.path.dirname(path))
        except BaseException as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(e, IsADirectoryError):
                raise StoreError(errno.EISDIR, f"cannot write {path}: a directory of that name exists "
                                               "(a key cannot also be a prefix directory of other keys)") from e
            if isinstance(e, OSError) and not isinstance(e, StoreError):
                raise self._error(e, "writing", path) from e
            raise

    def _posix_write(self, tmp: str, value: Buffer) -> None:
        pending = hasattr(value, "write_to")  # a kvfs.chunk.PendingChunk: written from the caller's KV
        mv = None if pending else _byte_view(value, writable=False)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            if pending:
                value.write_to(lambda views, offset: _pwritev_all(fd, views, offset))
            else:
                off = 0
                while off < len(mv):
                    off += os.write(fd, mv[off:])
            if self.fsync == "always":
                os.fsync(fd)
            elif self.fsync == "flush":
                _Writeback.start(fd)  # the disk works while we go on; flush() waits only for the tail
        finally:
            os.close(fd)

    def _kvikio_write(self, tmp: str, value: Any) -> None:
        try:
            with self._kvikio.CuFile(tmp, "w") as f:
                f.pwrite(value, _nbytes(value), 0).get()
        except RuntimeError as e:
            raise oserror(errno.EIO, f"kvikio write of {tmp} failed: {e}", e) from e
        if self.fsync == "always":
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    @staticmethod
    def _fsync_dir(directory: str) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _check_writable(self) -> None:
        if self.readonly:
            raise ReadOnlyStore(f"file:// store {self.root} was opened read-only (?readonly=true)")

    def delete_many(self, keys: Sequence[str]) -> None:
        paths = [self._path(k) for k in keys]
        if paths:
            self._check_writable()
        for path in paths:
            try:
                os.unlink(path)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                pass
            except OSError as e:
                if e.errno == errno.EPERM and os.path.isdir(path):
                    continue  # a directory is not a value: nothing to delete
                raise self._error(e, "deleting", path) from e

    # ---------------------------------------------------------------------------------- metadata
    def _stat(self, path: str) -> os.stat_result | None:
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise self._error(e, "checking", path) from e
        return st if _stat.S_ISREG(st.st_mode) else None

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        return [self._stat(p) is not None for p in [self._path(k) for k in keys]]

    def stat(self, key: str) -> ObjectInfo | None:
        st = self._stat(self._path(key))
        return None if st is None else ObjectInfo(key, st.st_size, st.st_mtime)

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under ``prefix``; never the reserved ``.kvfs/`` directory or temporary files."""
        head, _, _ = prefix.rpartition("/")
        start = os.path.join(self.root, head) if head else self.root
        out: list[str] = []
        stack = [(start, head + "/" if head else "")]
        while stack:
            directory, rel = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as e:
                raise self._error(e, "listing", directory) from e
            for e in entries:
                key = rel + e.name
                if not rel and e.name == RESERVED:
                    continue
                try:
                    is_dir = e.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if is_dir:
                    sub = key + "/"
                    if sub.startswith(prefix) or prefix.startswith(sub):
                        stack.append((e.path, sub))
                elif key.startswith(prefix) and not e.name.endswith(TMP_SUFFIX):
                    out.append(key)
        return iter(out)

    def usage(self) -> tuple[int | None, int | None]:
        """``(bytes used, bytes available)`` on the filesystem holding the store (``statvfs``)."""
        try:
            st = os.statvfs(self.root)
        except OSError:
            return None, None
        return (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_bavail * st.f_frsize

    def catalog_dir(self) -> str | None:
        return os.path.join(self.root, RESERVED, "catalog")

    # ---------------------------------------------------------------------------------- lifetime
    def flush(self) -> None:
        """Make every completed put durable (one ``syncfs`` of the store's filesystem)."""
        if self.fsync == "never" or self._closed or self.readonly:
            return
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise self._error(e, "syncing", self.root) from e
        try:
            _syncfs(fd)
        except OSError as e:
            raise self._error(e, "syncing", self.root) from e
        finally:
            os.close(fd)

    def close(self) -> None:
        self._closed = True


def _nbytes(buf: Any) -> int:
    n = getattr(buf, "nbytes", None)
    if n is not None:
        return int(n)
    if hasattr(buf, "write_to"):
        return len(buf)
    return len(memoryview(buf).cast("B"))


def _pwritev_all(fd: int, views: list[memoryview], offset: int) -> None:
    """Write every byte of ``views`` at ``offset`` (``pwritev``, resumed after a short write)."""
    views = [v for v in views if len(v)]
    while views:
        n = os.pwritev(fd, views[:_IOV_MAX], offset)
        if n <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]
