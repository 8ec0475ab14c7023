"""kvfs and LMCache 0.5.6 side by side, on the same Llama-3-8B-shaped KV, the same disk and the same process model.

    python benchmarks/lmcache_compare.py [--quick] [--gib 1] [--rounds 2] [--dir /path/on/disk] [--write-docs]

One command from a clean machine: it runs ``benchmarks/setup_lmcache.sh``
first (creates ``benchmarks/.lmcache-venv`` with LMCache 0.5.6 if missing;
nothing to do on a re-run), then alternates worker processes: kvfs in this
interpreter's venv, LMCache in its own (``lmcache_worker.py``), each
measuring its own memcpy and raw file I/O baselines of the same bytes in the
same process, warm-up first, best-of-N. A round is one ``main`` process per
side, then one ``restart`` process per side on the same directory.

Operations (256-token chunks of 32 MiB, 32 layers, 8 KV heads, head_dim 128, fp16):

* CPU tier store / retrieve: kvfs ``memory://`` (``Namespace.put`` /
  ``get(out=)``, checksums computed and verified) against LMCache's
  ``LocalCPUBackend`` through ``LMCacheEngine.store`` / ``retrieve``;
* local disk: kvfs ``file:///`` and ``lmdb:///`` against LMCache's
  ``LocalDiskBackend`` alone (``local_cpu=False``): store until written
  (kvfs: ``put`` returned; LMCache: ``store`` returned and its queued disk
  writes finished), store until durable (both + syncfs; kvfs's ``flush``),
  retrieve warm (page cache) and cold (after dropping the page cache);
* lookup of a 32k-token prompt (128 chunks), per chunk, and of the workload;
* a process restart on the same directory: lookup hits, retrieve, storing again;
* what each verifies: a chunk file corrupted and one truncated behind its back.

``--write-docs`` rewrites the "## kvfs vs LMCache" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import lmcache_worker as H  # noqa: E402  (the shared harness: workload, baselines, timing)

VENV = os.path.join(HERE, ".lmcache-venv")
DOCS = os.path.join(HERE, "..", "docs", "benchmarks.md")
SECTION = "## kvfs vs LMCache"
BACKENDS = ("file", "lmdb")


# ------------------------------------------------------------------------------------ the kvfs side
def _spec(tiny: bool = False):
    import kvfs

    if tiny:
        return kvfs.KVSpec("bench/lookup", num_layers=H.TINY["layers"], num_kv_heads=H.TINY["heads"],
                           head_dim=H.TINY["head_dim"], dtype="float16")
    return kvfs.KVSpec("bench/llama-3-8b-shaped", num_layers=H.LAYERS, num_kv_heads=H.HEADS,
                       head_dim=H.HEAD_DIM, dtype="float16")


def _url(backend: str, root: str) -> str:
    return f"{backend}://{root}"


def kvfs_main(a: argparse.Namespace) -> H.Report:
    import kvfs

    spec = _spec()
    n = H.n_tokens_for(a.gib)
    tokens = H.workload_tokens(n)
    kv = H.workload_kv(n).view(np.float16)
    rep = H.Report("kvfs", "main", kv.nbytes, n)
    from kvfs import _pool

    rep.fact("threads", _pool.workers())
    for op, v in H.baselines(kv.view(np.uint16), a.dir, a.repeats, a.cold_repeats).items():
        rep.add(op, v)
    out = H.touched(kv.shape).view(np.float16)

    def check() -> None:
        if not np.array_equal(out.view(np.uint16), kv.view(np.uint16)):
            raise AssertionError("kvfs returned different bytes")

    # --- CPU tier: memory://, full (capacity 1.25 prompts): every store of a new prompt evicts the oldest
    with kvfs.open(f"memory://?capacity={int(H.CPU_TIER_PROMPTS * kv.nbytes)}") as st:
        ns = st.namespace(spec)
        stores = []
        for i, prompt in enumerate(H.cpu_store_prompts(n, a.repeats)):
            t = H.timed(lambda: ns.put(prompt, kv))
            if ns.lookup(prompt) != n:
                raise AssertionError("kvfs did not keep the whole prompt it just stored")
            if i >= H.CPU_WARMUP_STORES:
                stores.append(t)
        rep.add("cpu_store", stores)
        ns.put(tokens, kv)
        ns.get(tokens, out=out)
        rep.add("cpu_retrieve", H.samples(a.repeats, lambda: ns.get(tokens, out=out)))
        check()
        rep.add("cpu_lookup_workload", H.samples(a.lookup_repeats, lambda: ns.lookup(tokens)))
        rep.fact("cpu_lookup_hits", ns.lookup(tokens))
    # diagnostic: the same retrieve with checksum verification off (what verifying costs; not a mode to run)
    with kvfs.open("memory://", verify=False) as st:
        ns = st.namespace(spec)
        ns.put(tokens, kv)
        ns.get(tokens, out=out)
        rep.add("cpu_retrieve_noverify", H.samples(a.repeats, lambda: ns.get(tokens, out=out)))

    # --- local disk: file:/// and lmdb:///, one tier each
    for b in BACKENDS:
        root = os.path.join(a.dir, f"kvfs-{b}")
        st = kvfs.open(_url(b, root))
        ns = st.namespace(spec)
        ns.put(tokens, kv)  # warm-up
        ns.get(tokens, out=out)

        stores, durable = [], []
        for _ in range(a.repeats):
            st.evict(all=True, force=True)  # public API: drop every chunk (files / LMDB values) and its record
            os.sync()
            t0 = time.perf_counter()
            written = ns.put(tokens, kv)
            t1 = time.perf_counter()
            st.flush()
            t2 = time.perf_counter()
            assert written == n // H.CHUNK, written
            stores.append(t1 - t0)
            durable.append(t2 - t0)
        rep.add(f"{b}_disk_store_call", stores)  # put returns once written: the same figure
        rep.add(f"{b}_disk_store", stores)
        rep.add(f"{b}_disk_store_durable", durable)
        rep.fact(f"{b}_files_bytes", H.du(root))
        ns.get(tokens, out=out)
        rep.add(f"{b}_disk_retrieve_warm", H.samples(a.repeats, lambda: ns.get(tokens, out=out)))
        check()
        rep.add(f"{b}_disk_lookup_workload", H.samples(a.lookup_repeats, lambda: ns.lookup(tokens)))
        st.close()
        with kvfs.open(_url(b, root), verify=False) as st:  # diagnostic, as above
            ns = st.namespace(spec)
            ns.get(tokens, out=out)
            rep.add(f"{b}_disk_retrieve_warm_noverify", H.samples(a.repeats, lambda: ns.get(tokens, out=out)))
        if H.drop_caches():
            # LMDB maps its file: pages mapped by an open environment survive drop_caches, so a cold
            # read closes the store, drops the cache and reopens it (untimed); file:// does the same so
            # that both read headers and catalog pages from the disk too
            cold = []
            for _ in range(a.cold_repeats):
                H.drop_caches()
                with kvfs.open(_url(b, root)) as st:
                    ns = st.namespace(spec)
                    cold.append(H.timed(lambda: ns.get(tokens, out=out)))
            rep.add(f"{b}_disk_retrieve_cold", cold)
            check()

    # --- lookup of a 32k-token prompt (tiny KV: lookups never touch KV bytes)
    tiny = _spec(tiny=True)
    ltoks = H.workload_tokens(H.LOOKUP_TOKENS, seed=7)
    lkv = np.zeros(tiny.chunk_shape(len(ltoks)), dtype=np.float16)
    for where, url in (("cpu", "memory://"),
                       ("file", _url("file", os.path.join(a.dir, "kvfs-file"))),
                       ("lmdb", _url("lmdb", os.path.join(a.dir, "kvfs-lmdb")))):
        with kvfs.open(url) as st:
            ns = st.namespace(tiny)
            ns.put(ltoks, lkv)
            rep.fact(f"{where}_lookup32k_hits", ns.lookup(ltoks))
            rep.add(f"{where}_lookup32k", H.samples(a.lookup_repeats, lambda: ns.lookup(ltoks)))
            arr = np.asarray(ltoks, dtype=np.uint32)
            rep.add(f"{where}_lookup32k_tensor", H.samples(a.lookup_repeats, lambda: ns.lookup(arr)))
            if where == "cpu":  # where a lookup's time goes: ids -> uint32, the blake2b chain, the catalog
                from kvfs.keys import as_tokens, chain

                digests = chain(tiny.seed, arr, tiny.chunk_tokens)
                rep.add("lookup32k_part_ids", H.samples(a.lookup_repeats, lambda: as_tokens(ltoks)))
                rep.add("lookup32k_part_chain",
                        H.samples(a.lookup_repeats, lambda: chain(tiny.seed, arr, tiny.chunk_tokens)))
                rep.add("lookup32k_part_catalog", H.samples(
                    a.lookup_repeats, lambda: st.catalog.count_present(ns.path, digests, st.mask)))
    return rep


def kvfs_restart(a: argparse.Namespace) -> H.Report:
    import kvfs

    spec, tiny = _spec(), _spec(tiny=True)
    n = H.n_tokens_for(a.gib)
    tokens = H.workload_tokens(n)
    rep = H.Report("kvfs", "restart", n * H.CHUNK_BYTES // H.CHUNK, n)
    out = H.touched(spec.chunk_shape(n)).view(np.float16)
    ltoks = H.workload_tokens(H.LOOKUP_TOKENS, seed=7)
    expect = None
    for b in BACKENDS:
        root = os.path.join(a.dir, f"kvfs-{b}")
        rep.fact(f"{b}_files_on_disk_before", H.du(root))
        cold = H.drop_caches()  # a restart after the page cache is gone: the worst case
        t0 = time.perf_counter()
        st = kvfs.open(_url(b, root))
        ns = st.namespace(spec)
        rep.add(f"{b}_restart_open", [time.perf_counter() - t0])
        t0 = time.perf_counter()
        hits = ns.lookup(tokens)
        rep.add(f"{b}_restart_first_lookup", [time.perf_counter() - t0])
        rep.fact(f"{b}_restart_lookup_hits", hits)
        t = H.timed(lambda: ns.get(tokens, out=out))
        rep.add(f"{b}_restart_retrieve_cold" if cold else f"{b}_restart_retrieve", [t])
        rep.add(f"{b}_restart_retrieve", [H.timed(lambda: ns.get(tokens, out=out))])
        rep.add(f"{b}_restart_lookup", H.samples(a.lookup_repeats, lambda: ns.lookup(tokens)))
        if expect is None:
            expect = H.workload_kv(n)
        if not np.array_equal(out.view(np.uint16), expect):
            raise AssertionError(f"kvfs {b} after restart returned different bytes")
        rep.fact(f"{b}_restart_retrieved_tokens", n)
        kv = expect.view(np.float16)
        os.sync()
        t0 = time.perf_counter()
        written = ns.put(tokens, kv)
        rep.add(f"{b}_restart_store_again", [time.perf_counter() - t0])
        rep.fact(f"{b}_restart_store_again_written", written)
        tns = st.namespace(tiny)
        rep.fact(f"{b}_restart_lookup32k_hits", tns.lookup(ltoks))
        rep.add(f"{b}_restart_lookup32k", H.samples(a.lookup_repeats, lambda: tns.lookup(ltoks)))
        st.close()

    # --- what kvfs checks when it reads: corrupt and truncate chunk files behind its back (file://)
    root = os.path.join(a.dir, "kvfs-file")
    logging.getLogger("kvfs").setLevel(logging.ERROR)  # the quarantine warnings are the expected outcome
    with kvfs.open(_url("file", root)) as st:
        ns = st.namespace(spec)
        keys = ns.keys(tokens)
        if len(keys) >= 3:
            p1, p2 = (os.path.join(root, keys[i].path) for i in (1, 2))
            with open(p1, "r+b") as f:
                off = os.path.getsize(p1) - H.CHUNK_BYTES // 2
                f.seek(off)
                block = bytearray(f.read(4096))
                f.seek(off)
                f.write(bytes(b ^ 0xFF for b in block))
            os.truncate(p2, os.path.getsize(p2) // 2)
            out[...] = 0
            try:
                ns.get(tokens, out=out)
                rep.fact("corrupt_get", "returned data")
            except kvfs.CacheMiss as e:
                rep.fact("corrupt_get", f"CacheMiss: {e}")
            got, kvp = ns.get_prefix(tokens)
            rep.fact("corrupt_tokens_returned", got)
            rep.fact("corrupt_chunk_served_wrong_bytes",
                     bool(got and not np.array_equal(kvp.view(np.uint16), expect[:, :, :got])))
            rep.fact("truncated_chunk_served_wrong_bytes", rep.data["facts"]["corrupt_chunk_served_wrong_bytes"])
            rep.fact("lookup_after_quarantine", ns.lookup(tokens))
            rep.fact("bad_files_left", [os.path.exists(p) for p in (p1, p2)])
    return rep


# ------------------------------------------------------------------------------------ orchestration
def lmcache_python() -> str:
    py = os.path.join(VENV, "bin", "python")
    if not os.path.exists(py) or os.environ.get("KVFS_BENCH_SETUP", "1") != "0":
        subprocess.run(["bash", os.path.join(HERE, "setup_lmcache.sh")], check=True)
    return py


def run_worker(side: str, phase: str, a: argparse.Namespace, scratch: str, py: str) -> dict[str, Any]:
    out = os.path.join(scratch, f"{side}-{phase}.json")
    common = ["--phase", phase, "--dir", scratch, "--gib", str(a.gib), "--repeats", str(a.repeats),
              "--cold-repeats", str(a.cold_repeats), "--lookup-repeats", str(a.lookup_repeats), "--out", out]
    env = dict(os.environ, PYTHONHASHSEED="0", LMCACHE_LOG_LEVEL="WARNING", PYTHONWARNINGS="ignore")
    if side == "kvfs":
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", *common]
    else:
        cmd = [py, os.path.join(HERE, "lmcache_worker.py"), *common]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"the {side} {phase} worker failed (exit {proc.returncode}): {' '.join(cmd)}")
    print(f"  {side:8s} {phase:8s} {time.time() - t0:6.1f} s", flush=True)
    with open(out) as f:
        return json.load(f)


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """{side: {"samples": {op: [...]}, "facts": {phase: {...}}}} over every round."""
    res: dict[str, Any] = {}
    for r in runs:
        side = res.setdefault(r["side"], {"samples": {}, "facts": {}, "bytes": r["bytes"], "tokens": r["tokens"]})
        for op, v in r["samples"].items():
            side["samples"].setdefault(op, []).extend(v)
        side["facts"].setdefault(r["phase"], []).append(r["facts"])
    return res


# ------------------------------------------------------------------------------------ the report
def _best(res, side, op) -> float | None:
    v = res[side]["samples"].get(op)
    return min(v) if v else None


def _noise(res, side, op) -> str:
    v = res[side]["samples"].get(op)
    if not v or len(v) < 2:
        return "–"
    return f"{(sorted(v)[len(v) // 2] / min(v) - 1) * 100:.0f}%"


def _gbs(nbytes: int, t: float | None) -> str:
    return "–" if not t else f"{nbytes / t / 1e9:.2f} GB/s"


def _x(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}×"


# (label, kvfs op, LMCache op, baseline op, baseline name, target)
THROUGHPUT = [
    ("store, CPU tier", "cpu_store", "cpu_store", "memcpy", "memcpy", 1.0),
    ("retrieve, CPU tier", "cpu_retrieve", "cpu_retrieve", "memcpy", "memcpy", 1.0),
    ("store until written, local disk", "{b}_disk_store", "disk_store", "raw_write", "raw write", 1.5),
    ("store call returns (caller unblocked), local disk", "{b}_disk_store_call", "disk_store_call", "raw_write",
     "raw write", None),
    ("store until durable, local disk", "{b}_disk_store_durable", "disk_store_durable", "raw_write_sync",
     "raw write + syncfs", 1.0),
    ("retrieve warm, local disk", "{b}_disk_retrieve_warm", "disk_retrieve_warm", "raw_read_warm",
     "raw warm read", 1.5),
    ("retrieve cold, local disk", "{b}_disk_retrieve_cold", "disk_retrieve_cold", "raw_read_cold",
     "raw cold read", 1.5),
]
LOOKUPS = [
    ("lookup 32k tokens, CPU tier", "cpu_lookup32k", "cpu_lookup32k", 128),
    ("lookup 32k tokens, local disk", "{b}_lookup32k", "disk_lookup32k", 128),
    ("lookup 32k tokens (array ids), CPU tier", "cpu_lookup32k_tensor", "cpu_lookup32k_tensor", 128),
    ("lookup 32k tokens (array ids), local disk", "{b}_lookup32k_tensor", "disk_lookup32k_tensor", 128),
    ("lookup 32k tokens, LMCache as its vLLM connector calls it (pin + unpin), CPU tier", "cpu_lookup32k",
     "cpu_lookup32k_pinned", 128),
    ("lookup 32k tokens, LMCache as its vLLM connector calls it (pin + unpin), local disk", "{b}_lookup32k",
     "disk_lookup32k_pinned", 128),
    ("lookup of the workload prompt, CPU tier", "cpu_lookup_workload", "cpu_lookup_workload", None),
    ("lookup of the workload prompt, local disk", "{b}_disk_lookup_workload", "disk_lookup_workload", None),
]


def rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (operation, kvfs backend): figures, ratios, baselines, target, met."""
    k, lm = res["kvfs"], res["lmcache"]
    nbytes = k["bytes"]
    out = []
    for label, kop, lop, bop, bname, target in THROUGHPUT:
        for b in (BACKENDS if "{b}" in kop else ("memory",)):
            kk = kop.format(b=b)
            tk, tl = _best(res, "kvfs", kk), _best(res, "lmcache", lop)
            bk, bl = _best(res, "kvfs", bop), _best(res, "lmcache", bop)
            ratio = tl / tk if tk and tl else None
            out.append({
                "operation": label, "kvfs_backend": f"{b}://", "kvfs": _gbs(nbytes, tk), "lmcache": _gbs(nbytes, tl),
                "ratio": ratio, "target": target,
                "met": None if ratio is None or target is None else ratio >= target,
                "baseline": bname, "kvfs_vs_baseline": bk / tk if bk and tk else None,
                "lmcache_vs_baseline": bl / tl if bl and tl else None,
                "baseline_kvfs": _gbs(nbytes, bk), "baseline_lmcache": _gbs(nbytes, bl),
                # robust to the machine changing speed between the two processes: each side over the
                # physical limit measured in its own process
                "normalized": (bk / tk) / (bl / tl) if bk and tk and bl and tl else None,
                "noise": f"{_noise(res, 'kvfs', kk)} / {_noise(res, 'lmcache', lop)}",
            })
    for label, kop, lop, chunks in LOOKUPS:
        for b in (BACKENDS if "{b}" in kop else ("memory",)):
            kk = kop.format(b=b)
            tk, tl = _best(res, "kvfs", kk), _best(res, "lmcache", lop)
            c = chunks or res["kvfs"]["tokens"] // H.CHUNK
            ratio = tl / tk if tk and tl else None
            out.append({
                "operation": label, "kvfs_backend": f"{b}://",
                "kvfs": "–" if tk is None else f"{tk * 1e6 / c:.2f} µs/chunk",
                "lmcache": "–" if tl is None else f"{tl * 1e6 / c:.2f} µs/chunk",
                "ratio": ratio, "target": 1.5 if chunks else None,
                "met": None if ratio is None or not chunks else ratio >= 1.5,
                "baseline": "", "kvfs_vs_baseline": None, "lmcache_vs_baseline": None, "normalized": None,
                "baseline_kvfs": "", "baseline_lmcache": "",
                "noise": f"{_noise(res, 'kvfs', kk)} / {_noise(res, 'lmcache', lop)}",
            })
    return out


