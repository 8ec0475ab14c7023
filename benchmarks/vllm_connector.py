"""vLLM engine steps through kvfs: how long a step waits when it saves a prompt, and when it loads one.

    python benchmarks/vllm_connector.py [--tokens 4096] [--repeats 5] [--dir DIR] [--url URL] [--quick]

vLLM's own objects (``VllmConfig``, ``KVConnectorFactory``, ``KVCacheConfig``,
paged caches from ``allocate_kv_cache``, ``Request``, ``SchedulerOutput``;
the CPU install of ``.ci/engines``) drive ``KVFSConnector`` as the model
runner does around one forward pass: ``bind_connector_metadata``,
``start_load_kv``, per layer ``wait_for_layer_load`` + ``save_kv_layer``,
then ``wait_for_save``. Llama-3-8B-shaped KV (32 layers, 8 KV heads of 128,
float16, blocks of 16 tokens), no model compute: "step" is the connector's
part of the step.

Saves: the prompt is new to the store (every chunk is written); between
samples the store is emptied and ``sync`` run, so every write lands in the
page cache of a store of the same size. "Until written" adds waiting for the
background writer to finish. Baseline: the same connector with
``save_in_background: false`` (the write inside ``wait_for_save``), measured
in the same run, interleaved.

Loads: a stored prompt plus one new token, scheduled again and again; the
worker loads every block of the prompt (all but the last token) into the
paged cache, layer by layer, reading and verifying each chunk (warm: the
store's files are in the page cache). Baseline: copying the same bytes in
memory (``torch`` ``copy_`` between two buffers already touched), same
process, interleaved. Also the first load of a new worker, whose layer
buffers are new memory (later loads reuse them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="kvfs-vllm-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, os.path.dirname(__file__))
from _common import Results  # noqa: E402

BLOCK = 16
LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(32)]
HEADS, HEAD = 8, 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="prompt length (KV: 128 KiB a token)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=None, help="directory for the file:// store (default: a temp dir)")
    ap.add_argument("--url", default=None, help="store URL instead of file://DIR")
    ap.add_argument("--quick", action="store_true", help="2048 tokens, 2 repeats")
    args = ap.parse_args()
    if args.tokens < BLOCK or args.repeats < 1:
        ap.error(f"--tokens must be at least {BLOCK} (one vLLM block) and --repeats at least 1")
    if args.quick:
        args.tokens, args.repeats = min(args.tokens, 2048), 2
    cmd = (f"python benchmarks/vllm_connector.py --tokens {args.tokens} --repeats {args.repeats}"
           + (" --quick" if args.quick else ""))
    res = Results("vLLM connector steps", cmd)
    try:
        import torch
        from vllm.config import CacheConfig, KVTransferConfig, VllmConfig
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
        from vllm.sampling_params import SamplingParams
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core.kv_cache_manager import KVCacheBlocks
        from vllm.v1.core.kv_cache_utils import KVCacheBlock, get_request_block_hasher, init_none_hash
        from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor
        from vllm.v1.kv_cache_layout import KVCacheLayout
        from vllm.v1.request import Request
        from vllm.v1.worker.utils import allocate_kv_cache
    except ImportError as e:
        res.add("vLLM connector steps", None, "", None, None, f"skipped: vLLM is not installed ({e.name})")
        res.print()
        res.save()
        return

    hash_fn = get_hash_fn_by_name("sha256")
    init_none_hash(hash_fn)
    nblocks = -(-args.tokens // BLOCK)
    num_blocks = 2 * nblocks + 8
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD, dtype=torch.float16)
    page = spec.page_size_bytes
    kv_cfg = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[KVCacheTensor(size=page * num_blocks * len(LAYERS), layers=LAYERS,
                                        layer_stride=page * num_blocks, block_stride=page)],
        kv_cache_groups=[KVCacheGroupSpec(LAYERS, spec)],
    )
    root = tempfile.mkdtemp(prefix="kvfs-bench-vllm-", dir=args.dir)
    url = args.url or f"file://{root}/store"

    def connector(role, background: bool):
        ktc = KVTransferConfig(kv_connector="KVFSConnector", kv_connector_module_path="kvfs.connectors.vllm",
                               kv_role="kv_both",
                               kv_connector_extra_config={"url": url, "model": "bench/llama-3-8b-shaped",
                                                          "save_in_background": background})
        cfg = VllmConfig(cache_config=CacheConfig(block_size=BLOCK), kv_transfer_config=ktc)
        return KVConnectorFactory.create_connector(cfg, role, kv_cfg)

    caches = allocate_kv_cache(kv_cfg, torch.device("cpu"), KVCacheLayout.LBNHC, [BLOCK])
    gen = torch.Generator().manual_seed(0)
    for t in caches.values():  # the forward pass's KV: whatever the blocks hold, every byte distinct
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32).to(torch.float16))
    block_ids = list(range(3, 3 + nblocks))
    load_blocks = list(range(3 + nblocks, 3 + 2 * nblocks + 1))  # other blocks: a load must move the bytes
    sched = connector(KVConnectorRole.SCHEDULER, True)
    workers = {mode: connector(KVConnectorRole.WORKER, mode == "background") for mode in ("in step", "background")}
    for w in workers.values():
        w.register_kv_caches(caches)
    kv_bytes = args.tokens * len(LAYERS) * 2 * HEADS * HEAD * 2
    counter = [0]

    def schedule(prompt: list[int], blocks: list[int]):
        """A new request through the scheduler connector: its connector metadata and the tokens it found."""
        counter[0] += 1
        req = Request(f"r{counter[0]}", prompt, SamplingParams(max_tokens=1), None,
                      block_hasher=get_request_block_hasher(BLOCK, hash_fn))
        sched.on_new_request(req)
        hit, _ = sched.get_num_new_matched_tokens(req, 0)
        sched.update_state_after_alloc(req, KVCacheBlocks(blocks=([KVCacheBlock(block_id=i) for i in blocks],)), hit)
        req.num_computed_tokens = hit
        out = SchedulerOutput.make_empty()
        out.scheduled_new_reqs = [NewRequestData.from_request(req, (blocks,))]
        out.num_scheduled_tokens = {req.request_id: len(prompt) - hit}
        out.total_num_scheduled_tokens = len(prompt) - hit
        return sched.build_connector_meta(out), hit

    def step(w, meta) -> float:
        """The model runner's calls around one forward pass; returns how long they took."""
        t0 = time.perf_counter()
        w.bind_connector_metadata(meta)
        w.start_load_kv(None)
        for name in LAYERS:
            w.wait_for_layer_load(name)
            w.save_kv_layer(name, caches[name], None)
        w.wait_for_save()
        errors = w.get_block_ids_with_load_errors()
        w.clear_connector_metadata()
        t = time.perf_counter() - t0
        assert not errors, f"load errors in blocks {sorted(errors)}"
        return t

    def one(mode: str) -> tuple[float, float]:
        prompt = [((counter[0] + 1) * 1_000_003 + i * 7919) % 128_000 for i in range(args.tokens)]  # new to the store
        meta, _ = schedule(prompt, block_ids)
        assert len(meta.saves) == 1, "the prompt must be new to the store"
        w = workers[mode]
        t0 = time.perf_counter()
        t_step = step(w, meta)
        assert w.wait_for_saves_written(600)
        t_written = time.perf_counter() - t0
        assert sched.ns.lookup(prompt) == args.tokens
        # drop the prompt and let the disk catch up, so that every sample writes into a store of the same
        # size with no backlog of dirty pages (else later samples measure the disk's writeback throttling)
        sched.store.evict(all=True)
        os.sync()
        return t_step, t_written

    def load_step(w, prompt: list[int]) -> float:
        meta, hit = schedule(prompt, load_blocks)
        assert hit == args.tokens, f"the stored prompt must be found whole ({hit} of {args.tokens} tokens)"
        assert len(meta.loads) == 1 and len(meta.saves) == 1
        return step(w, meta)

    try:
        first_step, _ = one("background")  # warm-up: the staging buffer's first touch, the store's first writes
        samples: dict[str, list[tuple[float, float]]] = {"in step": [], "background": []}
        for _ in range(args.repeats):
            for mode in samples:
                samples[mode].append(one(mode))
        sync_step = min(s for s, _ in samples["in step"])
        bg_step = min(s for s, _ in samples["background"])
        bg_written = min(w for _, w in samples["background"])
        gb = kv_bytes / 1e9
        res.add(f"step saving a {args.tokens}-token prompt, written in wait_for_save (baseline)", sync_step * 1e3,
                "ms", None, None, f"{gb:.2f} GB of KV, {gb / sync_step:.2f} GB/s")
        res.add(f"step saving a {args.tokens}-token prompt, written in the background", bg_step * 1e3, "ms",
                "written in wait_for_save", sync_step / bg_step,
                "the step's gather out of the paged cache; ratio: how much shorter the step is")
        res.add("background save, until written", bg_written * 1e3, "ms", "written in wait_for_save",
                sync_step / bg_written, "the same work, after the step")
        res.add("first step of a new worker, written in the background", first_step * 1e3, "ms",
                "later steps (written in the background)", bg_step / first_step,
                "its staging buffer new: the gather faults the memory in; later saves reuse the buffer")

        # --- loads: one stored prompt (its chunks whole: a multiple of the chunk size), loaded again and again
        stored = [(7 * i + 11) % 128_000 for i in range(args.tokens)]
        one_save = connector(KVConnectorRole.WORKER, True)
        one_save.register_kv_caches(caches)
        step(one_save, schedule(stored, block_ids)[0])
        assert one_save.wait_for_saves_written(600)
        one_save.shutdown()
        want = {name: caches[name][block_ids].clone() for name in LAYERS}
        loader = connector(KVConnectorRole.WORKER, True)
        loader.register_kv_caches(caches)
        first_load = load_step(loader, stored + [100])  # each load a new last token: its chunk is saved
        for name in LAYERS:  # the blocks loaded hold exactly what was saved
            assert torch.equal(caches[name][load_blocks[: nblocks]], want[name]), "the load differs from the save"
        src = torch.empty(kv_bytes, dtype=torch.uint8)
        dst = torch.empty(kv_bytes, dtype=torch.uint8)
        src.fill_(1)
        dst.fill_(2)
        loads, copies = [], []
        for _ in range(args.repeats):
            loads.append(load_step(loader, stored + [101 + len(loads)]))
            t0 = time.perf_counter()
            dst.copy_(src)
            copies.append(time.perf_counter() - t0)
        loader.shutdown()
        load_t, copy_t = min(loads), min(copies)
        res.add(f"step loading a stored {args.tokens}-token prompt", load_t * 1e3, "ms",
                "the same bytes copied in memory", copy_t / load_t,
                f"{gb:.2f} GB of KV, {gb / load_t:.2f} GB/s: read, verified, scattered into the paged cache "
                f"(memcpy {gb / copy_t:.2f} GB/s)")
        res.add("first load of a new worker", first_load * 1e3, "ms", "later loads", load_t / first_load,
                "its layer buffers new; later loads reuse them")
    finally:
        for w in workers.values():
            w.shutdown()
        sched.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    res.print()
    res.save()


if __name__ == "__main__":
    main()
