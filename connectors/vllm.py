"""vLLM V1: ``KVFSConnector``, a ``KVConnectorBase_V1`` that loads and saves prefix KV in a kvfs store.

Configure it as any vLLM connector::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVFSConnector",
        "kv_connector_module_path": "kvfs.connectors.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"url": "s3://bucket/kv"}}'

``kv_connector_extra_config``: ``url`` (any kvfs store URL; default
``$KVFS_URL``, else the embedded store), ``chunk_tokens`` (default 256) and
``model`` (the name KV is stored under; default: vLLM's model name).
Roles: ``kv_producer`` only saves, ``kv_consumer`` only loads, ``kv_both``
does both; a producer and a consumer sharing one store is prefill/decode
disaggregation through storage.

How one request goes through it:

- scheduler, ``get_num_new_matched_tokens``: how many tokens past vLLM's own
  prefix-cache hit kvfs holds: a lookup of the prompt without its last token
  (the last token is always computed: its logits are the output), rounded
  down to vLLM's block size. Read-only; nothing is reserved.
- scheduler, ``update_state_after_alloc``: remembers which blocks the
  external tokens go to.
- scheduler, ``build_connector_meta``: a :class:`KVFSConnectorMetadata` per
  step: what to load (token ids, token range, block ids) and what to save
  (a prompt whose prefill completes this step, unless kvfs already holds
  all of it).
- worker, ``start_load_kv``: reads the chunks (verified: checksums, token ids)
  and scatters them into the paged cache; a chunk that is missing or fails
  its checks is not loaded, and the blocks it would have filled are reported
  by ``get_block_ids_with_load_errors`` so vLLM recomputes them.
- worker, ``save_kv_layer``: gathers each layer's KV of the saved prompts out
  of the paged cache as the forward pass produces it; ``wait_for_save``
  gathers the rest and hands the copies to a background writer (bounded by
  ``save_queue_bytes``, default 2 GiB; ``save_in_background: false`` writes
  before the step ends). Chunks already stored are skipped.

Requests with LoRA adapters, multimodal inputs, prompt embeddings or a
``cache_salt`` are passed through untouched: their KV depends on more than
the token ids kvfs keys it by. Pipeline parallelism is not supported; with
tensor parallelism each rank stores its own KV heads in a namespace of its
own (``tp_rank``/``tp_size`` in the KVSpec), and the scheduler counts a
prefix only as far as every rank's namespace holds it. MLA's latent KV (the
same on every rank) is one namespace, saved by rank 0 and loaded by all.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

from ..errors import KVFSError
from ..gpu.hostpool import StagingPool
from ..spec import KVSpec, canonical_dtype
from ..store import open as open_store
from ..units import parse_bool, parse_size
from .paged import PagedCache, SlotIndex, slot_mapping

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("kvfs.vllm")

__all__ = ["KVFSConnector", "KVFSConnectorMetadata", "LoadSpec", "SaveSpec", "kv_spec_for"]


# ---------------------------------------------------------------------------------------------- metadata
@dataclass
class LoadSpec:
    """Load the KV of tokens ``[start, end)`` of ``token_ids`` into the request's blocks."""

    req_id: str
    token_ids: list[int]  # the prompt's first `end` tokens (the keys hash the whole prefix)
    start: int
    end: int
    block_ids: list[int]  # the request's blocks, from its first token


@dataclass
class SaveSpec:
    """Store the KV of ``token_ids`` (a whole prompt), found in the request's blocks, from token ``start`` on
    (a chunk boundary: the chunks before it were stored when the scheduler looked). ``computed``: the first token
    the step computes (the KV before it was in the blocks already: loaded, cached or computed in earlier steps)."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    start: int = 0
    computed: int = 0


@dataclass
class KVFSConnectorMetadata(KVConnectorMetadata):
    """One scheduler step's work for the workers' connectors."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class _Tracked:
    """Scheduler-side state of one running request."""

    token_ids: list[int]
    block_ids: list[int]