def diagnostics(res: dict[str, Any]) -> list[str]:
    nbytes = res["kvfs"]["bytes"]
    b = lambda op: _best(res, "kvfs", op)  # noqa: E731
    out = []
    v, nv = b("cpu_retrieve"), b("cpu_retrieve_noverify")
    if v and nv:
        out.append(f"- CPU-tier retrieve: {_gbs(nbytes, v)} verified, {_gbs(nbytes, nv)} with verification off "
                   f"(a diagnostic, not a mode to run): checking the xxh3-64 of every layer costs "
                   f"{(v / nv - 1) * 100:.0f}% on top of the copy. LMCache copies and checks nothing.")
    for be in BACKENDS:
        v, nv = b(f"{be}_disk_retrieve_warm"), b(f"{be}_disk_retrieve_warm_noverify")
        if v and nv:
            out.append(f"- `{be}://` warm retrieve: {_gbs(nbytes, v)} verified, {_gbs(nbytes, nv)} unverified "
                       f"({(v / nv - 1) * 100:.0f}% for the checks).")
    parts = [b("lookup32k_part_ids"), b("lookup32k_part_chain"), b("lookup32k_part_catalog")]
    total = b("cpu_lookup32k")
    if all(parts) and total:
        ids, chain, cat = (p * 1e6 / 128 for p in parts)
        out.append(f"- Lookup of the 32k-token prompt, {total * 1e6 / 128:.2f} µs a chunk: token ids (a Python "
                   f"list) to uint32 {ids:.2f} µs, the blake2b-256 key chain {chain:.2f} µs, the catalog (one "
                   f"LMDB read transaction) {cat:.2f} µs. LMCache's lookup is one Python `hash` of a tuple of the "
                   "chunk's ids per chunk and a dict probe: no conversion, a non-cryptographic 64-bit hash that "
                   "differs between processes unless PYTHONHASHSEED is fixed. With array ids (numpy for kvfs, a "
                   "torch tensor for LMCache) the conversion disappears for kvfs and LMCache pays `.tolist()`.")
    return out


