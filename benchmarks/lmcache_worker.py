"""The shared harness of the kvfs/LMCache comparison, and its LMCache side.

This file runs in two interpreters:

* inside LMCache's own venv (``benchmarks/.lmcache-venv``, made by
  ``setup_lmcache.sh``), as ``python lmcache_worker.py --phase main|restart ...``:
  it measures LMCache 0.5.6's cache engine and writes the timings as JSON;
* inside the project venv, where ``lmcache_compare.py`` imports the harness
  from here (workload, baselines, timing, cache dropping) so that both sides
  build the same bytes and are timed and baselined by the same code.

It never imports kvfs, and imports lmcache only on the LMCache side.

Workload: Llama-3-8B-shaped KV (32 layers, 8 KV heads, head_dim 128,
float16), 256-token chunks of 32 MiB. Each side holds the KV in its own
layout (kvfs ``[layers, 2, tokens, heads, dim]``, LMCache ``[2, layers,
tokens, heads*dim]``, the layout of its memory objects) with the same bytes
per (layer, plane, token), so both copy the same 64 strided 512 KiB blocks
per chunk in and out.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

LAYERS, HEADS, HEAD_DIM, CHUNK = 32, 8, 128, 256
ITEMSIZE = 2  # float16
CHUNK_BYTES = LAYERS * 2 * CHUNK * HEADS * HEAD_DIM * ITEMSIZE  # 32 MiB
LOOKUP_TOKENS = 32 * 1024  # the "32k-token prompt" of the lookup measurements
TINY = dict(layers=1, heads=1, head_dim=8)  # KV shape of the lookup-only stores (lookups never read KV)
CPU_TIER_PROMPTS = 1.25  # CPU tier capacity, in prompts: full after the warm-up, so each store evicts
CPU_WARMUP_STORES = 2


# ------------------------------------------------------------------------------------ the workload
def workload_tokens(n_tokens: int, seed: int = 0) -> list[int]:
    """The prompt's token ids (a Python list, as engines hold them)."""
    return np.random.default_rng(seed).integers(0, 128_000, n_tokens).tolist()


def workload_kv(n_tokens: int, seed: int = 0) -> np.ndarray:
    """Random KV bits, uint16 ``[layers, 2, tokens, heads, dim]`` (random bits: any float16 pattern)."""
    nbytes = LAYERS * 2 * n_tokens * HEADS * HEAD_DIM * ITEMSIZE
    raw = np.frombuffer(np.random.default_rng(seed + 1).bytes(nbytes), dtype=np.uint16)
    return raw.reshape(LAYERS, 2, n_tokens, HEADS, HEAD_DIM)


def cpu_store_prompts(n_tokens: int, repeats: int) -> list[list[int]]:
    """Distinct prompts for the CPU-tier stores: two fill the tier, then each one timed evicts older KV
    (the steady state of a cache; no chunk of a prompt is already stored)."""
    return [workload_tokens(n_tokens, seed=100 + i) for i in range(CPU_WARMUP_STORES + repeats)]


