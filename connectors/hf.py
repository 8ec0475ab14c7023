"""HuggingFace transformers: prefill that reuses stored KV, stores what it computed, generates.

    import kvfs
    from kvfs.connectors.hf import CachedLM

    lm = CachedLM(model, "lmdb:///nvme/kvfs")      # any store URL, or an open kvfs.Store
    out = lm.generate(prompt_ids, max_new_tokens=32)
    out.tokens, out.prefill.reused, out.ttft_s

For one prompt, :meth:`CachedLM.prefill` looks up the longest stored prefix
of the prompt *without its last token* (that token must be computed: its
logits are the first output) and starts loading its KV layer by layer in the
background (:meth:`kvfs.Namespace.prefetch`, onto the model's device; for a
model on the CPU the whole prefix is loaded first by default, see
:class:`CachedLM`), runs
the model on the remaining tokens only, each attention layer taking its
layer of the prefix from the prefetch as it reaches it (a ``DynamicCache``
whose layers fill themselves), and stores the prompt's new chunks
(:meth:`kvfs.Namespace.saver`) once the first token's logits exist, so
storing never delays the first token. :meth:`CachedLM.generate` then decodes
greedily. Outputs are the model's own: the cached KV is exactly what the
model computed for those tokens, so logits match a full forward to float
rounding and greedy outputs are token-identical.

Works for decoder-only models whose cache is a plain ``DynamicCache`` of
full-attention layers (Llama, Mistral without sliding window, Qwen2/3,
...). The namespace (:func:`kv_spec`) comes from the model config: model
name and revision, layers, KV heads, head size, KV dtype.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..errors import InvalidInput
from ..keys import as_tokens
from ..namespace import Namespace
from ..spec import KVSpec
from ..store import Store
from ..store import open as open_store


def kv_spec(model: Any, *, model_name: str | None = None, revision: str | None = None, dtype: Any = None,
            chunk_tokens: int = 256) -> KVSpec:
    """The namespace of a transformers model's KV, from its config.

    ``model`` is a ``PreTrainedModel`` or its config. The model name is the
    config's ``name_or_path`` (what ``from_pretrained`` was given) unless
    ``model_name`` is passed; the revision is the hub commit the config was
    loaded from, or for a model loaded from a local directory a fingerprint
    of its config and weight files (:func:`kvfs.modelid.local_revision`).
    ``dtype`` defaults to the model's dtype.
    """
    config = getattr(model, "config", model)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    _check_full_attention(text)
    name = model_name or getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "")
    if not name:
        raise InvalidInput(
            "the model has no name (built from a config?): pass model_name='org/model' so that its KV "
            "is stored under a name that identifies its weights"
        )
    if revision is None:
        from kvfs.modelid import local_revision

        # a hub commit; for a model loaded from a directory, a fingerprint of its config and weights (two
        # checkpoints saved at one path must not share KV)
        revision = getattr(config, "_commit_hash", None) or local_revision(name) or ""
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if getattr(text, "multi_query", False) and not getattr(text, "new_decoder_architecture", False):
        kv_heads = 1  # Falcon's multi-query attention caches one KV head (its num_kv_heads stays the query heads)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    if dtype is None:
        dtype = getattr(model, "dtype", None) or getattr(config, "dtype", None) or torch.float32
    return KVSpec(name, num_layers=text.num_hidden_layers, num_kv_heads=kv_heads, head_dim=head_dim,
                  dtype=str(dtype).removeprefix("torch."), chunk_tokens=chunk_tokens, revision=revision)


def _check_full_attention(text_config: Any) -> None:
    if getattr(text_config, "kv_lora_rank", None):
        raise InvalidInput(
            f"kvfs.connectors.hf stores one K and one V of the same shape per token and layer; this "
            f"{getattr(text_config, 'model_type', 'model')} model uses multi-head latent attention (kv_lora_rank="
            f"{text_config.kv_lora_rank}), whose K and V differ in size: use the vLLM or SGLang connector"
        )
    types = getattr(text_config, "layer_types", None) or []
    other = sorted({t for t in types if t != "full_attention"})
    sliding = getattr(text_config, "sliding_window", None) and getattr(text_config, "use_sliding_window", True)
    if other or sliding:
        what = ", ".join(other) if other else f"sliding_window={text_config.sliding_window}"
        raise InvalidInput(
            f"kvfs.connectors.hf stores full-attention KV only; this model has {what} layers, whose cache "
            "does not hold every token's KV"
        )


# ---------------------------------------------------------------------------------------------- conversion
def cache_from_kv(kv: torch.Tensor) -> DynamicCache:
    """A ``DynamicCache`` (batch 1) holding ``kv`` ``[layers, 2, tokens, kv_heads, head_dim]``.

    The cache's layers are views of ``kv`` (``[1, kv_heads, tokens, head_dim]``), not copies:
    ``DynamicCache(pairs)`` would concatenate every layer into new memory, a second copy of the whole
    prefix before the model's first update concatenates it again.
    """
    cache = DynamicCache()
    layers = []
    for i in range(kv.shape[0]):
        k, v = kv[i, 0].transpose(0, 1).unsqueeze(0), kv[i, 1].transpose(0, 1).unsqueeze(0)
        layer = DynamicLayer()
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        layers.append(layer)
    cache.layers = layers
    return cache


_CACHE_ARG: dict[Any, str] = {}


def cache_arg(model: Any) -> str:
    """The name a transformers model's ``forward`` takes its KV cache under: ``cache`` in the transformers
    versions that deprecate ``past_key_values`` (5.2x, removing it in 5.40), ``past_key_values`` before."""
    fwd = type(model).forward
    name = _CACHE_ARG.get(fwd)
    if name is None:
        try:
            params = inspect.signature(fwd).parameters
        except (TypeError, ValueError):
            params = {}
        name = _CACHE_ARG[fwd] = "cache" if "cache" in params else "past_key_values"
    return name


def run_model(model: Any, input_ids: torch.Tensor, cache: Any = None, **kwargs: Any) -> Any:
    """``model(input_ids, use_cache=True, ...)`` with ``cache`` passed under the name this transformers takes."""
    if cache is not None:
        kwargs[cache_arg(model)] = cache
    return model(input_ids=input_ids, use_cache=True, **kwargs)


def output_cache(out: Any) -> Any:
    """The KV cache a forward pass returned (``out.cache`` in newer transformers, ``out.past_key_values``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def kv_from_cache(cache: DynamicCache, ntokens: int | None = None) -> torch.Tensor:
    """The first ``ntokens`` tokens of a batch-1 ``DynamicCache`` as one contiguous CPU tensor
    ``[layers, 2, tokens, kv_heads, head_dim]`` (the layout of a kvfs chunk)."""
    layers = cache.layers
    for i, layer in enumerate(layers):
        if type(layer) not in (DynamicLayer, _PrefetchedLayer):
            raise InvalidInput(f"cache layer {i} is a {type(layer).__name__}; kvfs stores full-attention "
                               "DynamicLayer caches only")
    k0 = layers[0].keys
    if k0 is None or k0.dim() != 4 or k0.shape[0] != 1:
        raise InvalidInput("kvfs.connectors.hf handles batch-1 caches [1, kv_heads, tokens, head_dim]")
    t = k0.shape[2] if ntokens is None else ntokens
    out = torch.empty((len(layers), 2, t, k0.shape[1], k0.shape[3]), dtype=k0.dtype)
    for i, layer in enumerate(layers):
        out[i, 0].copy_(layer.keys[0, :, :t].transpose(0, 1))
        out[i, 1].copy_(layer.values[0, :, :t].transpose(0, 1))
    return out


class _PrefixShrank(Exception):
    """A prefix chunk failed after earlier layers had used it: the prefill must be redone."""


class _PrefetchedLayer(DynamicLayer):
    """A cache layer that takes its prefix KV from a prefetch when the model first reaches it."""

    def __init__(self, prefetch: Any, index: int, ntokens: int) -> None:
        super().__init__()
        self._prefetch = prefetch
        self._index = index
        self._ntokens = ntokens

    def get_seq_length(self) -> int:
        return self._ntokens if self._prefetch is not None else super().get_seq_length()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self._prefetch is not None:
            k, v = self._prefetch.wait_layer(self._index)  # [tokens, heads, dim], loaded and verified
            if k.shape[0] != self._ntokens:
                raise _PrefixShrank()
            self.lazy_initialization(key_states, value_states)
            self.keys = k.transpose(0, 1).unsqueeze(0)
            self.values = v.transpose(0, 1).unsqueeze(0)
            self._prefetch = None
        return super().update(key_states, value_states, *args, **kwargs)  # the concatenation copies the view


def _prompt_tokens(input_ids: Any) -> np.ndarray:
    if isinstance(input_ids, Mapping) and "input_ids" in input_ids:  # a tokenizer's output (BatchEncoding)
        raise InvalidInput("pass the prompt's token ids (enc['input_ids']), not the tokenizer's output: CachedLM runs "
                           "one prompt without padding, so it takes no attention mask")
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
        if input_ids.shape[0] != 1:
            raise InvalidInput(f"one prompt at a time: input_ids has batch size {input_ids.shape[0]}")
        input_ids = input_ids[0]
    return as_tokens(input_ids)


# ---------------------------------------------------------------------------------------------- results
@dataclass
class Prefill:
    """What one prefill did. ``logits`` are the last prompt token's, ``[vocab]``."""

    cache: DynamicCache
    logits: torch.Tensor
    prompt_tokens: int
    reused: int  # leading tokens whose KV came from kvfs
    load_s: float  # layer-wise: lookup and starting the prefetch (the loading overlaps the compute); else the load
    compute_s: float  # the model on the remaining tokens (layer-wise: including waits for layers still loading)

    @property
    def computed(self) -> int:
        return self.prompt_tokens - self.reused


@dataclass
class Generation:
    """A greedy generation: the new tokens, the prefill, and timings."""

    tokens: list[int]
    prefill: Prefill
    ttft_s: float  # prompt in -> first new token out
    total_s: float
    stored_chunks: int = 0
    save_s: float = 0.0


# ---------------------------------------------------------------------------------------------- the wrapper
class CachedLM:
    """A causal LM whose prefills reuse and store KV in a kvfs store.

    ``store`` is an open :class:`kvfs.Store` (left open), a store URL or
    ``None`` for the default store (opened here and closed by :meth:`close`).
    ``load``/``save`` switch reuse and storing (``load=False`` is the full
    prefill baseline). ``layerwise``: overlap the load with the compute, layer
    by layer (``True``), or load the whole prefix before the model runs
    (``False``); ``None`` (default) overlaps when the model is on a GPU and
    loads first on the CPU, where the loader's threads and the model's share
    the cores (loading first measured 20-35% faster there).
    """

    def __init__(self, model: Any, store: Store | str | None = None, *, spec: KVSpec | None = None,
                 model_name: str | None = None, chunk_tokens: int = 256, load: bool = True,
                 save: bool = True, layerwise: bool | None = None) -> None:
        self.model = model
        self.spec = spec or kv_spec(model, model_name=model_name, chunk_tokens=chunk_tokens)
        self._own_store = not isinstance(store, Store)
        self.store = open_store(store) if self._own_store else store
        self.ns: Namespace = self.store.namespace(self.spec)
        self.load = load
        self.save = save
        self._torch_dtype = getattr(torch, self.spec.dtype)
        self.device = next(model.parameters()).device
        self.layerwise = self.device.type != "cpu" if layerwise is None else bool(layerwise)

    def close(self) -> None:
        if self._own_store:
            self.store.close()

    def __enter__(self) -> "CachedLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------------------------- loading
    def load_prefix(self, tokens: Any) -> tuple[int, DynamicCache]:
        """The longest stored prefix of ``tokens`` as ``(n, DynamicCache of tokens[:n])``.

        Only verified chunks are used: the prefix stops at the first chunk
        that is missing or fails its checks (kvfs warns and quarantines it).
        """
        toks = as_tokens(tokens)
        plan = self.ns.plan(toks)
        if not plan:
            return 0, DynamicCache()
        total = plan[-1].end
        buf = torch.empty(self.spec.chunk_shape(total), dtype=self._torch_dtype)
        ok = self.ns.read(plan, self.ns.as_raw_kv(buf, total))
        n = total
        for p, good in zip(plan, ok):
            if not good:
                n = p.start
                break
        if n == 0:
            return 0, DynamicCache()
        kv = buf[:, :, :n]
        if self.device.type != "cpu":
            kv = kv.to(self.device, non_blocking=True)
        return n, cache_from_kv(kv)

    def store_prompt(self, tokens: Any, cache: DynamicCache) -> int:
        """Store the KV of ``tokens`` held in ``cache``: only chunks not stored yet are copied and written."""
        toks = as_tokens(tokens)
        t = len(toks)
        saver = self.ns.saver(toks)
        if not saver.keys:
            saver.abort()
            return 0
        try:
            for i, layer in enumerate(cache.layers):
                if type(layer) not in (DynamicLayer, _PrefetchedLayer):
                    raise InvalidInput(f"cache layer {i} is a {type(layer).__name__}; kvfs stores full-attention "
                                       "DynamicLayer caches only")
                saver.save_layer(i, layer.keys[0, :, :t].transpose(0, 1), layer.values[0, :, :t].transpose(0, 1))
        except BaseException:
            saver.abort()
            raise
        return saver.finish()

    # ---------------------------------------------------------------------------------- prefill
    @torch.inference_mode()
    def prefill(self, input_ids: Any) -> Prefill:
        """Run the prompt, reusing its longest stored prefix (never the last token)."""
        toks = _prompt_tokens(input_ids)
        t0 = time.perf_counter()
        n, cache = 0, DynamicCache()
        if self.load and len(toks) > 1 and not self.layerwise:
            n, cache = self.load_prefix(toks[:-1])
        elif self.load and len(toks) > 1:
            prefetch = self.ns.prefetch(toks[:-1], device=self.device)
            try:
                n = prefetch.num_tokens
                if n:
                    cache.layers = [_PrefetchedLayer(prefetch, i, n) for i in range(self.spec.num_layers)]
                    t1 = time.perf_counter()
                    try:
                        out = self._forward(toks[n:], cache)
                        if prefetch.valid_tokens == n:
                            t2 = time.perf_counter()
                            return Prefill(output_cache(out), out.logits[0, -1], len(toks), n, t1 - t0, t2 - t1)
                    except _PrefixShrank:
                        pass
                    # a chunk failed its checks after earlier layers had used it (kvfs warned and quarantined
                    # it): redo the prefill on the prefix that every layer loaded and verified
                    n = prefetch.valid_tokens
            finally:
                prefetch.close()
            n, cache = self.load_prefix(toks[:n]) if n else (0, DynamicCache())
        t1 = time.perf_counter()
        out = self._forward(toks[n:], cache)
        t2 = time.perf_counter()
        return Prefill(output_cache(out), out.logits[0, -1], len(toks), n, t1 - t0, t2 - t1)

    def _forward(self, tokens: np.ndarray, cache: DynamicCache):
        ids = torch.from_numpy(tokens.astype(np.int64)).unsqueeze(0).to(self.device)
        return run_model(self.model, ids, cache, logits_to_keep=1)

    @torch.inference_mode()
    def generate(self, input_ids: Any, max_new_tokens: int = 16) -> Generation:
        """Greedy generation of up to ``max_new_tokens`` tokens (stops at the model's EOS, if it has one)."""
        if max_new_tokens < 1:
            raise InvalidInput(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        toks = _prompt_tokens(input_ids)
        t0 = time.perf_counter()
        pre = self.prefill(toks)
        tok = int(torch.argmax(pre.logits))
        ttft = time.perf_counter() - t0
        stored, save_s = 0, 0.0
        if self.save:
            # after the first token: storing never delays it
            t = time.perf_counter()
            stored = self.store_prompt(toks, pre.cache)
            save_s = time.perf_counter() - t
        new = self.decode(tok, pre.cache, max_new_tokens)
        return Generation(new, pre, ttft, time.perf_counter() - t0, stored, save_s)

    def decode(self, tok: int, cache: Any, max_new_tokens: int) -> list[int]:
        """Greedy decoding from the first token ``tok`` and the prompt's ``cache``: the new token ids."""
        eos = self._eos()
        new = [tok]
        while len(new) < max_new_tokens and tok not in eos:
            step = torch.tensor([[tok]], dtype=torch.long, device=self.device)
            out = run_model(self.model, step, cache)
            cache = output_cache(out)
            tok = int(torch.argmax(out.logits[0, -1]))
            new.append(tok)
        return new

    def _eos(self) -> set[int]:
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            return set()
        return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
