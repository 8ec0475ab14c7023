"""Namespaces: the KV-compatible configuration that chunks are keyed under.

A :class:`KVSpec` names everything that makes two KV caches interchangeable:
model and revision, KV dtype, layer count, KV heads and head size (or the MLA
latent size), chunk size, tensor-parallel geometry and the hash algorithm. Its
canonical JSON is the *manifest*; ``blake2b(manifest)`` is the *seed* every
chunk key of the namespace is chained from, so nothing stored under one spec
can ever be found under another.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import InvalidInput

MANIFEST_VERSION = 1
HASH_NAME = "blake2b-256"

# canonical name -> (safetensors dtype code, itemsize, short name used in namespace ids)
DTYPES: dict[str, tuple[str, int, str]] = {
    "float32": ("F32", 4, "f32"),
    "float16": ("F16", 2, "f16"),
    "bfloat16": ("BF16", 2, "bf16"),
    "float8_e4m3fn": ("F8_E4M3", 1, "fp8e4m3"),
    "float8_e5m2": ("F8_E5M2", 1, "fp8e5m2"),
}
_DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "f32": "float32",
    "fp16": "float16",
    "half": "float16",
    "f16": "float16",
    "bf16": "bfloat16",
    "fp8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "float8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
}
SAFETENSORS_TO_DTYPE = {code: name for name, (code, _, _) in DTYPES.items()}

_MODEL_DIR_OK = re.compile(r"[^A-Za-z0-9._+-]")


def canonical_dtype(dtype: Any) -> str:
    """Accepts ``"bf16"``, ``"bfloat16"``, ``torch.bfloat16``, ``np.float16``, ... -> canonical name."""
    name = getattr(dtype, "name", None) if not isinstance(dtype, str) else dtype
    if name is None:
        name = str(dtype)
    name = str(name).lower().removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise InvalidInput(
            f"unsupported KV dtype {dtype!r}; kvfs stores {', '.join(DTYPES)}"
        )
    return name


def numpy_dtype(name: str):
    """The numpy dtype of a canonical dtype name (bfloat16 and fp8 through ml_dtypes)."""
    import numpy as np

    if name in ("float32", "float16"):
        return np.dtype(name)
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, name))


MODEL_DIR_MAX = 255  # bytes of a model's directory name: a path component (NAME_MAX on Linux filesystems)


def model_dir(model: str) -> str:
    """The directory name of a model: ``meta-llama/Llama-3.1-8B`` -> ``meta-llama--Llama-3.1-8B``."""
    name = _MODEL_DIR_OK.sub("_", model.strip().replace("/", "--"))
    if name in ("", ".", ".."):
        raise InvalidInput(f"model name {model!r} does not make a usable directory name")
    if len(name.encode()) > MODEL_DIR_MAX:
        # a file name (a path component) holds at most 255 bytes on every filesystem and object store kvfs
        # writes to; refused here, before anything is registered under it
        raise InvalidInput(f"model name {model[:40]!r}... makes a {len(name.encode())}-byte directory name; "
                           f"at most {MODEL_DIR_MAX} bytes (use a shorter model name)")
    return name


def _positive(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numbers

            if isinstance(value, numbers.Integral):
                value = int(value)
            else:
                raise TypeError
        except TypeError:
            raise InvalidInput(f"KVSpec.{name} must be an integer, got {value!r}") from None
    if value < minimum:
        raise InvalidInput(f"KVSpec.{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class KVSpec:
    """One KV-compatible configuration; chunks are keyed and stored under it.

    ``mla=True`` describes latent-attention models (DeepSeek): one latent
    vector per token and layer, ``head_dim`` is the latent size and
    ``num_kv_heads`` must be 1.
    """

    model: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    chunk_tokens: int = 256
    revision: str = ""
    tp_rank: int = 0
    tp_size: int = 1
    mla: bool = False
    _seed: bytes = field(default=b"", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise InvalidInput("KVSpec.model must be a non-empty string (e.g. 'meta-llama/Llama-3.1-8B')")
        model_dir(self.model)  # a name that makes no usable directory is refused now, not at the first put
        if not isinstance(self.revision, str):
            raise InvalidInput(f"KVSpec.revision must be a string, got {self.revision!r}")
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        for name in ("num_layers", "num_kv_heads", "head_dim", "chunk_tokens", "tp_size"):
            object.__setattr__(self, name, _positive(name, getattr(self, name)))
        object.__setattr__(self, "tp_rank", _positive("tp_rank", self.tp_rank, 0))
        if self.tp_rank >= self.tp_size:
            raise InvalidInput(f"KVSpec.tp_rank {self.tp_rank} must be < tp_size {self.tp_size}")
        if self.chunk_tokens > 65536:
            raise InvalidInput(f"KVSpec.chunk_tokens {self.chunk_tokens} is too large (at most 65536)")
        if self.mla and self.num_kv_heads != 1:
            raise InvalidInput("an MLA KVSpec has one latent 'head': set num_kv_heads=1")
        object.__setattr__(self, "mla", bool(self.mla))
        object.__setattr__(self, "_seed", hashlib.blake2b(self.manifest_bytes(), digest_size=32).digest())

    # -- identity -------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("_seed", None)
        d["layout"] = "mla" if d.pop("mla") else "kv"
        d["hash"] = HASH_NAME
        d["kvfs_manifest"] = MANIFEST_VERSION
        return d

    def manifest_bytes(self) -> bytes:
        """Canonical JSON: sorted keys, no spaces, ASCII. Hashing it gives the seed."""
        return json.dumps(self.manifest(), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any] | str | bytes) -> "KVSpec":
        if isinstance(manifest, (str, bytes)):
            try:
                manifest = json.loads(manifest)
            except ValueError as e:
                raise InvalidInput(f"manifest is not JSON: {e}") from None
        if not isinstance(manifest, dict):
            raise InvalidInput("a manifest is a JSON object")
        m = dict(manifest)
        version = m.pop("kvfs_manifest", None)
        if version != MANIFEST_VERSION:
            raise InvalidInput(f"manifest version {version!r} is not supported (this kvfs reads {MANIFEST_VERSION})")
        if m.pop("hash", HASH_NAME) != HASH_NAME:
            raise InvalidInput("manifest uses an unknown hash algorithm")
        m["mla"] = m.pop("layout", "kv") == "mla"
        try:
            return cls(**m)
        except TypeError as e:
            raise InvalidInput(f"manifest has unexpected fields: {e}") from None

    @property
    def seed(self) -> bytes:
        return self._seed

    @property
    def model_dir(self) -> str:
        return model_dir(self.model)

    @property
    def namespace_id(self) -> str:
        """Readable, ends in 8 hex digits of the seed: ``bf16-L32-H8-D128-c256-tp1.0-3fa9c1d2``."""
        short = DTYPES[self.dtype][2]
        shape = f"L{self.num_layers}-mla{self.head_dim}" if self.mla else (
            f"L{self.num_layers}-H{self.num_kv_heads}-D{self.head_dim}"
        )
        return f"{short}-{shape}-c{self.chunk_tokens}-tp{self.tp_size}.{self.tp_rank}-{self._seed[:4].hex()}"

    @property
    def path(self) -> str:
        """``<model>/<namespace-id>``: the namespace's directory in every view."""
        return f"{self.model_dir}/{self.namespace_id}"

    # -- shapes ---------------------------------------------------------------------------
    @property
    def kv_planes(self) -> int:
        """2 (K and V) for normal attention, 1 (the latent) for MLA."""
        return 1 if self.mla else 2

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    def chunk_shape(self, tokens: int) -> tuple[int, int, int, int, int]:
        return (self.num_layers, self.kv_planes, tokens, self.num_kv_heads, self.head_dim)

    def check_layers(self, layers: Any) -> None:
        """Refuse a ``layers`` argument a read cannot serve: reads take ``layers.start`` to ``layers.stop`` as one
        byte range of each chunk, so anything but consecutive layers of this namespace is the caller's mistake,
        refused before a read could take good chunks for truncated ones (and quarantine them)."""
        if not isinstance(layers, range) or layers.step != 1:
            raise InvalidInput(f"layers={layers!r}: give a range of consecutive layers (no step)")
        if len(layers) and not 0 <= layers.start < layers.stop <= self.num_layers:
            raise IndexError(f"layers {layers.start}..{layers.stop - 1} are out of range: the namespace has "
                             f"{self.num_layers} layers")

    @property
    def bytes_per_token(self) -> int:
        """KV bytes one token takes over all layers (the capacity-planning number)."""
        return self.num_layers * self.kv_planes * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def numpy_dtype(self):
        return numpy_dtype(self.dtype)
