"""Content addressing: chunk keys chained over the tokens before them.

``h_i = blake2b(h_{i-1} || uint32le(tokens of chunk i), digest_size=32)`` with
``h_{-1}`` the namespace seed, so a key names the whole prefix up to and
including its chunk. A trailing partial chunk is keyed the same way (its
length is part of the bytes hashed). Segment chunks (CacheBlend) are keyed
position-independently: their chain starts from ``seed || b"segment"``.

Deterministic across processes and machines (no Python ``hash``), and
cryptographic, so a tenant cannot forge a collision.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .errors import InvalidInput

DIGEST_SIZE = 32
SEGMENT_TAG = b"segment"
_U32_MAX = 2**32 - 1


@dataclass(frozen=True, slots=True)
class ChunkKey:
    """One chunk of one token sequence in one namespace.

    ``start``/``end`` are token indices in the sequence that was keyed
    (``end - start`` tokens, at most the namespace's ``chunk_tokens``).
    """

    digest: bytes
    parent: bytes | None
    start: int
    end: int
    namespace: str  # "<model>/<namespace-id>"
    segment: bool = False

    @property
    def hex(self) -> str:
        return self.digest.hex()

    @property
    def parent_hex(self) -> str:
        return self.parent.hex() if self.parent else ""

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    @property
    def path(self) -> str:
        h = self.digest.hex()
        return f"{self.namespace}/{h[:2]}/{h}.safetensors"

    def __repr__(self) -> str:
        return f"ChunkKey({self.path}, tokens {self.start}:{self.end})"


def chunk_path(namespace: str, digest_hex: str) -> str:
    return f"{namespace}/{digest_hex[:2]}/{digest_hex}.safetensors"


def as_tokens(tokens: Any, *, allow_empty: bool = False) -> np.ndarray:
    """Token ids as a contiguous little-endian uint32 array, validated.

    Accepts a list/tuple of ints, a 1-D numpy integer array or a 1-D torch
    tensor. Negative ids, ids >= 2**32, floats, bool arrays and nesting are
    refused with :class:`InvalidInput` (in a list, ``True`` and ``False`` are
    Python ints, read as 1 and 0: checking every element's type would make
    converting a list several times slower).
    """
    if isinstance(tokens, np.ndarray):
        arr = tokens
    elif type(tokens).__module__.startswith("torch"):
        if tokens.dim() != 1:
            raise InvalidInput(f"tokens must be 1-D, got a tensor of shape {tuple(tokens.shape)}")
        if tokens.is_floating_point() or tokens.is_complex():
            raise InvalidInput(f"token ids must be integers, got a {tokens.dtype} tensor")
        arr = tokens.detach().cpu().numpy()
    elif isinstance(tokens, (list, tuple, range, array)):
        if isinstance(tokens, range):
            arr = np.arange(tokens.start, tokens.stop, tokens.step, dtype=np.int64)
        else:
            try:
                # array('I') converts a list ~3x faster than numpy and refuses negatives/overflow itself;
                # fromlist (lists only) another 1.4x faster than array('I', list)
                if not tokens:
                    return _empty(allow_empty)
                if type(tokens) is list:
                    ids = array("I")
                    ids.fromlist(tokens)
                else:
                    ids = array("I", tokens)
                return np.frombuffer(ids, dtype="<u4")
            except (OverflowError, TypeError):
                arr = np.asarray(tokens, dtype=object)
                for t in arr.ravel():
                    if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                        raise InvalidInput(f"token ids must be integers, got {t!r}") from None
                    if t < 0 or t > _U32_MAX:
                        raise InvalidInput(
                            f"token id {t} is out of range: ids are 0 <= id < 2**32"
                        ) from None
                raise InvalidInput("token ids must be a flat list of integers") from None
    else:
        raise InvalidInput(
            f"tokens must be a list of ints, a 1-D numpy array or a 1-D torch tensor, got {type(tokens).__name__}"
        )
    if arr.ndim != 1:
        raise InvalidInput(f"tokens must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return _empty(allow_empty)
    if arr.dtype.kind not in "iu" or arr.dtype == np.bool_:
        raise InvalidInput(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.dtype != np.dtype("<u4"):
        if arr.dtype.kind == "i" and arr.min() < 0:
            raise InvalidInput(f"token id {int(arr.min())} is negative: ids are 0 <= id < 2**32")
        if arr.max() > _U32_MAX:
            raise InvalidInput(f"token id {int(arr.max())} is out of range: ids are 0 <= id < 2**32")
        arr = arr.astype("<u4")
    return np.ascontiguousarray(arr)


def _empty(allow_empty: bool) -> np.ndarray:
    if not allow_empty:
        raise InvalidInput("tokens is empty: give at least one token id")
    return np.zeros(0, dtype="<u4")


def chain(seed: bytes, tokens: np.ndarray, chunk_tokens: int, *, start: int = 0) -> list[bytes]:
    """Digests of every chunk (the last one possibly partial) of ``tokens``."""
    mv = memoryview(tokens).cast("B")
    out: list[bytes] = []
    prev = seed
    n = len(tokens)
    # copying a fresh hasher is cheaper than building one per chunk (lookups hash up to 512 chunks);
    # blake2b(prev || tokens) either way
    fresh = hashlib.blake2b(digest_size=DIGEST_SIZE)
    step = chunk_tokens * 4
    for s in range(start * 4, n * 4, step):
        h = fresh.copy()
        h.update(prev)
        h.update(mv[s : s + step])  # the last slice stops at the end: a partial chunk
        prev = h.digest()
        out.append(prev)
    return out


def next_digest(parent: bytes, tokens: np.ndarray) -> bytes:
    h = hashlib.blake2b(parent, digest_size=DIGEST_SIZE)
    h.update(memoryview(tokens).cast("B"))
    return h.digest()


def chunk_keys(seed: bytes, namespace: str, tokens: np.ndarray, chunk_tokens: int) -> list[ChunkKey]:
    digests = chain(seed, tokens, chunk_tokens)
    keys = []
    parent = None
    n = len(tokens)
    for i, d in enumerate(digests):
        s = i * chunk_tokens
        keys.append(ChunkKey(d, parent, s, min(s + chunk_tokens, n), namespace))
        parent = d
    return keys


def segment_keys(seed: bytes, namespace: str, tokens: np.ndarray, chunk_tokens: int) -> list[ChunkKey]:
    """Position-independent keys of a segment: the first is ``blake2b(seed || b"segment" || tokens)``."""
    digests = chain(seed + SEGMENT_TAG, tokens, chunk_tokens)
    keys = []
    parent = None
    n = len(tokens)
    for i, d in enumerate(digests):
        s = i * chunk_tokens
        keys.append(ChunkKey(d, parent, s, min(s + chunk_tokens, n), namespace, segment=True))
        parent = d
    return keys


def common_prefix_length(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    """Length of the common prefix of two token arrays (vectorized)."""
    a = np.asarray(a)
    b = np.asarray(b)
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n
