"""KVFSConnector driven with vLLM's own objects on the CPU.

vLLM builds the configs, the requests (with its block hasher), the block
lists, the scheduler outputs and the paged KV caches themselves
(``allocate_kv_cache``, in vLLM's layouts); the connector is created through
vLLM's connector factory from ``kv_connector_module_path``, as ``vllm serve``
does. The KV written into the paged caches is random data standing in for
what a forward pass computes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="kvfs-vllm-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from vllm.config import CacheConfig, KVTransferConfig, VllmConfig  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import get_hash_fn_by_name  # noqa: E402
from vllm.v1.core.kv_cache_manager import KVCacheBlocks  # noqa: E402
from vllm.v1.core.kv_cache_utils import KVCacheBlock, get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
)
from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.worker.utils import allocate_kv_cache  # noqa: E402

import kvfs  # noqa: E402
from bitrot import flip_bit  # noqa: E402
from kvfs.connectors.vllm import KVFSConnector, KVFSConnectorMetadata  # noqa: E402

BLOCK = 16
LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(3)]
HEADS, HEAD = 2, 8
NUM_BLOCKS = 40
HASH = get_hash_fn_by_name("sha256")
init_none_hash(HASH)

pytestmark = pytest.mark.engines


def kv_cache_config(spec=None) -> KVCacheConfig:
    spec = spec or FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD, dtype=torch.float32)
    page = spec.page_size_bytes
    return KVCacheConfig(
        num_blocks=NUM_BLOCKS,
        kv_cache_tensors=[KVCacheTensor(size=page * NUM_BLOCKS * len(LAYERS), layers=LAYERS,
                                        layer_stride=page * NUM_BLOCKS, block_stride=page)],
        kv_cache_groups=[KVCacheGroupSpec(LAYERS, spec)],
    )


def make_connector(url: str, role: KVConnectorRole, kv_role: str = "kv_both", chunk_tokens: int = 16, spec=None,
                   **extra):
    ktc = KVTransferConfig(kv_connector="KVFSConnector", kv_connector_module_path="kvfs.connectors.vllm",
                           kv_role=kv_role,
                           kv_connector_extra_config={"url": url, "chunk_tokens": chunk_tokens,
                                                      "model": "test/llama-3-layers", **extra})
    cfg = VllmConfig(cache_config=CacheConfig(block_size=BLOCK), kv_transfer_config=ktc)
    return KVConnectorFactory.create_connector(cfg, role, kv_cache_config(spec))


def paged_caches(layout: KVCacheLayout = KVCacheLayout.LBNHC, spec=None) -> dict[str, torch.Tensor]:
    """vLLM's own paged KV caches, zeroed: one ``[blocks, heads, block tokens, K|V]`` view per layer."""
    return allocate_kv_cache(kv_cache_config(spec), torch.device("cpu"), layout, [BLOCK])


def request(req_id: str, prompt: list[int]) -> Request:
    return Request(req_id, prompt, SamplingParams(max_tokens=4), None,
                   block_hasher=get_request_block_hasher(BLOCK, HASH))


def blocks_of(ids: list[int]) -> KVCacheBlocks:
    return KVCacheBlocks(blocks=([KVCacheBlock(block_id=i) for i in ids],))


def step(req: Request, block_ids: list[int], num_scheduled: int, computed: int = 0) -> SchedulerOutput:
    """A scheduler step that schedules ``req`` for the first time: its computed tokens (local and
    external hits) are set before NewRequestData is made, as the scheduler does."""
    req.num_computed_tokens = computed
    out = SchedulerOutput.make_empty()
    out.scheduled_new_reqs = [NewRequestData.from_request(req, (block_ids,))]
    out.num_scheduled_tokens = {req.request_id: num_scheduled}
    out.total_num_scheduled_tokens = num_scheduled
    return out


