"""Reading chunks (all layers, or some layers across many chunks) into torch tensors on a device.

Three paths, chosen per chunk:

* **CPU**: the store reads and verifies straight into the tensor's memory
  (``torch.from_numpy`` shares it): no copy besides the read itself.
* **CUDA, file backend with kvikio** (``direct``): ``kvikio.CuFile.pread``
  writes each layer's K and V planes straight into the device tensor (GPUDirect
  Storage where present, kvikio's bounce buffers otherwise). Integrity: the
  bytes that landed in device memory are copied back into a pinned buffer and
  each layer is hashed (xxh3-64) against the chunk's layer checksums before
  the layer counts as loaded; a mismatch quarantines the chunk and makes it a
  miss. The header (namespace, key, token ids, shape) is checked on the host
  as for every read. This costs a device->host copy per layer, not a second
  storage read.
* **CUDA, any other backend** (or a partly used chunk): the store reads and
  verifies into a pinned staging buffer from a bounded :class:`PinnedPool`,
  then a non-blocking copy on a side stream moves it to the device. The
  buffer returns to the pool with the copy's event, so the next read can
  fill another buffer while the copy runs.

Every path returns, with the data, a CUDA event (None on CPU): the consumer
makes its stream wait for it (``torch.cuda.current_stream().wait_event``)
and so waits only for the copies it uses.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from kvfs._layers import LayerReader
from kvfs.chunk import check_layer
from kvfs.errors import IntegrityError, InvalidInput
from kvfs.keys import as_tokens

from ._device import RAW_NUMPY, RAW_TORCH, as_device, empty, raw_numpy, torch_dtype
from .pinned import PinnedPool, default_pool

log = logging.getLogger("kvfs")
_AUTO = ("auto", True, False)


def _kvikio_backend(backend: Any) -> bool:
    """The file backend with a working kvikio reads device buffers itself."""
    return bool(getattr(backend, "direct_reads", False)) and getattr(backend, "_kvikio", None) is not None


class DeviceReader:
    """Reads layers of the chunks of one plan into tensors on ``device`` (see the module doc)."""

    def __init__(self, ns: Any, plan: Sequence[Any], device: Any = "cpu", *, pool: PinnedPool | None = None,
                 stream: Any = None, direct: str | bool = "auto") -> None:
        if direct not in _AUTO:
            raise InvalidInput(f"direct={direct!r}: use 'auto', True or False")
        self.ns = ns
        self.spec = ns.spec
        self.plan = list(plan)
        self.base = self.plan[0].start if self.plan else 0
        self.device = as_device(device)
        self.cuda = self.device.type == "cuda"
        self.direct = direct
        self.reader = LayerReader(ns.store, ns.spec, self.plan)
        spec = self.spec
        self.planes = spec.kv_planes
        self.token_layer_bytes = spec.bytes_per_token // spec.num_layers if spec.num_layers else 0
        self._own_pool = False
        self.pool = None
        self.stream = None
        if self.cuda:
            need = spec.chunk_tokens * self.token_layer_bytes  # one chunk's layer must fit a staging buffer
            self.pool = pool if pool is not None else default_pool()
            if self.pool.buffer_bytes < need:
                if pool is not None:
                    raise InvalidInput(f"pinned buffers of {pool.buffer_bytes} bytes cannot hold one chunk layer "
                                       f"({need} bytes); use a pool with larger buffers")
                self.pool, self._own_pool = PinnedPool(need, 3), True
            self.stream = stream if stream is not None else torch.cuda.Stream(self.device)
        #: per item, bytes read straight into device memory (kvikio) and through staging (tests look)
        self.direct_items: set[int] = set()
        self._writes_after: list[Any] = []  # events kvikio writes wait for on the host (order_after_current_stream)

    def order_after_current_stream(self) -> None:
        """Order this reader's later writes into device memory after the work queued so far on the calling
        thread's current stream. Call it once a destination was allocated (or handed over) there: the caching
        allocator gives a block freed on a stream to that stream's next allocation at once, while kernels
        queued before may still use it, and a caller's ``out`` may still be read by its previous request."""
        if not self.cuda:
            return
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        self.stream.wait_event(ev)  # staged copies run on the side stream
        self._writes_after.append(ev)  # kvikio writes are not on a stream: waited for on the host

    # ------------------------------------------------------------------------------------------ fill
    def fill(self, layers: range, dest: torch.Tensor, count: int | None = None) -> tuple[list[bool], Any]:
        """Read ``layers`` of the first ``count`` plan items into ``dest`` (``[len(layers), planes, T, heads,
        dim]`` on the device, contiguous, token axis starting at the plan's first token).

        Returns ``(ok per plan item, event)``: ``event`` (CUDA) completes when the data is in ``dest``.
        Items past ``count`` or failed before are ``False`` and not read.
        """
        count = len(self.plan) if count is None else count
        _check_layers(self.spec, layers)
        if not _rows_contiguous(dest) or dest.device != self.device:
            raise InvalidInput(f"destination must be a tensor on {self.device} whose [tokens, heads, dim] are "
                               "contiguous")
        if not self.cuda:
            raw = raw_numpy(dest)
            dests = [raw[:, :, p.start - self.base : p.end - self.base] if i < count else None
                     for i, p in enumerate(self.plan)]
            return self.reader.read(layers, dests), None
        return self._fill_cuda(layers, dest, count)

    def _fill_cuda(self, layers: range, dest: torch.Tensor, count: int) -> tuple[list[bool], Any]:
        ok = [False] * len(self.plan)
        todo = [i for i in range(count) if not self.reader.failed[i]]
        direct, staged = [], []
        for i in todo:
            src = self.reader.source(i)
            if (src is not None and self.direct in ("auto", True) and self.plan[i].whole
                    and _kvikio_backend(src[0].backend)):
                direct.append(i)
            else:
                staged.append(i)
        if self.direct is True and staged and any(self.reader._opened):
            log.debug("kvfs.gpu: %d chunks not on a kvikio file tier go through pinned staging", len(staged))
        for i, good in zip(direct, self._read_direct(direct, layers, dest)):
            ok[i] = good
        self._read_staged(staged, layers, dest, ok)
        ev = torch.cuda.Event()
        ev.record(self.stream)
        return ok, ev

    def _read_staged(self, idxs: list[int], layers: range, dest: torch.Tensor, ok: list[bool]) -> None:
        """Store -> pinned buffer (verified) -> async copy on the side stream, a group of chunks per buffer."""
        per_token = len(layers) * self.token_layer_bytes
        raw_t = RAW_TORCH[self.spec.itemsize]
        shape_tail = tuple(dest.shape[3:])
        draw = dest.view(raw_t)
        g = 0
        while g < len(idxs):
            # a run of consecutive items that fits one buffer (a single item always fits one layer)
            h = g
            first = self.plan[idxs[g]].start
            while (h < len(idxs) and (h == g or idxs[h] == idxs[h - 1] + 1)
                   and (self.plan[idxs[h]].end - first) * per_token <= self.pool.buffer_bytes):
                h += 1
            if h == g:  # more layers than one buffer holds: read them in slices of layers
                self._read_staged_layers(idxs[g], layers, dest, ok)
                g += 1
                continue
            run = idxs[g:h]
            ntok = self.plan[run[-1]].end - first
            buf = self.pool.acquire()
            try:
                host = buf.tensor[: ntok * per_token].view(raw_t).view((len(layers), self.planes, ntok) + shape_tail)
                hraw = host.numpy().view(RAW_NUMPY[self.spec.itemsize])
                dests: list[Any] = [None] * len(self.plan)
                for i in run:
                    p = self.plan[i]
                    dests[i] = hraw[:, :, p.start - first : p.end - first]
                got = self.reader.read(layers, dests)
                with torch.cuda.stream(self.stream):
                    lo = first - self.base
                    draw[:, :, lo : lo + ntok].copy_(host, non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(self.stream)
            except BaseException:
                buf.release()
                raise
            buf.release(after=ev)
            for i in run:
                ok[i] = got[i]
            g = h

    def _read_staged_layers(self, i: int, layers: range, dest: torch.Tensor, ok: list[bool]) -> None:
        step = max(1, self.pool.buffer_bytes // (self.plan[i].take * self.token_layer_bytes))
        good = True
        for a in range(0, len(layers), step):
            sub = range(layers.start + a, min(layers.stop, layers.start + a + step))
            part = [False] * len(self.plan)
            self._read_staged([i], sub, dest[a : a + len(sub)], part)
            good = good and part[i]
            if not good:
                break
        ok[i] = good

    def _read_direct(self, idxs: list[int], layers: range, dest: torch.Tensor) -> list[bool]:
        """kvikio reads into device memory, then each layer verified on a pinned host copy."""
        from kvfs import _pool

        while idxs and self._writes_after:
            self._writes_after.pop().synchronize()

        def one(i: int) -> bool:
            tier, h = self.reader.source(i)
            p = self.plan[i]
            lo = p.start - self.base
            lb = h.layer_bytes
            plane = lb // self.planes
            parts = []
            for li, layer in enumerate(layers):
                for pl in range(self.planes):
                    parts.append((h.data_offset + layer * lb + pl * plane,
                                  dest[li, pl, lo : lo + p.take].view(torch.uint8).reshape(-1)))
            try:
                got = tier.backend.readinto_ranges(p.key.path, parts)
            except OSError as e:
                self.ns.store._warn_once(f"read:{tier.index}", f"kvfs: kvikio read from {tier.url.redacted()} "
                                                              f"failed: {e}; treating its chunks as misses")
                self.reader.fail(i, str(e), corrupt=False)
                return False
            if got is None:
                self.reader.fail(i, "vanished", corrupt=False)
                return False
            if any(n != plane for n in got):
                self.reader.fail(i, f"{p.key.path} is truncated")
                return False
            if self.ns.store.verify and not self._verify_on_host(h, layers, dest, lo, p.take, i):
                return False
            self.direct_items.add(i)
            return True

        return _pool.run_all([lambda i=i: one(i) for i in idxs]) if idxs else []

    def _verify_on_host(self, h, layers: range, dest: torch.Tensor, lo: int, take: int, i: int) -> bool:
        lb = h.layer_bytes
        buf = self.pool.acquire()
        try:
            for li, layer in enumerate(layers):
                host = buf.tensor[:lb].view(RAW_TORCH[self.spec.itemsize]).view(
                    (self.planes, take) + tuple(dest.shape[3:]))
                with torch.cuda.stream(self.stream):
                    host.copy_(dest[li, :, lo : lo + take].view(host.dtype), non_blocking=True)
                self.stream.synchronize()
                try:
                    check_layer(h, layer, buf.tensor[:lb].numpy())
                except IntegrityError:
                    self.reader.fail(i, f"chunk {h.key[:16]}... layer {layer} checksum mismatch in device memory")
                    return False
        finally:
            buf.release()
        return True

    def close(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
        self.reader.close()  # views kept across layer reads (an LMDB read transaction)
        if self._own_pool and self.pool is not None:
            self.pool.close()


def _check_layers(spec: Any, layers: range) -> None:
    spec.check_layers(layers)


def _rows_contiguous(t: torch.Tensor) -> bool:
    """``[..., tokens, heads, dim]`` with each plane's tokens contiguous (direct reads need it)."""
    return t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] and t.stride(-3) == t.shape[-1] * t.shape[-2]


def _valid_prefix(plan: Sequence[Any], ok: Sequence[bool]) -> int:
    """Tokens covered before the first failed item (relative to the plan's first token)."""
    base = plan[0].start if plan else 0
    for p, good in zip(plan, ok):
        if not good:
            return p.start - base
    return (plan[-1].end - base) if plan else 0


def load(ns: Any, tokens: Any, *, device: Any = "cpu", layers: range | None = None, out: torch.Tensor | None = None,
         pool: PinnedPool | None = None, direct: str | bool = "auto") -> tuple[int, torch.Tensor]:
    """The longest cached prefix of ``tokens``: ``(n, kv)`` with kv ``[len(layers), planes, n, heads, dim]``
    on ``device`` (verified; a failing chunk ends the prefix). The caller's current stream already waits
    for the copies. ``out``: a ``[len(layers), planes, >= lookup tokens, heads, dim]`` tensor (its rows
    contiguous, e.g. a contiguous tensor) to read into instead of a new one."""
    spec = ns.spec
    plan = ns.plan(as_tokens(tokens))
    layers = range(spec.num_layers) if layers is None else layers
    _check_layers(spec, layers)
    total = plan[-1].end if plan else 0
    dev = as_device(device if out is None else out.device)
    shape = (len(layers),) + spec.chunk_shape(total)[1:]
    if out is None:
        out = empty(shape, torch_dtype(spec.dtype), dev)
    elif tuple(out.shape[:2]) != shape[:2] or out.shape[2] < total or tuple(out.shape[3:]) != shape[3:] \
            or out.dtype != torch_dtype(spec.dtype):
        raise InvalidInput(f"out {tuple(out.shape)} {out.dtype} cannot hold {shape} {spec.dtype}")
    if not plan:
        return 0, out[:, :, :0]
    dest = out[:, :, :total] if out.shape[2] != total else out
    if not _rows_contiguous(dest):
        tmp = torch.empty(shape, dtype=out.dtype, device=dev)
        n, got = load(ns, tokens, device=dev, layers=layers, out=tmp, pool=pool, direct=direct)
        out[:, :, :n].copy_(got)
        return n, out[:, :, :n]
    reader = DeviceReader(ns, plan, dev, pool=pool, direct=direct)
    try:
        reader.order_after_current_stream()  # out may still be in use by work queued on the caller's stream
        ok, ev = reader.fill(layers, dest)
        if ev is not None:
            torch.cuda.current_stream(dev).wait_event(ev)
    finally:
        reader.close()
    n = _valid_prefix(plan, ok)
    return n, out[:, :, :n]


def load_layer(ns: Any, tokens: Any, layer: int, *, device: Any = "cpu", **kw: Any) -> tuple[int, torch.Tensor]:
    """One layer of the cached prefix: ``(n, [planes, n, heads, dim])``."""
    if not 0 <= layer < ns.spec.num_layers:
        raise IndexError(f"layer {layer} is out of range: the namespace has {ns.spec.num_layers} layers")
    n, kv = load(ns, tokens, device=device, layers=range(layer, layer + 1), **kw)
    return n, kv[0]


__all__ = ["DeviceReader", "load", "load_layer"]