def _facts(res, side, phase) -> dict[str, Any]:
    runs = res[side]["facts"].get(phase) or [{}]
    return runs[-1]


def restart_rows(res: dict[str, Any]) -> list[list[str]]:
    n = res["kvfs"]["tokens"]
    nbytes = res["kvfs"]["bytes"]
    lf = _facts(res, "lmcache", "restart")
    lmain = _facts(res, "lmcache", "main")
    kf = _facts(res, "kvfs", "restart")
    table = []
    for b in BACKENDS:
        t = _best(res, "kvfs", f"{b}_restart_retrieve")
        tc = _best(res, "kvfs", f"{b}_restart_retrieve_cold")
        table.append([f"kvfs `{b}://`", f"{kf.get(f'{b}_restart_lookup_hits')} of {n}",
                      f"{kf.get(f'{b}_restart_lookup32k_hits')} of {H.LOOKUP_TOKENS}",
                      f"{n} tokens, verified: {_gbs(nbytes, t)} warm, {_gbs(nbytes, tc)} cold",
                      f"{kf.get(f'{b}_restart_store_again_written')} chunks rewritten "
                      f"({(_best(res, 'kvfs', f'{b}_restart_store_again') or 0) * 1e3:.1f} ms)"])
    files_before = lf.get("files_on_disk_before", [0, 0])
    files_after = lf.get("files_on_disk_after_store_again", [0, 0])
    table.append(["LMCache `LocalDiskBackend`", f"{lf.get('restart_lookup_hits')} of {n}",
                  f"{lf.get('restart_lookup32k_hits')} of {H.LOOKUP_TOKENS}",
                  f"{lf.get('restart_retrieved_tokens')} tokens ({files_before[0]} chunk files, "
                  f"{files_before[1] / 2**20:.0f} MiB, still on disk)",
                  f"all {n // H.CHUNK} chunks rewritten ({(_best(res, 'lmcache', 'restart_store_again') or 0) * 1e3:.0f}"
                  f" ms); {files_after[0]} files after"])
    same_key = lmain.get("chunk0_key") == lf.get("chunk0_key")
    acct = lf.get("accounting_stored_tokens_per_cycle")
    if acct:
        table.append(["", "", "", f"LMCache disk tier sized for one 4-chunk prompt, then store + `clear(tokens)` "
                      f"three times: tokens stored per cycle {acct} (its size counter is not decreased on "
                      "remove, so after that much writing every store is dropped, without an error)", ""])
    return table + [["", "", "", f"LMCache chunk keys equal across the two processes: {same_key} "
                     "(builtin `hash`, PYTHONHASHSEED=0 set for it)", ""]]


