"""Bit rot on the medium, for tests: flip one bit of a stored file in place."""

from __future__ import annotations

import os


def flip_bit(path: str, offset: int, mask: int = 0x40) -> None:
    """XOR the byte at ``offset`` of ``path`` (negative: from the end) with ``mask``, in place."""
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END if offset < 0 else os.SEEK_SET)
        pos = f.tell()
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ mask]))


def stored_chunk(store, spec, tokens, kv, index: int = 1):
    """Put ``kv`` for ``tokens`` into ``store``'s first tier; ``(ns, key, backend, bytes)`` of chunk ``index`` as
    stored there, for a test to put other bytes in its place behind the store's back."""
    ns = store.namespace(spec)
    ns.put(tokens, kv)
    key = ns.keys(tokens)[index]
    backend = store.tiers[0].backend
    return ns, key, backend, bytes(backend.get(key.path))
