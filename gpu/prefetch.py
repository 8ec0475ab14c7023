"""Background, layer-by-layer loading of a cached prefix while the engine computes.

    with ns.prefetch(tokens, device="cuda") as pf:        # starts loading at once
        n = pf.num_tokens                                  # what lookup found
        ...                                                # the engine prefills tokens[n:] meanwhile
        for i in range(num_layers):
            k, v = pf.wait_layer(i)                        # [valid_tokens, heads, dim] each
            ...
        assert pf.valid_tokens == n                        # unless a chunk failed (then fewer)

Order: layer 0 of every chunk, then layer 1, ... so the first layer is ready
after ``1 / num_layers`` of the load. A layer counts as loaded when every
chunk's part of it was read *and verified*; ``wait_layer(i)`` never returns
before that (on CUDA it returns once the copies are queued, and makes the
caller's current stream wait for them, so no kernel of the caller reads the
layer early).

Failures: a chunk that is missing or fails its checks in layer ``i`` is a miss
from that chunk on: ``valid_tokens`` drops to the chunk's first token, layers
from ``i`` on are loaded for the shorter prefix only, and every later
``wait_layer`` returns ``valid_tokens`` tokens. ``valid_tokens`` never grows;
its final value (after :meth:`wait` or the last ``wait_layer``) is the number
of leading tokens whose every layer was loaded and verified. An engine that
used earlier layers beyond that must treat those tokens as not loaded
(recompute them; vLLM: report their blocks as invalid).

``skip``: leading tokens the caller holds already (an engine's own prefix
cache). Chunks that end at or before them are not read; the layers then hold
the tokens from :attr:`Prefetcher.first` (the first chunk read) on, and
``valid_tokens`` still counts from token 0.

Memory: without ``max_bytes`` the prefetch holds one tensor for every layer
(``[layers, planes, num_tokens, heads, dim]``, also :meth:`result`), or reads
into the caller's ``out`` (``[layers, planes, >= num_tokens, heads, dim]``,
reused across requests: no new memory per prefetch). With
``max_bytes`` it holds at most ``max_bytes // layer_bytes`` layers: the loader
waits for the consumer to :meth:`release_layer` (or ``wait_layer(i,
release_previous=True)``) before loading more; waiting for a layer that can
never be loaded because every buffer holds a layer the caller has not
released is an error, not a hang. :meth:`cancel` stops the loader;
:meth:`close` (or leaving the ``with``) stops it and frees every buffer.

``slot_pool`` (a :class:`kvfs.gpu.StagingPool`, ``device="cpu"`` with
``max_bytes`` only): each layer gets a buffer of its own from the pool (even
when ``max_bytes`` holds every layer), and :meth:`close`
gives back the ones the consumer released, so that the next prefetch fills
memory already touched (a freshly mapped 32 MiB buffer costs about five times
the copy into a warm one on the 2-core test VM). A layer loaded and not
released may still be read through a view the consumer took: its buffer is
dropped from the pool, never handed out again. Pool buffers come in size
classes and a kept buffer up to twice a layer's size is reused for it (see
:mod:`kvfs.gpu.hostpool`), so a prefetch may hold more than ``max_bytes``, at
most twice as much.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from kvfs.errors import CacheMiss, InvalidInput, KVFSError
from kvfs.keys import as_tokens

from ._device import as_device, empty, torch_dtype
from .load import DeviceReader, _rows_contiguous, _valid_prefix
from .hostpool import StagingPool
from .pinned import PinnedPool

_PENDING, _READY, _RELEASED = 0, 2, 3


class PrefetchCancelled(KVFSError):
    """The prefetch was cancelled or closed before the layer asked for was loaded."""


class Prefetcher:
    """Loads the cached prefix of ``tokens`` in the background, layer by layer (see the module doc)."""

    def __init__(self, ns: Any, tokens: Any, *, device: Any = "cpu", max_bytes: int | None = None,
                 out: torch.Tensor | None = None, pool: PinnedPool | None = None, direct: str | bool = "auto",
                 start: bool = True, slot_pool: StagingPool | None = None, skip: int = 0) -> None:
        self.ns = ns
        self.spec = spec = ns.spec
        self.device = as_device(device if out is None else out.device)
        self.tokens = as_tokens(tokens)
        self.plan = ns.plan(self.tokens)
        #: tokens the lookup found cached (the prefix being loaded)
        self.num_tokens = self.plan[-1].end if self.plan else 0
        self._skipped: list[Any] = []  # chunks not read (skip): touched as a read would (_touch_skipped)
        if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
            raise InvalidInput(f"skip must be a token count >= 0, got {skip!r}")
        if skip:
            if out is not None:
                raise InvalidInput("skip and out exclude each other: out holds the prefix from token 0")
            # the caller holds these tokens already (an engine's own prefix cache): chunks ending at or before
            # them are not read
            self._skipped = [p for p in self.plan if p.end <= skip]
            self.plan = [p for p in self.plan if p.end > skip]
        #: the first token the layers hold (0, or with ``skip`` the start of the first chunk read)
        self.first = self.plan[0].start if self.plan else self.num_tokens
        self._valid = self.num_tokens
        self._nok = len(self.plan)  # leading plan items not failed
        L = spec.num_layers
        held = self.num_tokens - self.first
        self.layer_shape = (spec.kv_planes, held, spec.num_kv_heads, spec.head_dim)
        #: bytes of one layer of the tokens read
        self.layer_bytes = held * (spec.bytes_per_token // L if L else 0)
        self.dtype = torch_dtype(spec.dtype)
        if max_bytes is None:
            self.max_layers = L
        else:
            if self.layer_bytes and max_bytes < self.layer_bytes:
                raise InvalidInput(f"max_bytes={max_bytes} cannot hold one layer of the {held} cached "
                                   f"tokens ({self.layer_bytes} bytes); raise it")
            self.max_layers = max(1, min(L, max_bytes // self.layer_bytes if self.layer_bytes else L))
        if slot_pool is not None and (self.device.type != "cpu" or max_bytes is None or out is not None):
            raise InvalidInput("slot_pool recycles host layer buffers: it serves bounded prefetches "
                               "(max_bytes, no out) onto device='cpu' only")
        self._slot_pool = slot_pool
        self._pooled: list[torch.Tensor] = []  # layer buffers taken from slot_pool
        self._cond = threading.Condition()
        self._state = [_PENDING] * L
        self._slot: list[torch.Tensor | None] = [None] * L
        self._event: list[Any] = [None] * L
        self._free: list[tuple[torch.Tensor, Any]] = []  # (slot, event after which the consumer is done with it)
        self._allocated = 0
        self._all: torch.Tensor | None = None
        self._caller_out = out is not None
        self._loader_waiting = False
        self._cancelled = False
        self._closed = False
        self._error: BaseException | None = None
        self._done = not self.plan
        self._reader = DeviceReader(ns, self.plan, self.device, pool=pool, direct=direct) if self.plan else None
        self._thread: threading.Thread | None = None
        if self._done:
            self._state = [_READY] * L
            self._touch_skipped()  # (no loader to do it)
        elif out is not None:
            want = (L,) + self.layer_shape
            if (out.dim() != 5 or out.shape[:2] != want[:2] or out.shape[3:] != want[3:] or out.shape[2] < want[2]
                    or out.dtype != self.dtype or max_bytes is not None):
                raise InvalidInput(f"out {tuple(out.shape)} {out.dtype} cannot hold {want} {self.dtype} (and out "
                                   "excludes max_bytes)")
            self._all = out[:, :, : self.num_tokens]
            if not _rows_contiguous(self._all):
                raise InvalidInput("out must have contiguous [tokens, heads, dim] rows (a contiguous tensor)")
        elif self.max_layers == L and slot_pool is None:
            # one tensor for every layer, allocated on the caller's thread and stream
            self._all = empty((L,) + self.layer_shape, self.dtype, self.device)
        if self._reader is not None:
            # the loader's writes wait for the work the caller queued so far: it may still use out, or the
            # memory the allocator just gave _all
            self._reader.order_after_current_stream()
        if not self._done and start:
            self.start()

    def __repr__(self) -> str:
        return (f"Prefetcher({self.ns.path}, {self.num_tokens} tokens, valid={self._valid}, device={self.device}, "
                f"layers ready={sum(s == _READY for s in self._state)}/{len(self._state)})")

    # ------------------------------------------------------------------------------------------ life
    def start(self) -> None:
        if self._thread is None and not self._done:
            self._thread = threading.Thread(target=self._run, name="kvfs-prefetch", daemon=True)
            self._thread.start()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def cancel(self) -> None:
        """Stop loading (what is loaded stays readable until close)."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    def close(self) -> None:
        """Stop loading, wait for the loader, free every buffer. Later waits raise PrefetchCancelled."""
        self.cancel()
        if self._thread is not None:
            self._thread.join()
        if self._reader is not None:
            self._reader.close()
        with self._cond:
            self._closed = True
            # buffers of layers handed out and not released may still be read through the caller's views
            held = {id(t) for t, st in zip(self._slot, self._state) if t is not None and st == _READY}
            pooled, self._pooled = self._pooled, []
            self._slot = [None] * len(self._slot)
            self._event = [None] * len(self._event)
            self._free.clear()
            self._all = None
            self._allocated = 0
            self._cond.notify_all()
        for t in pooled:  # the loader has stopped: every other pooled buffer is idle
            (self._slot_pool.forget if id(t) in held else self._slot_pool.give)(t)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def bytes_held(self) -> int:
        """Bytes of layer buffers allocated by this prefetch (0 once closed)."""
        if self._all is not None:
            return 0 if self._caller_out else self._all.numel() * self._all.element_size()
        return self._allocated * self.layer_bytes

    @property
    def valid_tokens(self) -> int:
        """Leading tokens loaded and verified in every layer so far (only shrinks; see the module doc)."""
        return self._valid

    @property
    def done(self) -> bool:
        return self._done

    # ------------------------------------------------------------------------------------------ consumer
    def wait_layer(self, i: int, timeout: float | None = None, *, release_previous: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer ``i``'s ``(K, V)``, each ``[valid_tokens, heads, dim]`` (MLA: ``(latent [valid_tokens, 1,
        latent_dim], None)``), once loaded and verified. ``release_previous``: release layers ``< i`` first.
        With ``skip``, tokens from :attr:`first` on: ``valid_tokens - first`` of them."""
        kv = self.wait_layer_kv(i, timeout, release_previous=release_previous)
        return (kv[0], kv[1]) if kv.shape[0] == 2 else (kv[0], None)

    def wait_layer_kv(self, i: int, timeout: float | None = None, *, release_previous: bool = False) -> torch.Tensor:
        """Layer ``i`` as ``[planes, valid_tokens - first, heads, dim]`` (a view of the prefetch's buffer)."""
        if not 0 <= i < len(self._state):
            raise IndexError(f"layer {i} is out of range: the namespace has {len(self._state)} layers")
        if release_previous:
            for j in range(i):
                if self._state[j] == _READY:
                    self.release_layer(j)
        with self._cond:
            if self._closed:  # every buffer was dropped, loaded layers' too
                raise PrefetchCancelled(f"prefetch of {self.num_tokens} tokens is closed; layer {i} is gone")
            while self._state[i] == _PENDING:
                if self._closed or self._cancelled:
                    raise PrefetchCancelled(f"prefetch of {self.num_tokens} tokens was cancelled before layer {i} "
                                            "was loaded")
                if self._error is not None:
                    raise CacheMiss(f"prefetch failed before layer {i} was loaded: {self._error}") from self._error
                if self._loader_waiting and not self._free and self._allocated >= self.max_layers:
                    raise InvalidInput(
                        f"layer {i} cannot be loaded: the prefetch holds {self.max_layers} layers (max_bytes), all "
                        "handed out and not released; call release_layer(j) for layers you are done with, or "
                        "wait_layer(i, release_previous=True)")
                if not self._cond.wait(timeout):
                    raise TimeoutError(f"layer {i} not loaded after {timeout} s ({self!r})")
            if self._state[i] == _RELEASED:
                raise InvalidInput(f"layer {i} was released; its buffer holds another layer now")
            n = self._valid
            ev = self._event[i]
            slot = self._slot[i]
        if slot is None:  # nothing cached or every chunk failed
            return torch.empty(self.layer_shape[:1] + (0,) + self.layer_shape[2:], dtype=self.dtype,
                               device=self.device)
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            if ev is not None:
                stream.wait_event(ev)
            if not self._caller_out:
                slot.record_stream(stream)  # ours, allocated on another stream: kept until this stream is done
        return slot[:, : n - self.first]

    def release_layer(self, i: int) -> None:
        """The caller is done with layer ``i``: its buffer may hold another layer (bounded prefetch)."""
        with self._cond:
            if self._state[i] != _READY:
                return
            self._state[i] = _RELEASED
            slot, self._slot[i] = self._slot[i], None
            copied, self._event[i] = self._event[i], None
            if slot is not None and self._all is None:
                done = None
                if self.device.type == "cuda":  # the caller's queued kernels may still read it
                    stream = torch.cuda.current_stream(self.device)
                    if copied is not None:  # a layer released unread: its copies must land before reuse
                        stream.wait_event(copied)
                    done = torch.cuda.Event()
                    done.record(stream)
                self._free.append((slot, done))
                self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> int:
        """Wait until every layer is loaded; returns ``valid_tokens``. Raises :class:`PrefetchCancelled` if the
        prefetch was cancelled or closed first, ``CacheMiss`` if its loader failed."""
        with self._cond:
            while not self._done and not self._cancelled and self._error is None:
                if not self._cond.wait(timeout):
                    raise TimeoutError(f"prefetch not finished after {timeout} s ({self!r})")
        if self._error is not None and not self._done:
            raise CacheMiss(f"prefetch failed: {self._error}") from self._error
        if not self._done:  # cancelled: the layers not loaded hold no KV
            raise PrefetchCancelled(f"prefetch of {self.num_tokens} tokens was cancelled before every layer was "
                                    "loaded")
        return self._valid

    def result(self) -> tuple[int, torch.Tensor]:
        """After :meth:`wait` (unbounded prefetch): ``(n, [layers, planes, n - first, heads, dim])``."""
        n = self.wait()
        if self._all is None:
            if not self.plan:  # nothing cached (or every chunk skipped)
                return n, torch.empty((len(self._state),) + self.layer_shape, dtype=self.dtype, device=self.device)
            raise InvalidInput("result() needs an unbounded prefetch (max_bytes=None) that is not closed")
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            for ev in self._event:
                if ev is not None:
                    stream.wait_event(ev)
            if not self._caller_out:
                self._all.record_stream(stream)
        return n, self._all[:, :, : n - self.first]

    # ------------------------------------------------------------------------------------------ loader
    def _take_slot(self, i: int) -> torch.Tensor | None:
        with self._cond:
            while True:
                if self._cancelled:
                    return None
                if self._all is not None:
                    return self._all[i]
                if self._free:
                    slot, done = self._free.pop()
                    break
                if self._allocated < self.max_layers:
                    self._allocated += 1
                    if self._slot_pool is None:
                        slot = empty(self.layer_shape, self.dtype, self.device)
                        self._reader.order_after_current_stream()  # allocated on this thread's stream
                        return slot
                    slot = self._slot_pool.take(self.layer_shape, self.dtype)
                    self._pooled.append(slot)
                    return slot
                self._loader_waiting = True
                self._cond.notify_all()  # a consumer waiting for a later layer must see this
                self._cond.wait()
                self._loader_waiting = False
        if done is not None:
            if self._reader is not None and self._reader.stream is not None:
                self._reader.stream.wait_event(done)  # staged copies are ordered after the consumer's use
            done.synchronize()  # kvikio writes are not on a stream
        return slot

    def _touch_skipped(self) -> None:
        """The chunks skipped were used all the same (the engine holds their tokens): they become the most
        recently used, as a read makes them. Else an engine's hottest chunks, the first ones of a shared prefix,
        would be the first an LRU eviction takes, and evicting a prefix's first chunk cuts every chunk after
        it off. Best effort, like the access times a read records."""
        skipped, self._skipped = self._skipped, []
        if not skipped:
            return
        store = self.ns.store
        try:
            with store.reading():
                store._touch([f"{p.key.namespace}/{p.key.hex}" for p in skipped])
        except OSError:
            pass  # the store was closed under the prefetch: its loader reports that

    def _run(self) -> None:
        try:
            self._touch_skipped()
            for i in range(len(self._state)):
                slot = self._take_slot(i) if self._nok else None
                if self._cancelled:
                    return
                ev = None
                if self._nok:
                    ok, ev = self._reader.fill(range(i, i + 1), slot[None], self._nok)
                    first_bad = next((k for k in range(self._nok) if not ok[k]), self._nok)
                    if first_bad < self._nok:
                        self._nok = first_bad
                        with self._cond:
                            self._valid = min(self._valid,
                                              self.first + _valid_prefix(self.plan, ok[: self._nok] + [False]))
                    if not self._nok and slot is not None and self._all is None:
                        with self._cond:  # nothing valid in it: back to the free list
                            self._free.append((slot, None))
                with self._cond:
                    self._slot[i] = slot if self._nok else None
                    self._event[i] = ev
                    self._state[i] = _READY
                    self._cond.notify_all()
            with self._cond:
                self._done = True
                self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - surfaced to the consumer by wait_layer / wait
            with self._cond:
                self._error = e
                self._cond.notify_all()
