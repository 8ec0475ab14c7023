"""SGLang HiCache: ``KVFSHiCacheStorage``, a ``HiCacheStorage`` backend keeping pages in a kvfs store.

Load it with SGLang's dynamic backend::

    python -m sglang.launch_server --model-path MODEL --enable-hierarchical-cache \\
        --hicache-storage-backend dynamic --hicache-storage-backend-extra-config '{
            "backend_name": "kvfs", "module_path": "kvfs.connectors.sglang",
            "class_name": "KVFSHiCacheStorage", "interface_v1": 1, "url": "s3://bucket/kv"}'

``interface_v1: 1`` makes SGLang use the zero-copy calls (``batch_get_v1`` /
``batch_set_v1``): kvfs reads and verifies chunks straight into the host KV
pool's pages and encodes chunks straight from them, with no staging copy.
Other keys: ``url`` (any kvfs store URL; default ``$KVFS_URL``, else the
embedded store), ``model`` (default: SGLang's model name), ``revision``.

**Keys.** SGLang hands a storage backend only its page keys: SHA-256 hex
strings chained over the token pages (seeded by the request's cache salt /
extra key), never the token ids. kvfs keys chunks by the token ids
themselves, so a page cannot get the key vLLM or transformers would give the
same tokens. Instead every page becomes one kvfs chunk of ``page_size``
tokens in the namespace of the model's KV (model, dtype, layers, KV heads,
head size, ``chunk_tokens = page_size``, TP rank), whose parent is a
*virtual parent* derived from the page key::

    parent = blake2b(seed || page_key, digest_size=32, person=b"kvfs-sglang")
    key    = blake2b(parent || page_size zero token ids)    # the ordinary kvfs chain step

so each page is a valid kvfs chunk (the chain check ``key = H(parent ||
tokens)`` holds, the SGLang key is recorded in its metadata as
``sglang_key``, checksums cover every layer), nothing of another namespace
can ever be served for it, and the personalized hash makes a virtual parent
distinct from every real chunk key, so token-keyed lookups of other engines
never reach an SGLang page (and vice versa). The token ids the chunk records
are zeros: the backend never learns them. Pages are therefore shared between
SGLang servers (any node, any store URL), not with vLLM or transformers.

Supported host pools: ``MHATokenToKVPoolHost`` in the ``layer_first``,
``page_first``, ``page_first_direct`` and ``page_head`` layouts. Without a
registered host pool (tests, tools), the page geometry comes from the extra
config (``num_layers``, ``num_kv_heads``, ``head_dim``, ``dtype``,
``page_size``) and pages passed to ``set``/``get`` are flat tensors in the
``layer_first`` page order ``[2, layers, page, heads, dim]``, which is what
``get_dummy_flat_data_page`` allocates.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, List, Optional

import numpy as np
import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo

from ..keys import ChunkKey, next_digest
from ..namespace import Namespace
from ..spec import KVSpec, canonical_dtype
from ..store import ReadItem
from ..store import open as open_store
from .paged import logical_view

log = logging.getLogger("kvfs.sglang")

__all__ = ["KVFSHiCacheStorage", "page_chunk_key"]

PERSON = b"kvfs-sglang"
LAYOUTS = ("layer_first", "page_first", "page_first_direct", "page_head")


GEOMETRY = ("num_layers", "num_kv_heads", "head_dim", "dtype", "page_size")
#: extra_config keys of kvfs's; SGLang's own (backend_name, module_path, ...) share the dict
EXTRA_KEYS = ("url", "model", "revision") + GEOMETRY


def _check_extra(extra: dict) -> None:
    """Refuse a misspelt kvfs key (it would be ignored: another namespace, or no geometry) and values of the
    wrong type. Keys unlike any of kvfs's are SGLang's own or another component's, and left alone."""
    import difflib

    for key, value in extra.items():
        if key not in EXTRA_KEYS:
            near = difflib.get_close_matches(str(key), EXTRA_KEYS, n=1, cutoff=0.8)
            if near:
                raise ValueError(f"KVFSHiCacheStorage: unknown extra_config key {key!r}; did you mean {near[0]!r}? "
                                 f"kvfs's keys are {', '.join(EXTRA_KEYS)}")
        elif key in ("url", "model", "revision", "dtype") and value is not None and not isinstance(value, str):
            raise ValueError(f"KVFSHiCacheStorage: extra_config.{key} must be a string, got {value!r}")


