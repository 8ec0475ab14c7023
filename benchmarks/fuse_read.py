"""Sequential reads through a FUSE mount vs ``store.cat`` of the same chunks, in the same run.

    python benchmarks/fuse_read.py [--gib 1] [--dir /path/on/the/disk/to/test] [--repeat 5]

Chunks: Llama-3-8B-shaped (32 layers, 8 KV heads, head_dim 128, 256 tokens,
float16) = 32 MiB each, in an LMDB store on the disk tested. Every pass
reads every chunk file once:

* baseline ``store.cat``: the verified whole-chunk read of the Python API
  (parse, key and checksum checks, per-layer checksums), from one store
  handle kept open, as an engine keeps it;
* mount, Python reads: open + ``readinto`` of 1 MiB until EOF per file (the
  server checks each layer's checksum before serving it);
* mount, ``cat``: ``cat FILES > /dev/null`` (coreutils, 128 KiB reads);
* the FUSE ceiling: ``cat`` of the same bytes from a do-nothing pyfuse3
  server (``--raw-server``, started by this script) that holds every chunk in
  memory and answers reads by slicing them, with no checks and nothing else:
  how fast pyfuse3 and the kernel move bytes on this machine at all.

Both sides are warm, as in a long-running deployment: the store's LMDB file
is in the page cache and mapped by both processes (one untimed pass each
first). Before every mount pass the kernel's page cache of the mounted files
is dropped, untimed (``posix_fadvise(DONTNEED)``), so every byte goes through the
server. Passes of the three variants are interleaved, so that they share
whatever else the machine is doing, and the best pass of each counts.
Small random reads (4 KiB at random offsets, open + pread + close) are
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
from _common import Results  # noqa: E402

import kvfs  # noqa: E402
from kvfs.fuse import mount, unmount  # noqa: E402

SPEC = kvfs.KVSpec("bench/llama-3-8b-shaped", num_layers=32, num_kv_heads=8, head_dim=128, dtype="float16")


def fill(url: str, total: int) -> list[str]:
    per_chunk = SPEC.bytes_per_token * SPEC.chunk_tokens
    n = max(1, total // per_chunk)
    rng = np.random.default_rng(0)
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        for _ in range(n):  # one chunk per put: bounded memory
            toks = rng.integers(0, 128_000, SPEC.chunk_tokens).tolist()
            kv = rng.integers(0, 2**16, SPEC.chunk_shape(SPEC.chunk_tokens), dtype=np.uint16).view(np.float16)
            ns.put(toks, kv)
        return [e.path for e in store.ls(SPEC.path, recursive=True) if e.kind == "chunk"]


def drop_page_cache(files: list[str]) -> None:
    """Forget the kernel's cached pages of the mounted files (the store's own file stays cached)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_files(files: list[str]) -> int:
    buf = bytearray(1 << 20)
    total = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    return total


