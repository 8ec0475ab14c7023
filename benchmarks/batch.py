"""Batch planning (BatchLLM): tokens prefilled and prefix-cache hit ratio, planned vs first-come-first-served.

    python benchmarks/batch.py [--quick] [--skip-run]

Workloads (seeded, synthetic token ids; requests arrive shuffled):
  * snippet: 200 documents of 800-2,000 tokens, 4-32 questions each, behind one shared
    200-token instruction (search-snippet / document-QA style);
  * chat: multi-turn conversations behind a shared system prompt, each turn's prompt the
    history truncated to a context window (oldest turns dropped) plus the new message.
For each: (a) first-come-first-served through an LRU prefix cache of 16-token blocks holding a
quarter of the batch's distinct blocks, (b) the same cache with requests in plan order,
(c) the trie optimum (a cache that never evicts). Baseline: every prompt prefilled in full.
Also: planning time for 10,000 prompts of 2,000 tokens, and (unless --skip-run) wall time of
running a batch through a small random Llama with kvfs, planned vs unplanned.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

BLOCK = 16


# ---------------------------------------------------------------------------------------------- workloads
def snippet_workload(seed: int = 0, docs: int = 200, doc_tokens: tuple[int, int] = (800, 2000),
                     questions: tuple[int, int] = (4, 32), instruction_tokens: int = 200,
                     question_tokens: tuple[int, int] = (8, 48), max_tokens: tuple[int, int] = (16, 256),
                     vocab: int = 32000) -> tuple[list[np.ndarray], list[int]]:
    """Prompts ``instruction + document + question`` in shuffled order, and each request's max_tokens."""
    rng = np.random.default_rng(seed)
    instruction = rng.integers(0, vocab, instruction_tokens, dtype=np.uint32)
    prompts, decode = [], []
    for _ in range(docs):
        doc = rng.integers(0, vocab, int(rng.integers(doc_tokens[0], doc_tokens[1] + 1)), dtype=np.uint32)
        for _ in range(int(rng.integers(questions[0], questions[1] + 1))):
            q = rng.integers(0, vocab, int(rng.integers(question_tokens[0], question_tokens[1] + 1)), dtype=np.uint32)
            prompts.append(np.concatenate([instruction, doc, q]))
            decode.append(int(rng.integers(max_tokens[0], max_tokens[1] + 1)))
    perm = rng.permutation(len(prompts))
    return [prompts[i] for i in perm], [decode[i] for i in perm]


def chat_workload(seed: int = 0, conversations: int = 300, turns: tuple[int, int] = (2, 12),
                  system_tokens: int = 300, user_tokens: tuple[int, int] = (20, 200),
                  reply_tokens: tuple[int, int] = (50, 400), window: int = 2048,
                  vocab: int = 32000) -> tuple[list[np.ndarray], list[int]]:
    """One request per conversation turn: ``system + truncated history + user message``; max_tokens is the
    reply's length. A history that does not fit ``window`` loses its oldest turns, so later turns stop
    sharing a prefix with earlier ones (context truncation)."""
    rng = np.random.default_rng(seed)
    system = rng.integers(0, vocab, system_tokens, dtype=np.uint32)
    prompts, decode = [], []
    for _ in range(conversations):
        history: list[np.ndarray] = []  # one entry per finished turn: user message + reply
        for _ in range(int(rng.integers(turns[0], turns[1] + 1))):
            user = rng.integers(0, vocab, int(rng.integers(user_tokens[0], user_tokens[1] + 1)), dtype=np.uint32)
            reply = rng.integers(0, vocab, int(rng.integers(reply_tokens[0], reply_tokens[1] + 1)), dtype=np.uint32)
            kept = list(history)
            while kept and system_tokens + sum(map(len, kept)) + len(user) > window:
                kept.pop(0)
            prompts.append(np.concatenate([system, *kept, user]))
            decode.append(len(reply))
            history.append(np.concatenate([user, reply]))
    perm = rng.permutation(len(prompts))
    return [prompts[i] for i in perm], [decode[i] for i in perm]


def cache_comparison(prompts: list[np.ndarray], decode: list[int], fraction: float = 0.25,
                     block_tokens: int = BLOCK) -> dict:
    """FCFS vs plan order through the same LRU block cache, and the trie optimum."""
    from kvfs.connectors.batch import block_hashes, plan_batch, simulate_lru

    plan = plan_batch(prompts, decode_tokens=decode)
    blocks = [block_hashes(p, block_tokens) for p in prompts]
    lengths = [len(p) for p in prompts]
    working_set = len({h for bl in blocks for h in bl})
    capacity = int(working_set * fraction)
    fcfs = simulate_lru(blocks, range(len(prompts)), capacity, block_tokens, lengths)
    planned = simulate_lru(blocks, plan.order, capacity, block_tokens, lengths)
    return {"plan": plan, "working_set_blocks": working_set, "capacity_blocks": capacity, "fcfs": fcfs,
            "planned": planned}