def n_tokens_for(gib: float) -> int:
    return max(1, int(gib * 2**30) // CHUNK_BYTES) * CHUNK


def touched(shape, dtype=np.uint16) -> np.ndarray:
    """A page-aligned output buffer whose pages are already faulted in (measure copies, not page faults)."""
    import mmap

    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    m = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    a = np.frombuffer(m, dtype=dtype, count=int(np.prod(shape))).reshape(shape)
    a.reshape(-1).view(np.uint8)[::4096] = 1
    return a


# ------------------------------------------------------------------------------------ timing
def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def samples(n: int, fn: Callable[[], Any], before: Callable[[], Any] | None = None) -> list[float]:
    """``n`` timings of ``fn`` (``before`` runs untimed ahead of each)."""
    out = []
    for _ in range(max(1, n)):
        if before is not None:
            before()
        out.append(timed(fn))
    return out


def drop_caches() -> bool:
    """Write back dirty pages and drop the page cache (root only); False if not possible."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


_libc = None


def syncfs(path: str) -> None:
    """Flush the filesystem holding ``path`` (Linux ``syncfs``; ``sync`` elsewhere)."""
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
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), path)
    finally:
        os.close(fd)


def du(path: str) -> tuple[int, int]:
    """(files, bytes) under ``path``."""
    n = size = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                size += os.stat(os.path.join(root, f)).st_size
                n += 1
            except FileNotFoundError:
                pass
    return n, size


# ------------------------------------------------------------------------------------ baselines
def _chunk_views(buf: np.ndarray) -> list[memoryview]:
    mv = memoryview(buf.reshape(-1).view(np.uint8))
    return [mv[o : o + CHUNK_BYTES] for o in range(0, len(mv), CHUNK_BYTES)]


def _raw_write(d: str, src: np.ndarray, threads: int, sync: bool) -> float:
    """One file per 32 MiB chunk, plain buffered writes, as both systems lay chunks out."""
    parts = _chunk_views(src)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    os.sync()

    def write(i: int) -> None:
        with open(os.path.join(d, f"{i:06d}.bin"), "wb", buffering=0) as f:
            f.write(parts[i])

    t0 = time.perf_counter()
    if threads > 1:
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(write, range(len(parts))))
    else:
        for i in range(len(parts)):
            write(i)
    if sync:
        syncfs(d)
    return time.perf_counter() - t0


def _raw_read(d: str, dst: np.ndarray, threads: int) -> float:
    parts = _chunk_views(dst)

    def read(i: int) -> None:
        with open(os.path.join(d, f"{i:06d}.bin"), "rb", buffering=0) as f:
            f.readinto(parts[i])

    t0 = time.perf_counter()
    if threads > 1:
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(read, range(len(parts))))
    else:
        for i in range(len(parts)):
            read(i)
    return time.perf_counter() - t0


def baselines(src: np.ndarray, scratch: str, repeats: int, cold_repeats: int) -> dict[str, list[float]]:
    """memcpy and raw file I/O of the same bytes on the same disk, in this process.

    Each is the best of one thread and of a few threads (both systems use
    threads): the physical limit this process can reach.
    """
    dst = touched(src.shape, src.dtype)
    out: dict[str, list[float]] = {}
    out["memcpy"] = samples(repeats, lambda: np.copyto(dst, src))
    halves = [(dst[: len(dst) // 2], src[: len(src) // 2]), (dst[len(dst) // 2 :], src[len(src) // 2 :])]
    with ThreadPoolExecutor(2) as ex:  # numpy releases the GIL while copying: two cores' worth
        out["memcpy"] += samples(repeats, lambda: list(ex.map(lambda p: np.copyto(*p), halves)))
    try:
        import torch

        ts, td = torch.from_numpy(np.require(src, requirements="W")), torch.from_numpy(dst)
        out["memcpy"] += samples(repeats, lambda: td.copy_(ts))
    except ImportError:
        pass
    d = os.path.join(scratch, "raw")
    threads = [1, 4]
    out["raw_write"] = [_raw_write(d, src, t, False) for t in threads for _ in range(repeats)]
    out["raw_write_sync"] = [_raw_write(d, src, t, True) for t in threads for _ in range(repeats)]
    out["raw_read_warm"] = [_raw_read(d, dst, t) for t in threads for _ in range(repeats)]
    if drop_caches():
        out["raw_read_cold"] = []
        for t in threads:
            for _ in range(cold_repeats):
                drop_caches()
                out["raw_read_cold"].append(_raw_read(d, dst, t))
    if not np.array_equal(dst, src):
        raise AssertionError("raw read-back differs from what was written")
    shutil.rmtree(d, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------ worker plumbing
def worker_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="one side of benchmarks/lmcache_compare.py (not for direct use)")
    ap.add_argument("--phase", choices=("main", "restart"), required=True)
    ap.add_argument("--dir", required=True, help="scratch directory on the disk measured")
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cold-repeats", type=int, default=2)
    ap.add_argument("--lookup-repeats", type=int, default=30)
    ap.add_argument("--out", required=True, help="JSON file to write the results to")
    return ap.parse_args(argv)


class Report:
    """What a worker measured: timing samples per operation, and facts."""

    def __init__(self, side: str, phase: str, nbytes: int, ntokens: int) -> None:
        self.data: dict[str, Any] = {"side": side, "phase": phase, "bytes": nbytes, "tokens": ntokens,
                                     "samples": {}, "facts": {}}

    def add(self, op: str, values: list[float]) -> None:
        self.data["samples"].setdefault(op, []).extend(values)

    def fact(self, name: str, value: Any) -> None:
        self.data["facts"][name] = value

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.data, f, indent=1)


def wait_until(cond: Callable[[], bool], timeout: float = 300.0, poll: float = 0.0005) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("timed out waiting for writes to finish")
        time.sleep(poll)


# ------------------------------------------------------------------------------------ LMCache
class _LMCache:
    """LMCache 0.5.6 through its public engine API: LMCacheEngineBuilder, LMCacheEngineConfig, store/retrieve/lookup."""

    def __init__(self, name: str, *, cpu: bool, disk: str | None, pool_gib: float, shape=None,
                 disk_gib: float = 1000.0) -> None:
        import torch
        from lmcache.utils import mock_up_broadcast_fn, mock_up_broadcast_object_fn
        from lmcache.v1.cache_engine import LMCacheEngineBuilder
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.gpu_connector.gpu_connectors import GPUConnectorInterface
        from lmcache.v1.metadata import LMCacheMetadata

        layers, heads, dim = shape or (LAYERS, HEADS, HEAD_DIM)

        class CPUConnector(GPUConnectorInterface):
            """The engine-side adapter LMCache asks for: copies between the engine's KV tensor (here a
            CPU tensor ``[2, layers, tokens, heads*dim]``) and LMCache's memory objects (KV_2LTD,
            ``[2, layers, chunk tokens, heads*dim]``), one strided copy per chunk."""

            def to_gpu(self, memory_obj, start, end, **kw):
                kw["kvcaches"][:, :, start:end].copy_(memory_obj.tensor)

            def from_gpu(self, memory_obj, start, end, **kw):
                memory_obj.tensor.copy_(kw["kvcaches"][:, :, start:end])

            def batched_to_gpu(self, memory_objs, starts, ends, **kw):
                for m, s, e in zip(memory_objs, starts, ends):
                    self.to_gpu(m, s, e, **kw)

            def batched_from_gpu(self, memory_objs, starts, ends, **kw):
                for m, s, e in zip(memory_objs, starts, ends):
                    self.from_gpu(m, s, e, **kw)

            def get_shape(self, num_tokens):
                return torch.Size([2, layers, num_tokens, heads * dim])

        self.builder = LMCacheEngineBuilder
        self.name = name
        metadata = LMCacheMetadata("bench/llama-3-8b-shaped", 1, 1, 0, 0, torch.float16,
                                   (layers, 2, CHUNK, heads, dim))
        config = LMCacheEngineConfig.from_defaults(
            chunk_size=CHUNK,
            local_cpu=cpu,
            max_local_cpu_size=pool_gib,
            local_disk=disk,
            # an accounting limit, nothing is reserved: large so that its (never decremented on
            # remove) size counter cannot refuse the repeated store/clear cycles of the benchmark
            max_local_disk_size=disk_gib if disk else 0.0,
        )
        self.engine = LMCacheEngineBuilder.get_or_create(name, config, metadata, CPUConnector(),
                                                         mock_up_broadcast_fn, mock_up_broadcast_object_fn)
        self.engine.post_init()
        self.disk = self.engine.storage_manager.storage_backends.get("LocalDiskBackend")

    def store(self, tokens, kv) -> None:
        self.engine.store(tokens, kvcaches=kv)

    def written(self) -> bool:
        """Every disk write the engine queued has finished (and is in its index)."""
        return self.disk is None or not self.disk.disk_worker.put_tasks

    def store_until_written(self, tokens, kv) -> None:
        self.store(tokens, kv)
        wait_until(self.written)

    def retrieve(self, tokens, out) -> int:
        return int(self.engine.retrieve(tokens, kvcaches=out).sum())

    def lookup(self, tokens) -> int:
        return self.engine.lookup(tokens)

    def lookup_as_vllm(self, tokens) -> int:
        """What LMCache's vLLM connector does (its in-process lookup client): hash the prompt, look the
        hashes up pinning the hits for the coming retrieve, then release the pins."""
        hashes, offsets = [], []
        for start, end, h in self.engine.token_database.process_tokens(tokens, make_key=False):
            hashes.append(h)
            offsets.append(end - start)
        n = self.engine.lookup(hashes=hashes, offsets=offsets, lookup_id="bench", pin=True)
        self.engine.lookup_unpin("bench")
        return n

    def clear(self, tokens=None) -> None:
        self.engine.clear(tokens)

    def keys(self, tokens) -> list:
        return [k for _, _, k in self.engine.token_database.process_tokens(tokens)]

    def close(self) -> None:
        self.builder.destroy(self.name)


def full_samples(rep: Report, op: str, n: int, tokens_expected: int, fn: Callable[[], int],
                 before: Callable[[], Any] | None = None) -> None:
    """Timings of ``fn`` (a retrieve returning how many tokens it got); a sample that got fewer tokens is not
    a retrieve of the workload: it is left out of the timings and counted in the facts."""
    short = []
    for _ in range(max(1, n)):
        if before is not None:
            before()
        t0 = time.perf_counter()
        got = fn()
        t = time.perf_counter() - t0
        if got == tokens_expected:
            rep.add(op, [t])
        else:
            short.append(got)
    if short:
        rep.fact(f"{op}_short", short)


def _lmcache_layout(kv: np.ndarray):
    """kvfs layout uint16 [L, 2, T, H, D] -> LMCache's float16 torch tensor [2, L, T, H*D] (same bytes)."""
    import torch

    L, P, T, H, D = kv.shape
    arr = np.ascontiguousarray(kv.transpose(1, 0, 2, 3, 4)).reshape(P, L, T, H * D)
    return torch.from_numpy(arr).view(torch.float16)


