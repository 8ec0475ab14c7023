"""Storage backends behind one :class:`Backend` interface, selected by URL scheme.

=====================  ===========================  =========================================
scheme                 backend                      notes
=====================  ===========================  =========================================
``memory://[name]``    :class:`MemoryBackend`       tests, the hot CPU tier
``lmdb:///path``       :class:`LMDBBackend`         the embedded default, zero-copy reads
``file:///path``       ``FileBackend``              one file a chunk on local NVMe, kvikio
``s3://bucket/prefix`` ``FsspecBackend``            and every other fsspec protocol
=====================  ===========================  =========================================

Backends are imported lazily, so ``import kvfs`` never pulls in a client
library. Third-party backends register through the ``kvfs.backends`` entry
point group (``name = "package.module:Class"``) or :func:`register`.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from typing import Any

from kvfs.errors import BackendUnavailable, InvalidURL

from ._base import Backend, ByteRange, InvalidKey, ObjectInfo, check_key

__all__ = [
    "Backend",
    "ByteRange",
    "InvalidKey",
    "ObjectInfo",
    "check_key",
    "register",
    "open_backend",
    "backend_class",
    "registered_schemes",
]


@dataclass(frozen=True)
class _Entry:
    target: str  # "module:Class"
    hint: str = ""  # what to install when the import fails


_registry: dict[str, _Entry] = {
    "memory": _Entry("kvfs.backends._memory:MemoryBackend"),
    "lmdb": _Entry("kvfs.backends._lmdb:LMDBBackend", "pip install lmdb"),
    "file": _Entry("kvfs.backends._file:FileBackend"),
}
# everything fsspec can open goes through FsspecBackend; these are the common ones
_FSSPEC_HINTS = {
    "s3": "pip install 'kvfs[s3]'  (s3fs)",
    "s3a": "pip install 'kvfs[s3]'  (s3fs)",
    "gs": "pip install gcsfs",
    "gcs": "pip install gcsfs",
    "az": "pip install adlfs",
    "abfs": "pip install adlfs",
    "abfss": "pip install adlfs",
    "hf": "pip install huggingface_hub",
}
_FSSPEC_TARGET = "kvfs.backends._fsspec:FsspecBackend"
_lock = threading.Lock()
_entry_points_loaded = False


def register(scheme: str, target: str | type[Backend], hint: str = "") -> None:
    """Make ``scheme://`` URLs open ``target`` (a class or ``"module:Class"``)."""
    if isinstance(target, type):
        target = f"{target.__module__}:{target.__qualname__}"
    with _lock:
        _registry[scheme.lower()] = _Entry(target, hint)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="kvfs.backends"):
        _registry.setdefault(ep.name.lower(), _Entry(ep.value))


def registered_schemes() -> list[str]:
    _load_entry_points()
    return sorted(set(_registry) | set(_FSSPEC_HINTS))


def backend_class(scheme: str) -> type[Backend]:
    """The backend class for a URL scheme, imported on first use."""
    scheme = scheme.lower()
    _load_entry_points()
    entry = _registry.get(scheme)
    if entry is None:
        if scheme.startswith("fsspec+"):
            entry = _Entry(_FSSPEC_TARGET, "pip install fsspec")
        else:
            try:
                from fsspec.registry import known_implementations
            except ImportError:  # pragma: no cover - fsspec is a dependency
                known_implementations = {}
            if scheme in known_implementations or scheme in _FSSPEC_HINTS:
                entry = _Entry(_FSSPEC_TARGET, _FSSPEC_HINTS.get(scheme, ""))
            else:
                raise InvalidURL(
                    f"unknown storage scheme {scheme + '://'!r}; kvfs knows "
                    f"{', '.join(s + '://' for s in registered_schemes())} and every fsspec protocol"
                )
    module, _, name = entry.target.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        hint = f"; install it with: {entry.hint}" if entry.hint else ""
        raise BackendUnavailable(f"the {scheme}:// backend needs a library that is missing ({e}){hint}") from e
    return getattr(mod, name)


def open_backend(url: str, **options: Any) -> Backend:
    """Open one backend from a single-tier URL such as ``lmdb:///var/cache/kvfs?map_size=2TiB``."""
    from kvfs.url import parse_tier

    tier = parse_tier(url)
    if tier.store_options:
        raise InvalidURL(
            f"{', '.join(tier.store_options)} configure a store's tier, not a bare backend: use kvfs.open({url!r})"
        )
    return backend_class(tier.scheme).from_url(tier, **options)