def write_kv(caches, block_ids: list[int], kv: torch.Tensor, start: int = 0) -> None:
    """What the forward pass does: put ``kv`` [layers, 2, tokens, heads, dim] at positions start... ."""
    for pos in range(kv.shape[2]):
        p = start + pos
        b, o = block_ids[p // BLOCK], p % BLOCK
        for i, name in enumerate(LAYERS):
            caches[name][b, :, o, :HEAD] = kv[i, 0, pos]
            caches[name][b, :, o, HEAD:] = kv[i, 1, pos]


def read_kv(caches, block_ids: list[int], start: int, end: int) -> torch.Tensor:
    out = torch.empty(len(LAYERS), 2, end - start, HEADS, HEAD)
    for p in range(start, end):
        b, o = block_ids[p // BLOCK], p % BLOCK
        for i, name in enumerate(LAYERS):
            out[i, 0, p - start] = caches[name][b, :, o, :HEAD]
            out[i, 1, p - start] = caches[name][b, :, o, HEAD:]
    return out


def run_worker_step(worker, caches, meta) -> set[int]:
    """The model runner's calls around one forward pass."""
    worker.bind_connector_metadata(meta)
    worker.start_load_kv(None)
    for name in LAYERS:
        worker.wait_for_layer_load(name)
        worker.save_kv_layer(name, caches[name], None)
    worker.wait_for_save()
    errors = worker.get_block_ids_with_load_errors()
    worker.clear_connector_metadata()
    return errors


def gen(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


PROMPT_A = list(range(1000, 1100))  # 100 tokens
PROMPT_B = PROMPT_A[:70] + list(range(5000, 5030))  # shares 70 tokens with A
PROMPT_C = list(range(7000, 7100))  # shares nothing
BLOCKS_A = [5, 2, 17, 9, 30, 11, 3]  # 7 blocks of 16 hold 100 tokens; deliberately scattered
BLOCKS_B = [8, 21, 0, 14, 33, 26, 19]


@pytest.fixture
def url(tmp_path):
    return f"file://{tmp_path}/store"


def store_a(url: str, layout=KVCacheLayout.LBNHC) -> torch.Tensor:
    """Run request A through a kv_both scheduler and worker; returns the KV it computed."""
    sched = make_connector(url, KVConnectorRole.SCHEDULER)
    worker = make_connector(url, KVConnectorRole.WORKER)
    caches = paged_caches(layout)
    worker.register_kv_caches(caches)
    a = request("A", PROMPT_A)
    sched.on_new_request(a)
    assert sched.get_num_new_matched_tokens(a, 0) == (0, False)  # empty store
    sched.update_state_after_alloc(a, blocks_of(BLOCKS_A), 0)
    meta = sched.build_connector_meta(step(a, BLOCKS_A, len(PROMPT_A)))
    assert isinstance(meta, KVFSConnectorMetadata) and not meta.loads and len(meta.saves) == 1
    kv_a = gen(1, len(LAYERS), 2, len(PROMPT_A), HEADS, HEAD)
    write_kv(caches, BLOCKS_A, kv_a)
    assert run_worker_step(worker, caches, meta) == set()
    worker.shutdown()
    sched.shutdown()
    return kv_a


def test_it_is_a_real_vllm_connector(url):
    c = make_connector(url, KVConnectorRole.SCHEDULER)
    assert isinstance(c, KVFSConnector) and isinstance(c, KVConnectorBase_V1)
    assert c.spec.num_layers == 3 and c.spec.num_kv_heads == HEADS and c.spec.head_dim == HEAD
    assert c.spec.dtype == "float32"
    c.shutdown()


@pytest.mark.parametrize("layout", [KVCacheLayout.LBNHC, KVCacheLayout.LBHNC])
def test_two_requests_sharing_a_prefix(url, layout):
    kv_a = store_a(url, layout)
    with kvfs.open(url) as store:  # what A's prefill stored is exactly its KV
        spec = make_connector(url, KVConnectorRole.SCHEDULER).spec
        got = store.namespace(spec).get(PROMPT_A)
        assert torch.equal(torch.from_numpy(got), kv_a)

    # request B, in a fresh engine (new scheduler and worker connectors, zeroed caches)
    sched = make_connector(url, KVConnectorRole.SCHEDULER)
    worker = make_connector(url, KVConnectorRole.WORKER)
    caches = paged_caches(layout)
    worker.register_kv_caches(caches)
    b = request("B", PROMPT_B)
    sched.on_new_request(b)
    # 70 shared tokens, rounded down to whole blocks: 64; vLLM's own cache already has the first block
    assert sched.get_num_new_matched_tokens(b, 0) == (64, False)
    assert sched.get_num_new_matched_tokens(b, 16) == (48, False)
    assert sched.get_num_new_matched_tokens(b, 16) == (48, False)  # asking again changes nothing
    sched.update_state_after_alloc(b, blocks_of(BLOCKS_B), 48)
    meta = sched.build_connector_meta(step(b, BLOCKS_B, len(PROMPT_B) - 64, computed=64))
    assert [(m.start, m.end) for m in meta.loads] == [(16, 64)]
    # B's save starts after the 4 chunks kvfs holds: only its last 36 tokens are copied out of the cache
    assert [s.start for s in meta.saves] == [64]
    # the forward pass computes B's new tokens 64..100 (the loaded ones are read from the cache)
    kv_b_new = gen(2, len(LAYERS), 2, len(PROMPT_B) - 64, HEADS, HEAD)
    write_kv(caches, BLOCKS_B, kv_b_new, start=64)
    assert run_worker_step(worker, caches, meta) == set()
    # exactly A's KV landed in B's slots 16..64; the locally cached first block was not touched
    assert torch.equal(read_kv(caches, BLOCKS_B, 16, 64), kv_a[:, :, 16:64])
    assert torch.count_nonzero(read_kv(caches, BLOCKS_B, 0, 16)) == 0
    # and nothing else in the cache changed
    touched = {(BLOCKS_B[p // BLOCK], p % BLOCK) for p in range(16, 100)}
    for name in LAYERS:
        for blk in range(NUM_BLOCKS):
            for off in range(BLOCK):
                if (blk, off) not in touched:
                    assert not caches[name][blk, :, off].any()
    # B was saved too (written after the step, in the background): its whole prompt is now in kvfs
    assert worker.wait_for_saves_written(30)
    with kvfs.open(url) as store:
        ns = store.namespace(sched.spec)
        assert ns.lookup(PROMPT_B) == len(PROMPT_B)
        want = torch.cat([kv_a[:, :, :64], kv_b_new], dim=2)
        assert torch.equal(torch.from_numpy(ns.get(PROMPT_B)), want)
    worker.shutdown()
    sched.shutdown()


def test_loads_on_a_cpu_cache_reuse_their_layer_buffers(url):
    kv_a = store_a(url)
    sched = make_connector(url, KVConnectorRole.SCHEDULER)
    worker = make_connector(url, KVConnectorRole.WORKER, prefetch_bytes="4MiB")  # a size, as in the docs
    caches = paged_caches()
    worker.register_kv_caches(caches)
    allocated = []
    # four requests loading A's prefix one after the other, each into other blocks of the same cache
    for n, (req_id, blocks) in enumerate((("L1", BLOCKS_B), ("L2", BLOCKS_A), ("L3", BLOCKS_B), ("L4", BLOCKS_A))):
        for t in caches.values():
            t.zero_()
        prompt = PROMPT_A[: 64 + 16 * (n % 2)] + [9000 + n] * 8
        r = request(req_id, prompt)
        sched.on_new_request(r)
        hit = sched.get_num_new_matched_tokens(r, 0)[0]
        assert hit == len(prompt) - 8
        sched.update_state_after_alloc(r, blocks_of(blocks), hit)
        meta = sched.build_connector_meta(step(r, blocks, len(prompt) - hit, computed=hit))
        assert run_worker_step(worker, caches, meta) == set()
        assert torch.equal(read_kv(caches, blocks, 0, hit), kv_a[:, :, :hit])
        allocated.append(worker._load_slots.allocated)
    # each load holds up to one buffer per layer (prefetch_bytes holds all three; fewer when the scatter
    # releases a layer before the loader wants the next buffer): four loads, at most three buffers in all
    assert 1 <= allocated[0] and allocated[-1] <= len(LAYERS) and worker._load_slots.lent_bytes == 0
    worker.shutdown()
    sched.shutdown()
    with pytest.raises(kvfs.InvalidInput, match="prefetch_bytes"):
        make_connector(url, KVConnectorRole.WORKER, prefetch_bytes="lots")


def test_a_save_copies_the_whole_prompt_when_the_workers_store_lost_the_prefix(url):
    kv_a = store_a(url)
    sched = make_connector(url, KVConnectorRole.SCHEDULER)
    worker = make_connector(url, KVConnectorRole.WORKER)
    caches = paged_caches()
    worker.register_kv_caches(caches)
    b = request("B", PROMPT_B)
    sched.on_new_request(b)
    # vLLM's own prefix cache holds B's first 64 tokens: nothing to load, and the save starts after them
    assert sched.get_num_new_matched_tokens(b, 64) == (0, False)
    sched.update_state_after_alloc(b, blocks_of(BLOCKS_B), 0)
    meta = sched.build_connector_meta(step(b, BLOCKS_B, len(PROMPT_B) - 64, computed=64))
    assert not meta.loads and [s.start for s in meta.saves] == [64]
    kv_b = torch.cat([kv_a[:, :, :64], gen(3, len(LAYERS), 2, len(PROMPT_B) - 64, HEADS, HEAD)], dim=2)
    write_kv(caches, BLOCKS_B, kv_b)
    with kvfs.open(url) as store:  # evicted between the scheduler's lookup and the worker's step (or, under
        store.evict(all=True, force=True)  # tensor parallelism, never in this rank's store)
    assert run_worker_step(worker, caches, meta) == set()
    assert worker.wait_for_saves_written(30)
    with kvfs.open(url) as store:  # the worker saw the gap and saved all of B, not chunks behind a gap
        ns = store.namespace(sched.spec)
        assert ns.lookup(PROMPT_B) == len(PROMPT_B)
        assert torch.equal(torch.from_numpy(ns.get(PROMPT_B)), kv_b)
    worker.shutdown()
    sched.shutdown()


def test_the_last_prompt_token_is_never_loaded(url):
    store_a(url)
    sched = make_connector(url, KVConnectorRole.SCHEDULER)
    # all 100 tokens are stored; 99 may be loaded, rounded down to blocks: 96
    assert sched.get_num_new_matched_tokens(request("A2", PROMPT_A), 0) == (96, False)
    # a 96-token prompt fully stored: 95 loadable -> 80
    assert sched.get_num_new_matched_tokens(request("A3", PROMPT_A[:96]), 0) == (80, False)
    assert sched.get_num_new_matched_tokens(request("A4", PROMPT_A[:1]), 0) == (0, False)
    sched.shutdown()


def test_chunks_in_vllms_own_prefix_cache_are_not_read(url, tmp_path):
    """vLLM's prefix cache holds B's first 32 tokens: kvfs reads only the chunks past them. The first chunk
    is damaged here, and the load still succeeds: it was never read."""
    kv_a = store_a(url)
    sched = make_connector(url, KVConnectorRole.SCHEDULER)
    worker = make_connector(url, KVConnectorRole.WORKER)
    caches = paged_caches()
    worker.register_kv_caches(caches)
    flip_bit(os.path.join(tmp_path, "store", sched.ns.keys(PROMPT_A)[0].path), -7, 0x01)
    b = request("B", PROMPT_B)
    assert sched.get_num_new_matched_tokens(b, 32) == (32, False)
    sched.update_state_after_alloc(b, blocks_of(BLOCKS_B), 32)
    meta = sched.build_connector_meta(step(b, BLOCKS_B, len(PROMPT_B) - 64, computed=64))
    assert [(m.start, m.end) for m in meta.loads] == [(32, 64)]
    assert run_worker_step(worker, caches, meta) == set()
    assert torch.equal(read_kv(caches, BLOCKS_B, 32, 64), kv_a[:, :, 32:64])
    assert torch.count_nonzero(read_kv(caches, BLOCKS_B, 0, 32)) == 0  # vLLM's own blocks: not written
    worker.shutdown()
    sched.shutdown()


def test_a_corrupt_chunk_is_reported_not_loaded(url, tmp_path, caplog):
    kv_a = store_a(url)
    sched = make_connector(url, KVConnectorRole.SCHEDULER)
    worker = make_connector(url, KVConnectorRole.WORKER)
    caches = paged_caches()
    worker.register_kv_caches(caches)
    # bit rot in the chunk holding tokens 32..48
    bad = sched.ns.keys(PROMPT_A)[2]
    flip_bit(os.path.join(tmp_path, "store", bad.path), -7, 0x01)
    b = request("B", PROMPT_B)
    assert sched.get_num_new_matched_tokens(b, 0) == (64, False)  # the catalog still lists it
    sched.update_state_after_alloc(b, blocks_of(BLOCKS_B), 64)
    meta = sched.build_connector_meta(step(b, BLOCKS_B, len(PROMPT_B) - 64, computed=64))
    with caplog.at_level("WARNING"):
        errors = run_worker_step(worker, caches, meta)
    # the prefix is good up to the bad chunk: vLLM recomputes tokens 32..64 (blocks 2 and 3)
    assert errors == {BLOCKS_B[2], BLOCKS_B[3]}
    assert "quarantined" in caplog.text
    assert torch.equal(read_kv(caches, BLOCKS_B, 0, 32), kv_a[:, :, :32])
    # layers are loaded one by one and each is verified before it is used: the layers of tokens 32..64 that
    # were loaded before the damage showed up hold exactly the stored KV, the damaged layer holds nothing
    got = read_kv(caches, BLOCKS_B, 32, 64)
    for layer in range(len(LAYERS)):
        assert torch.equal(got[layer], kv_a[layer, :, 32:64]) or not got[layer].any()
    assert not got[len(LAYERS) - 1].any()  # the flipped byte is in the last layer of the chunk
    assert worker.get_block_ids_with_load_errors() == set()  # reported once
    # B's prompt was not saved with the hole in it: the next lookup stops before the quarantined chunk
    assert sched.get_num_new_matched_tokens(request("B2", PROMPT_B), 0) == (32, False)
    # vLLM rolls B back to the first bad block and recomputes tokens 32..100; that step saves B
    redo = SchedulerOutput.make_empty()
    redo.scheduled_cached_reqs = CachedRequestData(
        req_ids=["B"], resumed_req_ids=set(), new_token_ids=[[]], all_token_ids={},
        new_block_ids=[None], num_computed_tokens=[32], num_output_tokens=[0])
    redo.num_scheduled_tokens = {"B": len(PROMPT_B) - 32}
    meta = sched.build_connector_meta(redo)
    assert [s.req_id for s in meta.saves] == ["B"] and not meta.loads
    kv_b = torch.cat([kv_a[:, :, :70], gen(4, len(LAYERS), 2, 30, HEADS, HEAD)], dim=2)
    write_kv(caches, BLOCKS_B, kv_b[:, :, 32:], start=32)
    assert run_worker_step(worker, caches, meta) == set()
    assert worker.wait_for_saves_written(30)
    assert torch.equal(torch.from_numpy(sched.ns.get(PROMPT_B)), kv_b)
    worker.shutdown()
    sched.shutdown()


def test_a_chunk_evicted_after_the_lookup_is_reported(url):
    store_a(url)
    sched = make_connector(url, KVConnectorRole.SCHEDULER)
    worker = make_connector(url, KVConnectorRole.WORKER)
    caches = paged_caches()
    worker.register_kv_caches(caches)
    b = request("B", PROMPT_B)
    assert sched.get_num_new_matched_tokens(b, 0) == (64, False)
    sched.update_state_after_alloc(b, blocks_of(BLOCKS_B), 64)
    meta = sched.build_connector_meta(step(b, BLOCKS_B, len(PROMPT_B) - 64, computed=64))
    with kvfs.open(url) as store:  # another node evicts the last two chunks of the prefix
        ns = store.namespace(sched.spec)
        store.evict([k.path for k in ns.keys(PROMPT_A)[3:]], force=True)
    errors = run_worker_step(worker, caches, meta)
    assert errors == {BLOCKS_B[3]}
    assert torch.count_nonzero(read_kv(caches, BLOCKS_B, 48, 64)) == 0
    worker.shutdown()
    sched.shutdown()


def test_producer_saves_and_consumer_loads_exactly(url):
    """Prefill/decode disaggregation through storage: one engine prefills, another reads its KV."""
    p_sched = make_connector(url, KVConnectorRole.SCHEDULER, "kv_producer")
    p_worker = make_connector(url, KVConnectorRole.WORKER, "kv_producer")
    p_caches = paged_caches()
    p_worker.register_kv_caches(p_caches)
    a = request("A", PROMPT_A)
    p_sched.on_new_request(a)
    assert p_sched.get_num_new_matched_tokens(a, 0) == (0, False)
    # chunked prefill: 64 tokens, then 36; the prompt is saved once, when its prefill completes
    first = p_sched.build_connector_meta(step(a, BLOCKS_A[:4], 64))
    assert not first.saves and not first.loads
    kv_a = gen(3, len(LAYERS), 2, len(PROMPT_A), HEADS, HEAD)
    write_kv(p_caches, BLOCKS_A, kv_a[:, :, :64])
    run_worker_step(p_worker, p_caches, first)
    second = SchedulerOutput.make_empty()
    second.scheduled_cached_reqs = CachedRequestData(
        req_ids=["A"], resumed_req_ids=set(), new_token_ids=[[]], all_token_ids={},
        new_block_ids=[(BLOCKS_A[4:],)], num_computed_tokens=[64], num_output_tokens=[0])
    second.num_scheduled_tokens = {"A": 36}
    meta = p_sched.build_connector_meta(second)
    assert [len(s.token_ids) for s in meta.saves] == [100] and meta.saves[0].block_ids == BLOCKS_A
    write_kv(p_caches, BLOCKS_A, kv_a[:, :, 64:], start=64)
    run_worker_step(p_worker, p_caches, meta)
    assert p_worker.wait_for_saves_written(30)
    # a producer never loads
    assert p_sched.get_num_new_matched_tokens(request("A2", PROMPT_A), 0) == (0, False)

    c_sched = make_connector(url, KVConnectorRole.SCHEDULER, "kv_consumer")
    c_worker = make_connector(url, KVConnectorRole.WORKER, "kv_consumer")
    c_caches = paged_caches(KVCacheLayout.LBHNC)  # the decode engine may even use another layout
    c_worker.register_kv_caches(c_caches)
    d = request("A-decode", PROMPT_A)
    c_sched.on_new_request(d)
    assert c_sched.get_num_new_matched_tokens(d, 0) == (96, False)
    c_sched.update_state_after_alloc(d, blocks_of(BLOCKS_B), 96)
    meta = c_sched.build_connector_meta(step(d, BLOCKS_B, 4, computed=96))
    assert not meta.saves  # a consumer never saves
    assert run_worker_step(c_worker, c_caches, meta) == set()
    assert torch.equal(read_kv(c_caches, BLOCKS_B, 0, 96), kv_a[:, :, :96])
    for c in (p_sched, p_worker, c_sched, c_worker):
        c.shutdown()


def test_mla_latent_cache_round_trip(url):
    from vllm.v1.kv_cache_interface import MLAAttentionSpec

    spec = MLAAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=24, dtype=torch.bfloat16)
    p_sched = make_connector(url, KVConnectorRole.SCHEDULER, "kv_producer", spec=spec)
    p_worker = make_connector(url, KVConnectorRole.WORKER, "kv_producer", spec=spec)
    assert p_sched.spec.mla and p_sched.spec.head_dim == 24 and p_sched.spec.dtype == "bfloat16"
    caches = paged_caches(spec=spec)  # [blocks, 1, block tokens, latent]
    p_worker.register_kv_caches(caches)
    a = request("A", PROMPT_A)
    meta = p_sched.build_connector_meta(step(a, BLOCKS_A, len(PROMPT_A)))
    latent = gen(6, len(LAYERS), len(PROMPT_A), 24).to(torch.bfloat16)
    for p in range(len(PROMPT_A)):
        for i, name in enumerate(LAYERS):
            caches[name][BLOCKS_A[p // BLOCK], 0, p % BLOCK] = latent[i, p]
    run_worker_step(p_worker, caches, meta)
    assert p_worker.wait_for_saves_written(30)
    c_sched = make_connector(url, KVConnectorRole.SCHEDULER, "kv_consumer", spec=spec)
    c_worker = make_connector(url, KVConnectorRole.WORKER, "kv_consumer", spec=spec)
    c_caches = paged_caches(spec=spec)
    c_worker.register_kv_caches(c_caches)
    d = request("D", PROMPT_A)
    assert c_sched.get_num_new_matched_tokens(d, 0) == (96, False)
    c_sched.update_state_after_alloc(d, blocks_of(BLOCKS_B), 96)
    assert run_worker_step(c_worker, c_caches, c_sched.build_connector_meta(step(d, BLOCKS_B, 4, computed=96))) == set()
    for p in range(96):
        for i, name in enumerate(LAYERS):
            assert torch.equal(c_caches[name][BLOCKS_B[p // BLOCK], 0, p % BLOCK], latent[i, p])
    for c in (p_sched, p_worker, c_sched, c_worker):
        c.shutdown()


def test_mla_under_tensor_parallelism_is_one_namespace(tmp_path):
    """vLLM replicates MLA's latent KV on every tensor-parallel rank: kvfs keeps one copy (one namespace, saved by
    rank 0, loaded by all), not one per rank."""
    from vllm.config import ParallelConfig
    from vllm.v1.kv_cache_interface import MLAAttentionSpec

    from kvfs.connectors.vllm import kv_spec_for

    mla = MLAAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=24, dtype=torch.bfloat16)
    ktc = KVTransferConfig(kv_connector="KVFSConnector", kv_connector_module_path="kvfs.connectors.vllm",
                           kv_role="kv_both", kv_connector_extra_config={"url": f"file://{tmp_path}/s",
                                                                         "chunk_tokens": 16, "model": "test/mla"})
    cfg = VllmConfig(cache_config=CacheConfig(block_size=BLOCK), kv_transfer_config=ktc,
                     parallel_config=ParallelConfig(tensor_parallel_size=4))
    specs = {kv_spec_for(cfg, kv_cache_config(mla), tp_rank=r) for r in range(4)}
    assert len(specs) == 1 and next(iter(specs)).tp_size == 1
    sched = KVConnectorFactory.create_connector(cfg, KVConnectorRole.SCHEDULER, kv_cache_config(mla))
    assert [ns.path for ns in sched._rank_ns] == [sched.spec.path]
    sched.shutdown()


def test_requests_kvfs_must_not_share_are_passed_through(url):
    store_a(url)
    sched = make_connector(url, KVConnectorRole.SCHEDULER)
    salted = Request("S", PROMPT_A, SamplingParams(max_tokens=4), None, cache_salt="tenant-1",
                     block_hasher=get_request_block_hasher(BLOCK, HASH))
    sched.on_new_request(salted)
    assert sched.get_num_new_matched_tokens(salted, 0) == (0, False)
    meta = sched.build_connector_meta(step(salted, BLOCKS_B, len(PROMPT_A)))
    assert not meta.saves and not meta.loads
    sched.shutdown()


def test_after_a_cache_reset_the_engine_neither_loads_nor_saves(url):
    """vLLM resets its connector's cache after a weight update: KV in kvfs was computed with the old weights
    under the same revision, so the engine must not load it, nor store KV of the new weights there."""
    store_a(url)
    sched = make_connector(url, KVConnectorRole.SCHEDULER)
    a = request("A", PROMPT_A)
    sched.on_new_request(a)
    assert sched.get_num_new_matched_tokens(a, 0) == (96, False)
    b = request("B", PROMPT_B)
    sched.on_new_request(b)
    first = sched.build_connector_meta(step(b, BLOCKS_B[:4], 64))  # a prompt half prefilled at the reset
    assert sched.reset_cache() is True
    assert sched.get_num_new_matched_tokens(request("A2", PROMPT_A), 0) == (0, False)
    second = SchedulerOutput.make_empty()
    second.scheduled_cached_reqs = CachedRequestData(
        req_ids=["B"], resumed_req_ids=set(), new_token_ids=[[]], all_token_ids={},
        new_block_ids=[(BLOCKS_B[4:],)], num_computed_tokens=[64], num_output_tokens=[0])
    second.num_scheduled_tokens = {"B": len(PROMPT_B) - 64}
    assert not first.saves and not sched.build_connector_meta(second).saves
    c = request("C", PROMPT_B)
    sched.on_new_request(c)
    assert not sched.build_connector_meta(step(c, BLOCKS_B, len(PROMPT_B))).saves
    sched.shutdown()


def test_unsupported_kv_caches_are_refused(url):
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    ktc = KVTransferConfig(kv_connector="KVFSConnector", kv_connector_module_path="kvfs.connectors.vllm",
                           kv_role="kv_both", kv_connector_extra_config={"url": url, "model": "m"})
    cfg = VllmConfig(cache_config=CacheConfig(block_size=BLOCK), kv_transfer_config=ktc)
    spec = SlidingWindowSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD, dtype=torch.float32,
                             sliding_window=64)
    kcc = KVCacheConfig(num_blocks=4, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(LAYERS, spec)])
    with pytest.raises(ValueError, match="SlidingWindowSpec"):
        KVFSConnector(cfg, KVConnectorRole.SCHEDULER, kcc)


@pytest.mark.parametrize("extra, error", [
    # a misspelt key was ignored: chunks went to the 256-token namespace, or saves stayed in the background
    ({"chunk_token": 64}, "unknown kv_connector_extra_config key 'chunk_token'; did you mean 'chunk_tokens'"),
    ({"save_in_backgroud": False}, "did you mean 'save_in_background'"),
    ({"chunk_tokens": True}, "chunk_tokens must be a whole number of tokens"),  # was read as 1
    ({"chunk_tokens": 16.5}, "chunk_tokens must be a whole number of tokens"),  # was read as 16
    ({"chunk_tokens": "64x"}, "chunk_tokens must be a whole number of tokens"),  # was int()'s own message
    ({"url": 5}, "url must be a kvfs store URL"),  # was "empty store URL"
    ({"model": 12}, "model must be a model name"),
])
@pytest.mark.parametrize("role", [KVConnectorRole.SCHEDULER, KVConnectorRole.WORKER])
def test_bad_extra_config_is_refused_naming_the_key(url, extra, error, role):
    kw = dict(extra)
    with pytest.raises(ValueError, match=error.replace("(", r"\(")):
        make_connector(kw.pop("url", url), role, chunk_tokens=kw.pop("chunk_tokens", 16), **kw)
    c = make_connector(url, role, chunk_tokens="32")  # a number as a string, as some launchers pass it
    assert c.spec.chunk_tokens == 32
    c.shutdown()


# ------------------------------------------------------------------------------------ vLLM's own scheduler
@pytest.fixture(scope="module")
def model_config(tmp_path_factory):
    """vLLM's ModelConfig of a tiny local Llama config (no weights, no download; takes a few seconds)."""
    from transformers import LlamaConfig
    from vllm.config import ModelConfig

    d = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(vocab_size=2000, hidden_size=2 * HEADS * HEAD, intermediate_size=64,
                      num_hidden_layers=len(LAYERS), num_attention_heads=2 * HEADS, num_key_value_heads=HEADS,
                      head_dim=HEAD, max_position_embeddings=1024)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(d)
    return ModelConfig(model=str(d), skip_tokenizer_init=True, dtype="float32", max_model_len=512)


def engine(model_config, url: str, max_num_batched_tokens: int = 512, async_scheduling: bool = False):
    """vLLM's Scheduler with the connector (as the engine core builds it), and a worker-side connector."""
    from vllm.config import SchedulerConfig
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager

    ktc = KVTransferConfig(kv_connector="KVFSConnector", kv_connector_module_path="kvfs.connectors.vllm",
                           kv_role="kv_both", kv_load_failure_policy="recompute",
                           kv_connector_extra_config={"url": url, "chunk_tokens": 16})
    cfg = VllmConfig(model_config=model_config, cache_config=CacheConfig(block_size=BLOCK),
                     scheduler_config=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=4,
                                                      max_model_len=512, async_scheduling=async_scheduling,
                                                      is_encoder_decoder=False),
                     kv_transfer_config=ktc)
    cfg.cache_config.num_gpu_blocks = NUM_BLOCKS
    sched = (AsyncScheduler if async_scheduling else Scheduler)(cfg, kv_cache_config(), StructuredOutputManager(cfg),
                                                                 block_size=BLOCK)
    worker = KVConnectorFactory.create_connector(cfg, KVConnectorRole.WORKER, kv_cache_config())
    caches = paged_caches()
    worker.register_kv_caches(caches)
    return sched, worker, caches


def finish_step(sched, out, req_ids, errors=frozenset()):
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

    mro = ModelRunnerOutput(req_ids=list(req_ids), req_id_to_index={r: i for i, r in enumerate(req_ids)},
                            sampled_token_ids=[[7] for _ in req_ids],
                            kv_connector_output=KVConnectorOutput(invalid_block_ids=set(errors)))
    sched.update_from_output(out, mro)


def scheduled_step(sched, worker, caches, out, kv_of) -> set[int]:
    """One engine step of ``out``: the worker connector's calls around a forward pass that writes ``kv_of(prompt)``
    (its KV, [layers, 2, tokens, heads, dim]) at each scheduled request's scheduled positions."""
    for req_id, n in out.num_scheduled_tokens.items():
        r = sched.requests[req_id]
        start = r.num_computed_tokens - n  # (the scheduler has already counted them)
        write_kv(caches, sched.kv_cache_manager.get_block_ids(req_id)[0],
                 kv_of(r.prompt_token_ids)[:, :, start: start + n], start)
    return run_worker_step(worker, caches, out.kv_connector_metadata)


def finish_chunk(sched, out, errors=frozenset()):
    """update_from_output for a step that may end a prefill chunk (no token sampled) or complete one."""
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

    ids = list(out.num_scheduled_tokens)
    done = [sched.requests[r].num_computed_tokens >= sched.requests[r].num_prompt_tokens for r in ids]
    mro = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                            sampled_token_ids=[[7] if d else [] for d in done],
                            kv_connector_output=KVConnectorOutput(invalid_block_ids=set(errors)))
    sched.update_from_output(out, mro)


def test_a_request_id_used_again_after_an_abort_is_handled_as_the_new_request(model_config, tmp_path):
    """vLLM allows a request id again once the request is aborted; the next step lists it as finished and the new
    request as new. The new request's state must survive that step: its prompt (prefilled in chunks) is saved,
    and a new request with a cache_salt under that id is still passed through (never saved)."""
    from vllm.v1.request import RequestStatus

    url = f"file://{tmp_path}/store"
    sched, worker, caches = engine(model_config, url, max_num_batched_tokens=32)
    kvs: dict[tuple, torch.Tensor] = {}

    def kv_of(prompt):
        return kvs.setdefault(tuple(prompt), gen(len(kvs) + 40, len(LAYERS), 2, len(prompt), HEADS, HEAD))

    def new(req_id, prompt, **kw):
        return Request(req_id, prompt, SamplingParams(max_tokens=2), None,
                       block_hasher=get_request_block_hasher(BLOCK, HASH), **kw)

    def run(until):
        for _ in range(20):
            out = sched.schedule()
            if not out.num_scheduled_tokens:
                break
            finish_chunk(sched, out, scheduled_step(sched, worker, caches, out, kv_of))
            if until():
                break
        assert worker.wait_for_saves_written(30)

    salted_prompt, other = list(range(3000, 3030)), list(range(6000, 6100))
    sched.add_request(new("X", PROMPT_A))
    out = sched.schedule()  # the first 32 tokens of X
    finish_chunk(sched, out, scheduled_step(sched, worker, caches, out, kv_of))
    sched.finish_requests(["X"], RequestStatus.FINISHED_ABORTED)
    sched.add_request(new("X", PROMPT_C))  # the id again: a new prompt, 100 tokens in chunks of 32
    run(lambda: "X" not in sched.requests)
    assert worker.ns.lookup(PROMPT_C) == len(PROMPT_C)
    assert torch.equal(torch.from_numpy(worker.ns.get(PROMPT_C)), kv_of(PROMPT_C))

    sched.add_request(new("X", PROMPT_B))
    out = sched.schedule()
    finish_chunk(sched, out, scheduled_step(sched, worker, caches, out, kv_of))
    sched.finish_requests(["X"], RequestStatus.FINISHED_ABORTED)
    sched.add_request(new("Y", other))  # takes the next steps' budget: the new X waits past the step naming X finished
    sched.add_request(new("X", salted_prompt, cache_salt="tenant-secret"))
    run(lambda: "X" not in sched.requests and "Y" not in sched.requests)
    assert worker.ns.lookup(other) == len(other)
    assert worker.ns.lookup(salted_prompt) == 0  # a salted prompt is never stored where unsalted lookups find it
    worker.shutdown()


def test_vllm_keeps_the_output_of_a_request_preempted_with_a_save_pending(model_config, tmp_path):
    # kvfs is a best-effort cache that never reads blocks after the step: vLLM's scheduler must not treat its saves
    # as hand-offs to deliver (it would drop and recompute the output of requests preempted under async scheduling)
    sched, worker, _ = engine(model_config, f"file://{tmp_path}/store", async_scheduling=True)
    assert sched.connector.requires_kv_delivery is False and sched.requires_kv_delivery is False
    worker.shutdown()


def test_a_model_from_a_local_directory_is_named_by_its_contents(model_config, tmp_path, monkeypatch):
    """vLLM gives a local model's path as its name and no revision: the namespace's revision is a fingerprint of
    the directory's config and weights, so another checkpoint saved at that path gets its own KV."""
    from kvfs.connectors.vllm import kv_spec_for

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def spec(extra=None):
        ktc = KVTransferConfig(kv_connector="KVFSConnector", kv_connector_module_path="kvfs.connectors.vllm",
                               kv_role="kv_both", kv_connector_extra_config={"chunk_tokens": 16, **(extra or {})})
        return kv_spec_for(VllmConfig(model_config=model_config, kv_transfer_config=ktc), kv_cache_config())

    first = spec()
    assert first.revision.startswith("local-") and spec() == first
    assert spec({"revision": "v7"}).revision == "v7"
    with open(os.path.join(model_config.model, "config.json"), "a") as f:
        f.write("\n")  # the directory's contents change (a new checkpoint saved there)
    try:
        assert spec().revision != first.revision
    finally:
        with open(os.path.join(model_config.model, "config.json"), "rb+") as f:
            f.truncate(os.path.getsize(f.name) - 1)


def test_through_vllms_own_scheduler(model_config, tmp_path):
    url = f"file://{tmp_path}/store"
    # engine 1 prefills A; the connector saves its prompt in the step that computes it
    sched, worker, caches = engine(model_config, url)
    a = Request("A", PROMPT_A, SamplingParams(max_tokens=1), None, block_hasher=get_request_block_hasher(BLOCK, HASH))
    sched.add_request(a)
    out = sched.schedule()
    meta = out.kv_connector_metadata
    assert out.num_scheduled_tokens == {"A": 100} and not meta.loads and len(meta.saves) == 1
    kv_a = gen(5, len(LAYERS), 2, len(PROMPT_A), HEADS, HEAD)
    write_kv(caches, meta.saves[0].block_ids, kv_a)
    assert run_worker_step(worker, caches, meta) == set()
    finish_step(sched, out, ["A"])
    assert a.is_finished()
    worker.shutdown()

    # engine 2 (an empty local prefix cache) gets B: 64 tokens come from kvfs, 36 are computed
    sched, worker, caches = engine(model_config, url)
    b = Request("B", PROMPT_B, SamplingParams(max_tokens=1), None, block_hasher=get_request_block_hasher(BLOCK, HASH))
    sched.add_request(b)
    out = sched.schedule()
    meta = out.kv_connector_metadata
    assert out.num_scheduled_tokens == {"B": len(PROMPT_B) - 64}
    (load,) = meta.loads
    assert (load.start, load.end) == (0, 64)
    assert run_worker_step(worker, caches, meta) == set()
    assert torch.equal(read_kv(caches, load.block_ids, 0, 64), kv_a[:, :, :64])
    finish_step(sched, out, ["B"])
    worker.shutdown()

    # engine 3: a chunk of A's prefix rotted on disk; vLLM rolls B back and recomputes from the bad block
    bad = worker.ns.keys(PROMPT_A)[2]
    with open(os.path.join(tmp_path, "store", bad.path), "r+b") as f:
        f.seek(-5, os.SEEK_END)
        x = f.read(1)
        f.seek(-5, os.SEEK_END)
        f.write(bytes([x[0] ^ 0x20]))
    sched, worker, caches = engine(model_config, url)
    c = Request("C", PROMPT_B, SamplingParams(max_tokens=1), None, block_hasher=get_request_block_hasher(BLOCK, HASH))
    sched.add_request(c)
    out = sched.schedule()
    (load,) = out.kv_connector_metadata.loads
    assert (load.start, load.end) == (0, 96)  # engine 2 stored B's prompt too
    errors = run_worker_step(worker, caches, out.kv_connector_metadata)
    assert errors == set(load.block_ids[2:6])  # from the bad chunk (tokens 32..48) to the end of the load
    finish_step(sched, out, ["C"], errors)
    assert not c.is_finished()
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"C": len(PROMPT_B) - 32}  # recomputed from token 32
    meta = out.kv_connector_metadata
    assert not meta.loads and [s.req_id for s in meta.saves] == ["C"]
    worker.shutdown()


def _stored_a_with_chunk_2_unreadable(model_config, url: str, tmp_path):
    """PROMPT_A stored through an engine (its KV returned), then its third chunk made unreadable (an I/O error,
    not damage: it stays listed, nothing is quarantined) until the returned function is called."""
    import shutil

    sched, worker, caches = engine(model_config, url)
    sched.add_request(Request("A", PROMPT_A, SamplingParams(max_tokens=1), None,
                              block_hasher=get_request_block_hasher(BLOCK, HASH)))
    out = sched.schedule()
    kv_a = gen(5, len(LAYERS), 2, len(PROMPT_A), HEADS, HEAD)
    write_kv(caches, out.kv_connector_metadata.saves[0].block_ids, kv_a)
    assert run_worker_step(worker, caches, out.kv_connector_metadata) == set()
    finish_step(sched, out, ["A"])
    worker.shutdown()
    path = os.path.join(tmp_path, "store", worker.ns.keys(PROMPT_A)[2].path)
    shutil.move(path, path + ".away")
    os.mkdir(path)

    def readable_again() -> None:
        os.rmdir(path)
        shutil.move(path + ".away", path)

    return kv_a, readable_again


def test_a_request_sharing_the_blocks_of_a_failed_load_is_not_saved(model_config, tmp_path):
    """Two prompts with one stored prefix in one step: vLLM gives the second the first one's blocks (its own
    prefix cache), which the first loads from kvfs. If that load fails, the second's new KV was computed
    over blocks that were never filled: vLLM reschedules both, and kvfs must not store either."""
    url = f"file://{tmp_path}/store"
    _, readable_again = _stored_a_with_chunk_2_unreadable(model_config, url, tmp_path)
    sched, worker, caches = engine(model_config, url)
    x, y = PROMPT_A[:80] + list(range(3000, 3020)), PROMPT_A[:80] + list(range(4000, 4020))
    for req_id, prompt in (("X", x), ("Y", y)):
        sched.add_request(Request(req_id, prompt, SamplingParams(max_tokens=1), None,
                                  block_hasher=get_request_block_hasher(BLOCK, HASH)))
    out = sched.schedule()
    meta = out.kv_connector_metadata
    (load,) = meta.loads
    assert load.req_id == "X" and (load.start, load.end) == (0, 80)
    save_x, save_y = sorted(meta.saves, key=lambda s: s.req_id)
    assert save_y.block_ids[:5] == load.block_ids  # Y reads X's blocks, loaded in this very step
    write_kv(caches, save_x.block_ids, gen(8, len(LAYERS), 2, 20, HEADS, HEAD), start=80)
    write_kv(caches, save_y.block_ids, gen(9, len(LAYERS), 2, 20, HEADS, HEAD), start=80)
    errors = run_worker_step(worker, caches, meta)
    assert errors == set(load.block_ids)
    assert worker.wait_for_saves_written(30)
    readable_again()
    with kvfs.open(url) as store:  # neither prompt was stored from KV computed over the unloaded blocks
        ns = store.namespace(worker.spec)
        assert ns.lookup(x) == 80 and ns.lookup(y) == 80
    finish_step(sched, out, ["X", "Y"], errors)
    assert not sched.requests["Y"].is_finished()
    # the step that recomputes them saves them
    out = sched.schedule()
    assert sorted(s.req_id for s in out.kv_connector_metadata.saves) == ["X", "Y"]
    worker.shutdown()


def test_with_async_scheduling_a_save_scheduled_before_a_load_failure_is_known_is_not_stored(model_config, tmp_path):
    """Async scheduling: vLLM schedules step N+1 before it gets step N's output. If N's load fails, the prefill
    chunk that N+1 completes was computed over blocks that were never filled; its save (in N+1's metadata,
    built before vLLM knew) must not be stored: later saves of those tokens would find the chunks stored and keep
    them. The save of the step that recomputes the prompt stores its true KV."""
    url = f"file://{tmp_path}/store"
    kv_a, readable_again = _stored_a_with_chunk_2_unreadable(model_config, url, tmp_path)
    prompt = PROMPT_A[:80] + list(range(5000, 5040))  # 120 tokens, 80 of them stored
    kv_true = torch.cat([kv_a[:, :, :80], gen(6, len(LAYERS), 2, 40, HEADS, HEAD)], dim=2)
    sched, worker, caches = engine(model_config, url, max_num_batched_tokens=32, async_scheduling=True)
    sched.add_request(Request("B", prompt, SamplingParams(max_tokens=1), None,
                              block_hasher=get_request_block_hasher(BLOCK, HASH)))
    out_n = sched.schedule()  # loads 0..80, computes 80..112
    out_n1 = sched.schedule()  # before step N's output: computes 112..120, the prefill completes: saved
    (load,) = out_n.kv_connector_metadata.loads
    assert (load.start, load.end) == (0, 80) and out_n.num_scheduled_tokens == {"B": 32}
    assert [s.req_id for s in out_n1.kv_connector_metadata.saves] == ["B"]
    blocks = out_n1.kv_connector_metadata.saves[0].block_ids
    garbage = gen(7, len(LAYERS), 2, 40, HEADS, HEAD)  # what attention over the unfilled blocks computes
    write_kv(caches, blocks, garbage[:, :, :32], start=80)
    errors = run_worker_step(worker, caches, out_n.kv_connector_metadata)
    assert errors and errors <= set(load.block_ids)
    write_kv(caches, blocks, garbage[:, :, 32:], start=112)
    assert run_worker_step(worker, caches, out_n1.kv_connector_metadata) == set()
    assert worker.wait_for_saves_written(30)
    readable_again()
    assert worker.ns.lookup(prompt) == 80  # nothing computed over the unfilled blocks was stored

    finish_chunk(sched, out_n, errors)  # vLLM learns of the failure and recomputes from the first bad block
    finish_chunk(sched, out_n1)
    for _ in range(10):
        out = sched.schedule()
        if not out.num_scheduled_tokens:
            break
        finish_chunk(sched, out, scheduled_step(sched, worker, caches, out, lambda p: kv_true))
        if "B" not in sched.requests:
            break
    assert "B" not in sched.requests and worker.wait_for_saves_written(30)
    assert torch.equal(torch.from_numpy(worker.ns.get(prompt)), kv_true)
    worker.shutdown()


def test_the_scheduler_counts_only_what_every_tp_rank_holds(tmp_path):
    """Under tensor parallelism each rank stores its own KV heads: a prefix is a hit only as far as every rank's
    namespace holds it, and a prompt one rank lacks chunks of is saved again (the ranks holding them skip them)."""
    from vllm.config import ParallelConfig

    from kvfs.connectors.vllm import kv_spec_for

    url = f"file://{tmp_path}/store"
    ktc = KVTransferConfig(kv_connector="KVFSConnector", kv_connector_module_path="kvfs.connectors.vllm",
                           kv_role="kv_both", kv_connector_extra_config={"url": url, "chunk_tokens": 16,
                                                                         "model": "test/llama-3-layers"})
    cfg = VllmConfig(cache_config=CacheConfig(block_size=BLOCK), kv_transfer_config=ktc,
                     parallel_config=ParallelConfig(tensor_parallel_size=2))
    with kvfs.open(url) as store:  # rank 0 holds the whole prompt, rank 1 its first 48 tokens (the rest evicted)
        for rank, n in ((0, len(PROMPT_A)), (1, 48)):
            spec = kv_spec_for(cfg, kv_cache_config(), tp_rank=rank)
            store.namespace(spec).put(PROMPT_A[:n], np.zeros(spec.chunk_shape(n), np.float32))
    sched = KVConnectorFactory.create_connector(cfg, KVConnectorRole.SCHEDULER, kv_cache_config())
    a = request("A", PROMPT_A)
    assert sched.get_num_new_matched_tokens(a, 0) == (48, False)  # rank 0 alone would say 96
    sched.update_state_after_alloc(a, blocks_of(BLOCKS_A), 48)
    meta = sched.build_connector_meta(step(a, BLOCKS_A, len(PROMPT_A) - 48, computed=48))
    assert [(s.req_id, s.start) for s in meta.saves] == [("A", 48)]
    sched.shutdown()


def _tp_connectors(rank: int, port: int, store: str, model: str, spec=None):
    """Scheduler and worker connectors of one of two tensor-parallel ranks (gloo, in this process)."""
    from vllm.config import ParallelConfig, set_current_vllm_config
    from vllm.distributed.parallel_state import init_distributed_environment, initialize_model_parallel

    ktc = KVTransferConfig(kv_connector="KVFSConnector", kv_connector_module_path="kvfs.connectors.vllm",
                           kv_role="kv_both", kv_connector_extra_config={"url": f"file://{store}", "chunk_tokens": 16,
                                                                         "model": model})
    cfg = VllmConfig(cache_config=CacheConfig(block_size=BLOCK), kv_transfer_config=ktc,
                     parallel_config=ParallelConfig(tensor_parallel_size=2))
    with set_current_vllm_config(cfg):
        init_distributed_environment(world_size=2, rank=rank, distributed_init_method=f"tcp://127.0.0.1:{port}",
                                     local_rank=rank, backend="gloo")
        initialize_model_parallel(tensor_model_parallel_size=2)
        sched = KVConnectorFactory.create_connector(cfg, KVConnectorRole.SCHEDULER, kv_cache_config(spec))
        worker = KVConnectorFactory.create_connector(cfg, KVConnectorRole.WORKER, kv_cache_config(spec))
    return sched, worker


def _run_two_ranks(tmp_path, main: str) -> None:
    """Run ``main(rank, port, store)`` of this module in two processes, one per tensor-parallel rank."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {here!r}); import test_vllm_connector as t; "
            f"t.{main}(int(sys.argv[1]), {port}, {str(tmp_path / 'store')!r})")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in (0, 1)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"rank {r} ok" in out, "\n".join(o[-2500:] for o in outs)


def _tp_rank_main(rank: int, port: int, store: str) -> None:
    """One tensor-parallel rank of :func:`test_a_load_failing_on_one_tp_rank_saves_on_none` (its own process)."""
    import functools

    sched, worker = _tp_connectors(rank, port, store, "test/llama-3-layers")
    assert worker.spec.tp_rank == rank and worker.spec.tp_size == 2
    caches = paged_caches()
    worker.register_kv_caches(caches)
    barrier = functools.partial(torch.distributed.barrier, group=worker._tp_group.cpu_group)
    # both ranks build the metadata one scheduler would (from every rank's namespace) before either saves
    a = request("A", PROMPT_A)
    meta = sched.build_connector_meta(step(a, BLOCKS_A, len(PROMPT_A)))
    barrier()
    write_kv(caches, BLOCKS_A, gen(10 + rank, len(LAYERS), 2, len(PROMPT_A), HEADS, HEAD))  # each rank its heads
    assert run_worker_step(worker, caches, meta) == set()
    assert worker.wait_for_saves_written(30)
    barrier()
    if rank == 1:  # bit rot in rank 1's copy of the chunk of tokens 32..48 only
        flip_bit(os.path.join(store, worker.ns.keys(PROMPT_A)[2].path), -7, 0x01)
    b = request("B", PROMPT_B)
    sched.on_new_request(b)
    assert sched.get_num_new_matched_tokens(b, 0) == (64, False)  # every rank's catalog still lists the chunk
    sched.update_state_after_alloc(b, blocks_of(BLOCKS_B), 64)
    meta = sched.build_connector_meta(step(b, BLOCKS_B, len(PROMPT_B) - 64, computed=64))
    assert len(meta.loads) == 1 and [s.start for s in meta.saves] == [64]
    write_kv(caches, BLOCKS_B, gen(20 + rank, len(LAYERS), 2, len(PROMPT_B) - 64, HEADS, HEAD), start=64)
    errors = run_worker_step(worker, caches, meta)
    assert errors == (set() if rank == 0 else {BLOCKS_B[2], BLOCKS_B[3]})
    assert worker.wait_for_saves_written(30)
    # rank 0 loaded its prefix, but B's new KV went through rank 1's attention over unloaded blocks: vLLM
    # recomputes B, and no rank stores it (rank 0: A's 64 tokens and 6 of A's next chunk; rank 1: up to the
    # quarantined chunk)
    assert worker.ns.lookup(PROMPT_B) == (70 if rank == 0 else 32), worker.ns.lookup(PROMPT_B)
    worker.shutdown()
    sched.shutdown()
    print(f"rank {rank} ok", flush=True)


def test_a_load_failing_on_one_tp_rank_saves_on_none(tmp_path):
    _run_two_ranks(tmp_path, "_tp_rank_main")


def _tp_mla_rank_main(rank: int, port: int, store: str) -> None:
    """One rank of :func:`test_mla_ranks_other_than_0_stage_nothing` (its own process)."""
    from vllm.v1.kv_cache_interface import MLAAttentionSpec

    mla = MLAAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=24, dtype=torch.bfloat16)
    sched, worker = _tp_connectors(rank, port, store, "test/mla", mla)
    caches = paged_caches(spec=mla)
    worker.register_kv_caches(caches)
    latent = gen(6, len(LAYERS), len(PROMPT_A), 24).to(torch.bfloat16)  # the same on every rank
    for p in range(len(PROMPT_A)):
        for i, name in enumerate(LAYERS):
            caches[name][BLOCKS_A[p // BLOCK], 0, p % BLOCK] = latent[i, p]
    meta = sched.build_connector_meta(step(request("A", PROMPT_A), BLOCKS_A, len(PROMPT_A)))
    torch.distributed.barrier(group=worker._tp_group.cpu_group)  # both looked before either saves
    assert len(meta.saves) == 1
    assert run_worker_step(worker, caches, meta) == set()
    assert worker.wait_for_saves_written(30)
    # rank 0 saved the prompt; rank 1, which saves nothing, took no host staging copy of it either (a pinned
    # buffer of the whole prompt's latent KV, every step that saves)
    assert worker._staging.allocated == (1 if rank == 0 else 0), worker._staging.allocated
    torch.distributed.barrier(group=worker._tp_group.cpu_group)
    assert worker.ns.lookup(PROMPT_A) == len(PROMPT_A), worker.ns.lookup(PROMPT_A)  # every rank finds it
    worker.shutdown()
    sched.shutdown()
    print(f"rank {rank} ok", flush=True)


def test_mla_ranks_other_than_0_stage_nothing(tmp_path):
    _run_two_ranks(tmp_path, "_tp_mla_rank_main")


# ------------------------------------------------------------------------------- saves written in the background
def _prefill_step(sched, worker, caches, req_id: str, prompt: list[int], blocks: list[int], seed: int):
    """Schedule ``prompt`` whole (nothing cached), write its KV into the paged cache, run the worker's step."""
    r = request(req_id, prompt)
    sched.on_new_request(r)
    assert sched.get_num_new_matched_tokens(r, 0) == (0, False)
    sched.update_state_after_alloc(r, blocks_of(blocks), 0)
    meta = sched.build_connector_meta(step(r, blocks, len(prompt)))
    assert len(meta.saves) == 1
    kv = gen(seed, len(LAYERS), 2, len(prompt), HEADS, HEAD)
    write_kv(caches, blocks, kv)
    assert run_worker_step(worker, caches, meta) == set()
    return kv


class _WriterLock:
    """Another process holding the LMDB store's write lock: every put into the store waits for it."""

    def __init__(self, path: str) -> None:
        script = ("import lmdb, sys\n"
                  f"env = lmdb.open({path!r}, subdir=True, max_dbs=64, map_size=1 << 30)\n"
                  "txn = env.begin(write=True)\n"
                  "print('held', flush=True)\n"
                  "sys.stdin.readline()\n"
                  "txn.abort()\n")
        self.proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
            self.proc.wait(30)


def _lmdb_connectors(tmp_path, **worker_extra):
    """A scheduler and a worker connector on an LMDB store (whose write lock :class:`_WriterLock` can hold), the
    worker's paged caches registered: ``(store path, scheduler, worker, caches)``."""
    path = str(tmp_path / "store")
    sched = make_connector(f"lmdb://{path}", KVConnectorRole.SCHEDULER)
    worker = make_connector(f"lmdb://{path}", KVConnectorRole.WORKER, **worker_extra)
    caches = paged_caches()
    worker.register_kv_caches(caches)
    return path, sched, worker, caches


def test_a_step_does_not_wait_for_storage_and_the_write_uses_the_connectors_own_copy(tmp_path):
    """wait_for_save returns once the prompt is copied out of the paged cache, while the store cannot take a
    write at all (another process holds the LMDB write lock); vLLM then reuses the blocks, and once the store is
    free the prompt's own KV is written, not what the blocks hold now."""
    path, sched, worker, caches = _lmdb_connectors(tmp_path)
    lock = _WriterLock(path)
    result: dict[str, Any] = {}
    try:
        first = threading.Thread(target=lambda: result.setdefault(
            "kv", _prefill_step(sched, worker, caches, "A", PROMPT_A, BLOCKS_A, 11)), daemon=True)
        first.start()
        first.join(20)
        assert not first.is_alive(), "the step waited for the store"
        kv_a = result["kv"]
        assert not worker.wait_for_saves_written(0.3)  # the write waits for the lock; the step did not
        assert sched.ns.lookup(PROMPT_A) == 0
        for name in LAYERS:  # vLLM hands A's blocks to another request
            caches[name].fill_(7.0)
    finally:
        lock.release()
    assert worker.wait_for_saves_written(30)
    assert torch.equal(torch.from_numpy(sched.ns.get(PROMPT_A)), kv_a)
    worker.shutdown()
    sched.shutdown()


def test_saves_waiting_past_save_queue_bytes_hold_the_next_step(tmp_path):
    """Back-pressure: with room for one prompt, the next step's wait_for_save waits for the previous write."""
    path, sched, worker, caches = _lmdb_connectors(tmp_path, save_queue_bytes="1KiB")
    lock = _WriterLock(path)
    result: dict[str, Any] = {}
    try:
        kv_a = _prefill_step(sched, worker, caches, "A", PROMPT_A, BLOCKS_A, 12)  # admitted: the queue was empty
        second = threading.Thread(target=lambda: result.setdefault(
            "kv", _prefill_step(sched, worker, caches, "B", PROMPT_C, BLOCKS_B, 13)), daemon=True)
        second.start()
        second.join(0.5)
        assert second.is_alive()  # B's step waits for room: A is still not written
    finally:
        lock.release()
    second.join(30)
    assert not second.is_alive() and "kv" in result
    assert worker.wait_for_saves_written(30)
    assert torch.equal(torch.from_numpy(sched.ns.get(PROMPT_A)), kv_a)
    assert torch.equal(torch.from_numpy(sched.ns.get(PROMPT_C)), result["kv"])
    worker.shutdown()
    sched.shutdown()


def test_a_failed_background_write_is_logged_and_inference_goes_on(tmp_path, caplog):
    url = f"file://{tmp_path}/store"
    kvfs.open(url).close()
    sched = make_connector(url, KVConnectorRole.SCHEDULER)
    worker = make_connector(url + "?readonly=true", KVConnectorRole.WORKER)
    caches = paged_caches()
    worker.register_kv_caches(caches)
    with caplog.at_level("WARNING"):
        _prefill_step(sched, worker, caches, "A", PROMPT_A, BLOCKS_A, 14)
        assert worker.wait_for_saves_written(30)
    assert "could not store the KV of request A" in caplog.text
    assert sched.ns.lookup(PROMPT_A) == 0
    worker.shutdown()
    sched.shutdown()


def test_save_in_background_false_writes_before_the_step_ends(url):
    sched = make_connector(url, KVConnectorRole.SCHEDULER)
    worker = make_connector(url, KVConnectorRole.WORKER, save_in_background="false")
    caches = paged_caches()
    worker.register_kv_caches(caches)
    kv_a = _prefill_step(sched, worker, caches, "A", PROMPT_A, BLOCKS_A, 15)
    assert torch.equal(torch.from_numpy(sched.ns.get(PROMPT_A)), kv_a)  # no wait: written in wait_for_save
    kv_c = _prefill_step(sched, worker, caches, "C", PROMPT_C, BLOCKS_B, 16)
    assert torch.equal(torch.from_numpy(sched.ns.get(PROMPT_C)), kv_c)
    assert worker._staging.allocated == 1 and worker._staging.lent_bytes == 0  # C reused A's staging buffer
    with pytest.raises(ValueError, match="true or false"):
        make_connector(url, KVConnectorRole.WORKER, save_in_background="sometimes")
    worker.shutdown()
    sched.shutdown()


def test_staging_buffers_are_reused_but_never_while_a_write_still_reads_one(tmp_path):
    """The host copy of a saved prompt goes back to the connector's staging pool once its write is over: the next
    save fills the same buffer (no new memory to fault in), and a save made while an earlier write still waits
    gets a buffer of its own, so both prompts are stored exactly."""
    path, sched, worker, caches = _lmdb_connectors(tmp_path)
    pool = worker._staging
    lock = _WriterLock(path)
    try:
        kv_a = _prefill_step(sched, worker, caches, "A", PROMPT_A, BLOCKS_A, 21)
        kv_c = _prefill_step(sched, worker, caches, "C", PROMPT_C, BLOCKS_B, 22)  # A's write still waits
        assert pool.allocated == 2 and pool.lent_bytes > 0
    finally:
        lock.release()
    assert worker.wait_for_saves_written(30)
    assert pool.lent_bytes == 0
    prompt_d = list(range(9000, 9100))
    kv_d = _prefill_step(sched, worker, caches, "D", prompt_d, BLOCKS_A, 23)
    assert worker.wait_for_saves_written(30)
    assert pool.allocated == 2  # D reused a buffer
    for prompt, kv in ((PROMPT_A, kv_a), (PROMPT_C, kv_c), (prompt_d, kv_d)):
        assert torch.equal(torch.from_numpy(sched.ns.get(prompt)), kv)
    worker.shutdown()
    assert pool.kept_bytes == 0  # shutdown frees them
    sched.shutdown()

