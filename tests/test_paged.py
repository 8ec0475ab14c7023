"""Paged-block scatter/gather (kvfs.connectors.paged) for every engine layout.

Each layout is checked against a reference written from the engine's own
description of its tensor (the physical shape it allocates), one token at a
time, so a wrong logical view cannot pass by agreeing with itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvfs.connectors.paged import LAYOUTS, PagedCache, gather, logical_view, scatter, slot_mapping
from kvfs.errors import InvalidInput

L, H, D, LATENT = 3, 2, 8, 12


def _alloc(layout: str, num_blocks: int, bs: int, dtype=torch.bfloat16):
    """The engine tensor(s) as the engine allocates them, filled with noise."""
    g = torch.Generator().manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    size = num_blocks * bs
    per_layer = {
        "flash": lambda: rnd(2, num_blocks, bs, H, D),
        "flash_hnd": lambda: rnd(2, num_blocks, H, bs, D),
        "flashinfer": lambda: rnd(num_blocks, 2, bs, H, D),
        "kv_concat": lambda: rnd(num_blocks, H, bs, 2 * D),
        "mla": lambda: rnd(num_blocks, bs, LATENT),
    }
    if layout in per_layer:
        return [per_layer[layout]() for _ in range(L)]
    if layout == "flash_hnd_strided":  # vLLM hands HND caches over as [2, nb, bs, H, D] with HND strides
        return [rnd(2, num_blocks, H, bs, D).permute(0, 1, 3, 2, 4) for _ in range(L)]
    return {
        "sglang_layer_first": lambda: rnd(2, L, size, H, D),
        "sglang_page_first": lambda: rnd(2, size, L, H, D),
        "sglang_page_first_direct": lambda: rnd(2, num_blocks, L, bs, H, D),
        "sglang_page_head": lambda: rnd(2, num_blocks, H, bs, L, D),
        "sglang_mla_layer_first": lambda: rnd(L, size, 1, LATENT),
        "sglang_mla_page_first": lambda: rnd(size, L, 1, LATENT),
        "sglang_mla_page_first_direct": lambda: rnd(num_blocks, L, bs, 1, LATENT),
    }[layout]()


def _ref_token(layout: str, cache, layer: int, slot: int, bs: int) -> torch.Tensor:
    """One token's KV ``[planes, heads, dim]`` read straight from the engine tensor."""
    b, o = divmod(slot, bs)
    if layout in ("flash", "flash_hnd_strided"):
        return cache[layer][:, b, o]
    if layout == "flash_hnd":
        return cache[layer][:, b, :, o]
    if layout == "flashinfer":
        return cache[layer][b, :, o]
    if layout == "kv_concat":
        t = cache[layer][b, :, o]  # [H, 2D]
        return torch.stack([t[:, :D], t[:, D:]])
    if layout == "mla":
        return cache[layer][b, o][None, None]
    if layout == "sglang_layer_first":
        return cache[:, layer, slot]
    if layout == "sglang_page_first":
        return cache[:, slot, layer]
    if layout == "sglang_page_first_direct":
        return cache[:, b, layer, o]
    if layout == "sglang_page_head":
        return cache[:, b, :, o, layer]
    if layout == "sglang_mla_layer_first":
        return cache[layer, slot][None]
    if layout == "sglang_mla_page_first":
        return cache[slot, layer][None]
    if layout == "sglang_mla_page_first_direct":
        return cache[b, layer, o][None]
    raise AssertionError(layout)


ALL = list(LAYOUTS) + ["flash_hnd_strided"]
TOKEN_INDEXED = {"sglang_layer_first", "sglang_page_first", "sglang_mla_layer_first", "sglang_mla_page_first"}


def _geometry(layout: str):
    bs = 1 if layout in TOKEN_INDEXED else 4
    nb = 40 if layout in TOKEN_INDEXED else 10
    return nb, bs


def _kv(layout: str, ntok: int, seed: int) -> torch.Tensor:
    mla = "mla" in layout
    shape = (L, 1, ntok, 1, LATENT) if mla else (L, 2, ntok, H, D)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _name(layout: str) -> str:
    return "flash" if layout == "flash_hnd_strided" else layout