@dataclass
class _Loading:
    """Worker-side: a prefix being loaded this step, layer by layer."""

    load: LoadSpec
    prefetch: Any  # kvfs.gpu.Prefetcher
    valid: int = 1 << 62  # tokens every layer so far loaded and verified
    done: set[int] = field(default_factory=set)
    slots: SlotIndex | None = None


@dataclass
class _Staged:
    """Worker-side: a prompt being saved this step, gathered layer by layer into CPU memory."""

    save: SaveSpec
    kv: torch.Tensor  # [layers, planes, tokens - start, heads, dim]
    slots: SlotIndex
    start: int  # the first token gathered (a chunk boundary)
    done: set[int] = field(default_factory=set)


class _SaveWriter:
    """Writes gathered prompts to kvfs on a thread of its own, so that an engine step does not wait for storage.

    ``wait_for_save`` must finish copying a prompt's KV out of the paged cache
    before it returns (vLLM may reuse the blocks at once); the write to the
    store need not. Staged prompts wait here, oldest first, up to ``limit``
    bytes: a step that would go over it waits until earlier writes are done
    (back-pressure, never unbounded memory). A prompt is always admitted when
    nothing is waiting, however large. Write errors are logged, never raised
    into inference; :meth:`drain` waits for everything queued.
    """

    def __init__(self, ns: Any, limit: int, release: Any = None) -> None:
        self.ns = ns
        self.limit = limit
        self._release = release  # called with each prompt's KV once its write is over
        self._cond = threading.Condition()
        self._queue: list[tuple[str, list[int], torch.Tensor, int, int]] = []  # (req, tokens, kv, start, bytes)
        self._bytes = 0  # queued plus being written
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, req_id: str, token_ids: list[int], kv: torch.Tensor, start: int = 0) -> None:
        """Queue ``kv``, the KV of ``token_ids[start:]``, for writing."""
        n = kv.numel() * kv.element_size()
        with self._cond:
            if self._closed:
                raise RuntimeError("the kvfs save writer is shut down")
            while self._bytes and self._bytes + n > self.limit:
                self._cond.wait()
            self._queue.append((req_id, token_ids, kv, start, n))
            self._bytes += n
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kvfs-vllm-saves", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                req_id, token_ids, kv, start, n = self._queue[0]
            try:
                self.ns.put(token_ids, kv, start=start)
            except OSError as e:  # a full or unreachable store must not fail inference
                log.warning("kvfs: could not store the KV of request %s: %s", req_id, e)
            except Exception:  # noqa: BLE001 - nobody to raise to on this thread; the next prompt still goes
                log.exception("kvfs: storing the KV of request %s failed", req_id)
            if self._release is not None:
                self._release(kv)
            with self._cond:
                self._queue.pop(0)
                self._bytes -= n
                self._cond.notify_all()

    @property
    def pending(self) -> int:
        """Prompts queued or being written."""
        with self._cond:
            return len(self._queue)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted prompt is written (or failed); False if ``timeout`` ran out first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue, timeout)

    def close(self, timeout: float | None = None) -> None:
        if not self.drain(timeout):
            log.warning("kvfs: %d prompts were still being stored at shutdown; their KV is not saved",
                        self.pending)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)


# ---------------------------------------------------------------------------------------------- the spec
def _attention_spec(kv_cache_config: "KVCacheConfig"):
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(
            f"KVFSConnector handles models with one KV cache group; this one has {len(groups)} "
            "(hybrid attention). Run without the connector or with a full-attention model."
        )
    spec = groups[0].kv_cache_spec
    if not isinstance(spec, FullAttentionSpec) or type(spec).__name__ not in ("FullAttentionSpec",
                                                                              "MLAAttentionSpec"):
        raise ValueError(f"KVFSConnector stores full-attention or MLA KV caches, not {type(spec).__name__}")
    packed = spec.num_head_slots is not None or spec.state_content_bytes is not None
    if packed or getattr(spec.kv_quant_mode, "name", "NONE") != "NONE" or spec.tokens_per_state != 1:
        raise ValueError("KVFSConnector does not handle packed or quantized-with-scales KV cache pages")
    if not isinstance(spec, MLAAttentionSpec) and spec.head_size_v != spec.head_size:
        raise ValueError(f"KVFSConnector needs K and V of one head size (got {spec.head_size} and "
                         f"{spec.head_size_v})")
    return spec, list(groups[0].layer_names)