def raw_server(url: str, mnt: str) -> None:
    """The FUSE ceiling: chunks held in memory as files ``0``, ``1``, ... served by slicing, nothing else."""
    import errno
    import stat

    import pyfuse3
    import trio

    from kvfs.fuse._serve import _raise_readahead

    with kvfs.open(url) as store:
        blobs = [store.cat(e.path) for e in store.ls(SPEC.path, recursive=True) if e.kind == "chunk"]

    class Raw(pyfuse3.Operations):
        async def getattr(self, ino, ctx=None):
            a = pyfuse3.EntryAttributes()
            a.st_ino, a.entry_timeout, a.attr_timeout = ino, 60, 60
            if ino == pyfuse3.ROOT_INODE:
                a.st_mode, a.st_nlink = stat.S_IFDIR | 0o755, 2
            else:
                a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o444, 1, len(blobs[ino - 2])
            return a

        async def lookup(self, parent, name, ctx=None):
            try:
                return await self.getattr(int(name) + 2)
            except (ValueError, IndexError):
                raise pyfuse3.FUSEError(errno.ENOENT) from None

        async def open(self, ino, flags, ctx):
            return pyfuse3.FileInfo(fh=ino)

        async def read(self, fh, off, size):
            return memoryview(blobs[fh - 2])[off : off + size]

        async def flush(self, fh):
            pass

        async def release(self, fh):
            pass

    pyfuse3.init(Raw(), mnt, {"fsname=raw", "default_permissions"})

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            async def ready() -> None:
                st = await trio.to_thread.run_sync(os.stat, mnt)
                _raise_readahead(st.st_dev)  # the same kernel read-ahead as a kvfs mount
                print("ready", flush=True)
            nursery.start_soon(ready)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    finally:
        pyfuse3.close(unmount=False)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--raw-server":
        raw_server(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="bytes of chunks read per pass")
    ap.add_argument("--dir", default=None, help="directory on the disk to test (default: a temp dir)")
    ap.add_argument("--repeat", type=int, default=5, help="timed passes per variant (the best counts)")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="kvfs-fuse-bench-", dir=args.dir)
    os.environ.setdefault("XDG_CACHE_HOME", os.path.join(work, "xdg"))
    url = f"lmdb://{work}/store"
    mnt = os.path.join(work, "mnt")
    raw_mnt = os.path.join(work, "raw")
    os.makedirs(mnt)
    os.makedirs(raw_mnt)
    raw = None
    cmd = "python benchmarks/fuse_read.py " + " ".join(sys.argv[1:])
    res = Results("FUSE mount", cmd.strip())
    mounted = False
    try:
        paths = fill(url, int(args.gib * (1 << 30)))
        os.sync()  # no write-back of the fill competing with the passes
        files = [os.path.join(mnt, p) for p in paths]
        with kvfs.open(url) as store:
            sizes = [store.stat(p).size for p in paths]
            nbytes = sum(sizes)
            print(f"{len(paths)} chunks, {nbytes / 2**20:.0f} MiB per pass", file=sys.stderr)
            mount(url, mnt)
            mounted = True
            raw = subprocess.Popen([sys.executable, __file__, "--raw-server", url, raw_mnt], stdout=subprocess.PIPE,
                                   text=True)
            assert raw.stdout.readline().strip() == "ready"
            raw_files = [os.path.join(raw_mnt, str(i)) for i in range(len(paths))]

            def direct() -> None:
                for p in paths:
                    store.cat(p)

            def python_reads() -> None:
                assert read_files(files) == nbytes

            def coreutils_cat() -> None:
                subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)

            def ceiling() -> None:
                subprocess.run(["cat", *raw_files], stdout=subprocess.DEVNULL, check=True)

            variants = {"direct": direct, "python": python_reads, "cat": coreutils_cat, "ceiling": ceiling}
            # untimed before each mount pass: the kernel forgets the pages the last pass cached
            setups = {"direct": lambda: None, "python": lambda: drop_page_cache(files),
                      "cat": lambda: drop_page_cache(files), "ceiling": lambda: drop_page_cache(raw_files)}
            best = {k: float("inf") for k in variants}
            for name, fn in variants.items():  # warm-up: both processes map the store's file
                setups[name]()
                fn()
            for _ in range(args.repeat):
                for name, fn in variants.items():
                    setups[name]()
                    t0 = time.perf_counter()
                    fn()
                    best[name] = min(best[name], time.perf_counter() - t0)
            # the FUSE files' pages must not have been cached in a timed pass (keep_cache): check one
            with open(files[0], "rb") as f:
                assert f.read() == store.cat(paths[0])

            gbps = lambda t: nbytes / t / 1e9  # noqa: E731
            t_cat = best["direct"]
            res.add("store.cat, all chunks (baseline)", gbps(t_cat), "GB/s", None, None, "verified whole-chunk reads")
            res.add("mount: open + 1 MiB reads, all chunk files", gbps(best["python"]), "GB/s", "store.cat",
                    t_cat / best["python"], "every layer verified by the server; target >= 0.5")
            res.add("mount: `cat` of all chunk files", gbps(best["cat"]), "GB/s", "store.cat",
                    t_cat / best["cat"], "coreutils, 128 KiB reads; target >= 0.5")
            res.add("FUSE ceiling: `cat` from a do-nothing pyfuse3 server", gbps(best["ceiling"]), "GB/s",
                    "store.cat", t_cat / best["ceiling"], "bytes in memory, no checks")
            res.add("mount `cat` vs the FUSE ceiling", None, "", "FUSE ceiling", best["ceiling"] / best["cat"],
                    "what kvfs's server keeps of what FUSE can do")

            # small random reads: one layer fetched and verified per read, not the whole 32 MiB chunk
            rng = random.Random(0)
            probes = [(rng.choice(paths), rng.randrange(0, sizes[0] - 4096)) for _ in range(300)]
            t0 = time.perf_counter()
            for p, off in probes:
                store.read_range(p, off, 4096)
            t_rr = (time.perf_counter() - t0) / len(probes)
            drop_page_cache(files)
            t0 = time.perf_counter()
            for p, off in probes:
                fd = os.open(os.path.join(mnt, p), os.O_RDONLY)
                try:
                    os.pread(fd, 4096, off)
                finally:
                    os.close(fd)
            t_fr = (time.perf_counter() - t0) / len(probes)
        res.add("store.read_range, 4 KiB at random offsets", t_rr * 1e3, "ms", None, None, "unverified")
        res.add("mount: open + 4 KiB pread + close, random offsets", t_fr * 1e3, "ms", "store.read_range",
                t_rr / t_fr, "one verified layer (1 MiB) per read")
        res.print()
        print(f"\nsaved {res.save()}", file=sys.stderr)
    finally:
        if mounted:
            unmount(mnt)
        if raw is not None:
            subprocess.run(["fusermount3", "-u", raw_mnt], check=False)
            raw.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
