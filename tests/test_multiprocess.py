"""Several processes writing, reading and evicting one LMDB store, or one file store, at once."""

from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np
import pytest

import fault_report
import kvfs

SPEC = kvfs.KVSpec("mp/tiny", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", chunk_tokens=16)


def expected_kv(tokens) -> np.ndarray:
    """KV that is a pure function of the tokens (per position), so any reader can check what it gets."""
    t = np.asarray(tokens, dtype=np.float32)
    base = np.arange(np.prod(SPEC.chunk_shape(1)), dtype=np.float32).reshape(SPEC.chunk_shape(1))
    return ((base[:, :, :, :, :] * 0 + 1) * (t[None, None, :, None, None] % 997) / 7.0 + base).astype(np.float16)


def prompts(seed: int, n: int = 40) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    shared = rng.integers(0, 1000, 40).tolist()
    return [shared + rng.integers(0, 1000, int(rng.integers(1, 60))).tolist() for _ in range(n)]


def worker(url: str, role: str, seed: int, seconds: float, q) -> None:
    errors, ops = [], 0
    try:
        with kvfs.open(url) as store:
            ns = store.namespace(SPEC)
            ps = prompts(0) + prompts(1)
            rng = np.random.default_rng(seed)
            end = time.time() + seconds
            while time.time() < end:
                p = ps[int(rng.integers(len(ps)))]
                if role == "writer":
                    ns.put(p, expected_kv(p))
                else:
                    n, kv = ns.get_prefix(p)
                    if n and kv.tobytes() != expected_kv(p[:n]).tobytes():
                        errors.append(f"wrong KV for a {n}-token prefix")
                    if rng.random() < 0.05:
                        store.evict(all=True)
                ops += 1
    except Exception as e:  # noqa: BLE001
        errors.append(repr(e))
    q.put((role, ops, errors))


@pytest.mark.parametrize("scheme", ["lmdb", "file"])
def test_concurrent_processes_on_one_store(tmp_path, scheme):
    url = f"{scheme}://{tmp_path}/shared"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(url, role, i, 4.0, q))
             for i, role in enumerate(["writer", "writer", "reader", "reader"])]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    fault_report.add(f"concurrency ({scheme}, 4 processes)", concurrent_operations=sum(o for _, o, _ in results),
                     wrong_KV_served=sum(1 for _, _, errs in results for e in errs if e.startswith("wrong KV")))
    assert all(not errs for _, _, errs in results), results
    assert sum(ops for role, ops, _ in results if role == "reader") > 20
    with kvfs.open(url) as store:
        report = store.fsck(verify=True)
        assert not report.corrupt and not report.foreign
        ns = store.namespace(SPEC)
        for p in prompts(0)[:5]:
            n, kv = ns.get_prefix(p)
            assert kv.tobytes() == expected_kv(p[:n]).tobytes()


_HOLD = """
import sys, kvfs
store = kvfs.open(sys.argv[1])
tier = store.tiers[0]
n = int(sys.argv[2])
ok = store._make_room(tier, n, wait=False)
print("reserved" if ok else "refused", flush=True)
if sys.argv[3] == "hold":
    sys.stdin.readline()  # holds the room (a write in flight) until told, or until killed
    store._release_room(tier, [n])
store.close()
"""


def _hold(url: str, nbytes: int, mode: str):
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", _HOLD, url, str(nbytes), mode], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    return p, p.stdout.readline().strip()


