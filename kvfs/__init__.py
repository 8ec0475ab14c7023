"""kvfs: a filesystem for LLM KV caches.

    import kvfs
    with kvfs.open() as store:                     # the embedded LMDB store in ~/.cache/kvfs
        ns = store.namespace(kvfs.KVSpec("llama-3.1-8b", num_layers=32, num_kv_heads=8, head_dim=128))
        ns.put(tokens, kv)
        kv = ns.get(tokens[: ns.lookup(tokens)])

``import kvfs`` is light: numpy, LMDB, torch and backend clients load when
first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "open": ("kvfs.store", "open"),
    "Store": ("kvfs.store", "Store"),
    "Entry": ("kvfs.store", "Entry"),
    "Namespace": ("kvfs.namespace", "Namespace"),
    "PlanItem": ("kvfs.namespace", "PlanItem"),
    "KVSpec": ("kvfs.spec", "KVSpec"),
    "ChunkKey": ("kvfs.keys", "ChunkKey"),
    "KVFSError": ("kvfs.errors", "KVFSError"),
    "CacheMiss": ("kvfs.errors", "CacheMiss"),
    "ChunkFormatError": ("kvfs.errors", "ChunkFormatError"),
    "IntegrityError": ("kvfs.errors", "IntegrityError"),
    "SignatureError": ("kvfs.errors", "SignatureError"),
    "InvalidURL": ("kvfs.errors", "InvalidURL"),
    "InvalidInput": ("kvfs.errors", "InvalidInput"),
    "StoreError": ("kvfs.errors", "StoreError"),
    "NotFound": ("kvfs.errors", "NotFound"),
    "PinnedError": ("kvfs.errors", "PinnedError"),
    "default_url": ("kvfs.url", "default_url"),
    "KVFileSystem": ("kvfs.fsspec", "KVFileSystem"),
}

__all__ = sorted(_LAZY) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .errors import (CacheMiss, ChunkFormatError, IntegrityError, InvalidInput, InvalidURL, KVFSError,
                         NotFound, PinnedError, SignatureError, StoreError)
    from .keys import ChunkKey
    from .namespace import Namespace, PlanItem
    from .spec import KVSpec
    from .store import Entry, Store, open
    from .url import default_url


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'kvfs' has no attribute {name!r}")
    value = getattr(importlib.import_module(target[0]), target[1])
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
