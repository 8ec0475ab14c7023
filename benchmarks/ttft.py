"""Time to first token with a warm kvfs vs a full prefill, on the demo model on the CPU.

    python benchmarks/ttft.py [--contexts 2048,8192,16384] [--repeats 3] [--dir /path/on/the/disk]

The model is ``kvfs demo``'s: a Llama architecture with seeded random weights
(8 layers, hidden 512, 8 query / 2 KV heads of 64, 55 M parameters, float32),
on the CPU with torch's default threads. For each context length:

* baseline: full prefill of context + a 32-token question (kvfs not used),
  best of ``--repeats`` (one run for contexts over 8k tokens);
* the context's KV (from that prefill) is stored in an LMDB store and a file
  store in fresh directories under ``--dir``;
* warm kvfs: a request with the same context and a new question reuses the
  context's KV from the store and computes only the question (lookup, verified
  read, DynamicCache, forward of 32 tokens, argmax), best of ``--warm-repeats``,
  each with another question, twice: with the connector's layer-wise prefetch
  (each layer's load overlaps the compute of the layers before it) and loading
  the whole prefix before the model runs; then once more after dropping the page cache
  (the chunks come from the disk; the model is run once on other tokens
  first, so that torch's code is back in memory), when running as root.

The first warm request repeats the baseline's prompt and must produce the same
first token. The ratio is full-prefill TTFT / warm TTFT, same run, same machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import Results, drop_caches  # noqa: E402

import torch  # noqa: E402

import kvfs  # noqa: E402
from kvfs.connectors.demo_model import build_model  # noqa: E402
from kvfs.connectors.hf import CachedLM, output_cache, run_model  # noqa: E402

QUESTION = 32


def warm_up(model) -> None:
    with torch.inference_mode():
        ids = torch.arange(256).unsqueeze(0)
        out = run_model(model, ids)
        run_model(model, ids[:, :QUESTION], output_cache(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="2048,8192,16384", help="context lengths in tokens")
    ap.add_argument("--repeats", type=int, default=3, help="full prefills per context (one above 8k tokens)")
    ap.add_argument("--warm-repeats", type=int, default=7, help="warm requests per store and mode (best kept)")
    ap.add_argument("--dir", default=None, help="where the stores go (default: a temp dir)")
    args = ap.parse_args()
    contexts = [int(x) for x in args.contexts.split(",")]
    base_dir = tempfile.mkdtemp(prefix="kvfs-ttft-", dir=args.dir)
    cmd = "python benchmarks/ttft.py" + (f" --contexts {args.contexts}" if args.contexts != "2048,8192,16384"
                                         else "") + (f" --repeats {args.repeats}" if args.repeats != 3 else "") + (
        f" --warm-repeats {args.warm_repeats}" if args.warm_repeats != 7 else "")
    res = Results("Time to first token (connectors)", cmd)
    model = build_model("demo")
    vocab = model.config.vocab_size
    warm_up(model)
    gen = torch.Generator().manual_seed(0)
    can_drop = os.geteuid() == 0
    try:
        for n in contexts:
            context = torch.randint(0, vocab, (n,), generator=gen).tolist()
            questions = [torch.randint(0, vocab, (QUESTION,), generator=gen).tolist()
                         for _ in range(args.repeats + args.warm_repeats + 1)]
            full = CachedLM(model, f"memory://ttft-baseline-{n}", model_name="x", load=False, save=False)
            runs = args.repeats if n <= 8192 else 1
            best, first = float("inf"), None
            for q in questions[:runs]:
                t0 = time.perf_counter()
                pre = full.prefill(context + q)
                tok = int(torch.argmax(pre.logits))
                dt = time.perf_counter() - t0
                if dt < best:
                    best = dt
                first = first or (q, tok, pre)
            full.close()
            q0, tok0, pre0 = first
            res.add(f"full prefill, {n + QUESTION} tokens", best * 1e3, "ms", None, None,
                    f"best of {runs}; kvfs not used")
            print(f"[{n}] full prefill {best:.2f} s", flush=True)
            mib = None
            for scheme in ("lmdb", "file"):
                url = f"{scheme}://{base_dir}/{scheme}-{n}"
                with kvfs.open(url) as store:
                    CachedLM(model, store).store_prompt(context, pre0.cache)  # the context only: n tokens reused
                    mib = CachedLM(model, store).spec.bytes_per_token * n / 2**20
                    for layerwise in (True, False):
                        lm = CachedLM(model, store, layerwise=layerwise)
                        how = "layer-wise prefetch" if layerwise else "load, then compute"
                        times, loads = [], []
                        for q in [q0] + questions[runs: runs + args.warm_repeats - 1]:
                            t0 = time.perf_counter()
                            p = lm.prefill(context + q)
                            tok = int(torch.argmax(p.logits))
                            times.append(time.perf_counter() - t0)
                            loads.append(p.load_s)
                            assert p.reused == n, (p.reused, n)
                            if q is q0:  # the prompt the baseline ran: the same first token
                                assert tok == tok0, "kvfs changed the first token"
                        warm = min(times)
                        note = f"reuses {n} tokens ({mib:.0f} MiB)"
                        if not layerwise:
                            note += f"; of which load {loads[times.index(warm)] * 1e3:.0f} ms"
                        if 6000 <= n <= 10000:  # the 8k-token case
                            note += "; target >= 10x"
                        res.add(f"warm kvfs ({scheme}, {how}), {n + QUESTION} tokens", warm * 1e3, "ms",
                                "full prefill", best / warm, note)
                        print(f"[{n}] {scheme} {how}: warm TTFT {warm * 1e3:.0f} ms, {best / warm:.1f}x", flush=True)
                if can_drop and drop_caches():
                    warm_up(model)  # fault torch's own code back in: only the chunks stay out of the page cache
                    with kvfs.open(url) as store:
                        lm = CachedLM(model, store)
                        q = questions[-1]
                        t0 = time.perf_counter()
                        p = lm.prefill(context + q)
                        int(torch.argmax(p.logits))
                        cold = time.perf_counter() - t0
                        res.add(f"kvfs ({scheme}, layer-wise) after drop_caches, {n + QUESTION} tokens", cold * 1e3,
                                "ms", "full prefill", best / cold, "chunks read from disk")
                        print(f"[{n}] {scheme} after drop_caches: {cold * 1e3:.0f} ms, {best / cold:.1f}x",
                              flush=True)
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)
    res.print()
    print(f"\nsaved {res.save()}")


if __name__ == "__main__":
    main()