@pytest.mark.parametrize("scheme", ["lmdb", "file"])
def test_room_reserved_by_one_process_is_not_taken_by_another(tmp_path, scheme, monkeypatch):
    """Room made in a tier with a capacity for a write in flight is reserved for every process on the node:
    a second process does not count the same free space (each used to count only its own writes, so several
    processes writing into one tier took it over its capacity); a reservation left by a process killed
    mid-write is dropped once that process is gone."""
    from kvfs import catalog as catalog_mod

    cap = 1 << 20
    url = f"{scheme}://{tmp_path}/s?capacity={cap}"
    with kvfs.open(url) as store:
        tier = store.tiers[0]
        holder, said = _hold(url, cap - 4096, "hold")
        try:
            assert said == "reserved"
            assert store.catalog.reserved(tier.slot) == cap - 4096
            assert not store._make_room(tier, 8192, wait=False), "another process's room was counted as free"
            assert store._make_room(tier, 4096, wait=False)  # what is left is still free
            store._release_room(tier, [4096])
            holder.stdin.write("\n")
            holder.stdin.flush()
            assert holder.wait(60) == 0
        finally:
            holder.kill()
        assert store.catalog.reserved(tier.slot) == 0
        assert store._make_room(tier, 8192, wait=False)
        store._release_room(tier, [8192])

        killed, said = _hold(url, cap - 4096, "hold")
        assert said == "reserved"
        killed.kill()
        killed.wait(60)
        monkeypatch.setattr(catalog_mod, "ROOM_DEAD_S", 0.0)
        assert store._make_room(tier, 8192, wait=False), "a dead process's reservation was kept"
        assert store.catalog.reserved(tier.slot) == 8192
        store._release_room(tier, [8192])
        assert store.catalog.reserved(tier.slot) == 0


def _capped_writer(url: str, seed: int, q) -> None:
    errors, peak = [], 0
    try:
        with kvfs.open(url) as store:
            ns = store.namespace(SPEC)
            slot = store.tiers[0].slot
            for p in prompts(100 + seed, 30):
                ns.put(p, expected_kv(p))
                peak = max(peak, store.catalog.used(slot))
    except Exception as e:  # noqa: BLE001
        errors.append(repr(e))
    q.put((peak, errors))


@pytest.mark.parametrize("scheme", ["lmdb", "file"])
def test_processes_writing_side_by_side_keep_a_tier_within_its_capacity(tmp_path, scheme):
    chunk = int(np.prod(SPEC.chunk_shape(SPEC.chunk_tokens))) * 2
    cap = 24 * chunk
    url = f"{scheme}://{tmp_path}/s?capacity={cap}"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_capped_writer, args=(url, i, q)) for i in range(3)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert all(not errs for _, errs in results), results
    peak = max(pk for pk, _ in results)
    assert peak <= cap, f"the tier held {peak} bytes, over its capacity of {cap}"
    with kvfs.open(url) as store:
        assert store.catalog.used(store.tiers[0].slot) <= cap
        assert store.catalog.reserved(store.tiers[0].slot) == 0


_SAME_PID = """
import os, sys, kvfs
from kvfs import catalog
store = kvfs.open(sys.argv[1])
tier = store.tiers[0]
if sys.argv[2] == "crash":
    print(os.getpid(), store._make_room(tier, tier.capacity - 4096, wait=False), flush=True)
    os._exit(1)  # killed mid-write: its reservation is left behind
catalog.ROOM_STALE_S = 0.0  # (instead of waiting 10 minutes)
print(os.getpid(), store._make_room(tier, 8192, wait=False), flush=True)
"""


def test_a_reservation_left_by_a_process_with_this_pid_is_not_this_processs_own(tmp_path):
    """A process restarted with the pid of the one before (a container's pid 1) counted the reservation its
    crashed predecessor left as its own, and so never dropped it: that much of the tier stayed refused for
    good. Each run is pid 1 of a new pid namespace here."""
    import subprocess
    import sys

    if subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True).returncode:
        pytest.skip("cannot make a pid namespace here (unshare --pid needs root)")
    url = f"lmdb://{tmp_path}/s?capacity={1 << 20}"
    runs = [subprocess.run(["unshare", "--pid", "--fork", sys.executable, "-c", _SAME_PID, url, mode],
                           capture_output=True, text=True, timeout=120) for mode in ("crash", "again")]
    assert [r.stdout.split() for r in runs] == [["1", "True"], ["1", "True"]], [(r.stdout, r.stderr) for r in runs]
