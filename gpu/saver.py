"""Saving KV layer by layer while the engine computes the next layer.

    saver = ns.saver(tokens)                 # chunks already stored are skipped
    for i, layer in enumerate(model.layers):
        k, v = layer(...)                    # [tokens, heads, dim] each, any device
        saver.save_layer(i, k, v)            # returns at once; the copy runs in the background
    written = saver.finish()                 # the last layer's copy, then one write of every chunk

A chunk is one file holding all layers, so it can only be written once its
last layer exists. What the saver overlaps with compute is everything else:
for each layer as it arrives, a background thread copies it (device->host on
a side stream for CUDA tensors) straight into the chunks' final encoded
buffers (a chunk's layer is one contiguous byte range of its file) and hashes
it (the per-layer xxh3 checksums, and the whole-tensor checksum in layer
order). ``finish`` then only fills in the headers and writes, through the
store's normal write path (first tier with room, write-back below, catalog).

The saver reads ``k`` and ``v`` after ``save_layer`` returns: keep them
unchanged until ``finish`` (an engine's KV of a prompt is not overwritten
during its own prefill; for CUDA tensors the copy is ordered after the work
already queued on the current stream).
"""

from __future__ import annotations

import math
import queue
import struct
import threading
from typing import Any

import numpy as np
import torch
import xxhash

from kvfs import chunk as _chunk
from kvfs._buffers import alloc
from kvfs.errors import InvalidInput, KVFSError
from kvfs.keys import ChunkKey, as_tokens

from ._device import RAW_NUMPY, RAW_TORCH, raw_numpy, torch_dtype


class ChunkBuilder:
    """Encodes one chunk layer by layer into its final buffer: the same bytes as :func:`kvfs.chunk.encode`."""

    def __init__(self, spec: Any, key: ChunkKey, tokens: np.ndarray, *, positions: int | None = None,
                 signer: Any = None) -> None:
        self.spec = spec
        self.key = key
        self.tokens = tokens
        t = len(tokens)
        self.shape = spec.chunk_shape(t)
        self.nbytes = math.prod(self.shape) * spec.itemsize
        start = key.start
        meta = {
            "format": _chunk.FORMAT_NAME,
            "version": str(_chunk.FORMAT_VERSION),
            "namespace": spec.namespace_id,
            "key": key.hex,
            "parent": key.parent_hex,
            "kind": "segment" if key.segment else "prefix",
            "start": str(int(start)),
            "positions": str(int(start if positions is None else positions)),
            "tokens": "[" + ",".join(map(str, tokens.tolist())) + "]",
            "checksum": "xxh3-64:" + _chunk._HEX16,
            "layer_checksums": ",".join([_chunk._HEX16] * self.shape[0]),
            "meta_checksum": _chunk._HEX16,
        }
        self.signer = signer
        if signer is not None:
            meta["layer_digests"] = ",".join([_chunk._HEX32] * self.shape[0])
            meta["signature"] = signer.placeholder
        self.meta = meta
        self.hlen = _chunk._padded_len(len(_chunk._header_json(meta, spec.dtype, self.shape, self.nbytes)))
        self.data_offset = 8 + self.hlen
        self.buf = alloc(self.data_offset + self.nbytes)
        self.data = np.frombuffer(self.buf[self.data_offset :], dtype=RAW_NUMPY[spec.itemsize]).reshape(self.shape)
        self.layer_bytes = self.nbytes // self.shape[0] if self.shape[0] else 0
        self._sums: list[str | None] = [None] * self.shape[0]
        self._digests: list[str | None] = [None] * self.shape[0]
        self._whole = xxhash.xxh3_64()
        self._hashed = 0  # layers folded into the whole-tensor hash (in order)

    def layer(self, i: int) -> np.ndarray:
        """Layer ``i``'s raw ``[planes, tokens, heads, dim]`` in the final buffer (write it, then :meth:`done`)."""
        return self.data[i]

    def done(self, i: int) -> None:
        """Layer ``i`` is written: hash it (and every earlier layer not folded in yet)."""
        lo = self.data_offset + i * self.layer_bytes
        c = _chunk.LayerCheck(self.signer is not None)
        c.update(self.buf[lo : lo + self.layer_bytes])
        self._sums[i], self._digests[i] = c.sums()
        while self._hashed < len(self._sums) and self._sums[self._hashed] is not None:
            lo = self.data_offset + self._hashed * self.layer_bytes
            self._whole.update(self.buf[lo : lo + self.layer_bytes])
            self._hashed += 1

    def finish(self) -> memoryview:
        if self._hashed != len(self._sums):
            missing = [i for i, s in enumerate(self._sums) if s is None]
            raise InvalidInput(f"chunk {self.key.path}: layers {missing[:8]} were never saved")
        meta = self.meta
        _chunk.finish_metadata(meta, self._whole.hexdigest(), self._sums, self._digests, self.signer)
        final = _chunk._header_json(meta, self.spec.dtype, self.shape, self.nbytes)
        if len(final) > self.hlen:
            raise AssertionError("chunk header grew while encoding")
        struct.pack_into("<Q", self.buf, 0, self.hlen)
        self.buf[8 : 8 + self.hlen] = final + b" " * (self.hlen - len(final))
        return self.buf


class SaveFailed(KVFSError):
    """A background layer copy failed; nothing was written."""