@pytest.mark.parametrize("layout", ALL)
def test_scatter_matches_engine_layout_and_gather_round_trips(layout):
    nb, bs = _geometry(layout)
    cache = _alloc(layout, nb, bs)
    pc = PagedCache(cache, _name(layout))
    assert (pc.num_layers, pc.num_slots) == (L, nb * bs)
    rng = np.random.default_rng(7)
    ntok = 3 * bs + 2 if bs > 1 else 23  # a partial last block
    slots = rng.permutation(nb * bs)[:ntok]
    before = [c.clone() for c in cache] if isinstance(cache, list) else cache.clone()
    kv = _kv(layout, ntok, 3)
    pc.scatter(kv, slots)
    for layer in range(L):
        for t, s in enumerate(slots.tolist()):
            assert torch.equal(_ref_token(layout, cache, layer, s, bs), kv[layer, :, t]), (layer, t, s)
    # every slot not in the mapping is untouched
    untouched = sorted(set(range(nb * bs)) - set(slots.tolist()))
    for layer in range(L):
        for s in untouched[:: max(1, len(untouched) // 25)]:
            assert torch.equal(_ref_token(layout, cache, layer, s, bs), _ref_token(layout, before, layer, s, bs))
    assert torch.equal(pc.gather(slots), kv)
    out = torch.empty_like(kv)
    assert pc.gather(torch.as_tensor(slots), out=out) is out and torch.equal(out, kv)


@pytest.mark.parametrize("layout", ALL)
def test_single_layer_and_negative_slots(layout):
    nb, bs = _geometry(layout)
    cache = _alloc(layout, nb, bs)
    pc = PagedCache(cache, _name(layout))
    ntok = 9
    slots = np.random.default_rng(11).permutation(nb * bs)[:ntok].astype(np.int64)
    slots[[0, 4, 8]] = -1  # vLLM pads slot mappings with -1
    kv = _kv(layout, ntok, 5)
    saved = pc.gather(np.where(slots >= 0, slots, 0))  # what is there before
    pc.scatter(kv[1], slots, layer=1)
    got = pc.gather(slots, layer=1)
    keep = slots >= 0
    assert torch.equal(got[:, torch.from_numpy(keep)], kv[1][:, torch.from_numpy(keep)])
    assert torch.count_nonzero(got[:, torch.from_numpy(~keep)].float()) == 0  # allocated: zeros where skipped
    out = torch.full_like(kv[1], 3.0)
    pc.gather(slots, layer=1, out=out)
    assert torch.equal(out[:, torch.from_numpy(~keep)], torch.full_like(out[:, torch.from_numpy(~keep)], 3.0))
    # other layers untouched
    for layer in (0, 2):
        assert torch.equal(pc.gather(np.where(keep, slots, 0), layer=layer), saved[layer])


@pytest.mark.parametrize("layout", ["flash", "flash_hnd", "kv_concat", "mla", "sglang_page_first_direct"])
def test_block_table_partial_last_block(layout):
    nb, bs = _geometry(layout)
    cache = _alloc(layout, nb, bs)
    block_ids = [7, 2, 9, 0]
    n = 3 * bs + 1  # the fourth block is partly used
    slots = slot_mapping(block_ids, bs, 0, n)
    assert slots.tolist() == [block_ids[p // bs] * bs + p % bs for p in range(n)]
    kv = _kv(layout, n, 9)
    scatter(kv, cache, slots, layout=layout)
    assert torch.equal(gather(cache, slots, layout=layout), kv)
    # a later part of the same request: positions [bs+1, n)
    tail = slot_mapping(block_ids, bs, bs + 1, n)
    assert torch.equal(gather(cache, tail, layout=layout), kv[:, :, bs + 1:])


def test_scatter_is_one_vectorized_assignment_per_layer(monkeypatch):
    """SGLang page_first: the logical view shares memory with the pool; on CPU a scatter is one vectorized
    assignment per layer (the layers run side by side on kvfs's workers), never a loop over tokens."""
    import kvfs.connectors.paged as paged

    cache = _alloc("sglang_page_first", 40, 1)
    v = logical_view(cache, "sglang_page_first")
    assert v.shape == (L, 2, 40, 1, H, D) and v.data_ptr() == cache.data_ptr()
    pc = PagedCache(cache, "sglang_page_first")
    kv = _kv("sglang_page_first", 5, 1)
    calls = []
    orig = paged._put
    monkeypatch.setattr(paged, "_put", lambda *a: (calls.append(a[1]), orig(*a)))
    pc.scatter(kv, [3, 1, 30, 2, 8])
    assert len(calls) == L
    assert torch.equal(cache[:, 30, :], kv[:, :, 2].transpose(0, 1))
    # a per-layer layout: one assignment per layer
    calls.clear()
    flash = _alloc("flash", 4, 4)
    PagedCache(flash, "flash").scatter(_kv("flash", 6, 2), [0, 5, 9, 2, 3, 15])
    assert len(calls) == L


def test_errors_name_what_is_wrong():
    cache = _alloc("flash", 4, 4)
    pc = PagedCache(cache, "flash")
    kv = _kv("flash", 3, 0)
    with pytest.raises(IndexError, match="out of range.*16 slots"):
        pc.scatter(kv, [0, 1, 16])
    with pytest.raises(InvalidInput, match="shape"):
        pc.scatter(kv[:, :, :2], [0, 1, 2])
    with pytest.raises(InvalidInput, match="dtype"):
        pc.scatter(kv.float(), [0, 1, 2])
    with pytest.raises(InvalidInput, match="unknown paged layout"):
        PagedCache(cache, "nope")
    with pytest.raises(InvalidInput, match=r"\[2, num_blocks, block_size, heads, dim\]"):
        PagedCache(torch.zeros(4, 4, 2, 8), "flash")
    with pytest.raises(InvalidInput, match="cannot hold"):
        slot_mapping([1, 2], 4, 0, 9)
    with pytest.raises(InvalidInput, match="1-D"):
        pc.scatter(kv, [[0, 1, 2]])
    # a failed scatter wrote nothing
    assert torch.equal(torch.stack([c for c in cache]), torch.stack(_alloc("flash", 4, 4)))


def test_fp8_and_float32_caches():
    for dtype in (torch.float32, torch.float8_e4m3fn):
        cache = [torch.zeros(2, 6, 4, H, D, dtype=dtype) for _ in range(L)]
        kv = torch.randn(L, 2, 10, H, D).to(dtype)
        slots = torch.randperm(24)[:10]
        scatter(kv, cache, slots, layout="flash")
        assert torch.equal(gather(cache, slots, layout="flash").view(torch.uint8 if dtype != torch.float32
                                                                     else torch.float32),
                           kv.view(torch.uint8 if dtype != torch.float32 else torch.float32))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_gather_with_padded_slots(dtype):
    """vLLM pads slot mappings with -1 and runs fp8 KV caches: the skipped tokens stay as they were."""
    cache = [torch.randn(2, 6, 4, H, D).to(dtype) for _ in range(L)]
    kv = torch.randn(L, 2, 7, H, D).to(dtype)
    slots = torch.tensor([5, -1, 9, 0, -1, 23, 12])
    scatter(kv, cache, slots, layout="flash")
    keep = slots >= 0
    got = gather(cache, slots, layout="flash")
    assert torch.equal(got[:, :, keep].view(torch.uint8), kv[:, :, keep].view(torch.uint8))
    assert not got[:, :, ~keep].view(torch.uint8).any()
    out = torch.full_like(kv.view(torch.uint8), 3).view(dtype)
    gather(cache, slots, layout="flash", layer=2, out=out[2])
    assert torch.equal(out[2][:, keep].view(torch.uint8), kv[2][:, keep].view(torch.uint8))
    assert (out[2][:, ~keep].view(torch.uint8) == 3).all()


def test_empty_mapping_is_a_no_op():
    cache = _alloc("flash", 4, 4)
    pc = PagedCache(cache, "flash")
    pc.scatter(_kv("flash", 0, 0), [])
    assert pc.gather([]).shape == (L, 2, 0, H, D)
    pc.scatter(_kv("flash", 2, 0), [-1, -1])


@pytest.mark.parametrize("layout", [x for x in ALL if x not in TOKEN_INDEXED])
def test_block_table_moves_whole_blocks_in_every_layout(layout):
    """A block table's slots move a block at a time; padding (-1) and a partial last block still exact."""
    nb, bs = _geometry(layout)
    cache = _alloc(layout, nb, bs)
    pc = PagedCache(cache, _name(layout))
    n = 3 * bs + 2
    slots = torch.cat([slot_mapping([6, 1, 8, 3], bs, 0, n), torch.full((5,), -1, dtype=torch.int64)])
    idx = pc.index(slots)
    assert idx.aligned == 3 * bs and idx.blocks.tolist() == [6, 1, 8]
    kv = _kv(layout, n + 5, 13)
    pc.scatter(kv, idx)
    for layer in range(L):
        for t, s in enumerate(slots.tolist()[:n]):
            assert torch.equal(_ref_token(layout, cache, layer, s, bs), kv[layer, :, t]), (layer, t)
    got = pc.gather(idx)
    assert torch.equal(got[:, :, :n], kv[:, :, :n]) and not got[:, :, n:].float().any()
    # block ids not starting at offset 0 are not whole blocks: the token path takes them
    shifted = pc.index(slot_mapping([6, 1], bs, 0, 2 * bs) + 1)
    assert shifted.aligned == 0


@pytest.mark.parametrize("layout", sorted(TOKEN_INDEXED))
def test_token_indexed_pools_with_a_page_size(layout):
    """SGLang layer_first/page_first pools given their page size: slots stay token indices, pages move whole."""
    cache = _alloc(layout, 40, 1)
    pc = PagedCache(cache, layout, page_size=4)
    assert (pc.num_blocks, pc.block_size, pc.num_slots) == (10, 4, 40)
    slots = slot_mapping([7, 2, 5], 4, 0, 10)  # two whole pages and half of a third
    kv = _kv(layout, 10, 17)
    idx = pc.index(slots)
    assert idx.aligned == 8
    pc.scatter(kv, idx)
    for layer in range(L):
        for t, s in enumerate(slots.tolist()):
            assert torch.equal(_ref_token(layout, cache, layer, s, 1), kv[layer, :, t])
    assert torch.equal(pc.gather(slots), kv)
    with pytest.raises(InvalidInput, match="page_size"):
        PagedCache(cache, layout, page_size=7)
