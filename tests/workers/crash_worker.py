"""A process that works on a store until it is killed; it journals what completed.

usage: python crash_worker.py URL JOURNAL SEED

Every operation is journalled *after* it returns ("done put 3"), and its start
before it begins ("start evict 3"), each line flushed to the OS (SIGKILL keeps
the OS's page cache, so flushed lines survive the process).
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from workers.kvdata import SPEC, expected_kv, prompt  # noqa: E402

import kvfs  # noqa: E402


def main() -> None:
    url, journal, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = np.random.default_rng(seed)
    with open(journal, "a", buffering=1) as log, kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        log.write("ready\n")
        while True:
            i = int(rng.integers(0, 24))
            p = prompt(i)
            op = rng.choice(["put", "put", "put", "get", "evict", "pin", "unpin", "flush"])
            log.write(f"start {op} {i}\n")
            if op == "put":
                ns.put(p, expected_kv(p))
            elif op == "get":
                n, kv = ns.get_prefix(p)
                if n and kv.tobytes() != expected_kv(p[:n]).tobytes():
                    log.write(f"WRONG {i} {n}\n")
            elif op == "evict":
                ns.evict(p, force=True)
            elif op == "pin":
                ns.pin(p)
            elif op == "unpin":
                ns.unpin(p)
            else:
                store.flush()
            log.write(f"done {op} {i}\n")


if __name__ == "__main__":
    main()