def _whole(extra: dict, key: str) -> int:
    value = extra[key]
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"KVFSHiCacheStorage: extra_config.{key} must be a whole number >= 1, got {value!r}")
    return value


def page_chunk_key(spec: KVSpec, page_key: str) -> ChunkKey:
    """The kvfs chunk key of an SGLang page key in ``spec``'s namespace (see the module docstring)."""
    parent = hashlib.blake2b(spec.seed + page_key.encode("utf-8"), digest_size=32, person=PERSON).digest()
    digest = next_digest(parent, np.zeros(spec.chunk_tokens, dtype="<u4"))
    return ChunkKey(digest, parent, 0, spec.chunk_tokens, spec.path)


def page_view(page: torch.Tensor, layout: str) -> torch.Tensor:
    """One page of an SGLang MHA host pool as ``[layers, 2, page, heads, dim]``, a view (never a copy).

    ``page`` is the page as the pool's ``kv_buffer`` indexes it (``get_data_page(i, flat=False)``):
    ``layer_first`` ``[2, L, P, H, D]``, ``page_first`` ``[2, P, L, H, D]``, ``page_first_direct``
    ``[2, 1, L, P, H, D]``, ``page_head`` ``[2, 1, H, P, L, D]``; the axis order comes from
    :func:`kvfs.connectors.paged.logical_view`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"kvfs does not handle SGLang host pool layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    v = logical_view(page, f"sglang_{layout}")  # [L, 2, blocks, block_size, H, D]
    return v[:, :, :, 0] if layout in ("layer_first", "page_first") else v[:, :, 0]


class KVFSHiCacheStorage(HiCacheStorage):
    """SGLang HiCache storage on a kvfs store (see the module docstring)."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None) -> None:
        self.storage_config = storage_config
        self.extra = dict(storage_config.extra_config or {})
        _check_extra(self.extra)
        if storage_config.pp_size > 1 or storage_config.attn_cp_size > 1 or storage_config.dcp_size > 1:
            raise ValueError("KVFSHiCacheStorage does not support pipeline or context parallelism yet")
        self.store = open_store(self.extra.get("url"))
        self.layout = "layer_first"  # the flat page order of get/set until a host pool says otherwise
        self.spec: KVSpec | None = None
        self.ns: Namespace | None = None
        self.mem_pool_host = None
        given = [k for k in GEOMETRY if k in self.extra]
        if given and len(given) < len(GEOMETRY):
            raise ValueError(f"KVFSHiCacheStorage: the page geometry in extra_config is all of "
                             f"{', '.join(GEOMETRY)} or none; missing {', '.join(k for k in GEOMETRY if k not in given)}")
        if given:
            self._set_spec(*(_whole(self.extra, k) for k in GEOMETRY[:3]), self.extra["dtype"],
                           _whole(self.extra, "page_size"))
        log.info("KVFSHiCacheStorage on %s", self.store.redacted_url)

    # ---------------------------------------------------------------------------------- configuration
    def _revision(self, name: str) -> str:
        """``extra_config.revision``, else for a model served from a local directory a fingerprint of its config
        and weights (two checkpoints saved at one path must not share KV)."""
        if self.extra.get("revision"):
            return str(self.extra["revision"])
        from kvfs.modelid import local_revision

        return local_revision(str(getattr(self.storage_config, "model_name", "") or name)) or ""

    def _set_spec(self, layers: int, heads: int, head_dim: int, dtype: Any, page_size: int) -> None:
        c = self.storage_config
        name = self.extra.get("model") or c.model_name
        if not name:
            raise ValueError("KVFSHiCacheStorage: no model name; set model_name or extra_config.model")
        mla = bool(c.is_mla_model)
        spec = KVSpec(str(name), num_layers=layers, num_kv_heads=heads, head_dim=head_dim,
                      dtype=canonical_dtype(dtype), chunk_tokens=page_size, revision=self._revision(name),
                      # MLA KV is the same on every TP rank: one namespace for all of them
                      tp_rank=0 if mla else c.tp_rank, tp_size=1 if mla else c.tp_size, mla=mla)
        if self.spec is not None and spec != self.spec:
            raise ValueError(f"KVFSHiCacheStorage: the host pool ({spec}) does not match the configured "
                             f"geometry ({self.spec})")
        self.spec = spec
        self.ns = self.store.namespace(spec)

    def register_mem_pool_host(self, mem_pool_host) -> None:
        """Take the page geometry and layout from SGLang's host KV pool."""
        super().register_mem_pool_host(mem_pool_host)
        layout = getattr(mem_pool_host, "layout", None)
        buf = getattr(mem_pool_host, "kv_buffer", None)
        if layout not in LAYOUTS or not isinstance(buf, torch.Tensor) or buf.shape[0] != 2:
            raise ValueError(
                f"KVFSHiCacheStorage handles MHA host pools in the {', '.join(LAYOUTS)} layouts, not "
                f"{type(mem_pool_host).__name__} with layout {layout!r}"
            )
        if type(mem_pool_host).__name__ != "MHATokenToKVPoolHost" or self.storage_config.is_mla_model:
            # a subclass keeps more than the KV pages (MXFP8's per-page scales): pages stored without it would
            # be read back with another request's scales; MLA pools are refused (their buffer is not [2, ...])
            raise ValueError(f"KVFSHiCacheStorage handles MHATokenToKVPoolHost pools, not "
                             f"{type(mem_pool_host).__name__}{' (MLA)' if self.storage_config.is_mla_model else ''}")
        if getattr(mem_pool_host, "v_head_dim", mem_pool_host.head_dim) != mem_pool_host.head_dim:
            raise ValueError("KVFSHiCacheStorage needs K and V of one head size")
        if mem_pool_host.dtype == torch.uint8:
            raise ValueError("KVFSHiCacheStorage: this host pool holds fp8 KV as raw bytes (uint8), which does not "
                             "say which fp8 format (e4m3 or e5m2) it is; kvfs cannot keep servers with different KV "
                             "formats apart, so it does not store fp8 KV from SGLang: run with a 16-bit "
                             "--kv-cache-dtype or without the kvfs storage backend")
        self.layout = layout
        self._set_spec(mem_pool_host.layer_num, mem_pool_host.head_num, mem_pool_host.head_dim,
                       mem_pool_host.dtype, mem_pool_host.page_size)

    def register_mem_host_pool_v2(self, host_pool, host_pool_name) -> None:
        """Hybrid models register more host pools beside the KV one (Mamba, sliding-window or indexer state),
        which SGLang then asks a backend to keep with each page: kvfs stores attention KV only, so it refuses
        them here, when the backend is attached, rather than failing every lookup later."""
        name = str(getattr(host_pool_name, "value", host_pool_name))
        if name != "kv":
            raise ValueError(f"KVFSHiCacheStorage stores attention KV pages only; this model also keeps {name!r} "
                             "state in a host pool (a hybrid model), which kvfs cannot store with them: serve it "
                             "without the kvfs storage backend")
        super().register_mem_host_pool_v2(host_pool, host_pool_name)

    def _need_spec(self) -> tuple[KVSpec, Namespace]:
        if self.spec is None or self.ns is None:
            raise RuntimeError("KVFSHiCacheStorage: no page geometry yet; register the host pool first "
                               "(or give num_layers, num_kv_heads, head_dim, dtype, page_size in extra_config)")
        return self.spec, self.ns

    def _flat_page(self, flat: torch.Tensor) -> torch.Tensor:
        """A flat page tensor (the pool layout's page order) as ``[layers, 2, page, heads, dim]``."""
        s = self.spec
        L, P, H, D = s.num_layers, s.chunk_tokens, s.num_kv_heads, s.head_dim
        shapes = {"layer_first": (2, L, P, H, D), "page_first": (2, P, L, H, D),
                  "page_first_direct": (2, 1, L, P, H, D), "page_head": (2, 1, H, P, L, D)}
        want = int(np.prod(shapes[self.layout]))
        if flat.numel() != want:
            raise ValueError(f"a page holds {want} values in this namespace, got a tensor of {flat.numel()}")
        return page_view(flat.reshape(shapes[self.layout]), self.layout)

    def _pool_page(self, index: int) -> torch.Tensor:
        """The host pool's page starting at host index ``index``, as a view (SGLang's own page slicing)."""
        return page_view(self.mem_pool_host.get_data_page(index, flat=False), self.layout)

    # ---------------------------------------------------------------------------------- core operations
    def _present(self, ckeys: list[ChunkKey]) -> list[bool]:
        store = self.store
        recs = store._records(ckeys)
        have = [bool(store._held_bits(r)) for r in recs]  # (in this store's tiers, servable by it)
        todo = [i for i, h in enumerate(have) if not h]
        if todo:  # another node may have written them to a shared tier
            found = store._exists_anywhere([ckeys[i] for i in todo], lambda k: None)
            for i, f in zip(todo, found):
                have[i] = f
        return have

    def _write(self, keys: List[str], pages: List[torch.Tensor]) -> List[bool]:
        """Store pages (each ``[layers, 2, page, heads, dim]``, any strides); pages already stored are kept."""
        spec, ns = self._need_spec()
        store = self.store
        ckeys = [page_chunk_key(spec, k) for k in keys]
        have = self._present(ckeys)
        zeros = np.zeros(spec.chunk_tokens, dtype="<u4")
        todo = [(ck, k, p) for ck, k, p, h in zip(ckeys, keys, pages, have) if not h]
        try:
            if todo:
                raws = [ns.as_raw_kv(p.cpu() if p.device.type != "cpu" else p, spec.chunk_tokens) for _, _, p in todo]
                bufs = store._encode_many(spec, [(ck, zeros, raw, {"extra": {"sglang_key": k}})
                                                 for (ck, k, _), raw in zip(todo, raws)])
                store._write_new([(store._record_for(ck, zeros, len(buf)), None, ck.path, buf)
                                  for (ck, _, _), buf in zip(todo, bufs)])
        except (OSError, ValueError) as e:  # a full or unreachable store fails the write, not the server
            log.warning("kvfs: could not store %d SGLang pages: %s", len(todo), e)
            return [bool(h) for h in have]
        return [True] * len(keys)

    def _read(self, keys: List[str], dests: List[torch.Tensor]) -> List[bool]:
        """Read pages into ``dests`` (``[layers, 2, page, heads, dim]`` views), each verified (namespace, key,
        checksums of every layer). ``False`` for a page that is missing or fails a check: its destination then
        holds undefined data, which SGLang discards (it uses the pages before the first failure only)."""
        spec, ns = self._need_spec()
        zeros = np.zeros(spec.chunk_tokens, dtype="<u4")
        items = [ReadItem(page_chunk_key(spec, k), spec.chunk_tokens, ns.as_raw_kv(d, spec.chunk_tokens),
                          range(spec.num_layers), zeros, True) for k, d in zip(keys, dests)]
        return self.store._read(spec, items)

    # ---------------------------------------------------------------------------------- HiCacheStorage
    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def batch_exists(self, keys: List[str], extra_info: Optional[HiCacheStorageExtraInfo] = None) -> int:
        """How many of ``keys``, from the first, are stored."""
        spec, _ = self._need_spec()
        have = self._present([page_chunk_key(spec, k) for k in keys])
        return next((i for i, h in enumerate(have) if not h), len(keys))

    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: List[str], values: Optional[Any] = None, target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> bool:
        if values is None or len(values) != len(keys):
            raise ValueError("batch_set needs one page tensor per key")
        self._need_spec()
        return all(self._write(keys, [self._flat_page(v) for v in values]))

    def get(self, key: str, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> torch.Tensor | None:
        return self.batch_get([key], [target_location])[0]

    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> List[torch.Tensor | None]:
        spec, _ = self._need_spec()
        if target_locations is None:
            target_locations = [None] * len(keys)
        dtype = getattr(torch, spec.dtype)
        size = spec.num_layers * 2 * spec.chunk_tokens * spec.num_kv_heads * spec.head_dim
        targets = [torch.empty(size, dtype=dtype) if t is None else t for t in target_locations]
        ok = self._read(keys, [self._flat_page(t) for t in targets])
        return [t if good else None for t, good in zip(targets, ok)]

    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        """Zero-copy: encode each page straight from the host pool."""
        p = self._host_page_size(keys, host_indices)
        return self._write(keys, [self._pool_page(int(host_indices[i * p])) for i in range(len(keys))])

    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        """Zero-copy: read and verify each page straight into the host pool."""
        p = self._host_page_size(keys, host_indices)
        return self._read(keys, [self._pool_page(int(host_indices[i * p])) for i in range(len(keys))])

    def _host_page_size(self, keys: List[str], host_indices: torch.Tensor) -> int:
        if self.mem_pool_host is None:
            raise RuntimeError("KVFSHiCacheStorage: the v1 calls need a registered host pool")
        p = self.mem_pool_host.page_size
        if host_indices.numel() != len(keys) * p:
            raise ValueError(f"{len(keys)} pages need {len(keys) * p} host indices, got {host_indices.numel()}")
        return p

    def clear(self) -> bool:
        # The store may be shared with other servers and engines: never wipe it from here.
        log.warning("kvfs: HiCache clear() leaves the kvfs store as it is; use `kvfs evict` to remove KV")
        return False

    def get_stats(self):
        return None

    def close(self) -> None:
        self.store.close()