# ---------------------------------------------------------------------------------------------- main
def _cache_rows(res, name: str, c: dict) -> None:
    rep = c["plan"].report
    logical = rep.logical_tokens
    cap = f"LRU {c['capacity_blocks']:,} blocks of {BLOCK} = 1/4 of {c['working_set_blocks']:,}"
    res.add(f"{name}: logical prompt tokens", logical, "tokens", None, None, f"{rep.requests:,} requests")
    for label, prefilled, note in [
        ("(a) FCFS + LRU", c["fcfs"].prefill_tokens, cap),
        ("(b) plan order + same LRU", c["planned"].prefill_tokens, cap),
        (f"plan's own groups ({rep.method})", rep.prefill_tokens, f"{rep.shared_groups:,} shared groups"),
        ("single-level optimum", rep.single_level_tokens, "dynamic program"),
        ("(c) trie optimum", rep.trie_tokens, f"{rep.trie_nodes:,} trie nodes"),
    ]:
        res.add(f"{name}: {label}: tokens prefilled", prefilled, "tokens", "all prompts in full",
                prefilled / logical, f"hit ratio {100 * (1 - prefilled / logical):.1f}%; {note}")


def planning_time(res, n: int = 10_000, length: int = 2_000) -> None:
    """Planning time for ``n`` prompts of ``length`` tokens given as Python lists (what a JSONL reader holds),
    against reading them once into uint32 arrays (the least any planner must do)."""
    from kvfs.connectors.batch import plan_batch
    from kvfs.keys import as_tokens

    prompts, decode = snippet_workload(seed=1, docs=n // 10, doc_tokens=(length - 500, length - 500),
                                       question_tokens=(300, 300))
    lists = [p[:length].tolist() for p in prompts[:n]]
    assert len(lists) == n and all(len(p) == length for p in lists)
    base = min(_timed(lambda: [as_tokens(p) for p in lists]) for _ in range(3))
    dt = min(_timed(lambda: plan_batch(lists, decode_tokens=decode[:n])) for _ in range(3))
    plan = plan_batch(lists, decode_tokens=decode[:n])
    res.add(f"plan {n:,} prompts x {length:,} tokens (Python lists in)", dt, "s",
            "reading the lists into uint32 arrays", dt / base,
            f"{plan.report.shared_groups:,} shared groups, saving {100 * plan.report.saving:.1f}%")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_rows(res, quick: bool = False, size: str = "demo", rounds: int = 2) -> None:
    """Wall time of a small snippet batch through a seeded random Llama on the CPU.

    Baseline: every request prefilled in full, in arrival order (no cache). Then arrival order with kvfs as
    the prefix cache (every prompt stored and looked up) in a memory tier holding a quarter of the batch's KV,
    and the plan run by BatchRunner through a fresh tier of the same size (only the group prefixes stored,
    each pinned while its group runs). The three runs alternate for ``rounds`` rounds (fresh stores each
    time) and each keeps its fastest, so a busy machine disturbs them alike. Every run's outputs are checked
    token-identical to the baseline's.
    """
    import torch

    from kvfs.connectors.batch import plan_batch
    from kvfs.connectors.batch_runner import BatchRunner
    from kvfs.connectors.demo_model import build_model
    from kvfs.connectors.hf import CachedLM

    torch.manual_seed(0)
    prompts, decode = snippet_workload(seed=2, docs=4 if quick else 8, doc_tokens=(150, 300), questions=(3, 6),
                                       instruction_tokens=64, question_tokens=(8, 24), max_tokens=(4, 12))
    prompts = [p % 32000 for p in prompts]
    model = build_model(size, seed=0)
    plan = plan_batch(prompts, decode_tokens=decode)
    rep = plan.report
    chunk = BLOCK
    with CachedLM(model, "memory://", chunk_tokens=chunk) as lm:
        bpt = lm.spec.bytes_per_token
    # a quarter of the batch's distinct KV (the trie), as chunk files (data plus a 4 KiB header per chunk)
    capacity = rep.trie_tokens * bpt // 4 + (rep.trie_tokens // chunk // 4 + 1) * 4096
    # the tier must at least hold the two largest group prefixes at once (one pinned while the next is
    # prepared); with --quick's small documents a quarter of the batch can be less than that
    largest = max((len(g.prefix) for g in plan.groups), default=0)
    capacity = max(capacity, 2 * (largest * bpt + (largest // chunk + 1) * 4096))
    url = f"memory://?capacity={capacity}"

    def fcfs(load: bool, new: list[int]) -> tuple[float, list, int]:
        with CachedLM(model, url if load else "memory://", chunk_tokens=chunk, load=load, save=load) as lm:
            t0 = time.perf_counter()
            gens = [lm.generate(p, n) for p, n in zip(prompts, new)]
            return time.perf_counter() - t0, [g.tokens for g in gens], sum(g.prefill.computed for g in gens)

    def planned(new: list[int]) -> tuple[float, list, int]:
        with CachedLM(model, url, chunk_tokens=chunk, save=False) as lm:
            run = BatchRunner(lm, kv_budget="1GiB", workers=1).run(plan, new)
        assert not run.failed and not run.prefix_errors
        return run.wall_s, run.outputs, run.prompt_tokens_computed

    def measure(new: list[int]) -> dict[str, tuple[float, int]]:
        best: dict[str, tuple[float, int]] = {}
        base_out = None
        for _ in range(1 if quick else rounds):
            for name, fn in [("base", lambda: fcfs(False, new)), ("fcfs", lambda: fcfs(True, new)),
                             ("plan", lambda: planned(new))]:
                dt, out, computed = fn()
                base_out = out if base_out is None else base_out
                assert out == base_out, f"{name}: outputs differ from full prefill"
                best[name] = (min(dt, best.get(name, (dt, 0))[0]), computed)
        return best

    best = measure(decode)
    (base_s, _), (fcfs_s, fcfs_c), (plan_s, plan_c) = best["base"], best["fcfs"], best["plan"]
    what = (f"{rep.requests} requests, {rep.logical_tokens:,} prompt tokens, {size} model "
            f"({model.num_parameters() / 1e6:.0f} M params, fp32), best of {1 if quick else rounds}")
    res.add("run: arrival order, full prefill (no cache)", base_s, "s", None, None, what)
    res.add("run: arrival order, kvfs prefix cache at 1/4 of the batch's KV", fcfs_s, "s", "full prefill",
            fcfs_s / base_s, f"{fcfs_c:,} prompt tokens computed; memory tier {capacity / 2**20:.1f} MiB, "
                             f"chunks of {chunk} tokens")
    res.add("run: plan order, BatchRunner, same tier size", plan_s, "s", "full prefill", plan_s / base_s,
            f"{plan_c:,} prompt tokens computed (plan: {rep.prefill_tokens:,}); "
            f"{fcfs_s / plan_s:.2f}x faster than kvfs in arrival order")
    # the same batch with one new token per request: the prefills alone, the part of a run the plan changes
    first = measure([1] * len(prompts))
    (b1, _), (f1, _), (p1, _) = first["base"], first["fcfs"], first["plan"]
    res.add("first token only: arrival order, full prefill (no cache)", b1, "s", None, None,
            f"the same requests, 1 new token each: the prefills; decoding {sum(decode):,} tokens is the rest "
            f"of the run above ({base_s - b1:.2f} s)")
    res.add("first token only: arrival order, kvfs prefix cache", f1, "s", "full prefill", f1 / b1, "")
    res.add("first token only: plan order, BatchRunner", p1, "s", "full prefill", p1 / b1,
            f"{f1 / p1:.2f}x faster than kvfs in arrival order")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller workloads")
    ap.add_argument("--skip-run", action="store_true", help="only the planner and the cache simulation")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(__file__))
    from _common import Results

    cmd = "python benchmarks/batch.py" + (" --quick" if args.quick else "") + (" --skip-run" if args.skip_run else "")
    res = Results("Batch planning (BatchLLM)", cmd)
    docs = 50 if args.quick else 200
    snippet = cache_comparison(*snippet_workload(docs=docs))
    _cache_rows(res, "snippet", snippet)
    chat = cache_comparison(*chat_workload(conversations=75 if args.quick else 300))
    _cache_rows(res, "chat", chat)
    planning_time(res, n=2_000 if args.quick else 10_000)
    if not args.skip_run:
        run_rows(res, quick=args.quick)
    res.print()
    print("\nsaved", res.save())


if __name__ == "__main__":
    main()
