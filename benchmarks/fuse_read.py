"""Sequential reads through a FUSE mount vs ``store.cat`` of the same chunks, in the same run.

    python benchmarks/fuse_read.py [--gib 1] [--dir /path/on/the/disk/to/test] [--repeat 3]

Chunks: Llama-3-8B-shaped (32 layers, 8 KV heads, head_dim 128, 256 tokens,
float16) = 32 MiB each, in an LMDB store on the disk tested. Every pass
reads every chunk file once:

* baseline ``store.cat``: the verified whole-chunk read of the Python API
  (parse, key and checksum checks, per-layer checksums);
* mount, Python reads: open + ``readinto`` of 1 MiB until EOF per file (the
  server checks each layer's checksum before serving it);
* mount, ``cat``: ``cat FILE > /dev/null`` (coreutils, 128 KiB reads) over
  all files in one process.

The store's LMDB file is in the page cache for every variant (it was just
written, and the baseline reads it first). The mount is made fresh for each
pass so that the kernel's page cache of the FUSE files is empty: every byte
goes through the server. Small random reads (4 KiB at random offsets) are
reported too, against ``store.read_range``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import Results, best_of  # noqa: E402

import kvfs  # noqa: E402
from kvfs.fuse import mount, unmount  # noqa: E402

SPEC = kvfs.KVSpec("bench/llama-3-8b-shaped", num_layers=32, num_kv_heads=8, head_dim=128, dtype="float16")


def fill(url: str, total: int) -> list[str]:
    per_chunk = SPEC.bytes_per_token * SPEC.chunk_tokens
    n = max(1, total // per_chunk)
    rng = np.random.default_rng(0)
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        for i in range(n):  # one chunk per put: bounded memory
            toks = rng.integers(0, 128_000, SPEC.chunk_tokens).tolist()
            kv = rng.integers(0, 2**16, SPEC.chunk_shape(SPEC.chunk_tokens), dtype=np.uint16).view(np.float16)
            ns.put(toks, kv)
        return [e.path for e in store.ls(SPEC.path, recursive=True) if e.kind == "chunk"]


def read_through(mnt: str, paths: list[str]) -> int:
    buf = bytearray(1 << 20)
    total = 0
    for p in paths:
        with open(os.path.join(mnt, p), "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="bytes of chunks to read per pass")
    ap.add_argument("--dir", default=None, help="directory on the disk to test (default: a temp dir)")
    ap.add_argument("--repeat", type=int, default=3, help="passes per variant (the best counts)")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="kvfs-fuse-bench-", dir=args.dir)
    os.environ.setdefault("XDG_CACHE_HOME", os.path.join(work, "xdg"))
    url = f"lmdb://{work}/store"
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt)
    cmd = "python benchmarks/fuse_read.py " + " ".join(sys.argv[1:])
    res = Results("FUSE mount", cmd.strip())
    try:
        paths = fill(url, int(args.gib * (1 << 30)))
        with kvfs.open(url) as store:
            sizes = [store.stat(p).size for p in paths]
        nbytes = sum(sizes)
        print(f"{len(paths)} chunks, {nbytes / 2**20:.0f} MiB per pass", file=sys.stderr)

        def direct() -> None:
            with kvfs.open(url) as store:
                for p in paths:
                    store.cat(p)

        t_cat = best_of(args.repeat, direct)

        def mounted(fn) -> float:
            best = float("inf")
            for _ in range(args.repeat):
                mount(url, mnt)
                try:
                    t0 = time.perf_counter()
                    fn()
                    best = min(best, time.perf_counter() - t0)
                finally:
                    unmount(mnt)
            return best

        t_py = mounted(lambda: read_through(mnt, paths))
        files = [os.path.join(mnt, p) for p in paths]
        t_coreutils = mounted(lambda: subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True))

        gbps = lambda t: nbytes / t / 1e9  # noqa: E731
        res.add("store.cat, all chunks (baseline)", gbps(t_cat), "GB/s", None, None, "verified whole-chunk reads")
        res.add("mount: open + 1 MiB reads, all chunk files", gbps(t_py), "GB/s", "store.cat", t_cat / t_py,
                "layer checksums verified by the server")
        res.add("mount: `cat` of all chunk files", gbps(t_coreutils), "GB/s", "store.cat", t_cat / t_coreutils,
                "coreutils, 128 KiB reads")

        # small random reads: one layer fetched per read, not the whole 32 MiB chunk
        rng = random.Random(0)
        probes = [(rng.choice(paths), rng.randrange(0, sizes[0] - 4096)) for _ in range(200)]
        with kvfs.open(url) as store:
            t0 = time.perf_counter()
            for p, off in probes:
                store.read_range(p, off, 4096)
            t_rr = (time.perf_counter() - t0) / len(probes)
        mount(url, mnt)
        try:
            t0 = time.perf_counter()
            for p, off in probes:
                fd = os.open(os.path.join(mnt, p), os.O_RDONLY)
                try:
                    os.pread(fd, 4096, off)
                finally:
                    os.close(fd)
            t_fr = (time.perf_counter() - t0) / len(probes)
        finally:
            unmount(mnt)
        res.add("store.read_range, 4 KiB at random offsets", t_rr * 1e3, "ms", None, None, "unverified")
        res.add("mount: open + 4 KiB pread at random offsets", t_fr * 1e3, "ms", "store.read_range",
                t_rr / t_fr, "one verified layer (1 MiB) per read")
        res.print()
        print(f"\nsaved {res.save()}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
