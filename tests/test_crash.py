"""Crash consistency: processes killed with SIGKILL at random points lose nothing that completed.

Each iteration starts a worker (tests/workers/crash_worker.py) that puts,
gets, evicts, pins and flushes on a store, journalling each operation's start
and completion, and kills it with SIGKILL after a random delay. After every
kill: the store reopens, no visible chunk is partial or wrong, every chunk of
a completed put (not evicted since) is still there byte-exact, and fsck
finds nothing it cannot repair.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

import fault_report
import kvfs
from workers.kvdata import SPEC, expected_kv, prompt

HERE = os.path.dirname(__file__)
COUNTS = {"crash_points": 0, "chunks_checked": 0, "wrong_kv": 0, "lost": 0}


def _run_and_kill(url: str, journal: str, seed: int, delay: float) -> None:
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "workers", "crash_worker.py"), url, journal,
                             str(seed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 30
    while time.time() < deadline:  # wait until it works on the store, then let it run a random while
        if os.path.exists(journal) and "ready" in open(journal).read():
            break
        if proc.poll() is not None:
            raise AssertionError(f"worker died: {proc.stderr.read().decode()}")
        time.sleep(0.02)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.stderr.close()


def _expected_state(journal: str) -> tuple[set[int], set[int]]:
    """(prompts whose last put completed and which no evict touched since, prompts ever evicted)."""
    must, touched = set(), set()
    for line in open(journal):
        parts = line.split()
        if len(parts) != 3:
            continue
        phase, op, i = parts[0], parts[1], int(parts[2])
        if phase == "done" and op == "put":
            must.add(i)
        if phase == "start" and op == "evict":
            touched.add(i)
            must.discard(i)
    return must, touched


def _check(url: str, journal: str) -> None:
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        assert "WRONG" not in open(journal).read()
        must, _ = _expected_state(journal)
        # evicting one prompt can evict the shared prefix chunk of others: only chunks of prompts
        # whose own chunks no evict of any prompt touched are guaranteed
        evicted_paths = set()
        for line in open(journal):
            parts = line.split()
            if len(parts) == 3 and parts[0] == "start" and parts[1] == "evict":
                evicted_paths.update(k.path for k in ns.keys(prompt(int(parts[2]))))
        for i in must:
            p = prompt(i)
            keys = ns.keys(p)
            intact = 0
            for k in keys:
                if k.path in evicted_paths:
                    break
                intact = k.end
            n, kv = ns.get_prefix(p)
            COUNTS["chunks_checked"] += len(keys)
            if n < intact:
                COUNTS["lost"] += 1
            assert n >= intact, f"prompt {i}: {intact} tokens were committed, only {n} came back"
            if kv.tobytes() != expected_kv(p[:n]).tobytes():
                COUNTS["wrong_kv"] += 1
            assert kv.tobytes() == expected_kv(p[:n]).tobytes()
        # every visible chunk is whole and valid; fsck repairs what the kill left (orphans, stale entries)
        report = store.fsck(verify=True)
        assert not report.corrupt and not report.foreign, report.to_dict()
        assert store.fsck(verify=True).clean


@pytest.mark.parametrize("layout", ["lmdb", "memory-over-lmdb"])
def test_sigkill_at_random_points(tmp_path, request, layout):
    iterations = 60 if request.config.getoption("--soak") else 8
    rng = random.Random(1234)
    base = f"lmdb://{tmp_path}/store"
    url = base if layout == "lmdb" else f"memory://?capacity=2MiB::{base}"
    journal = str(tmp_path / "journal.txt")
    for it in range(iterations):
        _run_and_kill(url, journal, seed=rng.randrange(1 << 30), delay=rng.uniform(0.05, 0.6))
        COUNTS["crash_points"] += 1
        if layout == "memory-over-lmdb":
            # the memory tier died with the process: only what reached LMDB counts (flush = durable)
            _check_flushed_only(base, journal)
        else:
            _check(url, journal)
        os.unlink(journal)


def _check_flushed_only(url: str, journal: str) -> None:
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        assert "WRONG" not in open(journal).read()
        lines = [line.split() for line in open(journal)]
        # puts completed before the last completed flush, and not evicted afterwards or before
        last_flush = max((n for n, p in enumerate(lines) if p[:2] == ["done", "flush"]), default=-1)
        evicted = set()
        for p in lines:
            if len(p) == 3 and p[0] == "start" and p[1] == "evict":
                evicted.update(k.path for k in ns.keys(prompt(int(p[2]))))
        for n_line, p in enumerate(lines[: last_flush + 1]):
            if p[:2] != ["done", "put"]:
                continue
            tokens = prompt(int(p[2]))
            intact = 0
            for k in ns.keys(tokens):
                if k.path in evicted:
                    break
                intact = k.end
            n, kv = ns.get_prefix(tokens)
            COUNTS["chunks_checked"] += 1
            assert n >= intact
            assert kv.tobytes() == expected_kv(tokens[:n]).tobytes()
        report = store.fsck(verify=True)
        assert not report.corrupt and not report.foreign


def teardown_module(module):
    fault_report.add("crash (SIGKILL at random points)", crash_points=COUNTS["crash_points"],
                     chunk_checks=COUNTS["chunks_checked"], wrong_KV_served=COUNTS["wrong_kv"],
                     committed_prompts_lost=COUNTS["lost"])