def _raw(t) -> np.ndarray:
    import torch

    return t.view(torch.int16).numpy().view(np.uint16)


def lmcache_main(a: argparse.Namespace) -> Report:
    import torch

    n = n_tokens_for(a.gib)
    tokens = workload_tokens(n)
    kv_k = workload_kv(n)
    rep = Report("lmcache", "main", kv_k.nbytes, n)
    rep.fact("torch_threads", torch.get_num_threads())
    rep.fact("pythonhashseed", os.environ.get("PYTHONHASHSEED"))
    for op, v in baselines(kv_k, a.dir, a.repeats, a.cold_repeats).items():
        rep.add(op, v)
    kv = _lmcache_layout(kv_k)
    expect = _raw(kv)
    del kv_k
    out = torch.from_numpy(touched(kv.shape)).view(torch.float16)
    pool = a.gib + 0.5

    # --- CPU tier: LocalCPUBackend (the hot cache) through the engine; its pool holds 1.25 prompts,
    # so after the warm-up every store of a new prompt evicts (and reuses) older chunks
    lm = _LMCache("cpu", cpu=True, disk=None, pool_gib=CPU_TIER_PROMPTS * kv.numel() * ITEMSIZE / 2**30)
    stores = []
    for i, prompt in enumerate(cpu_store_prompts(n, a.repeats)):
        t = timed(lambda: lm.store(prompt, kv))
        if lm.lookup(prompt) != n:
            raise AssertionError("LMCache did not keep the whole prompt it just stored")
        if i >= CPU_WARMUP_STORES:
            stores.append(t)
    rep.add("cpu_store", stores)
    lm.store(tokens, kv)
    assert lm.retrieve(tokens, out) == n
    full_samples(rep, "cpu_retrieve", a.repeats, n, lambda: lm.retrieve(tokens, out))
    if not np.array_equal(_raw(out), expect):
        raise AssertionError("LMCache CPU retrieve returned different bytes")
    rep.add("cpu_lookup_workload", samples(a.lookup_repeats, lambda: lm.lookup(tokens)))
    rep.fact("cpu_lookup_hits", lm.lookup(tokens))
    lm.close()

    # --- local disk: LocalDiskBackend alone (local_cpu=False), the CPU pool only stages
    disk_dir = os.path.join(a.dir, "lmcache-disk") + "/"
    lm = _LMCache("disk", cpu=False, disk=disk_dir, pool_gib=pool)
    lm.store_until_written(tokens, kv)  # warm-up
    assert lm.retrieve(tokens, out) == n

    def fresh() -> None:
        lm.clear(tokens)  # public API: drops the keys and deletes their files
        os.sync()

    stores, durable, calls = [], [], []
    for _ in range(a.repeats):
        fresh()
        t0 = time.perf_counter()
        lm.store(tokens, kv)
        tc = time.perf_counter()  # store() returns once the KV is in its CPU staging pool
        wait_until(lm.written)
        t1 = time.perf_counter()
        syncfs(disk_dir)  # LMCache has no flush: the durable figure adds syncfs, as kvfs's flush does
        t2 = time.perf_counter()
        calls.append(tc - t0)
        stores.append(t1 - t0)
        durable.append(t2 - t0)
    rep.add("disk_store_call", calls)
    rep.add("disk_store", stores)
    rep.add("disk_store_durable", durable)
    rep.fact("disk_files_bytes", du(disk_dir))
    assert lm.retrieve(tokens, out) == n  # warm-up of the read path
    full_samples(rep, "disk_retrieve_warm", a.repeats, n, lambda: lm.retrieve(tokens, out))
    if drop_caches():
        full_samples(rep, "disk_retrieve_cold", a.cold_repeats, n, lambda: lm.retrieve(tokens, out),
                     before=drop_caches)
    if not np.array_equal(_raw(out), expect):
        raise AssertionError("LMCache disk retrieve returned different bytes")
    rep.add("disk_lookup_workload", samples(a.lookup_repeats, lambda: lm.lookup(tokens)))
    rep.fact("chunk0_key", lm.keys(tokens[:CHUNK])[0].chunk_hash)

    # --- what LMCache checks when it reads: corrupt and truncate chunk files behind its back
    keys = lm.keys(tokens)
    if len(keys) >= 3:
        p1, p2 = lm.disk._key_to_path(keys[1]), lm.disk._key_to_path(keys[2])  # instrument, not API
        with open(p1, "r+b") as f:
            f.seek(CHUNK_BYTES // 2)
            block = bytearray(f.read(4096))
            f.seek(CHUNK_BYTES // 2)
            f.write(bytes(b ^ 0xFF for b in block))
        os.truncate(p2, CHUNK_BYTES // 2)
        out.view(torch.int16).fill_(0)
        got = lm.retrieve(tokens, out)
        raw_out = _raw(out)
        c1 = slice(CHUNK, 2 * CHUNK)
        c2 = slice(2 * CHUNK, 3 * CHUNK)
        rep.fact("corrupt_tokens_returned", got)
        rep.fact("corrupt_chunk_served_wrong_bytes",
                 bool(got >= 2 * CHUNK and not np.array_equal(raw_out[:, :, c1], expect[:, :, c1])))
        rep.fact("truncated_chunk_served_wrong_bytes",
                 bool(got >= 3 * CHUNK and not np.array_equal(raw_out[:, :, c2], expect[:, :, c2])))
    fresh()
    lm.store_until_written(tokens, kv)  # leave intact files for the restart phase
    lm.close()

    # --- lookup of a 32k-token prompt (tiny KV: lookups never touch KV bytes)
    tiny = (TINY["layers"], TINY["heads"], TINY["head_dim"])
    ltoks = workload_tokens(LOOKUP_TOKENS, seed=7)
    lkv = torch.zeros(2, tiny[0], LOOKUP_TOKENS, tiny[1] * tiny[2], dtype=torch.float16)
    for where, cpu, disk in (("cpu", True, None), ("disk", False, os.path.join(a.dir, "lmcache-lookup") + "/")):
        lm = _LMCache(f"lookup-{where}", cpu=cpu, disk=disk, pool_gib=0.25, shape=tiny)
        lm.store_until_written(ltoks, lkv)
        rep.fact(f"{where}_lookup32k_hits", lm.lookup(ltoks))
        rep.add(f"{where}_lookup32k", samples(a.lookup_repeats, lambda: lm.lookup(ltoks)))
        arr = torch.tensor(ltoks)
        rep.add(f"{where}_lookup32k_tensor", samples(a.lookup_repeats, lambda: lm.lookup(arr)))
        rep.add(f"{where}_lookup32k_pinned", samples(a.lookup_repeats, lambda: lm.lookup_as_vllm(ltoks)))
        lm.close()
    return rep


def lmcache_restart(a: argparse.Namespace) -> Report:
    """A new process on the same disk directory: what survives."""
    import torch

    n = n_tokens_for(a.gib)
    tokens = workload_tokens(n)
    rep = Report("lmcache", "restart", n * CHUNK_BYTES // CHUNK, n)
    rep.fact("pythonhashseed", os.environ.get("PYTHONHASHSEED"))
    disk_dir = os.path.join(a.dir, "lmcache-disk") + "/"
    rep.fact("files_on_disk_before", du(disk_dir))
    drop_caches()  # as the kvfs side: a restart after the page cache is gone
    t0 = time.perf_counter()
    lm = _LMCache("disk", cpu=False, disk=disk_dir, pool_gib=a.gib + 0.5)
    rep.add("restart_open", [time.perf_counter() - t0])
    rep.fact("chunk0_key", lm.keys(tokens[:CHUNK])[0].chunk_hash)
    t0 = time.perf_counter()
    hits = lm.lookup(tokens)
    rep.add("restart_first_lookup", [time.perf_counter() - t0])
    rep.fact("restart_lookup_hits", hits)
    rep.add("restart_lookup", samples(a.lookup_repeats, lambda: lm.lookup(tokens)))
    out = torch.from_numpy(touched((2, LAYERS, n, HEADS * HEAD_DIM))).view(torch.float16)
    t0 = time.perf_counter()
    got = lm.retrieve(tokens, out)
    rep.add("restart_retrieve", [time.perf_counter() - t0])
    rep.fact("restart_retrieved_tokens", got)
    # the engine sees a miss and recomputes; storing the same prompt again rewrites every chunk
    kv = _lmcache_layout(workload_kv(n))
    os.sync()
    rep.add("restart_store_again", [timed(lambda: lm.store_until_written(tokens, kv))])
    rep.fact("files_on_disk_after_store_again", du(disk_dir))
    lm.close()
    ltoks = workload_tokens(LOOKUP_TOKENS, seed=7)
    tiny = (TINY["layers"], TINY["heads"], TINY["head_dim"])
    lm = _LMCache("lookup-disk", cpu=False, disk=os.path.join(a.dir, "lmcache-lookup") + "/", pool_gib=0.25,
                  shape=tiny)
    rep.fact("restart_lookup32k_hits", lm.lookup(ltoks))
    rep.add("restart_lookup32k", samples(a.lookup_repeats, lambda: lm.lookup(ltoks)))
    lm.close()

    # --- its disk size counter: a disk tier sized for 4 chunks, then store + clear(tokens) cycles
    pdir = os.path.join(a.dir, "lmcache-accounting") + "/"
    ptoks = workload_tokens(4 * CHUNK, seed=9)
    chunk_gib = 2 * tiny[0] * CHUNK * tiny[1] * tiny[2] * ITEMSIZE / 2**30
    lm = _LMCache("accounting", cpu=False, disk=pdir, pool_gib=0.25, shape=tiny, disk_gib=4 * chunk_gib)
    pkv = torch.zeros(2, tiny[0], len(ptoks), tiny[1] * tiny[2], dtype=torch.float16)
    stored = []
    for _ in range(3):
        lm.store_until_written(ptoks, pkv)
        stored.append(lm.lookup(ptoks))
        lm.clear(ptoks)
    rep.fact("accounting_stored_tokens_per_cycle", stored)
    lm.close()
    return rep


def main() -> None:
    a = worker_args()
    os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")
    rep = lmcache_main(a) if a.phase == "main" else lmcache_restart(a)
    rep.save(a.out)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # an engine thread left behind must not keep the worker alive


if __name__ == "__main__":
    main()
