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
