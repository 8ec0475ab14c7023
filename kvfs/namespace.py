"""A namespace: the chunks of one KV configuration inside a store.

    with kvfs.open() as store:
        ns = store.namespace(kvfs.KVSpec("llama-3.1-8b", 32, 8, 128))
        ns.put(tokens, kv)              # kv: [layers, 2, len(tokens), kv_heads, head_dim]
        n = ns.lookup(longer_tokens)    # leading tokens whose KV is stored
        kv = ns.get(tokens[:n])         # exactly those tokens' KV, verified

Lookups are token-granular: besides whole chunks found by their chained
keys, a stored chunk that extends the cached prefix by only part of its
tokens is found through the catalog and its first tokens are reused (a
prompt that shares 300 tokens with a stored one reuses 300, not 256).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .chunk import _STANDARD as _RESERVED  # metadata entries kvfs writes itself
from .errors import CacheMiss, ChunkFormatError, InvalidInput, NotFound
from .keys import ChunkKey, as_tokens, chain, chunk_keys, chunk_path, common_prefix_length, segment_keys
from .spec import KVSpec, canonical_dtype
from .store import ReadItem, Store

_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32}


@dataclass(frozen=True)
class PlanItem:
    """One stored chunk used to serve a request: its first ``take`` tokens, at ``start`` in the request."""

    key: ChunkKey
    start: int
    take: int
    tokens: np.ndarray  # the request's tokens [start, start + take)

    @property
    def end(self) -> int:
        return self.start + self.take

    @property
    def whole(self) -> bool:
        """The chunk is used whole (its key matched exactly)."""
        return self.take == self.key.num_tokens


def _prefix_positions(positions: Any) -> None:
    """A prefix's KV is computed at positions 0..n-1: its keys do not include positions, so KV computed
    anywhere else must not be stored under them."""
    if positions is None:
        return
    try:
        p = _segment_positions(positions)  # a whole number (an array, a float or a string is refused too)
    except InvalidInput:
        p = None
    if p != 0:
        raise InvalidInput(f"positions={positions!r}: a prefix's KV is the KV computed at positions 0..n-1 (its "
                           "chunk keys do not include positions); store KV computed elsewhere with put_segment")


def _segment_positions(positions: Any) -> int:
    """The position of a segment's first token: a whole number, 0 or more (a float would be truncated, None
    read back as 0 though it means "unknown")."""
    import operator

    try:
        if isinstance(positions, bool):
            raise TypeError
        p = operator.index(positions)
    except TypeError:
        raise InvalidInput(f"positions={positions!r}: give the position of the segment's first token as a whole "
                           "number, 0 or more") from None
    if p < 0:
        raise InvalidInput(f"positions={positions!r}: positions start at 0")
    return p


def _check_extra(extra: Any) -> None:
    """More chunk metadata: a dict of strings to strings, not naming an entry kvfs writes itself."""
    if extra is None:
        return
    if not isinstance(extra, dict):
        raise InvalidInput(f"extra must be a dict of metadata strings, got {type(extra).__name__}")
    for k, v in extra.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidInput(f"extra metadata {k!r}: {v!r}: names and values must be strings")
        if k in _RESERVED:
            raise InvalidInput(f"extra metadata {k!r} is an entry kvfs writes itself; use another name")


class Namespace:
    """Put, find and get the KV of token sequences in one namespace of a store."""

    def __init__(self, store: Store, spec: KVSpec) -> None:
        self.store = store
        self.spec = spec
        self.path = spec.path

    def __repr__(self) -> str:
        return f"Namespace({self.path})"

    # ---------------------------------------------------------------------------------- keys
    def keys(self, tokens: Any) -> list[ChunkKey]:
        """The chunk keys of a token sequence (what ``put`` writes), whole chunks then a partial one."""
        toks = as_tokens(tokens)
        return chunk_keys(self.spec.seed, self.path, toks, self.spec.chunk_tokens)

    def segment_keys(self, tokens: Any) -> list[ChunkKey]:
        """Position-independent keys of a segment (CacheBlend)."""
        toks = as_tokens(tokens)
        return segment_keys(self.spec.seed, self.path, toks, self.spec.chunk_tokens)

    # ---------------------------------------------------------------------------------- conversion
    def as_raw_kv(self, kv: Any, ntokens: int) -> np.ndarray:
        """Validate ``kv`` and return a raw-typed numpy view (no copy for CPU arrays and tensors)."""
        spec = self.spec
        shape = spec.chunk_shape(ntokens)
        if isinstance(kv, np.ndarray):
            if kv.dtype != spec.numpy_dtype:
                raise InvalidInput(
                    f"kv dtype {kv.dtype} does not match namespace dtype {spec.dtype}; convert it first"
                    + (" (numpy bfloat16 is ml_dtypes.bfloat16)" if spec.dtype == "bfloat16" else "")
                )
            arr = kv
        elif type(kv).__module__.startswith("torch"):
            import torch

            if canonical_dtype(str(kv.dtype)) != spec.dtype:
                raise InvalidInput(f"kv dtype {kv.dtype} does not match namespace dtype {spec.dtype}")
            t = kv.detach()
            if t.device.type != "cpu":
                t = t.cpu()
            raw_t = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[spec.itemsize]
            arr = t.view(raw_t).numpy()
        else:
            raise InvalidInput(f"kv must be a numpy array or a torch tensor, got {type(kv).__name__}")
        if tuple(arr.shape) != shape:
            what = "[layers, 1, tokens, 1, latent]" if spec.mla else "[layers, 2, tokens, kv_heads, head_dim]"
            raise InvalidInput(f"kv shape {tuple(arr.shape)} != {shape} {what} for {ntokens} tokens")
        return arr.view(_RAW[spec.itemsize])

    def _out(self, ntokens: int, out: Any) -> tuple[Any, np.ndarray]:
        """Allocate (or validate) an output array; returns (what the caller gets, raw numpy view)."""
        if out is None:
            from ._buffers import empty

            arr = empty(self.spec.chunk_shape(ntokens), self.spec.numpy_dtype)
            return arr, arr.view(_RAW[self.spec.itemsize])
        if type(out).__module__.startswith("torch") and out.device.type != "cpu":
            raise InvalidInput("out must be a CPU tensor here; kvfs.gpu loads into device memory")
        if isinstance(out, np.ndarray) and not out.flags.writeable:
            raise InvalidInput("out is a read-only array: give a writable one (or leave out to get a new array)")
        return out, self.as_raw_kv(out, ntokens)

    # ---------------------------------------------------------------------------------- writes
    def put(self, tokens: Any, kv: Any, *, positions: int | None = None, start: int = 0) -> int:
        """Store the KV of ``tokens``: whole chunks and the trailing partial one.

        Chunks already stored (in any tier) are not rewritten. Returns the
        number of chunks written.

        ``start`` (a multiple of the chunk size): ``kv`` holds the KV of
        ``tokens[start:]`` only (an engine that loaded a stored prefix and
        computed the rest copies out only the rest). The chunks before
        ``start`` must be stored: they become the most recently used, like
        every chunk a put finds stored, and if one of them is not (evicted
        since the caller looked), nothing is written and 0 returned, since
        the chunks after it could not be found behind the gap.
        """
        toks = as_tokens(tokens)
        c = self.spec.chunk_tokens
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or not 0 <= start <= len(toks) \
                or start % c:
            raise InvalidInput(f"start={start!r} must be a multiple of the chunk size ({c} tokens) between 0 and "
                               f"the {len(toks)} tokens given")
        start = int(start)
        _prefix_positions(positions)
        raw = self.as_raw_kv(kv, len(toks) - start)
        keys = chunk_keys(self.spec.seed, self.path, toks, c)
        return self._put_keys(keys, toks, raw, None, offset=start)

    def put_segment(self, tokens: Any, kv: Any, *, positions: int = 0, extra: dict[str, str] | None = None) -> int:
        """Store a position-independent segment (a document) computed at positions ``positions...``.

        ``extra``: more chunk metadata (string values; e.g. how the keys were rotated, for CacheBlend).
        A segment's chunks are one computation: if chunks of it are stored from a computation at other
        positions, every chunk is written again from this one (else a read would stitch two together)."""
        positions = _segment_positions(positions)
        _check_extra(extra)
        toks = as_tokens(tokens)
        raw = self.as_raw_kv(kv, len(toks))
        keys = segment_keys(self.spec.seed, self.path, toks, self.spec.chunk_tokens)
        return self._put_keys(keys, toks, raw, positions, segment=True, extra=extra)

    def _put_keys(self, keys: list[ChunkKey], toks, raw, positions, segment: bool = False,
                  extra: dict[str, str] | None = None, offset: int = 0) -> int:
        """Write the chunks of ``keys`` not stored yet; ``raw`` holds the KV of ``toks[offset:]`` (the chunks
        before ``offset`` are only checked to be stored)."""
        store = self.store
        store._check_writable()
        recs = store._records(keys)
        todo = [i for i, r in enumerate(recs) if not store._held_bits(r)]
        if todo:
            found = store._exists_anywhere([keys[i] for i in todo], lambda k: toks[k.start : k.end])
            todo = [i for i, f in zip(todo, found) if not f]
        if segment and 0 < len(todo) < len(keys):
            missing = set(todo)
            base = self._segment_base([k for i, k in enumerate(keys) if i not in missing])
            if base != positions:
                todo = list(range(len(keys)))  # the stored part is of another computation: replace it all
        if todo and keys[todo[0]].start < offset:
            return 0  # a chunk before offset is gone: what follows it would be unreachable
        if len(todo) < len(keys):
            # chunks already stored become the most recently used, so that making room for the rest
            # of this very put cannot evict them (which would cut the prefix just stored)
            new = set(todo)
            store.catalog.touch([f"{k.namespace}/{k.hex}" for i, k in enumerate(keys) if i not in new])
        def chunks():
            for j in todo:
                k = keys[j]
                opts: dict[str, Any] = {}
                if positions is not None:
                    opts["positions"] = positions + k.start
                if extra:
                    opts["extra"] = extra
                yield (k, toks[k.start : k.end], raw[:, :, k.start - offset : k.end - offset], opts)

        return store._put_encoded(self.spec, chunks(), segment=segment)

    # ---------------------------------------------------------------------------------- lookup
    def plan(self, tokens: Any) -> list[PlanItem]:
        """The stored chunks that cover the longest cached prefix of ``tokens``, in order."""
        self.store._check_open()
        toks = as_tokens(tokens)
        spec = self.spec
        keys = chunk_keys(spec.seed, self.path, toks, spec.chunk_tokens)
        recs = self.store._records(keys)
        n = 0
        while n < len(keys) and self.store._held_bits(recs[n]):
            n += 1
        if n < len(keys):
            n += self.store._probe(keys[n:], lambda k: toks[k.start : k.end])
        items = [PlanItem(k, k.start, k.num_tokens, toks[k.start : k.end]) for k in keys[:n]]
        covered = keys[n - 1].end if n else 0
        if covered < len(toks):
            parent = keys[n - 1] if n else None
            best: tuple[int, str, int] | None = None
            rest = toks[covered:]
            cands = self.store.catalog.children(self.path, parent.hex if parent else "", int(rest[0]))
            held = self.store.catalog.get_many([f"{self.path}/{h}" for h, _ in cands])
            for (hexd, ctoks), rec in zip(cands, held):
                if not self.store._held_bits(rec):
                    continue
                cp = common_prefix_length(ctoks, rest[: len(ctoks)])
                if cp and (best is None or cp > best[0]):
                    best = (cp, hexd, len(ctoks))
            if best is not None:
                cp, hexd, clen = best
                key = ChunkKey(bytes.fromhex(hexd), parent.digest if parent else None, covered, covered + clen,
                               self.path)
                items.append(PlanItem(key, covered, cp, toks[covered : covered + cp]))
        return items

    def lookup(self, tokens: Any) -> int:
        """How many leading tokens of ``tokens`` have their KV stored (one batched query)."""
        self.store._check_open()
        toks = as_tokens(tokens)
        digests = chain(self.spec.seed, toks, self.spec.chunk_tokens)
        unsigned = self.store._unsigned  # (chunks found without a valid signature: not counted)
        if self.store.catalog.count_present(self.path, digests, self.store.mask) == len(digests) and not (
                unsigned and any(chunk_path(self.path, d.hex()) in unsigned for d in digests)):
            return len(toks)  # every chunk is known: the common case needs no objects and no probing
        return sum(p.take for p in self.plan(toks))

    # ---------------------------------------------------------------------------------- reads
    def get(self, tokens: Any, *, out: Any = None) -> Any:
        """The KV of exactly ``tokens``, verified; :class:`kvfs.CacheMiss` if any part is not available."""
        toks = as_tokens(tokens)
        plan = self.plan(toks)
        covered = plan[-1].end if plan else 0
        if covered < len(toks):
            raise CacheMiss(
                f"{len(toks) - covered} of {len(toks)} tokens are not stored in {self.path} "
                f"(the cached prefix is {covered} tokens)"
            )
        result, raw = self._out(len(toks), out)
        ok = self.read(plan, raw)
        if not all(ok):
            bad = plan[ok.index(False)]
            raise CacheMiss(f"chunk {bad.key.path} (tokens {bad.start}:{bad.end}) is missing or failed its checks")
        return result

    def get_prefix(self, tokens: Any, *, out: Any = None) -> tuple[int, Any]:
        """Load the longest cached prefix: ``(n, kv of tokens[:n])``; stops early at a failing chunk."""
        toks = as_tokens(tokens)
        plan = self.plan(toks)
        total = plan[-1].end if plan else 0
        result, raw = self._out(total, out if out is not None else None)
        if not plan:
            return 0, result
        ok = self.read(plan, raw)
        n = total
        for p, good in zip(plan, ok):
            if not good:
                n = p.start
                break
        return n, result[:, :, :n]

    def read(self, plan: Sequence[PlanItem], dest: np.ndarray, layers: range | None = None) -> list[bool]:
        """Read planned chunks into ``dest`` (raw-typed ``[layers, planes, tokens, heads, dim]``, token
        axis covering the plan from 0). Returns, per plan item, whether it was read and verified."""
        layers = range(self.spec.num_layers) if layers is None else layers
        self.spec.check_layers(layers)
        base = plan[0].start if plan else 0
        items = [
            ReadItem(p.key, p.take, dest[:, :, p.start - base : p.end - base], layers, p.tokens, p.whole)
            for p in plan
        ]
        return self.store._read(self.spec, items)

    def get_segment(self, tokens: Any, *, out: Any = None) -> tuple[Any, int]:
        """A segment's KV and the first position it was computed at; CacheMiss if not stored whole, or if
        its chunks come from computations at different positions."""
        toks = as_tokens(tokens)
        keys = segment_keys(self.spec.seed, self.path, toks, self.spec.chunk_tokens)
        result, raw = self._out(len(toks), out)
        items = [ReadItem(k, k.num_tokens, raw[:, :, k.start : k.end], range(self.spec.num_layers),
                          toks[k.start : k.end], True) for k in keys]
        ok = self.store._read(self.spec, items)
        if not all(ok):
            raise CacheMiss(f"segment of {len(toks)} tokens is not stored whole in {self.path}")
        base = self._segment_base(keys)
        if base is None:
            self.store._warn_once(f"mixed:{keys[0].path}",
                                  f"kvfs: the chunks of segment {keys[0].hex[:16]}... in {self.path} were computed "
                                  "at different positions (stored by different runs); treated as a miss")
            raise CacheMiss(f"segment of {len(toks)} tokens in {self.path} is stored from computations at "
                            "different positions")
        return result, base

    def _segment_base(self, keys: list[ChunkKey]) -> int | None:
        """The first position the segment chunks ``keys`` were computed at, from their headers (cached by the
        read just done, else read); None if they disagree."""
        bases = set()
        for k in keys:
            header = self.store._headers.get(k.path)
            if header is None:  # evicted from the header cache since the read: the header says, not a guess
                try:
                    header = self.store._read_header(k.path)
                except (NotFound, ChunkFormatError):
                    return None  # gone or unreadable since: not a segment to trust (or to keep, for a put)
            bases.add(header.positions - header.start)
        return bases.pop() if len(bases) == 1 else None

    def has_segment(self, tokens: Any) -> bool:
        keys = self.segment_keys(tokens)
        recs = self.store._records(keys)
        if all(self.store._held_bits(r) for r in recs):
            return True
        return all(self.store._exists_anywhere(keys, lambda k: None))

    # ---------------------------------------------------------------------------------- device (kvfs.gpu)
    def prefetch(self, tokens: Any, *, device: Any = "cpu", **options: Any):
        """Start loading the cached prefix of ``tokens`` in the background, layer by layer
        (:class:`kvfs.gpu.Prefetcher`: ``wait_layer(i)``, ``valid_tokens``, ``close()``)."""
        from kvfs.gpu import Prefetcher  # torch enters here, not at import

        return Prefetcher(self, tokens, device=device, **options)

    def saver(self, tokens: Any, **options: Any):
        """A :class:`kvfs.gpu.LayerSaver` for ``tokens``: ``save_layer(i, k, v)`` as the engine computes
        each layer, ``finish()`` writes the chunks not stored yet."""
        from kvfs.gpu import LayerSaver

        return LayerSaver(self, tokens, **options)

    # ---------------------------------------------------------------------------------- pins
    def pin(self, tokens: Any) -> int:
        """Pin the stored chunks of ``tokens`` (never evicted while pinned); returns how many."""
        plan = self.plan(tokens)
        self.store._check_writable()
        return len(self.store.catalog.pin([f"{p.key.namespace}/{p.key.hex}" for p in plan], 1, leading=True))

    def unpin(self, tokens: Any) -> int:
        """Take one pin off the stored chunks of ``tokens``; returns how many had one."""
        plan = self.plan(tokens)
        self.store._check_writable()
        # not ``leading``: past a chunk evicted since the plan, the pins :meth:`pin` took are still to take back
        # (no later plan of these tokens reaches those chunks again)
        return len(self.store.catalog.pin([f"{p.key.namespace}/{p.key.hex}" for p in plan], -1))

    def evict(self, tokens: Any, *, force: bool = False):
        """Evict the stored chunks of ``tokens`` from every tier (pinned ones only with ``force``)."""
        from .store import EvictResult

        for attempt in range(3):
            plan = self.plan(tokens)
            if not plan:
                return EvictResult()
            try:
                return self.store.evict([p.key.path for p in plan], force=force)
            except NotFound:
                # a chunk of the plan left meanwhile (evicted for room by a write-back that the eviction waited
                # for, or by another process): plan again from what is stored now
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")
