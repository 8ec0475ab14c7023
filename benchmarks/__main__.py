"""Run every kvfs benchmark and rewrite docs/benchmarks.md with the results.

    python -m benchmarks [--quick] [--only NAME,...] [--skip NAME,...] [--no-docs] [--list]

Each benchmark is a script of this folder run in its own process (so one
cannot disturb the next with leftover memory or threads); each prints its
table and saves its rows to ``benchmarks/results/<section>.json``. Then the
tables of docs/benchmarks.md are regenerated between their
``<!-- results: SECTION -->`` markers (the prose around them is kept), the
summary of targets at the top is rebuilt, and the figures in ``docs/img/``
are redrawn. ``--quick`` runs smaller workloads (3-5 minutes on a 2-core
machine); the full suite takes about 10 minutes there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
IMG = os.path.join(ROOT, "docs", "img")


@dataclass
class Bench:
    name: str
    script: str
    quick: list[str]
    full: list[str]
    heading: str  # the "## " heading of docs/benchmarks.md its tables go under
    sections: list[str] = field(default_factory=list)  # JSON sections it writes (default: the heading)
    timeout: int = 1800


SUITE = [
    Bench("store", "store_throughput.py", ["--quick"], [], "Store throughput (core)"),
    Bench("backends", "backends_throughput.py", ["--quick"], [], "File backend and S3 tier"),
    Bench("paged", "paged.py", ["--repeat", "3"], [], "GPU data path and paged blocks",
          ["GPU data path: paged scatter and gather (cpu)"]),
    Bench("prefetch", "prefetch_overlap.py", ["--tokens", "1024", "--rounds", "3"], [], "GPU data path and paged blocks",
          ["GPU data path: prefetch overlap (cpu)"]),
    Bench("ttft", "ttft.py", ["--contexts", "2048,8192", "--repeats", "1", "--warm-repeats", "3"], [],
          "Time to first token (connectors)"),
    Bench("vllm_connector", "vllm_connector.py", ["--quick"], [], "vLLM connector steps"),
    Bench("fuse", "fuse_read.py", ["--gib", "0.25", "--repeat", "2"], [], "FUSE mount"),
    Bench("blend", "blend.py", ["--segments", "4", "--repeats", "2", "--prompts", "1"], [], "CacheBlend"),
    Bench("batch", "batch.py", ["--quick"], [], "Batch planning (BatchLLM)"),
    Bench("lmcache", "lmcache_compare.py", ["--quick", "--write-docs"], ["--write-docs"], "kvfs vs LMCache",
          ["kvfs vs LMCache"]),
]

_TARGET = re.compile(r"target\s*(>=|≥|<=|≤|<|>)\s*([0-9.]+)\s*(ms|s|×|x|%)?", re.I)


def run(bench: Bench, quick: bool, docs: bool = True) -> tuple[bool, float]:
    script = os.path.join(HERE, bench.script)
    if not os.path.exists(script):
        print(f"[benchmarks] {bench.name}: {bench.script} is missing, skipped", flush=True)
        return False, 0.0
    args = bench.quick if quick else bench.full
    if not docs:  # a script that writes its own docs section (lmcache_compare.py) must not either
        args = [x for x in args if x != "--write-docs"]
    cmd = [sys.executable, script, *args]
    print(f"\n[benchmarks] {bench.name}: {' '.join(['python', 'benchmarks/' + bench.script, *args])}", flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    t0 = time.perf_counter()
    with open(os.path.join(RESULTS, f"{bench.name}.log"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            proc.wait(timeout=bench.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            print(f"[benchmarks] {bench.name}: timed out after {bench.timeout} s", flush=True)
            return False, time.perf_counter() - t0
    dt = time.perf_counter() - t0
    ok = proc.returncode == 0
    print(f"[benchmarks] {bench.name}: {'done' if ok else f'FAILED (exit {proc.returncode})'} in {dt:.0f} s",
          flush=True)
    return ok, dt


# ------------------------------------------------------------------------------------------- results
def load_results() -> dict[str, dict]:
    out = {}
    if not os.path.isdir(RESULTS):
        return out
    for fn in sorted(os.listdir(RESULTS)):
        if fn.endswith(".json"):
            with open(os.path.join(RESULTS, fn)) as f:
                d = json.load(f)
            out[d.get("section") or "kvfs vs LMCache"] = d
    return out


def fmt_value(v, unit: str) -> str:
    if v is None:
        return ""
    if isinstance(v, (int, float)):
        if abs(v) >= 1000 and unit in ("tokens", ""):
            return f"{v:,.0f} {unit}".strip()
        return f"{v:.3g} {unit}".strip()
    return f"{v} {unit}".strip()


def table(d: dict) -> str:
    lines = [f"Measured {d.get('time', '?')} on {d.get('machine', '?')} with `{d.get('command', '?')}`", "",
             "| measurement | value | baseline (same run) | ratio | note |", "|---|---|---|---|---|"]
    for r in d.get("rows", []):
        ratio = r.get("ratio")
        ratio_s = "" if ratio is None else f"{ratio:.2f}×" if isinstance(ratio, (int, float)) else str(ratio)
        note = str(r.get("note", "")).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r.get('name', '')} | {fmt_value(r.get('value'), r.get('unit', ''))} | "
                     f"{r.get('baseline') or ''} | {ratio_s} | {note} |")
    return "\n".join(lines)


def target_rows(results: dict[str, dict]) -> list[tuple[str, dict, str, bool | None]]:
    """Rows whose note states a target: (section, row, target text, met?)."""
    out = []
    for section, d in results.items():
        for r in d.get("rows", []):
            m = _TARGET.search(str(r.get("note", "")))
            if not m:
                continue
            op, bound, unit = m.group(1), float(m.group(2)), (m.group(3) or "").lower()
            x = r.get("value") if unit in ("ms", "s", "%") else r.get("ratio")
            if unit == "s" and r.get("unit") == "ms" and x is not None:
                x = x / 1000
            met = None
            if isinstance(x, (int, float)):
                met = {">=": x >= bound, "≥": x >= bound, ">": x > bound, "<=": x <= bound, "≤": x <= bound,
                       "<": x < bound}[op]
            out.append((section, r, m.group(0), met))
    return out


def summary(results: dict[str, dict]) -> str:
    rows = target_rows(results)
    if not rows:
        return "No targets recorded yet."
    lines = ["| section | measurement | ratio / value | target | met |", "|---|---|---|---|---|"]
    for section, r, target, met in rows:
        ratio = r.get("ratio")
        shown = f"{ratio:.2f}×" if isinstance(ratio, (int, float)) else fmt_value(r.get("value"), r.get("unit", ""))
        lines.append(f"| {section} | {r.get('name')} | {shown} | {target} | "
                     f"{'yes' if met else 'no' if met is False else '?'} |")
    return "\n".join(lines)


def replace_region(text: str, key: str, body: str, heading: str | None) -> str:
    """Put ``body`` between ``<!-- results: key -->`` and ``<!-- /results -->``, adding them if missing."""
    start, end = f"<!-- results: {key} -->", "<!-- /results -->"
    block = f"{start}\n{body}\n{end}"
    i = text.find(start)
    if i >= 0:
        j = text.find(end, i)
        return text[:i] + block + text[j + len(end) :]
    if heading:
        m = re.search(rf"^## {re.escape(heading)}\s*$", text, re.M)
        if m:
            return text[: m.end()] + "\n\n" + block + "\n" + text[m.end() :]
        return text.rstrip() + f"\n\n## {heading}\n\n{block}\n"
    return text


def write_docs(results: dict[str, dict]) -> None:
    text = open(DOC, encoding="utf-8").read() if os.path.exists(DOC) else "# Benchmarks\n"
    text = replace_region(text, "summary", summary(results), None)
    for b in SUITE:
        if b.name == "lmcache":
            continue  # lmcache_compare.py --write-docs writes its own section
        for section in b.sections or [b.heading]:
            if section in results:
                text = replace_region(text, section, table(results[section]), b.heading)
    figures = plots(results)
    if figures:
        text = replace_region(text, "figures", "\n\n".join(f"![{alt}]({path})" for alt, path in figures), None)
    with open(DOC, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"[benchmarks] wrote {os.path.relpath(DOC, ROOT)}", flush=True)


# ------------------------------------------------------------------------------------------- figures
def plots(results: dict[str, dict]) -> list[tuple[str, str]]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[benchmarks] matplotlib is not installed: no figures", flush=True)
        return []
    os.makedirs(IMG, exist_ok=True)
    out = []
    ttft = results.get("Time to first token (connectors)")
    if ttft:
        series: dict[str, dict[int, float]] = {}
        for r in ttft["rows"]:
            m = re.match(r"(.*), (\d+) tokens$", r["name"])
            if not m or r.get("unit") != "ms" or r.get("value") is None:
                continue
            series.setdefault(m.group(1), {})[int(m.group(2))] = r["value"] / 1000
        if series:
            fig, ax = plt.subplots(figsize=(7, 4.2))
            for label, pts in sorted(series.items()):
                xs = sorted(pts)
                ax.plot(xs, [pts[x] for x in xs], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("time to first token (s)")
            ax.set_title("TTFT, demo Llama on CPU: full prefill vs warm kvfs")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(os.path.join(IMG, "ttft.png"), dpi=110)
            plt.close(fig)
            out.append(("time to first token vs context length", "img/ttft.png"))
    bars: list[tuple[str, float, str]] = []
    for section in ("Store throughput (core)", "File backend and S3 tier"):
        d = results.get(section)
        if not d:
            continue
        for r in d["rows"]:
            if r.get("unit") == "GB/s" and r.get("value"):
                bars.append((r["name"], r["value"], "baseline" if "baseline" in r["name"] else "kvfs"))
    if bars:
        fig, ax = plt.subplots(figsize=(7, 0.32 * len(bars) + 1))
        names = [b[0] for b in bars]
        ax.barh(range(len(bars)), [b[1] for b in bars],
                color=["#999999" if b[2] == "baseline" else "#3a76c4" for b in bars])
        ax.set_yticks(range(len(bars)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("GB/s (grey: physical baselines measured in the same run)")
        ax.set_title("Throughput per backend")
        ax.grid(True, axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(IMG, "throughput.png"), dpi=110)
        plt.close(fig)
        out.append(("throughput per backend", "img/throughput.png"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller workloads (3-5 minutes on 2 cores)")
    ap.add_argument("--only", default="", help="comma-separated benchmark names")
    ap.add_argument("--skip", default="", help="comma-separated benchmark names")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    ap.add_argument("--docs-only", action="store_true", help="rewrite docs/benchmarks.md from saved results")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    a = ap.parse_args()
    if a.list:
        for b in SUITE:
            print(f"{b.name:10} benchmarks/{b.script} {' '.join(b.quick)}   (quick)")
        return
    only = {x for x in a.only.split(",") if x}
    skip = {x for x in a.skip.split(",") if x}
    unknown = (only | skip) - {b.name for b in SUITE}
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}; see --list")
    failed = []
    t0 = time.perf_counter()
    if not a.docs_only:
        for b in SUITE:
            if (only and b.name not in only) or b.name in skip:
                continue
            ok, _ = run(b, a.quick, docs=not a.no_docs)
            if not ok:
                failed.append(b.name)
    if not a.no_docs:
        write_docs(load_results())
    print(f"\n[benchmarks] finished in {time.perf_counter() - t0:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
