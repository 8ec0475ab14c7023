"""The process-wide worker pool for copies, checksums and encodes.

numpy copies, xxhash and blake2b release the GIL on large buffers, so
spreading a batch's chunks (or one chunk's layers) over a few threads runs
copy+verify at memory speed instead of at one core's speed. Tasks given to
this pool are leaves: they never wait on other tasks of the pool.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

_pool: ThreadPoolExecutor | None = None
_pid = 0
_lock = threading.Lock()
_PREFIX = "kvfs-io"


def workers() -> int:
    env = os.environ.get("KVFS_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, min(8, os.cpu_count() or 1))


def pool() -> ThreadPoolExecutor:
    global _pool, _pid
    if _pool is None or _pid != os.getpid():
        with _lock:
            if _pool is None or _pid != os.getpid():
                _pool = ThreadPoolExecutor(max_workers=workers(), thread_name_prefix=_PREFIX)
                _pid = os.getpid()
    return _pool


def run_all(fns) -> list:
    """Run callables on the pool (the first one on this thread) and return their results in order.

    Exceptions propagate after every task has finished, so no task is left
    writing into a buffer the caller is about to reuse.
    """
    fns = list(fns)
    if len(fns) <= 1 or workers() == 1 or threading.current_thread().name.startswith(_PREFIX):
        return [f() for f in fns]  # on a worker already: run inline (a worker waiting on workers could deadlock)
    futures = [pool().submit(f) for f in fns[1:]]
    results: list = [None] * len(fns)
    first_exc: BaseException | None = None
    try:
        results[0] = fns[0]()
    except BaseException as e:  # noqa: BLE001
        first_exc = e
    for i, fut in enumerate(futures, 1):
        try:
            results[i] = fut.result()
        except BaseException as e:  # noqa: BLE001
            first_exc = first_exc or e
    if first_exc is not None:
        raise first_exc
    return results