def markdown(res: dict[str, Any], command: str, when: str | None = None, where: str | None = None) -> str:
    k, lm = res["kvfs"], res["lmcache"]
    lmf, kmain = _facts(res, "lmcache", "main"), _facts(res, "kvfs", "main")
    kr = _facts(res, "kvfs", "restart")
    rounds = len(k["facts"].get("main", []))
    missed = [f"{r['operation']} (`{r['kvfs_backend']}`, {_x(r['ratio'])})" for r in rows(res) if r["met"] is False]
    lines = [
        "Run it: `python benchmarks/lmcache_compare.py` (the first run creates `benchmarks/.lmcache-venv` with "
        "LMCache 0.5.6 through `benchmarks/setup_lmcache.sh`, about a minute; `--quick` moves 0.25 GiB in one "
        "round, about a minute more; `--write-docs` rewrites this section).",
        "",
        f"Command: `{command}`  ",
        f"Machine: {where or machine()}; {when or time.strftime('%Y-%m-%d %H:%M')}; {rounds} round(s), each side's figure the best "
        "of every sample (noise column: median over best, kvfs / LMCache: on this VM the memory bandwidth a "
        "process gets moves by up to 2x between minutes, even with nothing else running). When the machine's "
        "speed changed between the two sides' processes, the column dividing each side by the baseline measured "
        "in its own process is the steadier comparison; `met` uses the plain ratio.",
        "",
        f"Workload: {k['tokens']} tokens = {k['tokens'] // H.CHUNK} chunks of 256 tokens x 32 MiB "
        f"({k['bytes'] / 2**30:.2f} GiB), Llama-3-8B-shaped (32 layers, 8 KV heads, head_dim 128, fp16); the same "
        "bytes for both. Lookups: a 32,768-token prompt (128 chunks, tiny KV, since lookups never read KV) and "
        "the workload prompt itself. kvfs (verifying every read) in the project venv, LMCache 0.5.6 in "
        "`benchmarks/.lmcache-venv`, each in its own fresh process per phase, each with its default thread "
        f"counts (kvfs pool {kmain.get('threads')}, LMCache disk I/O 4, torch {lmf.get('torch_threads')}). "
        "Baselines are measured in each side's own process (memcpy: best of one and two threads; file I/O: one "
        "file per 32 MiB chunk, best of 1 and 4 threads); caller buffers and baseline destinations are faulted in "
        "ahead, page aligned.",
        "",
        "| operation | kvfs backend | kvfs | LMCache | kvfs / LMCache | target | met | baseline | kvfs vs baseline "
        "| LMCache vs baseline | kvfs / LMCache, each over its baseline | noise |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows(res):
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        tgt = "" if r["target"] is None else f"≥ {r['target']:.1f}×"
        base = f"{r['baseline']} ({r['baseline_kvfs']} / {r['baseline_lmcache']})" if r["baseline"] else ""
        lines.append(f"| {r['operation']} | `{r['kvfs_backend']}` | {r['kvfs']} | {r['lmcache']} | {_x(r['ratio'])} "
                     f"| {tgt} | {met} | {base} | {_x(r['kvfs_vs_baseline'])} | {_x(r['lmcache_vs_baseline'])} "
                     f"| {_x(r['normalized'])} | {r['noise']} |")
    lines += ["", "Targets missed in this run: " + ("; ".join(missed) if missed else "none") + ".", ""]
    lines += [
        "**Method.** CPU tier: both tiers hold 1.25 prompts; after two warm-up stores every timed store is a new "
        "prompt that evicts older KV (LMCache reuses its pre-allocated pool, kvfs's `memory://` the encode buffers "
        "of evicted chunks); each store is checked to keep the whole prompt. Retrieves go into a caller buffer "
        "already faulted in and are checked byte for byte. Local disk: LMCache's `LocalDiskBackend` alone "
        "(`local_cpu=False`, its CPU pool only stages) against one kvfs tier; before each timed store both drop "
        "the previous copy through their public API (LMCache `clear(tokens)`, kvfs `evict(all=True)`) and "
        "`sync`. \"Store until written\": the call plus, for LMCache, its queued disk writes (its `store()` "
        "returns once the KV is in its staging pool: the \"store call returns\" row); \"until durable\" adds "
        "`syncfs` (LMCache has no flush, kvfs's `flush()` is one). Cold reads drop the page cache first (kvfs "
        "closes and reopens its store around it: pages LMDB has mapped survive `drop_caches`). Lookups: LMCache's "
        "`engine.lookup(tokens)` with a Python list (its cheapest call) and as its vLLM connector calls it; kvfs "
        "`Namespace.lookup`. Without vLLM installed LMCache keys chunks with Python's `hash`; the benchmark sets "
        "PYTHONHASHSEED=0 for it, or its keys would change with every process.",
        "",
        "**Why kvfs misses where it misses.** CPU tier: both sides are memory-bound copies, and kvfs also "
        "computes (store) or checks (retrieve) the xxh3-64 of every layer, which LMCache never does (diagnostic "
        "below); even unverified, kvfs's copy (numpy, layer by layer, over its thread pool) trails LMCache's "
        "strided torch copy at its best moments, and its store copies into the chunk format before keeping it. "
        "LMCache's CPU-path figures swing up to 4x between rounds on this shared machine (noise column); over "
        "the recorded runs kvfs reached 0.65-0.88x LMCache on the CPU-tier store and 0.67-0.87x on its "
        "retrieve (a re-run of `python benchmarks/lmcache_compare.py --rounds 3` on 2026-11-25 08:00 at commit "
        "75be7fc, after the capacity-reservation and signature changes: store 0.71x, retrieve 0.67x, store until "
        "written 0.82x `file://` and 0.64x `lmdb://` against an LMCache run at 6.25 GB/s, its fastest recorded, "
        "warm retrieve 1.54x and 1.57x, cold 1.07x and 1.19x, lookup 1.18-1.21x; an interleaved A/B of a 1 GiB "
        "put against the previous tree moved neither `lmdb://` nor `file://` beyond noise). "
        "Store until written to `file://`: kvfs writes each chunk straight from the caller's KV (`pwritev` of "
        "the caller's planes, each layer hashed right before the kernel copies it into the page cache, the header "
        "last), one copy as in a raw write; on top of that copy it hashes every byte (about 65 of each writer "
        "thread's 215 ms per GiB, measured by timing `write_to` and `pwritev` inside a put) and starts the disk "
        "writing at once, so that `flush()` is cheap (about 35 ms per GiB; `?fsync=never` skips it), and on 2 "
        "cores both take CPU from the copy. That lands near 0.6x a two-thread raw write, LMCache's level; 1.5x "
        "LMCache would be more than 0.8x a raw write while checksumming every byte on these 2 cores. "
        "Retrieve warm from local disk: kvfs reads at 11.8-15.3 GB/s in every run (0.76-0.96x its raw warm "
        "read, whenever that read did not land on a 23-25 GB/s moment), and whether that is 1.5x LMCache depends "
        "on LMCache's run (7.5-11.9 GB/s: 0.42-0.51x a raw read in some runs, as in the issue, 0.66-0.67x in "
        "others): the runs of 2026-11-24 22:03 (1.59x `file://`, 1.52x `lmdb://`) and 2026-11-25 00:45 "
        "(1.60x, 1.84x) met it, the one of 2026-11-24 22:07 (1.17x, 1.16x) did not. "
        "`lmdb://` encodes into a buffer and LMDB copies it into its dirty pages before the commit writes them "
        "(py-lmdb has no `MDB_RESERVE`): two copies more than `file://`. Cold reads are bound "
        "by the disk: once LMCache reaches more than two thirds of the raw cold read, 1.5x LMCache is more than "
        "the disk gives a plain read. Lookup with list ids: "
        "kvfs converts the ids and runs a cryptographic blake2b chain (keys stable across processes and "
        "unforgeable), LMCache one Python `hash` per chunk; the target holds against LMCache's vLLM-connector "
        "path and with array ids. A SHA-256 chain (this CPU has the SHA extensions) took 1.00-1.03 us a chunk "
        "against BLAKE2b's 1.43, which would make about 2.55 us in all, 1.41x LMCache's list lookup: short of "
        "the target still, so the key scheme keeps BLAKE2b. BLAKE3 (the `blake3` wheel) took 1.70 us a chunk: "
        "on 1 KiB inputs its Python binding costs more than the hash saves.",
        "",
    ]
    lines += ["**Where kvfs's time goes** (measured in the same kvfs process):", ""] + diagnostics(res) + [
        "",
        "**After a process restart** (a new process on the same directory; the page cache still warm, then "
        "dropped for the cold figure):",
        "",
        "| store | lookup hits, workload | lookup hits, 32k prompt | retrieve | storing the same prompt again |",
        "|---|---|---|---|---|",
    ]
    for row in restart_rows(res):
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "**What a read checks** (a chunk file flipped in 4 KiB of its data and another truncated to half, behind "
        "each store's back):",
        "",
        f"- kvfs `file://`: `get` raised `{str(kr.get('corrupt_get', '?')).split(':')[0]}`; `get_prefix` returned "
        f"{kr.get('corrupt_tokens_returned')} tokens (the chunks before the corrupt one), wrong bytes served: "
        f"{kr.get('corrupt_chunk_served_wrong_bytes')}; bad files still in the store afterwards: "
        f"{kr.get('bad_files_left')} (quarantined: removed and logged; lookup then finds "
        f"{kr.get('lookup_after_quarantine')} tokens). Every read checks the header's own checksum, namespace, key, "
        "token ids and the xxh3-64 of every layer.",
        f"- LMCache `LocalDiskBackend`: `retrieve` reported {lmf.get('corrupt_tokens_returned')} of "
        f"{lm['tokens']} tokens retrieved with no error or warning; the flipped chunk was served with wrong bytes: "
        f"{lmf.get('corrupt_chunk_served_wrong_bytes')}; the truncated chunk was reported retrieved (its missing "
        "half is whatever the reused staging buffer held; wrong bytes: "
        f"{lmf.get('truncated_chunk_served_wrong_bytes')}; `False` means the reused buffer happened to hold this "
        "same chunk from the previous retrieve). Its chunk files are headerless raw tensors "
        "(`<model>@<world>@<worker>@<hash>@<dtype>.pt`); shape and dtype live only in the in-memory index, and "
        "nothing is checksummed or compared on read.",
    ]
    return "\n".join(lines) + "\n"


