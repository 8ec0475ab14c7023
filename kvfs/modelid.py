"""A revision for models loaded from a local directory.

A namespace is the model's name and revision (plus its KV layout). A model
from the hub has a commit; a model loaded from a directory has only its path,
and two checkpoints at one path (a fine-tune saved over another, ``./ckpt`` in
two working directories) would share a namespace, each served the other's KV.
:func:`local_revision` names such a model by its contents instead: a hash of
its config and weight files, cached per node by each file's identity (path,
size, modification time, inode), so that it is computed once per checkpoint
(about a second per 10 GB from the page cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import tempfile

log = logging.getLogger("kvfs")

#: files whose contents decide a model's KV: its config (RoPE settings, layer shapes) and its weights
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".npz")
CONFIG_FILES = ("config.json", "params.json")
#: a Trainer checkpoint's files that are not the model (optimizer state can be twice the weights)
NOT_WEIGHTS = ("optimizer", "scheduler", "rng_state", "training_args", "scaler")
_BLOCK = 64 << 20


def _model_files(directory: str) -> list[os.DirEntry]:
    out = []
    with os.scandir(directory) as it:
        for e in it:
            if not e.is_file():
                continue
            name = e.name
            if name.startswith(NOT_WEIGHTS):
                continue
            if name in CONFIG_FILES or name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json"):
                out.append(e)
    return sorted(out, key=lambda e: e.name)


def _cache_file(directory: str) -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = hashlib.blake2b(os.path.realpath(directory).encode("utf-8", "surrogateescape"), digest_size=12).hexdigest()
    return os.path.join(cache, "kvfs", "model-fingerprints", key + ".json")


def _hash_file(h, path: str) -> None:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            mv = memoryview(m)
            try:
                for off in range(0, size, _BLOCK):
                    h.update(mv[off : off + _BLOCK])
            finally:
                mv.release()


def local_revision(name: str) -> str | None:
    """``"local-<hex>"`` for a model name that is a local directory holding a config or weights; ``None``
    for anything else (a hub id). Files that cannot be read make it ``None`` too (with a warning)."""
    if not name or not os.path.isdir(name):
        return None
    try:
        files = _model_files(name)
        if not files:
            return None
        identity = [[e.name, e.stat().st_size, e.stat().st_mtime_ns, e.stat().st_ino] for e in files]
        cache = _cache_file(name)
        saved = _saved(cache, identity)
        if saved is not None:
            return saved
        lock = None
        try:  # one process per node hashes (a TP engine's scheduler and ranks start together); the rest wait
            import fcntl

            os.makedirs(os.path.dirname(cache), exist_ok=True)
            lock = open(cache + ".lock", "a")
            fcntl.flock(lock, fcntl.LOCK_EX)
            saved = _saved(cache, identity)
            if saved is not None:
                return saved
        except OSError:
            pass
        try:
            import xxhash

            h = xxhash.xxh3_128()
            for e in files:
                h.update(e.name.encode("utf-8", "surrogateescape") + b"\0")
                _hash_file(h, e.path)
            revision = "local-" + h.hexdigest()[:24]
            try:
                fd, tmp = tempfile.mkstemp(dir=os.path.dirname(cache), prefix=".fp-")
                with os.fdopen(fd, "w") as f:
                    json.dump({"directory": os.path.realpath(name), "files": identity, "revision": revision}, f)
                os.replace(tmp, cache)
            except OSError:
                pass  # computed again next time
            return revision
        finally:
            if lock is not None:
                lock.close()
    except OSError as e:
        log.warning("kvfs: cannot fingerprint the model in %s (%s): its namespace has no revision; pass one", name, e)
        return None


def _saved(cache: str, identity: list) -> str | None:
    try:
        with open(cache) as f:
            saved = json.load(f)
        if saved.get("files") == identity and isinstance(saved.get("revision"), str):
            return saved["revision"]
    except (OSError, ValueError, AttributeError):
        pass
    return None
