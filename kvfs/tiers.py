"""Tiers and the background write-back that fills the lower ones.

A store's URL chains tiers fastest first. Writes land in the first tier that
has room and are copied to the tiers below it by one background thread
through a queue bounded in bytes: a producer faster than the lower tiers
waits (back-pressure) instead of growing memory. ``flush()`` waits until
every queued write is in place and reports the ones that failed.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .errors import StoreError
from .url import TierURL

log = logging.getLogger("kvfs")
WRITEBACK_THREADS = 4  # write-back threads at most (started as the queue backs up): a bucket takes PUTs side by side
DOWN_SECONDS = 3.0  # after a tier failed for good (timeout, refused, denied...), write-back to it fails fast this long
#: errors that retrying the same write cannot fix: reported at once
_PERMANENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOENT, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                     errno.EISDIR, errno.ENAMETOOLONG, errno.EFBIG, errno.EINVAL, errno.ENOSYS, errno.EBADF}
#: of those, the ones that concern the whole tier (credentials, a missing bucket, a full or read-only device)
#: rather than one key
_TIER_WIDE_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOENT, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EBADF}


@dataclass(eq=False)
class Tier:
    index: int  # position in the chain, 0 = fastest
    url: TierURL
    backend: object  # kvfs.backends.Backend
    slot: int  # the catalog's persistent bit for this storage
    capacity: int | None
    watermark: float
    shared: bool
    lock: threading.Lock = field(default_factory=threading.Lock)
    identity: str = ""  # the catalog's name for this storage (process-local for memory tiers)

    @property
    def bit(self) -> int:
        return 1 << self.slot

    @property
    def name(self) -> str:
        return self.url.identity

    def __repr__(self) -> str:
        return f"Tier({self.index}, {self.url.redacted()})"


@dataclass(eq=False)
class WriteJob:
    path: str
    data: object  # a buffer holding the whole encoded chunk
    targets: list[int]  # tier indices still to write
    on_written: Callable[[int], None]  # called with each tier index once written
    release: bool = False  # give the buffer back to kvfs._buffers when done

    @property
    def nbytes(self) -> int:
        return len(self.data)


class WriteBack:
    """Background threads (up to ``threads``, started as the queue backs up) draining a byte-bounded queue of
    :class:`WriteJob`s. Jobs for one path are written one at a time, in the order they were queued."""

    def __init__(self, write: Callable[[WriteJob, int], bool | None], max_bytes: int, retries: int = 3,
                 backoff: float = 0.2, on_recovered: Callable[[int], bool | None] | None = None,
                 threads: int | None = None) -> None:
        self._write = write
        #: called (on the write-back thread) with a tier's index when a write to it succeeds after one failed;
        #: returning False means "not now": it is called again after the next write to that tier that succeeds
        self._on_recovered = on_recovered
        self._failed: set[int] = set()  # tiers a write failed to since the last write that succeeded
        self._paths: dict[str, int] = {}  # paths of the jobs queued or being written
        self._max_bytes = max_bytes
        self._retries = retries
        self._backoff = backoff
        self._queue: deque[WriteJob] = deque()
        self._queued_bytes = 0
        self._busy = 0
        self._cond = threading.Condition()
        self._errors: list[tuple[str, int, BaseException]] = []
        self._closed = False
        self._nthreads = max(1, WRITEBACK_THREADS if threads is None else threads)
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for a job
        self._writing: set[str] = set()  # paths being written now (a later job for one waits for it)
        self._down: dict[int, tuple[float, BaseException]] = {}  # tier -> (fail fast until, why)

    def submit(self, job: WriteJob) -> None:
        """Queue a job; blocks while queued and in-flight jobs hold ``max_bytes`` (unless there are none)."""
        if not job.targets:
            return
        with self._cond:
            if self._closed:
                raise StoreError(5, "the store is closed")
            # (bytes being written count too; a job larger than the bound goes once nothing else is held)
            while (self._queue or self._busy) and self._queued_bytes + job.nbytes > self._max_bytes:
                self._cond.wait()
            if self._closed:  # closed while it waited: no thread would drain the queue any more
                raise StoreError(5, "the store is closed")
            self._queue.append(job)
            self._queued_bytes += job.nbytes
            self._paths[job.path] = self._paths.get(job.path, 0) + 1
            if not self._idle and len(self._threads) < self._nthreads:
                th = threading.Thread(target=self._run, name=f"kvfs-writeback-{len(self._threads)}", daemon=True)
                self._threads.append(th)
                th.start()
            self._cond.notify_all()

    def queued_paths(self) -> set[str]:
        """Paths of the jobs queued or being written now."""
        with self._cond:
            return set(self._paths)

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + self._busy

    def _next_job(self) -> WriteJob | None:
        """The first queued job whose path no other thread is writing (under the lock)."""
        for i, job in enumerate(self._queue):
            if job.path not in self._writing:
                del self._queue[i]
                return job
        return None

    def _run(self) -> None:
        while True:
            with self._cond:
                self._idle += 1
                while (job := self._next_job()) is None and not (self._closed and not self._queue):
                    self._cond.wait()
                self._idle -= 1
                if job is None:
                    return
                self._writing.add(job.path)
                self._busy += 1
            try:
                for tier_index in job.targets:
                    self._write_with_retries(job, tier_index)
                if job.release:
                    from . import _buffers

                    _buffers.release(job.data)
            finally:
                with self._cond:
                    self._writing.discard(job.path)
                    self._busy -= 1
                    self._queued_bytes -= job.nbytes
                    n = self._paths.pop(job.path, 1) - 1
                    if n > 0:
                        self._paths[job.path] = n
                    self._cond.notify_all()

    def _write_with_retries(self, job: WriteJob, tier_index: int) -> None:
        down = self._down.get(tier_index)
        if down is not None and time.monotonic() < down[0]:
            # the tier timed out or refused us moments ago: fail fast instead of waiting out its
            # deadline once more for every queued chunk (close() would take minutes)
            with self._cond:
                self._errors.append((job.path, tier_index, down[1]))
            return
        delay = self._backoff
        for attempt in range(self._retries + 1):
            try:
                if not self._write(job, tier_index):  # True: the writer recorded the copy itself
                    job.on_written(tier_index)
                self._down.pop(tier_index, None)
                if tier_index in self._failed:
                    handled = True
                    if self._on_recovered is not None:
                        try:
                            # False: not handled now (a pass already running, or one ran moments ago): the tier
                            # stays marked, so that a later write that succeeds asks again
                            handled = self._on_recovered(tier_index) is not False
                        except Exception as e:  # noqa: BLE001 - never stops the write-back thread
                            log.warning("kvfs: after tier %d came back: %s", tier_index, e)
                    if handled:
                        self._failed.discard(tier_index)
                return
            except Exception as e:  # noqa: BLE001 - reported through flush()
                # an unreachable tier already used up its own deadline and retries inside the backend; a
                # permanent error (denied, no bucket, no space, read-only) does not go away by retrying
                unreachable = isinstance(e, (TimeoutError, ConnectionError))
                permanent = getattr(e, "errno", None) in _PERMANENT_ERRNOS
                if attempt == self._retries or unreachable or permanent:
                    if unreachable or attempt == self._retries or getattr(e, "errno", None) in _TIER_WIDE_ERRNOS:
                        # the tier itself is failing (it kept failing through every retry, or refuses the whole
                        # tier): the chunks queued behind this one fail fast for a while instead of each waiting
                        # out the same retries (close() would take minutes with a full queue)
                        self._down[tier_index] = (time.monotonic() + DOWN_SECONDS, e)
                    log.warning("kvfs: write-back of %s to tier %d failed: %s", job.path, tier_index, e)
                    self._failed.add(tier_index)
                    with self._cond:
                        self._errors.append((job.path, tier_index, e))
                    return
                time.sleep(delay)
                delay *= 2

    def flush(self, timeout: float | None = None, *, take_errors: bool = True) -> list[tuple[str, int, BaseException]]:
        """Wait for the queue to drain; return (and forget) the writes that failed (with ``take_errors=False``:
        none, and they stay for the next flush to report)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"write-back still has {len(self._queue) + self._busy} chunks in flight")
                self._cond.wait(remaining)
            if not take_errors:
                return []
            errors, self._errors = self._errors, []
            return errors

    def close(self) -> list[tuple[str, int, BaseException]]:
        errors = self.flush()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            threads = list(self._threads)
        for th in threads:
            th.join()
        return errors