def machine() -> str:
    try:
        from _common import machine as m

        return m()
    except Exception:  # noqa: BLE001
        return f"{os.cpu_count()} cores"


def write_docs(text: str, path: str = DOCS) -> None:
    """Replace the body of the '## kvfs vs LMCache' section (up to the next '## ' heading), nothing else."""
    with open(path) as f:
        doc = f.read()
    start = doc.find(SECTION + "\n")
    if start < 0:
        raise SystemExit(f"{path} has no '{SECTION}' heading")
    body = start + len(SECTION) + 1
    nxt = doc.find("\n## ", body)
    end = len(doc) if nxt < 0 else nxt + 1
    with open(path, "w") as f:
        f.write(doc[:body] + "\n" + text + ("\n" if nxt >= 0 else "") + doc[end:])


def main() -> None:
    if "--worker" in sys.argv:
        argv = [x for x in sys.argv[1:] if x != "--worker"]
        a = H.worker_args(argv)
        rep = kvfs_main(a) if a.phase == "main" else kvfs_restart(a)
        rep.save(a.out)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="KV bytes moved per operation (GiB, default 1)")
    ap.add_argument("--quick", action="store_true", help="0.25 GiB, 2 repeats, 1 round (about 2 minutes)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating kvfs/LMCache rounds (best of all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cold-repeats", type=int, default=2)
    ap.add_argument("--lookup-repeats", type=int, default=30)
    ap.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir)")
    ap.add_argument("--write-docs", action="store_true", help="rewrite this section of docs/benchmarks.md")
    ap.add_argument("--render", metavar="JSON", help="only re-render a saved run (benchmarks/results/...json)")
    a = ap.parse_args()
    if a.render:
        with open(a.render) as f:
            saved = json.load(f)
        text = markdown(saved["raw"], saved["command"], saved.get("time"), saved.get("machine"))
        print(text)
        if a.write_docs:
            write_docs(text)
        return
    command = "python benchmarks/lmcache_compare.py" + " ".join(
        [""] + [x for x in sys.argv[1:] if x not in ("--write-docs",)])
    if a.quick:
        a.gib, a.repeats, a.cold_repeats, a.rounds = min(a.gib, 0.25), 2, 1, 1
    py = lmcache_python()
    runs = []
    for r in range(a.rounds):
        print(f"round {r + 1}/{a.rounds}", flush=True)
        for side in (("kvfs", "lmcache") if r % 2 == 0 else ("lmcache", "kvfs")):
            scratch = tempfile.mkdtemp(prefix=f"kvfs-vs-lmcache-{side}-", dir=a.dir)
            try:
                runs.append(run_worker(side, "main", a, scratch, py))
                runs.append(run_worker(side, "restart", a, scratch, py))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    res = merge(runs)
    text = markdown(res, command)
    print("\n" + SECTION + "\n\n" + text)
    os.makedirs(H_RESULTS, exist_ok=True)
    with open(os.path.join(H_RESULTS, "lmcache_compare.json"), "w") as f:
        json.dump({"command": command, "time": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
                   "rows": rows(res), "raw": res}, f, indent=1)
    if a.write_docs:
        write_docs(text)
        print(f"wrote the '{SECTION}' section of {os.path.relpath(DOCS)}")


H_RESULTS = os.path.join(HERE, "results")

if __name__ == "__main__":
    main()