class LayerSaver:
    """Accumulates the KV of ``tokens`` layer by layer and writes its chunks at :meth:`finish`."""

    def __init__(self, ns: Any, tokens: Any, *, positions: int | None = None) -> None:
        from kvfs.namespace import _prefix_positions

        _prefix_positions(positions)
        store = ns.store
        store._check_writable()
        self.ns = ns
        self.spec = spec = ns.spec
        self.tokens = toks = as_tokens(tokens)
        self.num_tokens = len(toks)
        keys = ns.keys(toks)
        recs = store._records(keys)
        todo = [i for i, r in enumerate(recs) if not store._held_bits(r)]
        if todo:
            found = store._exists_anywhere([keys[i] for i in todo], lambda k: toks[k.start : k.end])
            todo = [i for i, f in zip(todo, found) if not f]
        self.keys = [keys[i] for i in todo]
        self._builders = [ChunkBuilder(spec, k, toks[k.start : k.end],
                                       positions=None if positions is None else positions + k.start,
                                       signer=store.signer) for k in self.keys]
        #: token positions whose KV the saver copies (the chunks not stored yet)
        self.ranges = [(k.start, k.end) for k in self.keys]
        self._saved = [False] * spec.num_layers
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._finished = False
        self._stream = None
        self._thread = threading.Thread(target=self._run, name="kvfs-saver", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"LayerSaver({self.ns.path}, {self.num_tokens} tokens, {len(self.keys)} chunks to write)"

    def __enter__(self) -> "LayerSaver":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None and not self._finished:
            self.finish()
        else:
            self.abort()

    # ------------------------------------------------------------------------------------------ caller
    def save_layer(self, i: int, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
        """Hand over layer ``i``: ``k`` and ``v`` ``[tokens, heads, dim]`` (MLA: ``k`` the latent ``[tokens, 1,
        latent]``, ``v`` None), or ``k`` the layer's ``[planes, tokens, heads, dim]`` and ``v`` None."""
        spec = self.spec
        if self._finished:
            raise InvalidInput("this saver is finished")
        if not 0 <= i < spec.num_layers:
            raise IndexError(f"layer {i} is out of range: the namespace has {spec.num_layers} layers")
        if self._saved[i]:
            raise InvalidInput(f"layer {i} was already saved")
        if self._error is not None:
            raise SaveFailed(f"saving failed: {self._error}") from self._error
        want = (spec.kv_planes, self.num_tokens, spec.num_kv_heads, spec.head_dim)
        if v is None and k.dim() == 4:
            planes = [k[p] for p in range(k.shape[0])] if tuple(k.shape) == want else None
        else:
            planes = [k] if v is None else [k, v]
        if planes is None or len(planes) != spec.kv_planes or any(tuple(p.shape) != want[1:] for p in planes):
            raise InvalidInput(f"layer {i}: expected K and V of shape {want[1:]} (tokens, heads, dim) or one "
                               f"{want} tensor; got {[tuple(p.shape) for p in ([k] if v is None else [k, v])]}")
        if any(p.dtype != torch_dtype(spec.dtype) for p in planes):
            raise InvalidInput(f"layer {i}: dtype {planes[0].dtype} does not match the namespace's {spec.dtype}")
        ev = None
        if planes[0].device.type == "cuda":
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(planes[0].device))  # the copy waits for the compute queued so far
        self._saved[i] = True
        self._queue.put((i, planes, ev))

    def finish(self) -> int:
        """Wait for the background copies, then write every new chunk; returns how many were written."""
        if self._finished:
            raise InvalidInput("this saver is finished")
        missing = [i for i, s in enumerate(self._saved) if not s]
        if missing and self.keys:
            self.abort()
            raise InvalidInput(f"finish() before layers {missing[:8]} were saved; nothing was written")
        self._finished = True
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise SaveFailed(f"saving failed, nothing was written: {self._error}") from self._error
        store = self.ns.store
        entries = []
        recs = store._records(self.keys)
        for b, rec in zip(self._builders, recs):
            if store._held_bits(rec):
                continue  # someone stored it meanwhile
            buf = b.finish()
            entries.append((store._record_for(b.key, b.tokens, len(buf)), None if b.key.segment else b.tokens,
                            b.key.path, buf))
        self._builders = []
        if entries:
            store._write_new(entries, recycle=True)
        return len(entries)

    def abort(self) -> None:
        """Drop everything; nothing is written."""
        if not self._thread.is_alive() and self._finished:
            return
        self._finished = True
        self._queue.put(None)
        self._thread.join()
        self._builders = []

    # ------------------------------------------------------------------------------------------ background
    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is not None:
                continue
            try:
                self._copy_layer(*job)
            except BaseException as e:  # noqa: BLE001 - reported by finish / save_layer
                self._error = e

    def _copy_layer(self, i: int, planes: list[torch.Tensor], ev: Any) -> None:
        if not self._builders:
            return
        dev = planes[0].device
        if dev.type == "cuda":
            if self._stream is None:
                self._stream = torch.cuda.Stream(dev)
            self._stream.wait_event(ev)
            with torch.cuda.stream(self._stream):
                for b in self._builders:
                    dst = torch.from_numpy(b.layer(i)).view(RAW_TORCH[self.spec.itemsize])
                    s, e = b.key.start, b.key.end
                    for p, src in enumerate(planes):
                        dst[p].copy_(src[s:e].view(dst.dtype))  # pageable destination: returns when copied
                self._stream.synchronize()
        else:
            raws = [raw_numpy(p.detach()) for p in planes]
            for b in self._builders:
                s, e = b.key.start, b.key.end
                lay = b.layer(i)
                for p, r in enumerate(raws):
                    np.copyto(lay[p], r[s:e])
        for b in self._builders:
            b.done(i)
