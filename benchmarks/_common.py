"""Shared helpers for kvfs benchmarks: timing, cache dropping, machine description, result tables."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


def best_of(n: int, fn: Callable[[], Any]) -> float:
    """The fastest of ``n`` runs of ``fn`` in seconds (the least disturbed by a noisy machine)."""
    best = float("inf")
    for _ in range(max(1, n)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def drop_caches() -> bool:
    """Drop the page cache (root only); False if not possible."""
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def machine() -> str:
    cores = os.cpu_count()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = 0
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    return f"{cores} cores, {mem:.0f} GiB RAM, {platform.machine()}, {gpu}"


@dataclass
class Results:
    section: str
    command: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, name: str, value: float | None, unit: str, baseline: str | None, ratio: float | None,
            note: str = "") -> None:
        self.rows.append({"name": name, "value": value, "unit": unit, "baseline": baseline, "ratio": ratio,
                          "note": note})

    def table(self) -> str:
        lines = [f"Command: `{self.command}`  ", f"Machine: {machine()}", "",
                 "| measurement | value | baseline | ratio | note |", "|---|---|---|---|---|"]
        for r in self.rows:
            v = "" if r["value"] is None else f"{r['value']:.3g} {r['unit']}"
            ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}×"
            lines.append(f"| {r['name']} | {v} | {r['baseline'] or ''} | {ratio} | {r['note']} |")
        return "\n".join(lines)

    def print(self) -> None:
        print(f"\n## {self.section}\n")
        print(self.table())

    def save(self) -> str:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        name = self.section.lower().replace(" ", "_").replace("(", "").replace(")", "").replace("/", "_")
        path = os.path.join(RESULTS_DIR, f"{name}.json")
        with open(path, "w") as f:
            json.dump({"section": self.section, "command": self.command, "machine": machine(),
                       "time": time.strftime("%Y-%m-%d %H:%M"), "rows": self.rows}, f, indent=1)
        return path


def aligned_like(a, copy: bool = False):
    """A page-aligned, touched array of ``a``'s shape and dtype (a copy of ``a`` with ``copy``).

    Engines hand kvfs torch tensors (64-byte aligned) or pinned buffers (page
    aligned); a large ``np.empty`` sits 16 bytes past a page boundary, and
    copies between buffers of different alignment run up to 40 % slower here.
    Benchmarks therefore copy between aligned buffers, baselines included.
    """
    import mmap

    import numpy as np

    buf = mmap.mmap(-1, max(1, a.nbytes))
    out = np.frombuffer(buf, dtype=a.dtype, count=a.size).reshape(a.shape)
    if copy:
        np.copyto(out, a)
    else:
        out.view(np.uint8).reshape(-1)[::4096] = 1
    return out


def raw_write(path: str, data, fsync: bool = False, block: int = 4 << 20) -> float:
    """Seconds for an unbuffered write of ``data``'s bytes to a new file at ``path``, after a ``sync`` so that
    earlier dirty pages do not throttle it; with ``fsync``, until the bytes are on disk. The file is removed
    afterwards (its dirty pages dropped, not written back behind the next measurement)."""
    import numpy as np

    mv = memoryview(data.reshape(-1).view(np.uint8))
    if os.path.exists(path):
        os.unlink(path)
    os.sync()
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for off in range(0, len(mv), block):
            f.write(mv[off : off + block])
        if fsync:
            os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    os.unlink(path)
    return dt


def raw_read(path: str, out, block: int = 4 << 20) -> float:
    """Seconds to read ``path`` into ``out`` with plain ``readinto`` calls (the baseline of every get)."""
    import numpy as np

    mv = memoryview(out.reshape(-1).view(np.uint8))
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        off = 0
        while off < len(mv):
            n = f.readinto(mv[off : off + block])
            if not n:
                break
            off += n
    return time.perf_counter() - t0
