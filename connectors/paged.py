"""Scatter kvfs chunk tensors into an engine's paged KV cache, and gather them back.

A kvfs chunk holds ``[layers, planes, tokens, heads, dim]`` (planes = 2 for
K and V; MLA: ``[layers, 1, tokens, 1, latent]``). An engine keeps its KV in
fixed-size *blocks* (pages) and says where each token lives with a *slot
mapping*: ``slot = block_id * block_size + offset``, one slot per token, a
negative slot meaning "skip this token" (vLLM pads with -1). A *block table*
(the block ids of one request, in order) gives the slot mapping of token
positions ``[start, end)`` through :func:`slot_mapping`.

Every supported layout is first turned into a strided *logical view* (no
copy) of shape ``[planes, blocks, block_size, heads, dim]`` for layouts that
keep one tensor per layer, or ``[layers, planes, blocks, block_size, heads,
dim]`` for layouts that keep every layer in one tensor. A scatter or gather
is then one advanced-indexing operation on that view: one per layer for
per-layer caches, one for all layers of a whole-cache tensor on a device. No
Python loop over tokens. On CPU, the layers of a scatter run side by side on
kvfs's worker pool (numpy's fancy assignment releases the GIL, and rows of a
few hundred bytes are bound by one core's stores, not by memory bandwidth);
caches whose blocks are not laid out in token order (HND, ``kv_concat``,
SGLang ``page_head``) are copied a block at a time, which numpy orders by the
block's memory layout.

==========================  =====================================================  ==============
layout                      engine tensor (shape as the engine allocates it)       one tensor per
==========================  =====================================================  ==============
``flash``                   vLLM FlashAttention/Triton/xFormers (vLLM <= 0.10):    layer
                            ``[2, num_blocks, block_size, heads, dim]``; NHD is
                            contiguous, HND is the same logical shape with the
                            strides of ``[2, num_blocks, heads, block_size,
                            dim]`` (what vLLM hands a connector): both work
``flash_hnd``               the HND tensor as physically allocated:                layer
                            ``[2, num_blocks, heads, block_size, dim]``
``flashinfer``              vLLM FlashInfer: ``[num_blocks, 2, block_size,         layer
                            heads, dim]``
``kv_concat``               vLLM >= 0.33 FlashAttention: ``[num_blocks, heads,     layer
                            block_size, 2 * dim]``, K in ``[..., :dim]``, V in
                            ``[..., dim:]``
``mla``                     vLLM MLA: ``[num_blocks, block_size, latent]``         layer
``sglang_layer_first``      SGLang ``MHATokenToKVPoolHost`` ``layer_first``:       cache
                            ``[2, layers, size, heads, dim]``
``sglang_page_first``       ``page_first``: ``[2, size, layers, heads, dim]``      cache
``sglang_page_first_direct``  ``page_first_direct``: ``[2, pages, layers,          cache
                            page_size, heads, dim]``
``sglang_page_head``        ``page_head``: ``[2, pages, heads, page_size,          cache
                            layers, dim]``
``sglang_mla_layer_first``  SGLang ``MLATokenToKVPoolHost`` ``layer_first``:       cache
                            ``[layers, size, 1, latent]``
``sglang_mla_page_first``   ``page_first``: ``[size, layers, 1, latent]``          cache
``sglang_mla_page_first_direct``  ``page_first_direct``: ``[pages, layers,         cache
                            page_size, 1, latent]``
==========================  =====================================================  ==============

SGLang's ``layer_first`` / ``page_first`` pools index tokens directly (a slot
is a host index, the block size is 1); the ``*_direct`` and ``page_head``
pools have pages of ``page_size`` tokens and slots ``page * page_size +
offset``, exactly like vLLM's.

    cache = PagedCache(kv_caches, "flash")            # list of per-layer tensors
    slots = slot_mapping(block_ids, block_size=16, start=0, end=n)
    cache.scatter(chunk_kv, slots)                    # chunk_kv [layers, 2, n, heads, dim]
    back = cache.gather(slots)                        # the same tensor

Slots are checked once per mapping (:meth:`PagedCache.index`, two or three
device syncs for a device tensor; reuse the result for every layer): out of
range is an ``IndexError`` naming the slot count, never a silent write
elsewhere.
Gathering a negative slot leaves that token of ``out`` as it was (zeros when
``gather`` allocates ``out``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from kvfs import _pool
from kvfs.errors import InvalidInput

_RAW_TORCH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

__all__ = ["LAYOUTS", "PagedCache", "SlotIndex", "gather", "logical_view", "scatter", "slot_mapping"]


@dataclass(frozen=True)
class _Layout:
    name: str
    per_layer: bool  # one tensor per layer (vLLM) or one tensor holding every layer (SGLang host pools)
    mla: bool
    view: Callable[[torch.Tensor], torch.Tensor]  # engine tensor -> logical view (no copy)
    shape: str  # for error messages


def _kv_concat(t: torch.Tensor) -> torch.Tensor:
    nb, h, bs, c = t.shape
    if c % 2:
        raise InvalidInput(f"kv_concat cache's last dim {c} is not 2 * head_dim")
    return t.unflatten(3, (2, c // 2)).permute(3, 0, 2, 1, 4)


_LAYOUT_LIST = [
    _Layout("flash", True, False, lambda t: t, "[2, num_blocks, block_size, heads, dim]"),
    _Layout("flash_hnd", True, False, lambda t: t.permute(0, 1, 3, 2, 4), "[2, num_blocks, heads, block_size, dim]"),
    _Layout("flashinfer", True, False, lambda t: t.permute(1, 0, 2, 3, 4), "[num_blocks, 2, block_size, heads, dim]"),
    _Layout("kv_concat", True, False, _kv_concat, "[num_blocks, heads, block_size, 2 * dim]"),
    _Layout("mla", True, True, lambda t: t[None, :, :, None, :], "[num_blocks, block_size, latent]"),
    _Layout("sglang_layer_first", False, False, lambda t: t.permute(1, 0, 2, 3, 4)[:, :, :, None],
            "[2, layers, size, heads, dim]"),
    _Layout("sglang_page_first", False, False, lambda t: t.permute(2, 0, 1, 3, 4)[:, :, :, None],
            "[2, size, layers, heads, dim]"),
    _Layout("sglang_page_first_direct", False, False, lambda t: t.permute(2, 0, 1, 3, 4, 5),
            "[2, pages, layers, page_size, heads, dim]"),
    _Layout("sglang_page_head", False, False, lambda t: t.permute(4, 0, 1, 3, 2, 5),
            "[2, pages, heads, page_size, layers, dim]"),
    _Layout("sglang_mla_layer_first", False, True, lambda t: t[:, None, :, None],
            "[layers, size, 1, latent]"),
    _Layout("sglang_mla_page_first", False, True, lambda t: t.transpose(0, 1)[:, None, :, None],
            "[size, layers, 1, latent]"),
    _Layout("sglang_mla_page_first_direct", False, True, lambda t: t.transpose(0, 1)[:, None],
            "[pages, layers, page_size, 1, latent]"),
]
#: every supported layout, by name
LAYOUTS: dict[str, _Layout] = {lay.name: lay for lay in _LAYOUT_LIST}
_NDIM = {lay.name: lay.shape.count(",") + 1 for lay in _LAYOUT_LIST}


def _layout(name: str) -> _Layout:
    lay = LAYOUTS.get(name)
    if lay is None:
        raise InvalidInput(f"unknown paged layout {name!r}; use one of {', '.join(LAYOUTS)}")
    return lay


def logical_view(cache: torch.Tensor, layout: str, page_size: int | None = None) -> torch.Tensor:
    """The engine tensor as ``[planes, blocks, block_size, heads, dim]`` (per-layer layouts) or
    ``[layers, planes, blocks, block_size, heads, dim]`` (whole-cache layouts); shares memory.

    ``page_size``: for the token-indexed SGLang layouts (``layer_first``, ``page_first``), see the token
    axis as pages of this many tokens (slots stay token indices), so that whole pages move at once."""
    lay = _layout(layout)
    if not isinstance(cache, torch.Tensor):
        raise InvalidInput(f"a {layout} cache must be a torch tensor, got {type(cache).__name__}")
    if cache.dim() != _NDIM[layout]:
        raise InvalidInput(f"a {layout} cache is {lay.shape}; got shape {tuple(cache.shape)}")
    v = lay.view(cache)
    planes = v.shape[-5]
    if planes != (1 if lay.mla else 2) or (lay.mla and v.shape[-2] != 1):
        raise InvalidInput(f"a {layout} cache is {lay.shape}; got shape {tuple(cache.shape)}")
    if page_size is not None and page_size != 1:
        size = v.shape[-4] * v.shape[-3]
        if v.shape[-3] != 1 or page_size <= 0 or size % page_size:
            raise InvalidInput(f"page_size={page_size} applies to token-indexed layouts whose size is a multiple "
                               f"of it; {layout} cache {tuple(cache.shape)}")
        v = v.select(-3, 0).unflatten(-3, (size // page_size, page_size))
    return v


def slot_mapping(block_table: Any, block_size: int, start: int = 0, end: int | None = None, *,
                 device: Any = None) -> torch.Tensor:
    """Slots (``block_id * block_size + offset``, int64) of token positions ``[start, end)`` of a request
    whose blocks are ``block_table`` (block ids in token order; a negative id gives negative slots)."""
    blocks = torch.as_tensor(np.asarray(block_table, dtype=np.int64) if not isinstance(block_table, torch.Tensor)
                             else block_table, dtype=torch.int64)
    if device is not None:
        blocks = blocks.to(device)
    end = blocks.numel() * block_size if end is None else end
    if block_size <= 0 or not 0 <= start <= end:
        raise InvalidInput(f"bad slot range [{start}, {end}) with block size {block_size}")
    if blocks.numel() * block_size < end:
        raise InvalidInput(f"{blocks.numel()} blocks of {block_size} tokens cannot hold {end} tokens")
    pos = torch.arange(start, end, dtype=torch.int64, device=blocks.device)
    b = blocks[pos // block_size]
    return torch.where(b >= 0, b * block_size + pos % block_size, torch.full_like(b, -1))


@dataclass(frozen=True)
class SlotIndex:
    """A checked slot mapping, ready to index one cache geometry (reuse it for every layer).

    When the kept slots start with whole blocks filled in order (what a block table gives: ``block *
    block_size + 0 .. block_size - 1``), those ``aligned`` tokens move a block at a time (``blocks``);
    the rest (a partial last block, or any other mapping) moves a token at a time.
    """

    ntokens: int  # tokens in the chunk tensor (negative slots included)
    keep: torch.Tensor | None  # token indices with a slot, or None when every token has one
    flat: torch.Tensor  # the slots that are kept
    block: torch.Tensor  # flat // block_size
    offset: torch.Tensor  # flat % block_size
    aligned: int = 0  # leading kept tokens that fill whole blocks in order
    blocks: torch.Tensor | None = None  # their block ids


class PagedCache:
    """An engine's paged KV cache in one of :data:`LAYOUTS`: one tensor (whole-cache layouts, or a single
    layer of a per-layer layout) or a sequence of per-layer tensors.

    ``scatter``/``gather`` move ``[layers, planes, tokens, heads, dim]`` (all layers) or, with
    ``layer=i``, ``[planes, tokens, heads, dim]``. Views and slot indices are computed once and reused.
    ``page_size`` (SGLang ``layer_first``/``page_first`` pools): the pool's page size, so that the
    whole pages of a mapping move a page at a time (slots are still token indices).
    """

    def __init__(self, cache: torch.Tensor | Sequence[torch.Tensor], layout: str, *,
                 page_size: int | None = None) -> None:
        self.layout = _layout(layout)
        if isinstance(cache, torch.Tensor):
            tensors = [cache]
            self._single = True
        else:
            tensors = list(cache)
            self._single = False
            if not self.layout.per_layer:
                raise InvalidInput(f"a {layout} cache is one tensor holding every layer, not a list")
            if not tensors:
                raise InvalidInput("no per-layer cache tensors given")
        self._views = [logical_view(t, layout, page_size) for t in tensors]
        v0 = self._views[0]
        geo = tuple(v0.shape[-5:])
        for i, v in enumerate(self._views):
            if tuple(v.shape[-5:]) != geo or v.dtype != v0.dtype or v.device != v0.device:
                raise InvalidInput(f"layer {i}'s cache {tuple(tensors[i].shape)} {tensors[i].dtype} differs from "
                                   f"layer 0's {tuple(tensors[0].shape)} {tensors[0].dtype}")
        self.planes, self.num_blocks, self.block_size, self.heads, self.dim = geo
        self.num_layers = len(self._views) if self.layout.per_layer else v0.shape[0]
        self.dtype = v0.dtype
        self.device = v0.device
        self.num_slots = self.num_blocks * self.block_size
        # views whose (blocks, block_size) dims merge into one slot dim are indexed with one index tensor
        self._flat = [_merge_slots(v) for v in self._views]

    def __repr__(self) -> str:
        return (f"PagedCache({self.layout.name}, layers={self.num_layers}, blocks={self.num_blocks}, "
                f"block_size={self.block_size}, heads={self.heads}, dim={self.dim}, {self.dtype}, {self.device})")

    # ------------------------------------------------------------------------------------------ slots
    def index(self, slots: Any) -> SlotIndex:
        """Check a slot mapping (one int per token, negative = skip) and precompute its indices."""
        if isinstance(slots, SlotIndex):
            return slots
        s = slots if isinstance(slots, torch.Tensor) else torch.as_tensor(np.asarray(slots, dtype=np.int64))
        if s.dim() != 1:
            raise InvalidInput(f"a slot mapping is one slot per token (1-D), got shape {tuple(s.shape)}")
        if s.dtype not in (torch.int64, torch.int32):
            raise InvalidInput(f"slots must be integers, got {s.dtype}")
        s = s.to(device=self.device, dtype=torch.int64)
        n = s.numel()
        keep = None
        if not n:
            return SlotIndex(0, None, s, s, s)
        bs = self.block_size
        lo, hi = (int(x) for x in torch.stack(torch.aminmax(s)).tolist())  # one sync on a device
        if hi >= self.num_slots:
            raise IndexError(f"slot {hi} is out of range: the cache has {self.num_blocks} blocks of "
                             f"{bs} tokens ({self.num_slots} slots)")
        if lo < 0:
            keep = torch.nonzero(s >= 0).flatten()
            s = s.index_select(0, keep)
        aligned, blocks = 0, None
        whole = (s.numel() // bs) * bs
        if bs > 1 and whole:
            head = s[:whole].view(-1, bs)
            in_order = (head == head[:, :1] + torch.arange(bs, device=s.device)).all()
            if bool(in_order & (head[:, 0] % bs == 0).all()):  # one more sync on a device
                aligned, blocks = whole, head[:, 0] // bs
        return SlotIndex(n, keep, s, s // bs, s % bs, aligned, blocks)

    # ------------------------------------------------------------------------------------------ scatter
    def scatter(self, kv: torch.Tensor, slots: Any, *, layer: int | None = None) -> None:
        """Write ``kv`` into the cache at ``slots`` (negative slots skipped)."""
        idx = self.index(slots)
        kv = self._check_kv(kv, idx.ntokens, layer)
        if idx.keep is not None:
            kv = kv.index_select(-3, idx.keep)
        if not idx.flat.numel():
            return
        pairs = self._sources(layer)
        jobs = list(zip(pairs, self._per_target(kv, layer, len(pairs))))
        if self.device.type == "cpu" and kv.device.type == "cpu":
            # one job per layer, over kvfs's worker pool: numpy's fancy assignment releases the GIL, and a
            # scatter of 256-byte rows is bound by one core's store latency, not by memory bandwidth
            jobs = self._per_layer_jobs(jobs)
            _pool.run_all([lambda v=v, f=f, s=s: self._scatter_one(v, f, s, idx) for (v, f), s in jobs])
            return
        for (view, flat), src in jobs:
            self._scatter_one(view, flat, src, idx)

    def _scatter_one(self, view: torch.Tensor, flat: torch.Tensor | None, src: torch.Tensor, idx: SlotIndex) -> None:
        a = idx.aligned
        if a:  # whole blocks: a block at a time (contiguous runs in NHD and HND alike)
            whole = src[..., :a, :, :].unflatten(-3, (-1, self.block_size))
            if view.device.type == "cpu" and whole.device.type == "cpu" and _layers_inside_blocks(view):
                _copy_blocks(view, whole, idx.blocks.tolist(), range(whole.shape[-4]))
            else:
                _put(view, (idx.blocks, slice(None), slice(None), slice(None)), whole)
            if a == src.shape[-3]:
                return
            src = src[..., a:, :, :]
        if flat is not None:
            _put(flat, (idx.flat[a:], slice(None), slice(None)), src)
        else:
            _put(view, (idx.block[a:], idx.offset[a:], slice(None), slice(None)), src)

    # ------------------------------------------------------------------------------------------ gather
    def gather(self, slots: Any, *, layer: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read the cache at ``slots`` into ``out`` (allocated on the cache's device if None)."""
        idx = self.index(slots)
        shape = self._kv_shape(idx.ntokens, layer)
        if out is None:
            alloc = torch.zeros if idx.keep is not None else torch.empty
            out = alloc(shape, dtype=self.dtype, device=self.device)
        else:
            self._check_kv(out, idx.ntokens, layer, what="out")
        pairs = self._sources(layer)
        jobs = list(zip(pairs, self._per_target(out, layer, len(pairs))))
        if self.device.type == "cpu" and out.device.type == "cpu":
            # per-layer caches: one job per layer over kvfs's worker pool (a whole-cache tensor stays one
            # index_select: split by layer, its output slabs are not contiguous and that measured 8x slower)
            _pool.run_all([lambda v=v, f=f, d=d: self._gather_one(v, f, d, idx) for (v, f), d in jobs])
        else:
            for (view, flat), d in jobs:
                self._gather_one(view, flat, d, idx)
        return out

    def _gather_one(self, view: torch.Tensor, flat: torch.Tensor | None, d: torch.Tensor, idx: SlotIndex) -> None:
        if idx.keep is None and d.device == view.device:
            self._gather_into(view, flat, idx, d)
            return
        got = torch.empty(d.shape[:-3] + (idx.flat.numel(),) + d.shape[-2:], dtype=d.dtype, device=view.device)
        self._gather_into(view, flat, idx, got)
        if idx.keep is not None:
            raw = _RAW_TORCH[d.element_size()]  # same bytes as raw integers: index_copy_ has no fp8 kernels
            d.view(raw).index_copy_(d.dim() - 3, idx.keep.to(d.device), got.to(d.device).view(raw))
        else:
            d.copy_(got)

    def _per_layer_jobs(self, jobs: list) -> list:
        """A whole-cache tensor's single job split into one per layer (not for caches whose blocks hold every
        layer: those are split by blocks instead, see :func:`_copy_blocks`)."""
        if len(jobs) == 1 and not self.layout.per_layer and jobs[0][1].dim() == 5 \
                and not _layers_inside_blocks(jobs[0][0][0]):
            (view, flat), t = jobs[0]
            return [((view[i], None if flat is None else flat[i]), t[i]) for i in range(t.shape[0])]
        return jobs

    def _gather_into(self, view: torch.Tensor, flat: torch.Tensor | None, idx: SlotIndex, d: torch.Tensor) -> None:
        """Every kept slot of ``view`` -> ``d`` (``[..., planes, kept tokens, heads, dim]``, same device).

        ``index_select(..., out=d)`` where the cache's rows (a token's heads x dim, or a whole block) are
        contiguous: one pass, no temporary. Whole blocks of other strides (HND, kv_concat, page_head) are
        copied a block at a time on CPU, through an advanced-indexing temporary on a device.
        """
        if flat is not None and _rows_contiguous(flat, 2):
            _select(flat, flat.dim() - 3, idx.flat, d)
            return
        a = idx.aligned
        if a:
            head = d[..., :a, :, :].unflatten(-3, (-1, self.block_size))
            if _rows_contiguous(view, 3):
                _select(view, view.dim() - 4, idx.blocks, head)
            elif view.device.type == "cpu" and head.device.type == "cpu":
                # whole blocks a block at a time (HND, kv_concat, page_head): 2-5x faster here than
                # torch's advanced indexing into a temporary
                _copy_blocks(head, view, range(len(idx.blocks)), idx.blocks.tolist())
            else:
                head.copy_(view[..., idx.blocks, :, :, :])
            if a == d.shape[-3]:
                return
        rest = d[..., a:, :, :]
        if flat is not None:
            rest.copy_(flat[..., idx.flat[a:], :, :])
        else:
            rest.copy_(view[..., idx.block[a:], idx.offset[a:], :, :])

    # ------------------------------------------------------------------------------------------ helpers
    def _one_layer(self, layer: int | None) -> bool:
        return layer is not None or (self._single and self.layout.per_layer)

    def _kv_shape(self, ntokens: int, layer: int | None) -> tuple[int, ...]:
        one = (self.planes, ntokens, self.heads, self.dim)
        return one if self._one_layer(layer) else (self.num_layers,) + one

    def _check_kv(self, kv: torch.Tensor, ntokens: int, layer: int | None, what: str = "kv") -> torch.Tensor:
        if not isinstance(kv, torch.Tensor):
            raise InvalidInput(f"{what} must be a torch tensor, got {type(kv).__name__}")
        if layer is not None and not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} is out of range: the cache has {self.num_layers} layers")
        want = self._kv_shape(ntokens, layer)
        got = tuple(kv.shape)
        if got != want and not (self._one_layer(layer) and got == (1,) + want):
            raise InvalidInput(f"{what} shape {got} != {want} ({'' if self._one_layer(layer) else 'layers, '}"
                               f"planes, tokens, heads, dim) for {ntokens} slots in {self!r}")
        if kv.dtype != self.dtype:
            raise InvalidInput(f"{what} dtype {kv.dtype} differs from the cache's {self.dtype}")
        if what == "kv" and kv.device != self.device:
            kv = kv.to(self.device, non_blocking=True)
        return kv

    def _sources(self, layer: int | None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(view, merged view or None) per target: one per layer tensor, or the whole-cache tensor."""
        if self.layout.per_layer:
            if layer is not None:
                return [(self._views[layer], self._flat[layer])]
            return list(zip(self._views, self._flat))
        v, f = self._views[0], self._flat[0]
        if layer is not None:
            return [(v[layer], None if f is None else f[layer])]
        return [(v, f)]

    def _per_target(self, kv: torch.Tensor, layer: int | None, n: int) -> list[torch.Tensor]:
        """Split a kv/out tensor to match :meth:`_sources`: per layer, or whole for a whole-cache tensor."""
        if self._one_layer(layer):
            return [kv[0] if kv.dim() == 5 else kv]
        if self.layout.per_layer:
            return [kv[i] for i in range(n)]
        return [kv]


def _put(dst: torch.Tensor, index: tuple, src: torch.Tensor) -> None:
    """``dst[..., *index] = src``: one vectorized assignment.

    On CPU through numpy's fancy assignment on views that share the tensors' memory (same bytes, raw
    integer dtype): it copies whole rows at a time where torch's CPU index kernels go element by
    element (2-3x faster on HND strides here). On a device, torch's ``index_put_``.
    """
    if dst.device.type == "cpu" and src.device.type == "cpu":
        raw = _RAW_TORCH[dst.element_size()]
        np_index = (Ellipsis,) + tuple(i.numpy() if isinstance(i, torch.Tensor) else i for i in index)
        dst.view(raw).numpy()[np_index] = src.view(raw).numpy()
        return
    dst[(Ellipsis,) + index] = src


def _layers_inside_blocks(view: torch.Tensor) -> bool:
    """A whole-cache view ``[layers, planes, blocks, block_size, heads, dim]`` whose blocks hold every layer
    and whose (heads, dim) rows are split (SGLang ``page_head``: a token's layers interleaved in ``dim``-sized
    runs; not ``page_first``, whose token rows hold every head)."""
    return view.dim() == 6 and view.shape[0] > 1 and view.stride(0) < view.stride(2) \
        and not _rows_contiguous(view, 2)


def _copy_blocks(dst: torch.Tensor, src: torch.Tensor, dst_blocks, src_blocks) -> None:
    """``dst[..., i, :, :, :] = src[..., j, :, :, :]`` for each pair of block indices, on CPU, one block at a
    time (the blocks split over kvfs's workers): numpy then orders each block's copy by its memory layout. For scatters into SGLang ``page_head``
    (whose pages hold every layer, 256-byte runs) this measured 0.52-0.62x a contiguous copy against
    0.46-0.51x for one fancy assignment (which stays faster for the other layouts' scatters); for gathers
    out of blocks whose tokens are not contiguous (HND, ``kv_concat``, ``page_head``) 0.46-0.56x against
    0.12-0.29x for torch's advanced indexing into a temporary."""
    raw = _RAW_TORCH[dst.element_size()]
    d = dst.view(raw).numpy()
    s = src.view(raw).numpy()
    rows = (slice(None),) * 3
    pairs = list(zip(dst_blocks, src_blocks))

    def copy(part) -> None:
        for i, j in part:
            np.copyto(d[(Ellipsis, i) + rows], s[(Ellipsis, j) + rows])

    # split over kvfs's workers (numpy copies release the GIL; inline when called from a worker)
    step = max(1, -(-len(pairs) // _pool.workers()))
    _pool.run_all([lambda lo=lo: copy(pairs[lo : lo + step]) for lo in range(0, len(pairs), step)])


def _select(src: torch.Tensor, dim: int, index: torch.Tensor, out: torch.Tensor) -> None:
    """``out = src.index_select(dim, index)`` with ``out=`` (whole rows at a time, no temporary); one call per
    leading slab when ``out`` is a strided part of a bigger tensor (a partial last block, one of K/V)."""
    if out.is_contiguous():
        torch.index_select(src, dim, index, out=out)
        return
    for pos in np.ndindex(*out.shape[:dim]):
        o = out[pos]
        if o.is_contiguous():
            torch.index_select(src[pos], 0, index, out=o)
        else:
            o.copy_(src[pos].index_select(0, index))


def _rows_contiguous(v: torch.Tensor, ndims: int) -> bool:
    """The last ``ndims`` dims of ``v`` are laid out contiguously (row-major)."""
    expect = 1
    for size, stride in zip(reversed(v.shape[-ndims:]), reversed(v.stride()[-ndims:])):
        if size != 1 and stride != expect:
            return False
        expect *= size
    return True


def _merge_slots(v: torch.Tensor) -> torch.Tensor | None:
    """``v`` with its (blocks, block_size) dims merged into one slot dim, or None where strides forbid it."""
    nb, bs = v.shape[-4], v.shape[-3]
    if bs != 1 and nb != 1 and v.stride(-4) != bs * v.stride(-3):
        return None
    shape = v.shape[:-4] + (nb * bs,) + v.shape[-2:]
    slot_stride = v.stride(-3) if bs != 1 else v.stride(-4)
    strides = v.stride()[:-4] + (slot_stride,) + v.stride()[-2:]
    return v.as_strided(shape, strides, v.storage_offset())


def scatter(kv: torch.Tensor, cache: torch.Tensor | Sequence[torch.Tensor], slots: Any, *, layout: str,
            layer: int | None = None) -> None:
    """Write a chunk tensor into a paged cache at ``slots``; see :class:`PagedCache` for shapes."""
    PagedCache(cache, layout).scatter(kv, slots, layer=layer)


def gather(cache: torch.Tensor | Sequence[torch.Tensor], slots: Any, *, layout: str, layer: int | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Read ``[layers, planes, tokens, heads, dim]`` (or one layer) out of a paged cache at ``slots``."""
    return PagedCache(cache, layout).gather(slots, layer=layer, out=out)