#: the keys of ``kv_connector_extra_config`` and what each holds
EXTRA_KEYS = {
    "url": "a kvfs store URL",
    "chunk_tokens": "a whole number of tokens",
    "model": "a model name",
    "revision": "a revision",
    "prefetch_bytes": "a size",
    "save_in_background": "true or false",
    "save_queue_bytes": "a size",
}


def _extra_config(vllm_config: "VllmConfig") -> dict[str, Any]:
    """``kv_connector_extra_config``, checked: a misspelt key would otherwise be ignored (a misspelt
    ``chunk_tokens`` silently puts every chunk in another namespace), a wrong type misread."""
    extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
    for key, value in extra.items():
        if key not in EXTRA_KEYS:
            import difflib

            near = difflib.get_close_matches(str(key), EXTRA_KEYS, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ValueError(f"KVFSConnector: unknown kv_connector_extra_config key {key!r}; {hint}"
                             f"the keys are {', '.join(EXTRA_KEYS)}")
        if key in ("url", "model", "revision") and value is not None and not isinstance(value, str):
            raise ValueError(f"KVFSConnector: kv_connector_extra_config.{key} must be {EXTRA_KEYS[key]} (a string), "
                             f"got {value!r}")
    ct = extra.get("chunk_tokens", 256)
    if isinstance(ct, str) and ct.strip().isdigit():
        ct = int(ct)
    if isinstance(ct, bool) or not isinstance(ct, int) or ct < 1:
        raise ValueError(f"KVFSConnector: kv_connector_extra_config.chunk_tokens must be a whole number of tokens "
                         f">= 1 (e.g. 256), got {extra['chunk_tokens']!r}")
    return {**extra, "chunk_tokens": ct}


def _revision_of(mc: Any) -> str:
    """The weights' revision: vLLM's ``revision``, else the hub commit its config was loaded from, else for a model
    loaded from a local directory a fingerprint of its config and weights (two checkpoints saved at one path
    must not share KV)."""
    if mc is None:
        return ""
    if getattr(mc, "revision", None):
        return str(mc.revision)
    commit = getattr(getattr(mc, "hf_config", None), "_commit_hash", None)
    if commit:
        return str(commit)
    from kvfs.modelid import local_revision

    return local_revision(str(getattr(mc, "model", "") or "")) or ""


def kv_spec_for(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig", *, tp_rank: int = 0) -> KVSpec:
    """The kvfs namespace of a vLLM engine's KV: model, revision, layers, KV heads, head size, dtype, TP."""
    extra = _extra_config(vllm_config)
    spec, layers = _attention_spec(kv_cache_config)
    mc = vllm_config.model_config
    name = extra.get("model") or (mc.model if mc is not None else None)
    if not name:
        raise ValueError("KVFSConnector: no model name; set kv_connector_extra_config.model")
    revision = extra.get("revision") or _revision_of(mc)
    pc = vllm_config.parallel_config
    if pc.pipeline_parallel_size > 1:
        raise ValueError("KVFSConnector does not support pipeline parallelism (each stage holds other layers)")
    mla = isinstance(spec, MLAAttentionSpec)
    return KVSpec(
        str(name),
        num_layers=len(layers),
        num_kv_heads=1 if mla else spec.num_kv_heads,
        head_dim=spec.head_size,
        dtype=canonical_dtype(spec.dtype),
        chunk_tokens=extra["chunk_tokens"],
        revision=str(revision),
        # MLA's latent KV is the same on every tensor-parallel rank (vLLM replicates it): one namespace for all
        tp_rank=0 if mla else tp_rank,
        tp_size=1 if mla else pc.tensor_parallel_size,
        mla=mla,
    )



# ---------------------------------------------------------------------------------------------- the connector
class KVFSConnector(KVConnectorBase_V1):
    """vLLM V1 connector storing prefix KV in kvfs (see the module docstring)."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig | None" = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        if kv_cache_config is None:
            raise ValueError("KVFSConnector needs the KV cache config (vLLM >= 0.11 passes it)")
        ktc = self._kv_transfer_config
        extra = _extra_config(vllm_config)
        self._block_size = vllm_config.cache_config.block_size
        self._loads_enabled = ktc.is_kv_consumer
        self._saves_enabled = ktc.is_kv_producer
        tp_rank = 0
        self._tp_group = None  # the tensor-parallel group, whose ranks agree on which saves a failed load spoils
        if role == KVConnectorRole.WORKER and vllm_config.parallel_config.tensor_parallel_size > 1:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank, get_tp_group

            tp_rank = get_tensor_model_parallel_rank()
            self._tp_group = get_tp_group()
        self.spec = kv_spec_for(vllm_config, kv_cache_config, tp_rank=tp_rank)
        #: MLA ranks share one namespace of the same latent KV: rank 0 saves it, every rank loads it
        self._saves_here = not (self.spec.mla and tp_rank != 0)
        _, self._layer_names = _attention_spec(kv_cache_config)
        self.store = open_store(extra.get("url"))
        self.ns = self.store.namespace(self.spec)
        # scheduler side: under tensor parallelism each rank stores its KV heads in its own namespace, and a prefix
        # is usable only as far as every rank holds it (one rank's chunk evicted or quarantined would fail that
        # rank's load on every request for it, and rank 0's full copy would keep the prompt from being saved again)
        self._rank_ns = [self.ns]
        if (role == KVConnectorRole.SCHEDULER and vllm_config.parallel_config.tensor_parallel_size > 1
                and not self.spec.mla):
            self._rank_ns = [self.store.namespace(kv_spec_for(vllm_config, kv_cache_config, tp_rank=r))
                             for r in range(vllm_config.parallel_config.tensor_parallel_size)]
        self._lookups: dict[str, tuple[int, int]] = {}  # req_id -> (local tokens, kvfs tokens), last answer
        self._pending_loads: dict[str, LoadSpec] = {}
        self._tracked: dict[str, _Tracked] = {}
        self._passthrough: set[str] = set()  # requests whose KV kvfs must not save (see _eligible)
        # worker side
        self._paged: PagedCache | None = None
        self._loading: list[_Loading] = []
        self._prefetch_bytes = parse_size(extra.get("prefetch_bytes", 256 << 20), "KVFSConnector: prefetch_bytes")
        # a CPU cache's loads read each layer into a host buffer first: kept for the next request's load
        self._load_slots = StagingPool(self._prefetch_bytes)
        self._writer: _SaveWriter | None = None
        queue_bytes = parse_size(extra.get("save_queue_bytes", 2 << 30), "KVFSConnector: save_queue_bytes")
        # the host copies of saved prompts, recycled between steps (pinned once the caches are known on a GPU)
        self._staging = StagingPool(queue_bytes)
        background = parse_bool(extra.get("save_in_background", True), "KVFSConnector: save_in_background")
        if role == KVConnectorRole.WORKER and self._saves_enabled and background:
            self._writer = _SaveWriter(self.ns, queue_bytes, release=self._staging.give)
        self._layer_index: dict[str, int] = {}
        self._staged: dict[str, _Staged] = {}
        self._load_errors: set[int] = set()
        self._failed_reqs: set[str] = set()  # requests whose load failed this step: their KV is not saved
        # blocks a load of this step failed to fill: a save reading any of them (the failed request's own, or
        # another request's sharing its prefix blocks through vLLM's prefix cache) computed its KV over them
        self._failed_blocks: set[int] = set()
        # the previous step's: with async scheduling vLLM schedules a step before it learns that the previous one's
        # load failed, so a save in it may read those blocks, unfilled, as if loaded (a prefill ending in the next
        # chunk, or a request given the blocks by vLLM's prefix cache); only a save that computes them anew may
        self._prev_failed_blocks: set[int] = set()
        self._prev_loaded = False  # the previous step loaded (the same on every tensor-parallel rank)
        self._lock = threading.Lock()
        log.info("KVFSConnector (%s, %s) on %s, namespace %s", role.name.lower(), ktc.kv_role,
                 self.store.redacted_url, self.spec.path)
        if role == KVConnectorRole.SCHEDULER and self._loads_enabled and ktc.kv_load_failure_policy != "recompute":
            log.warning("kvfs: kv_load_failure_policy is %r: a request whose cached KV fails its checks (or was "
                        "evicted meanwhile) fails; set \"kv_load_failure_policy\": \"recompute\" to recompute "
                        "it instead", ktc.kv_load_failure_policy)

    # ======================================================================================= scheduler side
    def _eligible(self, request: "Request") -> bool:
        return not (request.lora_request is not None or request.mm_features or request.prompt_embeds is not None
                    or getattr(request, "cache_salt", None) or not request.prompt_token_ids)

    def reset_cache(self) -> bool:
        """vLLM's ``reset_prefix_cache(reset_connector=True)``, which RL frameworks call after updating the
        weights. kvfs cannot tell whether the weights changed, and its namespace (keyed by the model's revision)
        is shared with other engines, so it deletes nothing: this engine stops loading from and saving to kvfs
        (KV computed with other weights would otherwise be served, or stored, under the same revision). Loads
        already scheduled still run. A restart, under a new revision if the weights changed, uses kvfs again."""
        if self._loads_enabled or self._saves_enabled:
            log.warning("kvfs: the engine reset its caches (after a weight update?): this engine no longer loads "
                        "or saves KV through kvfs, whose namespace %s holds KV of the weights it was started "
                        "with; restart it to use kvfs again (with a new revision if the weights changed)",
                        self.spec.path)
        self._loads_enabled = self._saves_enabled = False
        self._tracked.clear()  # prompts being prefilled: not saved
        return True

    def on_new_request(self, request: "Request") -> None:
        if not self._eligible(request):
            self._passthrough.add(request.request_id)

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens past ``num_computed_tokens`` that kvfs can load: block-aligned, never the last prompt token."""
        if not self._loads_enabled or not self._eligible(request):
            return 0, False
        prompt = request.prompt_token_ids
        if len(prompt) < 2:
            return 0, False
        found = self._held(prompt[: len(prompt) - 1])
        usable = found - found % self._block_size
        self._lookups[request.request_id] = (num_computed_tokens, usable)
        return max(0, usable - num_computed_tokens), False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            self._pending_loads.pop(request.request_id, None)
            return
        local, _ = self._lookups.get(request.request_id, (0, 0))
        start, end = local, local + num_external_tokens
        block_ids = list(blocks.get_block_ids()[0])
        self._pending_loads[request.request_id] = LoadSpec(
            request.request_id, list(request.prompt_token_ids[:end]), start, end, block_ids[: -(-end // self._block_size)]
        )

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = KVFSConnectorMetadata(loads=list(self._pending_loads.values()))
        self._pending_loads.clear()
        self._lookups.clear()
        # first: a request aborted and added again under the same id (legal in vLLM) is in finished_req_ids and
        # in this step's new requests; dropping the finished one afterwards would drop the new one's state.
        # (request_finished, called for every finished request, already cleared the passthrough flag of the old
        # one: discarding it here would clear the new one's, and a salted prompt would be saved.)
        for req_id in scheduler_output.finished_req_ids:
            self._tracked.pop(req_id, None)
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            eligible = (new.req_id not in self._passthrough and new.prompt_token_ids
                        and new.lora_request is None and not new.mm_features and new.prompt_embeds is None)
            if self._saves_enabled and eligible:
                self._tracked[new.req_id] = _Tracked(list(new.prompt_token_ids), list(new.block_ids[0]))
                self._maybe_save(meta, new.req_id, new.num_computed_tokens, scheduled.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            t = self._tracked.get(req_id)
            if t is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if new_blocks is not None:
                if req_id in cached.resumed_req_ids:
                    t.block_ids = list(new_blocks[0])
                else:
                    t.block_ids.extend(new_blocks[0])
            self._maybe_save(meta, req_id, cached.num_computed_tokens[i], scheduled.get(req_id, 0))
        return meta

    def _maybe_save(self, meta: KVFSConnectorMetadata, req_id: str, computed_before: int, scheduled: int) -> None:
        """Save a prompt in the step that completes its prefill (again if vLLM recomputes it after a failed load)."""
        t = self._tracked[req_id]
        p = len(t.token_ids)
        if not computed_before < p <= computed_before + scheduled:
            return
        held = self._held(t.token_ids)
        if held == p:
            return  # kvfs holds every chunk of this prompt already
        # the stored leading chunks (a loaded prefix, earlier turns of a chat) are not copied out again
        c = self.spec.chunk_tokens
        meta.saves.append(SaveSpec(req_id, t.token_ids, t.block_ids[: -(-p // self._block_size)], held // c * c,
                                   computed_before))

    def _held(self, token_ids: list[int]) -> int:
        """Leading tokens whose KV every tensor-parallel rank's namespace holds."""
        n = len(token_ids)
        for ns in self._rank_ns:
            n = ns.lookup(token_ids[:n]) if n else 0
        return n

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._tracked.pop(request.request_id, None)
        self._pending_loads.pop(request.request_id, None)
        self._passthrough.discard(request.request_id)
        return False, None  # saves are synchronous: vLLM may free the blocks now

    # ======================================================================================= worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Keep the per-layer paged caches: vLLM's ``[blocks, heads, block tokens, K|V content]`` views."""
        missing = [n for n in self._layer_names if n not in kv_caches]
        if missing:
            raise ValueError(f"KVFSConnector: no KV cache registered for layers {missing[:3]}")
        tensors = [kv_caches[n] for n in self._layer_names]
        self._layer_index = {n: i for i, n in enumerate(self._layer_names)}
        if self.spec.mla:  # [blocks, 1, block tokens, latent]
            self._paged = PagedCache([t[:, 0] for t in tensors], "mla")
        else:
            self._paged = PagedCache(tensors, "kv_concat")
        p = self._paged
        self._staging.pin = p.device.type == "cuda"
        if (p.heads, p.dim, canonical_dtype(p.dtype)) != (self.spec.num_kv_heads, self.spec.head_dim, self.spec.dtype):
            raise ValueError(f"KVFSConnector: the registered caches ({p}) do not match the KV cache spec "
                             f"({self.spec.num_kv_heads} heads of {self.spec.head_dim}, {self.spec.dtype})")

    def _slots(self, block_ids: list[int], start: int, end: int) -> SlotIndex:
        """The checked slots of token positions ``[start, end)`` of a request with these blocks."""
        return self._paged.index(slot_mapping(block_ids, self._block_size, start, end, device=self._paged.device))

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        """Start loading each request's prefix in the background, layer by layer, onto the cache's device;
        take the host buffers of this step's saves (before the forward pass, not between its layers)."""
        meta = self._connector_metadata
        if not isinstance(meta, KVFSConnectorMetadata):
            return
        for save in meta.saves if self._saves_here else ():  # (an MLA rank other than 0 saves nothing)
            self._stage(save)
        per_layer = self.spec.bytes_per_token // self.spec.num_layers
        for load in meta.loads:
            # bounded: a few layers in flight, never a second copy of the whole prefix on the device
            budget = max(self._prefetch_bytes, 2 * load.end * per_layer)
            on_host = self._paged.device.type == "cpu"
            # (chunks wholly in the blocks vLLM's own prefix cache holds are not read)
            pf = self.ns.prefetch(load.token_ids[: load.end], device=self._paged.device, max_bytes=budget,
                                  slot_pool=self._load_slots if on_host else None, skip=load.start)
            self._loading.append(_Loading(load, pf))

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Block until this layer of every prefix loading this step is in the paged cache."""
        i = self._layer_index.get(layer_name)
        if i is not None:
            for ld in self._loading:
                self._load_layer(ld, i)

    def _load_layer(self, ld: "_Loading", i: int) -> None:
        if i in ld.done:
            return
        ld.done.add(i)
        load = ld.load
        try:
            kv = ld.prefetch.wait_layer_kv(i, release_previous=True)  # [planes, valid tokens, heads, dim]
        except KVFSError as e:  # the loader itself failed: nothing more from this prefix
            log.warning("kvfs: loading the prefix of request %s failed: %s", load.req_id, e)
            ld.valid = 0
            return
        first = ld.prefetch.first  # kv holds the tokens from here on
        ld.valid = min(ld.valid, first + kv.shape[1])
        hi = min(ld.valid, load.end)
        if hi > load.start:
            if ld.slots is None or ld.slots.ntokens != hi - load.start:
                ld.slots = self._slots(load.block_ids, load.start, hi)
            self._paged.scatter(kv[:, load.start - first: hi - first], ld.slots, layer=i)
        ld.prefetch.release_layer(i)

    def _finish_loads(self) -> None:
        """Complete this step's loads (layers the forward pass did not wait for) and record what failed."""
        loading, self._loading = self._loading, []
        try:
            for ld in loading:
                self._finish_load(ld)
        finally:
            for ld in loading:  # an exception out of one load must not leave the others' prefetches running
                ld.prefetch.close()

    def _finish_load(self, ld: "_Loading") -> None:
        try:
            for i in range(self.spec.num_layers):
                self._load_layer(ld, i)
            valid = min(ld.valid, ld.prefetch.valid_tokens)
        finally:
            ld.prefetch.close()
        load = ld.load
        if valid >= load.end:
            return
        # a chunk missing (evicted since the lookup) or failing its checks: vLLM recomputes from there
        s = max(valid, load.start)
        bad = {int(b) for b in load.block_ids[s // self._block_size: -(-load.end // self._block_size)]}
        log.warning("kvfs: request %s: %d tokens of cached KV could not be loaded; vLLM recomputes blocks %s",
                    load.req_id, load.end - s, sorted(bad))
        with self._lock:
            self._load_errors.update(bad)
            self._failed_blocks.update(bad)
            self._failed_reqs.add(load.req_id)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: "AttentionMetadata",
                      **kwargs: Any) -> None:
        """Copy this layer's KV of the prompts being saved out of the paged cache, as soon as it exists."""
        meta = self._connector_metadata
        if not isinstance(meta, KVFSConnectorMetadata) or not meta.saves or not self._saves_here:
            return
        i = self._layer_index.get(layer_name)
        if i is None:
            return
        for save in meta.saves:
            if save.req_id in self._failed_reqs:
                continue
            staged = self._stage(save)
            if i not in staged.done:
                self._paged.gather(staged.slots, layer=i, out=staged.kv[i])
                staged.done.add(i)

    def _stage(self, save: SaveSpec) -> "_Staged":
        entry = self._staged.get(save.req_id)
        if entry is None or entry.save is not save:
            start = save.start
            if start and self.ns.lookup(save.token_ids[:start]) < start:
                # this rank's store lacks part of the prefix the scheduler found (rank 0's, under tensor
                # parallelism; or evicted since): copy and save the whole prompt
                start = 0
            slots = self._slots(save.block_ids, start, len(save.token_ids))
            if entry is not None:  # a stale entry (not expected: wait_for_save clears them every step)
                self._staging.give(entry.kv)
            entry = _Staged(save, self._staging.take(self.spec.chunk_shape(len(save.token_ids) - start),
                                                     getattr(torch, self.spec.dtype)), slots, start)
            self._staged[save.req_id] = entry
        return entry

    def wait_for_save(self) -> None:
        """Write this step's prompts: layers the forward pass did not hand over are gathered now."""
        meta = self._connector_metadata
        self._finish_loads()  # which requests' loads failed decides which prompts are saved
        try:
            if not isinstance(meta, KVFSConnectorMetadata):
                return
            for save, dropped in zip(meta.saves, self._spoilt_saves(meta)):  # (every rank takes part)
                if dropped or not self._saves_here:
                    # part of its prompt's KV is missing from the cache this step (its own load failed, or
                    # that of a request whose blocks it shares, so its new KV was computed over them); vLLM
                    # recomputes it and the scheduler asks for the save again when the prefill completes
                    continue
                staged = self._stage(save)
                for i in range(self.spec.num_layers):
                    if i not in staged.done:
                        self._paged.gather(staged.slots, layer=i, out=staged.kv[i])
                        staged.done.add(i)
                del self._staged[save.req_id]  # from here the writer (or the finally below) gives the copy back
                if self._writer is not None:  # staged.kv is this prompt's own copy: written after the step
                    try:
                        self._writer.submit(save.req_id, save.token_ids, staged.kv, staged.start)
                    except BaseException:
                        self._staging.give(staged.kv)
                        raise
                    continue
                try:
                    self.ns.put(save.token_ids, staged.kv, start=staged.start)
                except OSError as e:  # a full or unreachable store must not fail inference
                    log.warning("kvfs: could not store the KV of request %s: %s", save.req_id, e)
                finally:
                    self._staging.give(staged.kv)
        finally:
            for staged in self._staged.values():  # gathered but not saved (a failed load, an exception)
                self._staging.give(staged.kv)
            self._staged.clear()
            self._failed_reqs.clear()
            self._prev_failed_blocks, self._failed_blocks = self._failed_blocks, set()
            self._prev_loaded = isinstance(meta, KVFSConnectorMetadata) and bool(meta.loads)

    def _spoilt_saves(self, meta: KVFSConnectorMetadata) -> list[bool]:
        """Per save of this step: was its KV computed over blocks a load failed to fill, on any rank?

        Under tensor parallelism a load can fail on one rank only (each rank reads its own KV heads' chunks),
        yet every rank's new KV was computed from hidden states that went through the failed rank's attention:
        no rank may store it. The ranks agree through one small all-reduce, in the steps that save while
        loading or right after a step that loaded.
        """
        bs = self._block_size
        # blocks of the previous step's failed loads that no prompt of this step computes again (vLLM recomputes
        # a failed load from its first bad block; a request sharing those blocks reads what that one writes)
        prev = self._prev_failed_blocks.difference(*(s.block_ids[-(-s.computed // bs):] for s in meta.saves))
        spoilt = [s.req_id in self._failed_reqs or not self._failed_blocks.isdisjoint(s.block_ids)
                  or not prev.isdisjoint(s.block_ids[: -(-s.computed // bs)])
                  for s in meta.saves]
        # (the same metadata on every rank, so every rank takes part or none)
        if self._tp_group is not None and (meta.loads or self._prev_loaded) and meta.saves:
            flags = torch.tensor(spoilt, dtype=torch.int32)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=self._tp_group.cpu_group)
            spoilt = [bool(f) for f in flags.tolist()]
        return spoilt

    def get_block_ids_with_load_errors(self) -> set[int]:
        self._finish_loads()  # vLLM may ask before wait_for_save (deferred finalize)
        with self._lock:
            bad, self._load_errors = self._load_errors, set()
        return bad

    @property
    def requires_kv_delivery(self) -> bool:
        """False: kvfs is a best-effort cache. A save copies its KV out of the paged blocks within the step
        (``wait_for_save``), and ``request_finished`` never holds blocks, so a request preempted with a save
        pending frees nothing kvfs still reads; vLLM's default (True for a producer) made async scheduling
        throw away and recompute such a request's output."""
        return False

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        return True  # loads and saves happen layer by layer, between the attention layers

    def wait_for_saves_written(self, timeout: float | None = None) -> bool:
        """Wait until the prompts saved so far are in the store (saves are written in the background)."""
        return self._writer is None or self._writer.drain(timeout)

    def shutdown(self) -> None:
        for ld in self._loading:
            ld.prefetch.close()
        self._loading = []
        if self._writer is not None:
            self._writer.close()
        self._staging.clear()
        self._load_slots.clear()
        self.store.close()
