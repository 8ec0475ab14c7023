"""Files being written into a ``--read-write`` mount, before they become chunks.

A chunk is content-addressed and checked whole, so a new file cannot be
stored piece by piece: its bytes are buffered in memory as the writer sends
them, and validated and imported in one go when the writer closes the file
(``flush``, i.e. ``close(2)``, or ``fsync``). Invalid bytes are never stored;
the error is returned by that ``close``/``fsync``, which is where ``cp``,
``rsync`` and ``dd`` report it.

Names a mount accepts (see :func:`classify_new_name`):

* ``<64 hex>.safetensors`` in a namespace directory or in its ``<hh>`` shard:
  a chunk, stored at ``<model>/<ns>/<hh>/<hex>.safetensors``;
* ``manifest.json`` in a namespace directory: the namespace's manifest (a
  new namespace is created by ``mkdir`` and copying its manifest first);
* names starting with ``.``: temporary files (``rsync`` writes
  ``.name.XXXXXX`` and renames it), kept in memory until renamed onto a
  chunk name or removed.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import ChunkFormatError, InvalidInput, StoreError

CHUNK_NAME = re.compile(r"^([0-9a-f]{64})\.safetensors$")
SHARD_NAME = re.compile(r"^[0-9a-f]{2}$")
MANIFEST_NAME = "manifest.json"
#: cap of a file whose namespace (hence chunk size) is not known yet
MAX_UNKNOWN = 1 << 30


def classify_new_name(dir_kind: str, dir_path: str, name: str) -> tuple[str, str]:
    """What a new file called ``name`` in a directory becomes: ``(kind, store path)``.

    ``kind`` is ``chunk``, ``manifest`` or ``temp``; raises ``InvalidInput``
    for a name that cannot be stored there.
    """
    if name.startswith("."):
        return "temp", f"{dir_path}/{name}"
    if dir_kind == "namespace" and name == MANIFEST_NAME:
        return "manifest", f"{dir_path}/{name}"
    m = CHUNK_NAME.match(name)
    if m is None:
        raise InvalidInput(f"{dir_path}/{name}: only chunk files (<64 hex>.safetensors) and manifest.json "
                           "can be stored in a kvfs mount")
    hexd = m.group(1)
    if dir_kind == "namespace":
        return "chunk", f"{dir_path}/{hexd[:2]}/{name}"
    if dir_kind == "shard":
        if dir_path.rsplit("/", 1)[1] != hexd[:2]:
            raise InvalidInput(f"{dir_path}/{name}: chunk {hexd[:8]}... belongs in shard {hexd[:2]}/")
        return "chunk", f"{dir_path}/{name}"
    raise InvalidInput(f"{dir_path}/{name}: chunks are stored in a namespace directory (<model>/<ns-id>/)")


@dataclass(eq=False)
class StagedFile:
    """A new file's bytes, buffered until it is closed and can be checked whole."""

    ino: int
    parent_ino: int
    name: str
    kind: str  # chunk | manifest | temp
    path: str  # where it will be stored (store path)
    limit: int = MAX_UNKNOWN
    data: bytearray = field(default_factory=bytearray)
    dirty: bool = True  # changed since the last import attempt (a new empty file counts)
    opens: int = 0
    lookups: int = 0
    created: float = field(default_factory=time.time)
    modified: float = field(default_factory=time.time)
    pin: bool | None = None  # user.kvfs.pinned set before the import
    removed: bool = False  # unlinked while still open: never stored, whatever is written to it

    def write(self, off: int, buf: bytes) -> int:
        end = off + len(buf)
        if end > self.limit:
            raise StoreError(27, f"{self.path}: {end} bytes is more than a chunk of this namespace can be "
                                 f"({self.limit})")  # EFBIG
        if off > len(self.data):
            self.data.extend(bytes(off - len(self.data)))
        self.data[off:end] = buf
        self.dirty = True
        self.modified = time.time()
        return len(buf)

    def truncate(self, size: int) -> None:
        if size > self.limit:
            raise StoreError(27, f"{self.path}: {size} bytes is more than a chunk of this namespace can be")
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data.extend(bytes(size - len(self.data)))
        self.dirty = True
        self.modified = time.time()


def import_staged(store: Any, staged: StagedFile, path: str, manifest: bytes | None) -> bool:
    """Validate and store a staged chunk at ``path``; ``ChunkFormatError`` if it is not that chunk.

    Returns False when the store already held the chunk (nothing written).
    """
    if not staged.data:
        raise ChunkFormatError(f"{path}: empty file; a chunk file is a kvfs safetensors chunk")
    return store.import_chunk(path, bytes(staged.data), manifest=manifest)


def check_manifest(store: Any, ns_path: str, data: bytes) -> bytes:
    """The manifest bytes if ``data`` is the manifest of namespace ``ns_path``, else ``ChunkFormatError``."""
    from ..spec import KVSpec

    try:
        spec = KVSpec.from_manifest(bytes(data))
    except (InvalidInput, ValueError) as e:
        raise ChunkFormatError(f"{ns_path}/{MANIFEST_NAME}: not a kvfs manifest: {e}") from None
    if spec.path != ns_path:
        raise ChunkFormatError(f"{ns_path}/{MANIFEST_NAME}: this manifest describes namespace {spec.path}")
    known = store.spec_of(ns_path)
    if known is not None and known.manifest_bytes() != spec.manifest_bytes():
        raise ChunkFormatError(f"{ns_path}/{MANIFEST_NAME}: differs from the namespace's manifest")
    return spec.manifest_bytes()


def chunk_limit(store: Any, ns_path: str, pending_manifest: bytes | None = None) -> int:
    """The largest a chunk file of a namespace can be (header included)."""
    from ..spec import KVSpec

    spec = store.spec_of(ns_path)
    if spec is None and pending_manifest is not None:
        spec = KVSpec.from_manifest(pending_manifest)
    if spec is None:
        return MAX_UNKNOWN
    return (1 << 20) + 8 + spec.bytes_per_token * spec.chunk_tokens
