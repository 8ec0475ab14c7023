"""Paged scatter/gather (kvfs.connectors.paged) vs a contiguous copy of the same bytes, per layout.

    python benchmarks/paged.py [--tokens 4096] [--layers 4] [--device cpu|cuda] [--layouts flash,...]

For each engine layout a cache of ``--blocks`` blocks of ``--block-size`` tokens per layer (8 KV heads,
head_dim 128, bf16; MLA: latent 576) is filled by ``PagedCache.scatter`` from a chunk tensor
``[layers, planes, tokens, heads, dim]`` through a realistic slot mapping: a random block table (blocks
scattered over the cache), tokens filling each block in order, the last block partly used. Gather reads
the same tokens back. Baseline, measured in the same run: ``dst.copy_(src)`` of the same number of bytes
between two contiguous tensors on the same device. Every round is checked (gather == what was scattered).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import Results, best_of  # noqa: E402

from kvfs.connectors.paged import PagedCache, slot_mapping  # noqa: E402

H, D, LATENT = 8, 128, 576


def make_cache(layout: str, layers: int, nb: int, bs: int, device: str):
    z = dict(dtype=torch.bfloat16, device=device)
    size = nb * bs
    per_layer = {
        "flash": lambda: torch.zeros(2, nb, bs, H, D, **z),
        "flash (HND strides)": lambda: torch.zeros(2, nb, H, bs, D, **z).permute(0, 1, 3, 2, 4),
        "kv_concat": lambda: torch.zeros(nb, H, bs, 2 * D, **z),
        "mla": lambda: torch.zeros(nb, bs, LATENT, **z),
    }
    if layout in per_layer:
        return [per_layer[layout]() for _ in range(layers)], layout.split(" ")[0], bs
    whole = {
        "sglang_layer_first": (lambda: torch.zeros(2, layers, size, H, D, **z), 1),
        "sglang_page_first": (lambda: torch.zeros(2, size, layers, H, D, **z), 1),
        "sglang_page_first_direct": (lambda: torch.zeros(2, nb, layers, bs, H, D, **z), bs),
        "sglang_page_head": (lambda: torch.zeros(2, nb, H, bs, layers, D, **z), bs),
    }
    make, slot_bs = whole[layout]
    return make(), layout, slot_bs


LAYOUTS = ["flash", "flash (HND strides)", "kv_concat", "mla", "sglang_layer_first", "sglang_page_first",
           "sglang_page_first_direct", "sglang_page_head"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--blocks", type=int, default=1024)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: stable figures on a shared machine; copy and paged alike)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = args.device
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    res = Results(f"GPU data path: paged scatter and gather ({dev})",
                  ("python benchmarks/paged.py " + " ".join(sys.argv[1:])).strip())
    ntok = args.tokens - args.block_size // 2  # the last block partly used
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    for layout in args.layouts.split(","):  # token-indexed SGLang pools are given their page size
        cache, name, bs = make_cache(layout, args.layers, args.blocks, args.block_size, dev)
        pc = PagedCache(cache, name, page_size=args.block_size if bs == 1 else None)
        mla = name == "mla"
        shape = (args.layers, 1, ntok, 1, LATENT) if mla else (args.layers, 2, ntok, H, D)
        kv = torch.randn(shape, generator=gen).to(torch.bfloat16).to(dev)
        table = torch.randperm(pc.num_blocks, generator=gen)[: -(-ntok // pc.block_size)]
        slots = slot_mapping(table, pc.block_size, 0, ntok).to(dev)
        idx = pc.index(slots)  # what a connector computes once per request
        nbytes = kv.numel() * kv.element_size()
        src = torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(1)
        dst = torch.empty_like(src)

        def copy() -> None:
            dst.copy_(src)
            sync()

        def scatter() -> None:
            pc.scatter(kv, idx)
            sync()

        out = torch.empty_like(kv)

        def gather() -> None:
            pc.gather(idx, out=out)
            sync()

        t_copy = t_sc = t_ga = float("inf")
        for _ in range(args.repeat):  # interleaved: a busy moment of the machine hits all three alike
            t_copy = min(t_copy, best_of(1, copy))
            t_sc = min(t_sc, best_of(1, scatter))
            t_ga = min(t_ga, best_of(1, gather))
        if not torch.equal(out, kv):
            raise AssertionError(f"{layout}: gather did not return what was scattered")
        note = f"{nbytes / 2**20:.0f} MiB, copy {nbytes / t_copy / 1e9:.2f} GB/s"
        res.add(f"{layout} scatter", nbytes / t_sc / 1e9, "GB/s", "contiguous copy_", t_copy / t_sc,
                note + "; target >= 0.5")
        res.add(f"{layout} gather", nbytes / t_ga / 1e9, "GB/s", "contiguous copy_", t_copy / t_ga, "")
        del cache, pc, kv, src, dst, out
    res.print()
    print(f"\n({time.time() - t0:.0f} s; saved to {res.save()})")


if __name__ == "__main__":
    main()
