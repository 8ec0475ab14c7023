"""CacheBlend for transformers: reuse a document's KV wherever it appears in a prompt.

    from kvfs.connectors.blend import BlendedLM

    lm = BlendedLM(model, "lmdb:///nvme/kvfs")              # any store URL or an open kvfs.Store
    out = lm.generate(prefix, [doc_a, doc_b, doc_c], query, max_new_tokens=32)
    out.tokens, out.prefill.ratio, out.prefill.segments_loaded, out.ttft_s

A prompt ``[prefix, segment_1 … segment_n, query]`` (retrieval-augmented
generation: documents in any order, after any prompt) is prefilled like this
(CacheBlend, Yao et al., EuroSys '25; docs/cacheblend.md):

1. the prefix goes through :class:`kvfs.connectors.hf.CachedLM`: its stored
   prefix chunks are reused, the rest computed; exact;
2. each segment's KV is looked up by its own tokens (position-independent
   segment keys) and loaded layer by layer in the background; a segment that
   is not stored is computed alone (after the model's BOS, if it has one) and
   stored after the first token;
3. the reused keys are rotated from the positions they were computed at to
   their positions in this prompt, with the model's own rotary embedding;
4. layers ``0 … check_layer - 1`` are computed for every non-prefix token;
   at ``check_layer`` the K and V of every token are computed, each segment
   token is scored by how far its reused K/V is from the fresh one, and the
   top ``ratio`` of them plus every query token are kept;
5. in later layers only the kept tokens are computed (Q, K, V, attention,
   MLP); their K and V are written over the reused ones and they attend over
   the whole patched KV with an exact causal mask.

``ratio=1.0`` recomputes every token: the logits are a full prefill's (to
float rounding). ``ratio=0`` is plain reuse (no recompute but the query).
The blended KV is an approximation: it is never stored.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..errors import CacheMiss, InvalidInput
from ..keys import as_tokens
from ..namespace import PlanItem
from ..spec import KVSpec
from ..store import Store
from .hf import CachedLM, _check_full_attention, kv_from_cache, output_cache

#: model types whose decoder layer is exactly norm -> attention -> residual -> norm -> MLP -> residual,
#: with separate q/k/v projections and rotate-half RoPE (Qwen3 adds per-head q/k norms, handled)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
#: RoPE types where rotating a key by a position difference is exact (frequencies fixed per model)
ROTATABLE_ROPE = ("default", "linear", "llama3", "yarn")
DEFAULT_RATIO = 0.15
MIN_AUTO_RATIO = 0.15
KEYS_METADATA = "post-rope"  # what segment chunks record about their keys ("keys" metadata entry)


# ---------------------------------------------------------------------------------------------- the model
def _decoder(model: Any) -> Any:
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        raise InvalidInput(f"{type(model).__name__} is not a *ForCausalLM with .model.layers and .model.rotary_emb; "
                           f"CacheBlend supports {', '.join(SUPPORTED_MODEL_TYPES)} models")
    return inner


def _check_model(model: Any) -> None:
    config = model.config
    mtype = getattr(config, "model_type", "")
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise InvalidInput(f"CacheBlend runs the decoder layers itself and knows {', '.join(SUPPORTED_MODEL_TYPES)} "
                           f"models; this one is {mtype!r}")
    # the config's sliding window too: Mistral's attention modules do not carry it (its mask does), and a
    # spec= passed in skips the CachedLM check
    _check_full_attention(config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config)
    inner = _decoder(model)
    if len(inner.layers) < 2:
        raise InvalidInput("CacheBlend needs at least 2 layers (layer 0 and a check layer)")
    for i, layer in enumerate(inner.layers):
        attn = getattr(layer, "self_attn", None)
        parts = [getattr(layer, n, None) for n in ("input_layernorm", "post_attention_layernorm", "mlp")]
        parts += [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if any(p is None for p in parts):
            raise InvalidInput(f"decoder layer {i} ({type(layer).__name__}) lacks the Llama structure CacheBlend "
                               "runs (input_layernorm, self_attn.q/k/v/o_proj, post_attention_layernorm, mlp)")
        if getattr(attn, "sliding_window", None):
            raise InvalidInput(f"layer {i} uses sliding-window attention; CacheBlend needs full attention")


class KeyRotation:
    """Moves RoPE-rotated keys to other positions with the model's own rotary embedding.

    A key computed at position ``p`` is ``R(θ·p) k``; rotating it by ``R(θ·q) R(θ·p)^-1`` gives
    ``R(θ·q) k``, the key at ``q``: exact when the frequencies ``θ`` are fixed per model (default,
    linear, llama3, yarn RoPE; yarn's attention factor scales both tables and is divided out).
    The rotation uses the model's float32 cos/sin tables at ``p`` and ``q`` (angle-difference
    identities), so the result matches, to float32 rounding, what the model computes at ``q``
    itself, however large ``q`` is. ``dynamic`` (NTK) RoPE is accepted only while every position
    stays below the model's original context (its frequencies change with the sequence length
    above it); anything else is refused.
    """

    def __init__(self, model: Any) -> None:
        inner = _decoder(model)
        self.rotary = inner.rotary_emb
        rope_type = getattr(self.rotary, "rope_type", None)
        if not isinstance(rope_type, str):
            raise InvalidInput(f"rotary embedding with per-layer rope types {rope_type!r}: CacheBlend supports one "
                               "RoPE for every layer")
        self.rope_type = rope_type
        self.max_positions: int | None = None
        if rope_type == "dynamic":
            # below the original context, dynamic NTK is the default RoPE; above it the frequencies depend on
            # the sequence length, and keys computed for one length are not the keys of another
            self.max_positions = int(self.rotary.original_max_seq_len)
        elif rope_type not in ROTATABLE_ROPE:
            raise InvalidInput(f"RoPE type {rope_type!r}: re-rotating stored keys to new positions is not exact for "
                               f"it; CacheBlend supports {', '.join(ROTATABLE_ROPE)} (and dynamic below the "
                               "original context)")
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if self.rotary.inv_freq.numel() * 2 != head_dim:
            raise InvalidInput(f"partial rotary embedding ({self.rotary.inv_freq.numel() * 2} of {head_dim} dims); "
                               "CacheBlend rotates whole heads")
        params = dict(getattr(config, "rope_parameters", None) or {})
        #: canonical description recorded in segment chunks (``rope`` metadata): keys rotated under other
        #: RoPE settings (a user override of rope scaling) are not reused
        #: (numbers as floats: a config.json's ``500000.0`` and a config built with ``500000`` are one RoPE)
        self.description = json.dumps(_canonical_numbers(params), sort_keys=True, default=str, separators=(",", ":"))

    def check_positions(self, last: int) -> None:
        if self.max_positions is not None and last >= self.max_positions:
            raise InvalidInput(f"dynamic RoPE: position {last} is beyond the original context "
                               f"({self.max_positions}), where its frequencies depend on the sequence length and "
                               "stored keys cannot be moved; shorten the prompt or use a model with fixed RoPE")

    def table(self, positions: torch.Tensor, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(cos, sin)`` ``[T, head_dim]`` at ``positions``, without the attention factor."""
        self.check_positions(int(positions.max()) if positions.numel() else 0)
        x = torch.empty(0, dtype=torch.float32, device=device)
        cos, sin = self.rotary(x, positions.to(device).view(1, -1))
        scale = float(self.rotary.attention_scaling)
        return cos[0].float() / scale, sin[0].float() / scale

    def shift_table(self, src: torch.Tensor, dst: torch.Tensor, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` ``[T, head_dim]`` of the rotation from positions ``src`` to ``dst``."""
        cb, sb = self.table(src, device)
        ca, sa = self.table(dst, device)
        return ca * cb + sa * sb, sa * cb - ca * sb  # cos(a - b), sin(a - b)

    @staticmethod
    def apply(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``keys`` (``[..., T, head_dim]``, any strides) by ``cos``/``sin`` ``[T, head_dim]``."""
        k = keys.float()
        half = k.shape[-1] // 2
        out = k * cos  # rotate_half(k) * sin, written into the halves without building rotate_half(k)
        out[..., :half].addcmul_(k[..., half:], sin[..., :half], value=-1.0)
        out[..., half:].addcmul_(k[..., :half], sin[..., half:])
        return out.to(keys.dtype)

    def rotate(self, keys: torch.Tensor, src: Any, dst: Any) -> torch.Tensor:
        """``keys`` ``[..., T, head_dim]`` computed at positions ``src`` moved to ``dst`` (ints: first positions)."""
        t = keys.shape[-2]
        src_t = torch.arange(t) + src if isinstance(src, int) else torch.as_tensor(src, dtype=torch.long)
        dst_t = torch.arange(t) + dst if isinstance(dst, int) else torch.as_tensor(dst, dtype=torch.long)
        cos, sin = self.shift_table(src_t, dst_t, keys.device)
        return self.apply(keys, cos, sin)


def _canonical_numbers(value: Any) -> Any:
    """``value`` with every number (not bools) as a float, in dicts and lists, for comparing RoPE settings."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        return {str(k): _canonical_numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical_numbers(v) for v in value]
    return value


def rotate_keys(model: Any, keys: torch.Tensor, src: Any, dst: Any) -> torch.Tensor:
    """Keys ``[..., tokens, head_dim]`` (a transformers cache layer's layout) computed at positions ``src``,
    as the model would have computed them at ``dst`` (first positions as ints, or one per token)."""
    return KeyRotation(model).rotate(keys, src, dst)


# ---------------------------------------------------------------------------------------------- loading
class _SegmentLoader:
    """Loads the stored segments' layers ``layers`` in the background into ``buf`` ``[L, 2, S, H, D]``,
    one layer of every chunk at a time (kvfs.gpu's DeviceReader), recording how long each layer took."""

    def __init__(self, ns: Any, plan: list[PlanItem], buf: torch.Tensor, layers: Sequence[int]) -> None:
        from kvfs.gpu import DeviceReader

        self.plan = plan
        self.buf = buf
        self.layers = list(layers)
        self.reader = DeviceReader(ns, plan, buf.device) if plan else None
        self.base = plan[0].start if plan else 0
        self._cond = threading.Condition()
        self._done: dict[int, tuple[list[bool], Any]] = {}
        self.seconds: dict[int, float] = {}  # load time of each layer
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="kvfs-blend-load", daemon=True)
        if plan:
            self._thread.start()

    def _run(self) -> None:
        try:
            for layer in self.layers:
                if self._stop:
                    return
                t0 = time.perf_counter()
                ok, ev = self.reader.fill(range(layer, layer + 1), self.buf[layer : layer + 1, :, self.base :])
                with self._cond:
                    self.seconds[layer] = time.perf_counter() - t0
                    self._done[layer] = (ok, ev)
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - surfaced to the consumer by wait()
            with self._cond:
                self._error = e
                self._cond.notify_all()

    def wait(self, layer: int) -> list[bool]:
        """Per plan item, whether layer ``layer`` was read and verified into ``buf``."""
        if not self.plan:
            return []
        with self._cond:
            while layer not in self._done and self._error is None:
                self._cond.wait()
            if layer not in self._done:
                raise CacheMiss(f"loading the segments' layer {layer} failed: {self._error}") from self._error
            ok, ev = self._done[layer]
        if ev is not None:
            torch.cuda.current_stream(self.buf.device).wait_event(ev)
        return ok

    def header(self, i: int) -> Any:
        src = self.reader.reader.source(i) if self.reader is not None else None
        if src is not None:
            return src[1]
        return self.reader.ns.store._headers.get(self.plan[i].key.path) if self.reader is not None else None

    def mean_layer_seconds(self) -> float:
        with self._cond:
            return sum(self.seconds.values()) / len(self.seconds) if self.seconds else 0.0

    def close(self) -> None:
        self._stop = True
        if self._thread.is_alive():
            self._thread.join()
        if self.reader is not None:
            self.reader.close()


class _Segments:
    """The segments of one prompt: stored ones loading in the background, the others computed; hands out
    each layer's K (rotated to the prompt's positions) and V, ``[1, kv_heads, S, head_dim]``."""

    def __init__(self, lm: "BlendedLM", segs: list[np.ndarray], prefix_tokens: int, layers: range) -> None:
        self.lm = lm
        self.segs = segs
        self.prefix_tokens = prefix_tokens
        self.layers = layers
        lens = [len(s) for s in segs]
        self.offsets = [int(x) for x in np.concatenate([[0], np.cumsum(lens)])]
        self.total = self.offsets[-1]
        self.first_pos = [lm.segment_start] * len(segs)  # where each segment's stored keys were computed
        self.computed: dict[int, torch.Tensor] = {}  # segment -> KV computed here (CPU)
        #: segments whose stored chunks are intact but unusable here (other RoPE, context, no metadata): what is
        #: computed for them replaces those chunks (a put alone would keep them: their keys are stored)
        self.refused: set[int] = set()
        self.wait_s = 0.0
        self._checked = False
        self._shift: tuple[torch.Tensor, torch.Tensor] | None = None
        self.stored = [lm.ns.has_segment(s) for s in segs]
        self.plan: list[PlanItem] = []
        self.owner: list[int] = []  # plan item -> segment
        for j, s in enumerate(segs):
            if self.stored[j]:
                for k in lm.ns.segment_keys(s):
                    self.plan.append(PlanItem(k, self.offsets[j] + k.start, k.num_tokens, s[k.start : k.end]))
                    self.owner.append(j)
        self.buf = torch.empty(lm.spec.chunk_shape(self.total), dtype=lm.dtype, device=lm.device)
        self.loader = _SegmentLoader(lm.ns, self.plan, self.buf, layers)

    def __enter__(self) -> "_Segments":
        return self

    def __exit__(self, *exc) -> None:
        self.loader.close()

    def compute_missing(self) -> None:
        for j, s in enumerate(self.segs):
            if not self.stored[j]:
                self.computed[j] = self.lm.compute_segment(s)

    def load_layer_s(self) -> float:
        return self.loader.mean_layer_seconds()

    def _check_headers(self, ok: list[bool]) -> set[int]:
        """Segments whose chunks cannot be used (missing, corrupt, other RoPE, inconsistent positions)."""
        first: dict[int, int] = {}
        bad: set[int] = set()
        for i, item in enumerate(self.plan):
            j = self.owner[i]
            header = self.loader.header(i) if ok[i] else None
            p0 = self.lm._usable(header, item) if header is not None else None
            if p0 is None and header is not None:
                self.refused.add(j)
            if p0 is None or first.setdefault(j, p0) != p0:
                bad.add(j)
        for j, p0 in first.items():
            if j not in bad and p0 != self.first_pos[j]:
                self.first_pos[j] = p0
                self._shift = None
        return bad

    def layer(self, li: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = time.perf_counter()
        ok = self.loader.wait(li)  # the loader is done with this layer: nothing else writes it now
        self.wait_s += time.perf_counter() - t
        redo = {self.owner[i] for i, good in enumerate(ok) if not good}
        if not self._checked:
            self._checked = True
            redo |= self._check_headers(ok)
        for j in sorted(redo - set(self.computed)):
            # a stored segment that failed its checks (kvfs warned and quarantined it) or whose keys cannot be
            # moved here: computed alone, and used from this layer on
            self.computed[j] = self.lm.compute_segment(self.segs[j])
            if self.first_pos[j] != self.lm.segment_start:
                self.first_pos[j] = self.lm.segment_start
                self._shift = None
        for j, kv in self.computed.items():
            a, b = self.offsets[j], self.offsets[j + 1]
            self.buf[li, :, a:b].copy_(kv[li].to(self.buf.device, non_blocking=True))
        if self._shift is None:
            src = [torch.arange(len(s)) + self.first_pos[j] for j, s in enumerate(self.segs)]
            src_t = torch.cat(src) if src else torch.zeros(0, dtype=torch.long)
            dst = torch.arange(self.prefix_tokens, self.prefix_tokens + self.total)
            self._shift = self.lm.rotation.shift_table(src_t, dst, self.buf.device)
        k = self.buf[li, 0].transpose(0, 1)  # [H, S, D]
        v = self.buf[li, 1].transpose(0, 1)
        return KeyRotation.apply(k, *self._shift).unsqueeze(0), v.unsqueeze(0)


# ---------------------------------------------------------------------------------------------- results
@dataclass
class Blend:
    """One blended prefill. ``logits`` are the last query token's ``[vocab]``; ``cache`` holds the whole prompt."""

    cache: DynamicCache
    logits: torch.Tensor
    prefix_tokens: int
    segment_tokens: int
    query_tokens: int
    ratio: float  # fraction of segment tokens recomputed after the check layer
    check_layer: int
    selected: np.ndarray  # prompt positions of the recomputed segment tokens, ascending
    prefix_reused: int  # prefix tokens whose KV came from kvfs
    segments_loaded: int  # segments whose KV came from kvfs
    segments_computed: int  # segments computed here (missing, or failed their checks)
    prefix_s: float = 0.0  # the prefix (CachedLM prefill)
    segments_s: float = 0.0  # computing segments that were not stored
    compute_s: float = 0.0  # the blended layers, including waits for layers still loading
    load_wait_s: float = 0.0  # of compute_s: waiting for segment layers
    load_layer_s: float = 0.0  # measured time to load one layer of the stored segments
    pending: list = field(default_factory=list, repr=False)  # what to store after the first token

    @property
    def prompt_tokens(self) -> int:
        return self.prefix_tokens + self.segment_tokens + self.query_tokens

    @property
    def recomputed(self) -> int:
        """Segment tokens recomputed after the check layer."""
        return len(self.selected)


@dataclass
class BlendGeneration:
    """A greedy generation from a blended prefill."""

    tokens: list[int]
    prefill: Blend
    ttft_s: float
    total_s: float
    stored_segments: int = 0
    stored_chunks: int = 0


# ---------------------------------------------------------------------------------------------- the wrapper
class BlendedLM:
    """A Llama-family causal LM whose prompts reuse stored segments (documents) at any position.

    ``store``: an open :class:`kvfs.Store`, a URL or ``None`` (the default store). ``ratio`` (default
    0.15): fraction of segment tokens recomputed after the check layer, or ``"auto"``: as many as the
    recompute of a layer can do while the next layer loads, never below ``min_ratio``.
    ``check_layer`` (default 1): the layer where deviations are measured. ``deviation``: score tokens
    by their key (``"k"``), value (``"v"``) or both (``"kv"``, each normalized by its mean). ``bos``:
    the token segments are computed after (``"auto"``: the config's ``bos_token_id``; ``None``: none,
    segments start at position 0). ``save``: store missing segments and new prefix chunks (after the
    first token, in :meth:`generate`).
    """

    def __init__(self, model: Any, store: Store | str | None = None, *, spec: KVSpec | None = None,
                 model_name: str | None = None, chunk_tokens: int = 256, ratio: float | str = DEFAULT_RATIO,
                 check_layer: int = 1, deviation: str = "kv", min_ratio: float = MIN_AUTO_RATIO,
                 bos: int | str | None = "auto", save: bool = True) -> None:
        _check_model(model)
        self.model = model
        self.lm = CachedLM(model, store, spec=spec, model_name=model_name, chunk_tokens=chunk_tokens, save=save)
        try:
            self._setup(model, ratio, check_layer, deviation, min_ratio, bos, save)
        except BaseException:
            self.lm.close()  # a store opened from a URL for a refused model is not left open
            raise

    def _setup(self, model: Any, ratio: Any, check_layer: Any, deviation: Any, min_ratio: Any, bos: Any,
               save: bool) -> None:
        self.spec = self.lm.spec
        self.ns = self.lm.ns
        self.store = self.lm.store
        self.rotation = KeyRotation(model)
        self.num_layers = len(_decoder(model).layers)
        self.ratio = _check_ratio(ratio)
        self.check_layer = self._check_layer(check_layer)
        self.deviation = _check_choice("deviation", deviation, ("k", "v", "kv"))
        self.min_ratio = _check_ratio(min_ratio)
        if self.min_ratio == "auto":
            raise InvalidInput("min_ratio must be a number in [0, 1]")
        self.save = save
        self.device = self.lm.device
        self.dtype = self.lm._torch_dtype
        if bos == "auto":
            bos = getattr(model.config, "bos_token_id", None)
            bos = bos[0] if isinstance(bos, (list, tuple)) and bos else bos
        elif bos is not None and (isinstance(bos, bool) or not isinstance(bos, int) or bos < 0):
            raise InvalidInput(f"bos must be 'auto', a token id or None, got {bos!r}")
        #: segments are computed alone after this token (the model's BOS), or at positions from 0 without one
        self.bos: int | None = int(bos) if isinstance(bos, int) else None
        self.segment_start = 1 if self.bos is not None else 0
        #: what segment chunks record: post-RoPE keys, the RoPE they were rotated with, and what the segment was
        #: computed after (``after``: ``bos:<id>`` or ``none``): a segment computed without the BOS (or after
        #: another one) has other KV in every layer past 0, which re-rotation cannot fix
        self._extra = {"keys": KEYS_METADATA, "rope": self.rotation.description,
                       "after": f"bos:{self.bos}" if self.bos is not None else "none"}

    def close(self) -> None:
        self.lm.close()

    def __enter__(self) -> "BlendedLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer < self.num_layers:
            raise InvalidInput(f"check_layer must be an integer in 1..{self.num_layers - 1} (layer 0's reused KV "
                               f"deviates from nothing: it depends on the token alone), got {layer!r}")
        return layer

    # ---------------------------------------------------------------------------------- segments
    @torch.inference_mode()
    def compute_segment(self, tokens: Any) -> torch.Tensor:
        """A segment's KV computed alone (after the BOS if the model has one): a CPU tensor
        ``[layers, 2, tokens, kv_heads, head_dim]`` at positions ``segment_start ...``."""
        toks = as_tokens(tokens)
        if len(toks) == 0:
            raise InvalidInput("a segment must hold at least one token")
        ids = toks.astype(np.int64)
        if self.bos is not None:
            ids = np.concatenate([[self.bos], ids])
        self.rotation.check_positions(len(ids) - 1)
        out = self.model(input_ids=torch.from_numpy(ids).unsqueeze(0).to(self.device), use_cache=True,
                         logits_to_keep=1)
        return kv_from_cache(output_cache(out))[:, :, self.segment_start :].contiguous()

    def store_segment(self, tokens: Any, kv: torch.Tensor | None = None) -> int:
        """Store a segment (computing it if ``kv`` is not given); returns the chunks written."""
        if kv is None:
            kv = self.compute_segment(tokens)
        return self.ns.put_segment(tokens, kv.cpu(), positions=self.segment_start, extra=self._extra)

    def has_segment(self, tokens: Any) -> bool:
        return self.ns.has_segment(tokens)

    def _usable(self, header: Any, item: PlanItem) -> int | None:
        """The first position of a stored segment chunk's KV, or None if its keys cannot be moved here."""
        if header is None:
            return None
        meta = header.metadata
        # required, not assumed: a segment stored without them (ns.put_segment by hand) may hold keys rotated
        # some other way, or not at all
        if meta.get("keys") != KEYS_METADATA or meta.get("rope") != self._extra["rope"]:
            self.store._warn_once(f"blend-rope:{self.ns.path}", f"kvfs: segment chunk {item.key.path} was stored "
                                  f"with other RoPE settings, or none (keys={meta.get('keys')}, rope={meta.get('rope')}); "
                                  "recomputing it")
            return None
        if meta.get("after") != self._extra["after"]:
            self.store._warn_once(f"blend-after:{self.ns.path}", f"kvfs: segment chunk {item.key.path} was computed "
                                  f"after {meta.get('after')!r}, this model computes segments after "
                                  f"{self._extra['after']!r} (bos={self.bos}); recomputing it")
            return None
        return header.positions - item.key.start

    # ---------------------------------------------------------------------------------- prefill
    @torch.inference_mode()
    def prefill(self, prefix: Any, segments: Sequence[Any], query: Any, *, ratio: float | str | None = None,
                check_layer: int | None = None, selection: str = "deviation", seed: int = 0) -> Blend:
        """Blended prefill of ``prefix + segments + query`` (see the module doc); stores what it computed
        (new prefix chunks, missing segments) before returning unless ``save=False``.

        ``selection="random"`` recomputes a random set of segment tokens of the same size instead of the
        ones that deviate most (a baseline, for measuring what the selection is worth).
        """
        blend = self._prefill(prefix, segments, query, ratio=ratio, check_layer=check_layer, selection=selection,
                              seed=seed)
        self._store_pending(blend)
        return blend

    def _prefill(self, prefix: Any, segments: Sequence[Any], query: Any, *, ratio: float | str | None,
                 check_layer: int | None, selection: str, seed: int) -> Blend:
        ratio = self.ratio if ratio is None else _check_ratio(ratio)
        c = self.check_layer if check_layer is None else self._check_layer(check_layer)
        _check_choice("selection", selection, ("deviation", "random"))
        pre_toks = as_tokens(prefix, allow_empty=True) if prefix is not None else np.zeros(0, np.uint32)
        segs = _segment_list(segments)
        q_toks = as_tokens(query, allow_empty=True)
        if len(q_toks) == 0:
            raise InvalidInput("the query must hold at least one token: its last token's logits are the output")
        P = len(pre_toks)
        self.rotation.check_positions(P + sum(len(s) for s in segs) + len(q_toks) - 1)
        # layers of the stored segments this prefill reads: from the check layer on (plain reuse: all)
        wanted = range(self.num_layers) if ratio == 0 else range(c, self.num_layers)
        with _Segments(self, segs, P, wanted) as seg:  # stored segments start loading now, in the background
            t0 = time.perf_counter()
            pre = self.lm.prefill(pre_toks) if P else None  # exact: stored chunks reused, the rest computed
            t1 = time.perf_counter()
            seg.compute_missing()  # segments not stored: computed alone now, stored after the first token
            t2 = time.perf_counter()
            prefix_kv = [(layer.keys, layer.values) for layer in pre.cache.layers] if pre is not None else None
            blend = self._blend(seg, q_toks, prefix_kv, ratio, c, selection, seed)
            t3 = time.perf_counter()
        blend.prefix_reused = pre.reused if pre is not None else 0
        blend.prefix_s, blend.segments_s, blend.compute_s = t1 - t0, t2 - t1, t3 - t2
        blend.segments_loaded = len(segs) - len(seg.computed)
        blend.segments_computed = len(seg.computed)
        if self.save:
            if pre is not None:
                blend.pending.append(("prefix", pre_toks, pre.cache))
            for j, kv in seg.computed.items():
                blend.pending.append(("replace" if j in seg.refused else "segment", segs[j], kv))
        return blend

    def _blend(self, seg: "_Segments", q_toks: np.ndarray, prefix_kv: list | None, ratio: float | str, c: int,
               selection: str, seed: int) -> Blend:
        model, inner = self.model, _decoder(self.model)
        dev = self.device
        P, S, Q = seg.prefix_tokens, seg.total, len(q_toks)
        R = S + Q
        N = P + R
        ids = np.concatenate([s.astype(np.int64) for s in seg.segs] + [q_toks.astype(np.int64)])
        pos = torch.arange(P, N, device=dev)
        H, D = self.spec.num_kv_heads, self.spec.head_dim

        if ratio == 0:
            rows = torch.arange(S, R, device=dev)  # the query only: every segment token is reused as stored
            first_partial = 0
        else:
            rows = torch.arange(R, device=dev)
            first_partial = c + 1
        h = inner.embed_tokens(torch.from_numpy(ids[rows.cpu().numpy()]).to(dev).unsqueeze(0))
        cos, sin = inner.rotary_emb(h, pos[rows].unsqueeze(0))  # the model's own tables, in its dtype
        selected = torch.zeros(0, dtype=torch.long, device=dev)
        used_ratio = 0.0 if ratio == 0 else ratio
        full_layer_s = 0.0
        mask = mask_rows = None
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        for li, layer in enumerate(inner.layers):
            attn = layer.self_attn
            dtype = attn.k_proj.weight.dtype
            K = torch.empty((1, H, N, D), dtype=dtype, device=dev)
            V = torch.empty((1, H, N, D), dtype=dtype, device=dev)
            if P:
                K[:, :, :P], V[:, :, :P] = prefix_kv[li]
            t0 = time.perf_counter()
            x = layer.input_layernorm(h)
            k, v = _project_kv(attn, x, cos, sin)
            if li < first_partial:
                # a full layer: K and V of every non-prefix token (the check layer's are compared with the
                # reused ones); attention and MLP for every token, or after the check, for those kept
                K[:, :, P:], V[:, :, P:] = k, v
                if li == c:
                    rk, rv = seg.layer(li)
                    if ratio == "auto":
                        used_ratio = self._auto_ratio(full_layer_s, seg.load_layer_s())
                    selected = self._select(k[:, :, :S], v[:, :, :S], rk, rv, used_ratio, selection, seed)
                    keep = torch.cat([selected, torch.arange(S, R, device=dev)])
                    rows, h, x, cos, sin = rows[keep], h[:, keep], x[:, keep], cos[:, keep], sin[:, keep]
            else:
                # a partial layer: the reused KV, patched with the fresh K/V of the tokens recomputed
                K[:, :, P : P + S], V[:, :, P : P + S] = seg.layer(li)
                K[:, :, P + rows], V[:, :, P + rows] = k, v
            q = _project_q(attn, x, cos, sin)
            if mask_rows is not rows:  # the rows computed change once, at the check layer
                mask, mask_rows = causal_mask(P + rows, N), rows
            h = _attend_mlp(layer, attn, h, q, K, V, mask)
            if li == 0:
                full_layer_s = time.perf_counter() - t0
            cache.append((K, V))
        logits = model.lm_head(inner.norm(h[:, -1:]))[0, -1]
        return Blend(cache=DynamicCache(cache), logits=logits, prefix_tokens=P, segment_tokens=S, query_tokens=Q,
                     ratio=float(used_ratio), check_layer=c, selected=(selected + P).cpu().numpy(),
                     prefix_reused=0, segments_loaded=0, segments_computed=0, load_wait_s=seg.wait_s,
                     load_layer_s=seg.load_layer_s())

    def _select(self, k, v, rk, rv, ratio: float, selection: str, seed: int) -> torch.Tensor:
        """Indices (into the segment tokens) of the ``ceil(ratio * S)`` tokens to recompute, ascending."""
        S = k.shape[2]
        n = min(S, math.ceil(ratio * S - 1e-9))
        if n == 0:
            return torch.zeros(0, dtype=torch.long, device=k.device)
        if n == S:
            return torch.arange(S, device=k.device)
        if selection == "random":
            g = torch.Generator().manual_seed(seed)
            return torch.randperm(S, generator=g)[:n].sort().values.to(k.device)
        score = _deviation(k, rk) if self.deviation != "v" else _deviation(v, rv)
        if self.deviation == "kv":
            dv = _deviation(v, rv)
            score = score / score.mean().clamp_min(1e-30) + dv / dv.mean().clamp_min(1e-30)
        return torch.topk(score, n).indices.sort().values

    def _auto_ratio(self, full_layer_s: float, load_layer_s: float) -> float:
        """The fraction whose recompute of a layer takes about as long as loading the next layer."""
        if full_layer_s <= 0:
            return max(self.min_ratio, DEFAULT_RATIO)
        return float(min(1.0, max(self.min_ratio, load_layer_s / full_layer_s)))

    # ---------------------------------------------------------------------------------- storing, generating
    def _store_pending(self, blend: Blend) -> tuple[int, int]:
        """Store what the prefill computed exactly: new prefix chunks and missing segments (never the blend)."""
        segments = chunks = 0
        for kind, toks, what in blend.pending:
            if kind == "prefix":
                chunks += self.lm.store_prompt(toks, what)
            else:
                if kind == "replace":  # its stored chunks cannot be used here: evicted (unless pinned), rewritten
                    self.store.evict([k.path for k in self.ns.segment_keys(toks)])
                chunks += self.store_segment(toks, what)
                segments += 1
        blend.pending = []
        return segments, chunks

    @torch.inference_mode()
    def generate(self, prefix: Any, segments: Sequence[Any], query: Any, max_new_tokens: int = 16, *,
                 ratio: float | str | None = None, check_layer: int | None = None, selection: str = "deviation",
                 seed: int = 0) -> BlendGeneration:
        """Greedy generation from a blended prefill (options as for :meth:`prefill`). What the prefill
        computed exactly is stored once the first token exists, so storing never delays it."""
        if max_new_tokens < 1:
            raise InvalidInput(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        t0 = time.perf_counter()
        blend = self._prefill(prefix, segments, query, ratio=ratio, check_layer=check_layer, selection=selection,
                              seed=seed)
        tok = int(torch.argmax(blend.logits))
        ttft = time.perf_counter() - t0
        stored_segments, stored_chunks = self._store_pending(blend)
        new = self.lm.decode(tok, blend.cache, max_new_tokens)
        return BlendGeneration(new, blend, ttft, time.perf_counter() - t0, stored_segments, stored_chunks)


# ---------------------------------------------------------------------------------------------- layer parts
def _heads(x: torch.Tensor, proj: Any, head_dim: int, norm: Any = None) -> torch.Tensor:
    """``proj(x)`` ``[1, T, hidden]`` -> ``[1, heads, T, head_dim]`` (with Qwen3's per-head norm)."""
    y = proj(x).view(x.shape[0], x.shape[1], -1, head_dim)
    if norm is not None:
        y = norm(y)
    return y.transpose(1, 2)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _project_kv(attn: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    d = attn.head_dim
    k = _rope(_heads(x, attn.k_proj, d, getattr(attn, "k_norm", None)), cos, sin)
    return k, _heads(x, attn.v_proj, d)


def _project_q(attn: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _rope(_heads(x, attn.q_proj, attn.head_dim, getattr(attn, "q_norm", None)), cos, sin)


@dataclass(frozen=True)
class CausalTail:
    """The queries are the last ``n`` of ``nkeys`` positions, in order (a full layer): plain causal attention."""

    n: int
    nkeys: int


def causal_mask(qpos: torch.Tensor, nkeys: int) -> CausalTail | torch.Tensor:
    """The exact causal mask of queries at prompt positions ``qpos`` over keys at positions ``0 … nkeys-1``:
    a query sees the keys at positions <= its own. The last positions in order (a full layer) give a
    :class:`CausalTail`, which :func:`attend` runs with SDPA's causal kernel instead of a dense mask;
    a few queries (the query alone, plain reuse) get a dense mask."""
    n = qpos.numel()
    # (padded to a square problem, see attend: worth it while the padding is at most the queries)
    if 2 * n >= nkeys and int(qpos[0]) == nkeys - n and int(qpos[-1]) == nkeys - 1 \
            and bool((qpos[1:] - qpos[:-1] == 1).all()):
        return CausalTail(n, nkeys)
    return torch.arange(nkeys, device=qpos.device).unsqueeze(0) <= qpos.unsqueeze(1)


def attend(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, mask: CausalTail | torch.Tensor,
           scale: float) -> torch.Tensor:
    """SDPA of ``q`` ``[1, heads, n, D]`` over ``K``/``V`` ``[1, kv_heads, nkeys, D]`` under ``mask``."""
    gqa = q.shape[1] != K.shape[1]
    if isinstance(mask, CausalTail):
        pad = mask.nkeys - mask.n
        if pad:
            # queries for the first `pad` positions (dropped after): a square causal problem, which SDPA's
            # fused kernels run without materializing a mask (a lower-right bias on CPU builds one)
            q = torch.cat([q.new_zeros(q.shape[0], q.shape[1], pad, q.shape[3]), q], dim=2)
        out = F.scaled_dot_product_attention(q, K, V, is_causal=True, scale=scale, enable_gqa=gqa)
        return out[:, :, pad:]
    return F.scaled_dot_product_attention(q, K, V, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _attend_mlp(layer: Any, attn: Any, h: torch.Tensor, q: torch.Tensor, K: torch.Tensor, V: torch.Tensor,
                mask: CausalTail | torch.Tensor) -> torch.Tensor:
    """Attention of ``q`` over the keys ``mask`` (:func:`causal_mask`) lets each see, then the residual, the
    MLP and its residual: the rest of the decoder layer for these tokens."""
    out = attend(q, K, V, mask, attn.scaling)
    out = out.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1)
    h = h + attn.o_proj(out)
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _deviation(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per token, the squared distance between fresh and reused ``[1, H, S, D]`` (summed over heads and dims)."""
    return (new.float() - old.float()).pow(2).sum(dim=(0, 1, 3))


def _segment_list(segments: Any) -> list[np.ndarray]:
    """The segments as token arrays: a list of token-id sequences, one per document, none empty."""
    if isinstance(segments, (str, bytes)) or not hasattr(segments, "__iter__"):
        raise InvalidInput(f"segments must be a list of token-id sequences (one per document), got "
                           f"{type(segments).__name__}")
    segs = list(segments)
    if segs and all(isinstance(s, (int, np.integer)) or (isinstance(s, torch.Tensor) and s.dim() == 0)
                    for s in segs):
        raise InvalidInput("segments must be a list of token-id sequences (one per document), got one flat sequence "
                           "of token ids: pass [tokens] for a single document")
    out = []
    for i, s in enumerate(segs):
        try:
            toks = as_tokens(s, allow_empty=True)
        except InvalidInput as e:
            raise InvalidInput(f"segment {i}: {e}") from None
        if len(toks) == 0:
            raise InvalidInput(f"segment {i} is empty; pass segments of at least one token")
        out.append(toks)
    return out


def _check_ratio(ratio: Any) -> float | str:
    if ratio == "auto":
        return "auto"
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) <= 1.0:
        raise InvalidInput(f"ratio must be a number in [0, 1] or 'auto', got {ratio!r}")
    return float(ratio)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise InvalidInput(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


__all__ = ["Blend", "BlendGeneration", "BlendedLM", "CausalTail", "KeyRotation", "attend", "causal_mask",
           "rotate_keys"]
