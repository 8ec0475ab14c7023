"""The chunk format: a safetensors file any safetensors reader opens.

Layout (all integers little-endian)::

    [u64 N][N bytes of JSON header, space padded][tensor data]
    8 + N is a multiple of 4096, so tensor data is aligned for O_DIRECT / GDS.

One tensor, ``kv``, of shape ``[layers, planes, tokens, kv_heads, head_dim]``
(planes = 2 for K and V, 1 for an MLA latent), layer-major: one layer's K and
V are one contiguous byte range. ``__metadata__`` (string values, as
safetensors requires) holds:

==================  ==============================================================
``format``          ``"kvfs"``
``version``         format version (``"1"``); readers refuse newer versions
``namespace``       the namespace id (``bf16-L32-H8-D128-c256-tp1.0-3fa9c1d2``)
``key``/``parent``  hex chunk key and its parent's ("" for a chain's first chunk)
``kind``            ``"prefix"`` or ``"segment"`` (position-independent, CacheBlend)
``start``           index of the chunk's first token in the sequence keyed
``positions``       first position the KV was computed at (RoPE)
``tokens``          JSON list of the chunk's token ids
``checksum``        ``xxh3-64:<hex>`` of all tensor bytes
``layer_checksums`` comma-separated xxh3-64 of each layer's byte range
``meta_checksum``   xxh3-64 of the canonical JSON of every other metadata entry
``layer_digests``   signed chunks only: comma-separated BLAKE2b-128 of each layer
``signature``       signed chunks only: ``b2mac:<hex>`` over the metadata (see :mod:`kvfs.signing`)
==================  ==============================================================

Parsing is strict and only ever raises :class:`ChunkFormatError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from .errors import ChunkFormatError, ForeignChunk, IntegrityError, UnsupportedVersion
from .spec import DTYPES, SAFETENSORS_TO_DTYPE, KVSpec

FORMAT_NAME = "kvfs"
FORMAT_VERSION = 1
ALIGN = 4096
MAX_HEADER = 1 << 20  # a header claiming more is corrupt, not a big chunk
MAX_FILE = (1 << 63) - 1  # a chunk larger than any file offset is corrupt (and would overflow a pread)
_KEY_HEX = re.compile(r"[0-9a-f]{64}")
_DECIMAL = re.compile(r"[0-9]+")  # ASCII digits only: int() would also take signs, spaces, "_" and other scripts
_HEX16 = "0" * 16
_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32}
_REQUIRED = ("format", "version", "namespace", "key", "parent", "kind", "start", "positions", "tokens",
             "checksum", "layer_checksums", "meta_checksum")


def _xxh(data) -> str:
    return xxhash.xxh3_64_hexdigest(data)


_HEX32 = "0" * 32


class LayerCheck:
    """Hashes one layer's bytes (in any number of pieces): XXH3-64 always, BLAKE2b-128 for signed chunks.

    A signed chunk's ``layer_digests`` are covered by its signature, so a
    layer read on its own is authenticated, not just checked for corruption.
    """

    __slots__ = ("_x", "_b")

    def __init__(self, strong: bool) -> None:
        self._x = xxhash.xxh3_64()
        self._b = hashlib.blake2b(digest_size=16) if strong else None

    def update(self, data) -> None:
        self._x.update(data)
        if self._b is not None:
            self._b.update(data)

    def sums(self) -> tuple[str, str | None]:
        return self._x.hexdigest(), (self._b.hexdigest() if self._b is not None else None)


def check_layer(header: "ChunkHeader", layer: int, *pieces) -> None:
    """Raise :class:`IntegrityError` unless the bytes of ``layer`` (given in order, in pieces) are intact."""
    digests = header.layer_digests
    if digests is None and len(pieces) == 1 and (not isinstance(pieces[0], np.ndarray)
                                                 or pieces[0].flags.c_contiguous):
        # one contiguous piece: one call instead of a hasher object and its updates (xxhash releases the
        # GIL on large buffers either way, so the layers a read splits over the thread pool are checked in
        # parallel)
        if xxhash.xxh3_64_hexdigest(pieces[0]) != header.layer_checksums[layer]:
            raise IntegrityError(f"chunk {header.key[:16]}... layer {layer} checksum mismatch: corrupt")
        return
    c = LayerCheck(digests is not None)
    for p in pieces:
        c.update(p if not isinstance(p, np.ndarray) or p.flags.c_contiguous else np.ascontiguousarray(p))
    x, b = c.sums()
    if x != header.layer_checksums[layer] or (digests is not None and b != digests[layer]):
        raise IntegrityError(f"chunk {header.key[:16]}... layer {layer} checksum mismatch: corrupt")


def _canonical_meta(meta: dict[str, str]) -> bytes:
    rest = {k: v for k, v in meta.items() if k not in ("meta_checksum", "signature")}
    return json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    """A parsed, self-consistent chunk header (not yet checked against what was asked for)."""

    metadata: dict[str, str]
    dtype: str
    shape: tuple[int, int, int, int, int]
    data_offset: int
    nbytes: int
    tokens: np.ndarray

    @property
    def namespace(self) -> str:
        return self.metadata["namespace"]

    @property
    def key(self) -> str:
        return self.metadata["key"]

    @property
    def parent(self) -> str:
        return self.metadata["parent"]

    @property
    def kind(self) -> str:
        return self.metadata["kind"]

    @property
    def start(self) -> int:
        return int(self.metadata["start"])

    @property
    def positions(self) -> int:
        return int(self.metadata["positions"])

    @property
    def num_tokens(self) -> int:
        return self.shape[2]

    @property
    def file_size(self) -> int:
        return self.data_offset + self.nbytes

    @property
    def layer_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape[0] else 0

    @property
    def layer_checksums(self) -> list[str]:
        return self.metadata["layer_checksums"].split(",") if self.shape[0] else []

    @property
    def layer_digests(self) -> list[str] | None:
        """BLAKE2b-128 of each layer, present in signed chunks (covered by the signature)."""
        v = self.metadata.get("layer_digests")
        return v.split(",") if v is not None and self.shape[0] else None

    def layer_range(self, layer: int) -> tuple[int, int]:
        """Byte range ``[start, end)`` of one layer's K and V in the file."""
        lb = self.layer_bytes
        return self.data_offset + layer * lb, self.data_offset + (layer + 1) * lb


# --------------------------------------------------------------------------------------------
# encoding


def encode(
    spec: KVSpec,
    *,
    key: str,
    parent: str,
    tokens: np.ndarray,
    kv: np.ndarray,
    start: int,
    kind: str = "prefix",
    positions: int | None = None,
    extra: dict[str, str] | None = None,
    signer: Any = None,
) -> memoryview:
    """Encode one chunk into a new buffer: the tensor bytes are copied exactly once.

    ``kv`` is a raw-typed (uint8/16/32) or spec-typed array of shape
    ``spec.chunk_shape(len(tokens))``, with any strides (a slice of a longer
    sequence is fine). Checksums are computed on the copy while it is in cache.
    """
    return PendingChunk(spec, key=key, parent=parent, tokens=tokens, kv=kv, start=start, kind=kind,
                        positions=positions, extra=extra, signer=signer).materialize()


class PendingChunk:
    """A chunk whose layout is fixed and whose bytes are produced as they are written.

    The header has fixed-width placeholders for the checksums, so the file
    size (``len()``) is known before any tensor byte is touched. Two ways out:

    * :meth:`materialize` copies the KV into one new buffer (what a backend
      that keeps or copies whole values gets), hashing each layer while it
      is hot in cache;
    * :meth:`write_to` hands the caller's own KV bytes, layer by layer, to a
      positional writer (a file: ``pwritev``), hashing each layer right
      before it is written and writing the header, checksums filled in, last.
      The KV is read once and never copied in user space: the kernel copies
      it into the page cache straight from the caller's array.

    The caller's KV must not change until the write returns (``Store.put``
    returns only once it is written).
    """

    __slots__ = ("spec", "meta", "shape", "nbytes", "hlen", "data_offset", "src", "signer")

    def __init__(self, spec: KVSpec, *, key: str, parent: str, tokens: np.ndarray, kv: np.ndarray, start: int,
                 kind: str = "prefix", positions: int | None = None, extra: dict[str, str] | None = None,
                 signer: Any = None) -> None:
        t = len(tokens)
        shape = spec.chunk_shape(t)
        if tuple(kv.shape) != shape:
            raise ValueError(f"kv shape {tuple(kv.shape)} != {shape}")
        nbytes = math.prod(shape) * spec.itemsize
        meta = {
            "format": FORMAT_NAME,
            "version": str(FORMAT_VERSION),
            "namespace": spec.namespace_id,
            "key": key,
            "parent": parent,
            "kind": kind,
            "start": str(int(start)),
            "positions": str(int(start if positions is None else positions)),
            "tokens": "[" + ",".join(map(str, tokens.tolist())) + "]",
            "checksum": "xxh3-64:" + _HEX16,
            "layer_checksums": ",".join([_HEX16] * shape[0]),
        }
        if extra:
            for k, v in extra.items():
                if k in meta or k in ("meta_checksum", "signature"):
                    raise ValueError(f"metadata key {k!r} is reserved")
                meta[k] = str(v)
        if signer is not None:
            meta["layer_digests"] = ",".join([_HEX32] * shape[0])
        meta["meta_checksum"] = _HEX16
        if signer is not None:
            meta["signature"] = signer.placeholder  # fixed width: the real signature has the same length
        self.spec = spec
        self.meta = meta
        self.shape = shape
        self.nbytes = nbytes
        self.hlen = _padded_len(len(_header_json(meta, spec.dtype, shape, nbytes)))
        self.data_offset = 8 + self.hlen
        raw = _RAW[spec.itemsize]
        self.src = kv.view(raw) if kv.dtype != raw else kv
        self.signer = signer

    def __len__(self) -> int:
        return self.data_offset + self.nbytes

    @property
    def layer_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape[0] else 0

    def _finish(self, whole: str, layer_sums: list[str], layer_digests: list) -> bytes:
        """The header bytes (length prefix, JSON, padding) with the checksums filled in."""
        meta = dict(self.meta)
        finish_metadata(meta, whole, layer_sums, layer_digests, self.signer)
        final = _header_json(meta, self.spec.dtype, self.shape, self.nbytes)
        if len(final) > self.hlen:  # cannot happen with fixed-width placeholders; guard anyway
            raise AssertionError("chunk header grew while encoding")
        return struct.pack("<Q", self.hlen) + final + b" " * (self.hlen - len(final))

    def materialize(self) -> memoryview:
        """The whole chunk in one new buffer from :func:`kvfs._buffers.alloc` (the KV copied once)."""
        from ._buffers import alloc

        mv = alloc(len(self))
        off, lb = self.data_offset, self.layer_bytes
        dst = np.frombuffer(mv[off:], dtype=self.src.dtype).reshape(self.shape)
        whole = xxhash.xxh3_64()
        layer_sums, layer_digests = [], []
        for layer in range(self.shape[0]):
            np.copyto(dst[layer], self.src[layer])
            self._sum_layer(whole, [mv[off + layer * lb : off + (layer + 1) * lb]], layer_sums, layer_digests)
        mv[: self.data_offset] = self._finish(whole.hexdigest(), layer_sums, layer_digests)
        return mv

    def _sum_layer(self, whole, pieces, layer_sums: list, layer_digests: list) -> None:
        """Feed one layer's bytes (in file order) to the whole-tensor hash and append the layer's own sums."""
        c = LayerCheck(self.signer is not None)
        for p in pieces:
            whole.update(p)
            c.update(p)
        x, b = c.sums()
        layer_sums.append(x)
        layer_digests.append(b)

    def _layer_pieces(self, layer: int, scratch: list) -> list[memoryview]:
        """Contiguous byte views of ``layer``'s bytes, in file order: one per plane when each plane of the
        caller's array is contiguous (a chunk sliced out of a prompt-wide ``[L, 2, T, H, D]`` array), else
        the layer copied into a scratch buffer reused across layers."""
        src = self.src[layer]
        if src.flags.c_contiguous:
            return [memoryview(src).cast("B")]
        planes = [src[p] for p in range(src.shape[0])]
        if all(p.flags.c_contiguous for p in planes):
            return [memoryview(p).cast("B") for p in planes]
        if not scratch:
            scratch.append(np.empty(src.shape, dtype=src.dtype))
        np.copyto(scratch[0], src)
        return [memoryview(scratch[0]).cast("B")]

    def write_to(self, pwritev) -> None:
        """Write the chunk through ``pwritev(views, offset)`` (which writes all of ``views`` at ``offset``):
        each layer hashed and then written from the caller's KV, the header last (at offset 0)."""
        whole = xxhash.xxh3_64()
        layer_sums, layer_digests = [], []
        scratch: list = []
        off, lb = self.data_offset, self.layer_bytes
        for layer in range(self.shape[0]):
            pieces = self._layer_pieces(layer, scratch)
            self._sum_layer(whole, pieces, layer_sums, layer_digests)
            pwritev(pieces, off + layer * lb)
        pwritev([self._finish(whole.hexdigest(), layer_sums, layer_digests)], 0)


def finish_metadata(meta: dict[str, str], whole: str, layer_sums: list[str], layer_digests: list,
                    signer: Any = None) -> None:
    """Fill the checksums (and the signature) into metadata made with fixed-width placeholders."""
    meta["checksum"] = "xxh3-64:" + whole
    meta["layer_checksums"] = ",".join(layer_sums)
    if signer is not None:
        meta["layer_digests"] = ",".join(layer_digests)
    meta["meta_checksum"] = _xxh(_canonical_meta(meta))
    if signer is not None:
        meta["signature"] = signer.sign(_canonical_meta(meta))


_STANDARD = set(_REQUIRED) | {"layer_digests", "signature"}


def resign(buf, spec: KVSpec, signer: Any) -> memoryview:
    """The same chunk (tensor bytes and metadata) signed with ``signer`` (or unsigned if None).

    For ``kvfs cp`` into a store with another deployment key; the caller
    must have verified ``buf`` first: signing is vouching for its content.
    """
    header = parse_header(buf)
    mv = memoryview(buf)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    raw = np.frombuffer(mv[header.data_offset :], dtype=_RAW[DTYPES[header.dtype][1]]).reshape(header.shape)
    m = header.metadata
    return encode(spec, key=m["key"], parent=m["parent"], tokens=header.tokens, kv=raw, start=int(m["start"]),
                  kind=m["kind"], positions=int(m["positions"]),
                  extra={k: v for k, v in m.items() if k not in _STANDARD}, signer=signer)


def _header_json(meta: dict[str, str], dtype: str, shape: tuple[int, ...], nbytes: int) -> bytes:
    header = {
        "__metadata__": meta,
        "kv": {"dtype": DTYPES[dtype][0], "shape": list(shape), "data_offsets": [0, nbytes]},
    }
    return json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()


def _padded_len(n: int) -> int:
    return ((8 + n + ALIGN - 1) // ALIGN) * ALIGN - 8


# --------------------------------------------------------------------------------------------
# decoding


def header_length(prefix: bytes | memoryview) -> int:
    """Total bytes of ``[u64][header]``, i.e. the data offset, from a file's first 8 bytes."""
    if len(prefix) < 8:
        raise ChunkFormatError(f"chunk is truncated: {len(prefix)} bytes, not even a header length")
    (n,) = struct.unpack_from("<Q", prefix, 0)
    if n > MAX_HEADER:
        raise ChunkFormatError(f"chunk header claims {n} bytes (more than {MAX_HEADER}): corrupt")
    if (8 + n) % ALIGN:
        raise ChunkFormatError(f"chunk data offset {8 + n} is not a multiple of {ALIGN}: not a kvfs chunk")
    return 8 + n


def parse_header(buf: bytes | bytearray | memoryview, file_size: int | None = None) -> ChunkHeader:
    """Parse and self-check a chunk header from a buffer holding at least the header.

    ``file_size``: the chunk's full length if known (defaults to ``len(buf)``
    when the buffer is longer than the header); a mismatch means truncation.
    Raises :class:`ChunkFormatError` for anything that is not a valid chunk.
    """
    try:
        return _parse_header(buf, file_size)
    except ChunkFormatError:
        raise
    except (ValueError, TypeError, KeyError, OverflowError, IndexError, AttributeError, RecursionError,
            struct.error) as e:
        raise ChunkFormatError(f"malformed chunk header: {type(e).__name__}: {e}") from None


def _unique_members(pairs: list) -> dict:
    """A JSON object whose names are all different: with a name given twice, readers that keep the first
    value and readers that keep the last (Python's json) would see different metadata."""
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ChunkFormatError(f"chunk header names {dup!r} more than once")
    return d


def _parse_header(buf, file_size: int | None) -> ChunkHeader:
    mv = memoryview(buf)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    data_offset = header_length(mv[:8])
    if len(mv) < data_offset:
        raise ChunkFormatError(f"chunk is truncated: {len(mv)} bytes, header needs {data_offset}")
    raw = bytes(mv[8:data_offset])
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_members)
    except (UnicodeDecodeError, ValueError) as e:
        raise ChunkFormatError(f"chunk header is not JSON: {e}") from None
    if not isinstance(header, dict) or set(header) != {"__metadata__", "kv"}:
        raise ChunkFormatError("chunk header must hold exactly '__metadata__' and one tensor 'kv'")
    meta, tensor = header["__metadata__"], header["kv"]
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ChunkFormatError("chunk metadata must map strings to strings")
    if meta.get("format") != FORMAT_NAME:
        raise ChunkFormatError(f"not a kvfs chunk (format {meta.get('format')!r})")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise ChunkFormatError(f"chunk metadata lacks {', '.join(missing)}")
    if not _DECIMAL.fullmatch(meta["version"]):
        raise ChunkFormatError(f"chunk format version {meta['version'][:40]!r} is not a decimal number")
    version = int(meta["version"])
    if version > FORMAT_VERSION:
        raise UnsupportedVersion(
            f"chunk format version {version} is newer than this kvfs reads ({FORMAT_VERSION}); upgrade kvfs"
        )
    if version < 1:
        raise ChunkFormatError(f"chunk format version {version} is invalid")
    if _xxh(_canonical_meta(meta)) != meta["meta_checksum"]:
        raise IntegrityError("chunk metadata checksum mismatch: the header is corrupt")
    if not isinstance(tensor, dict) or set(tensor) != {"dtype", "shape", "data_offsets"}:
        raise ChunkFormatError("tensor 'kv' must have dtype, shape and data_offsets")
    dtype = SAFETENSORS_TO_DTYPE.get(tensor["dtype"]) if isinstance(tensor["dtype"], str) else None
    if dtype is None:
        raise ChunkFormatError(f"unsupported tensor dtype {tensor['dtype']!r}")
    shape = tensor["shape"]
    if (not isinstance(shape, list) or len(shape) != 5
            or not all(type(d) is int and 0 <= d < 2**31 for d in shape)):
        raise ChunkFormatError(f"tensor shape {shape!r} is not [layers, planes, tokens, heads, dim]")
    if shape[1] not in (1, 2):
        raise ChunkFormatError(f"tensor shape {shape!r}: planes must be 2 (K, V) or 1 (MLA)")
    nbytes = math.prod(shape) * DTYPES[dtype][1]
    offs = tensor["data_offsets"]
    if not isinstance(offs, list) or not all(type(o) is int for o in offs) or offs != [0, nbytes]:
        raise ChunkFormatError(f"data_offsets {offs!r} do not match shape {shape} ({nbytes} bytes)")
    if data_offset + nbytes > MAX_FILE:
        raise ChunkFormatError(f"tensor shape {shape} describes {nbytes} bytes, more than any file holds: corrupt")
    if file_size is None and len(mv) > data_offset:
        file_size = len(mv)
    if file_size is not None and file_size != data_offset + nbytes:
        raise ChunkFormatError(
            f"chunk is {file_size} bytes but its header describes {data_offset + nbytes}: truncated or padded"
        )
    tokens_list = json.loads(meta["tokens"])
    if not isinstance(tokens_list, list) or not all(type(t) is int and 0 <= t < 2**32 for t in tokens_list):
        raise ChunkFormatError("chunk tokens must be a list of uint32 ids")
    if len(tokens_list) != shape[2]:
        raise ChunkFormatError(f"chunk holds {len(tokens_list)} token ids but KV for {shape[2]} tokens")
    if meta["kind"] not in ("prefix", "segment"):
        raise ChunkFormatError(f"unknown chunk kind {meta['kind']!r}")
    for name in ("start", "positions"):
        if not _DECIMAL.fullmatch(meta[name]):
            raise ChunkFormatError(f"chunk metadata {name} {meta[name][:40]!r} is not a decimal number")
    if int(meta["start"]) >= 2**32:
        raise ChunkFormatError(f"chunk start {meta['start'][:40]} is not a token index (at most 2**32 - 1)")
    if not _KEY_HEX.fullmatch(meta["key"]):
        raise ChunkFormatError(f"chunk key {meta['key'][:70]!r} is not 64 lowercase hex digits")
    if meta["parent"] and not _KEY_HEX.fullmatch(meta["parent"]):
        raise ChunkFormatError(f"chunk parent {meta['parent'][:70]!r} is neither '' nor 64 lowercase hex digits")
    if not meta["checksum"].startswith("xxh3-64:"):
        raise ChunkFormatError(f"unknown checksum {meta['checksum']!r}")
    if len(meta["layer_checksums"].split(",")) != shape[0] and shape[0]:
        raise ChunkFormatError("layer_checksums does not have one entry per layer")
    if "layer_digests" in meta and shape[0] and len(meta["layer_digests"].split(",")) != shape[0]:
        raise ChunkFormatError("layer_digests does not have one entry per layer")
    tokens = np.asarray(tokens_list, dtype="<u4") if tokens_list else np.zeros(0, "<u4")
    return ChunkHeader(meta, dtype, (shape[0], shape[1], shape[2], shape[3], shape[4]), data_offset, nbytes, tokens)


def check_expected(
    header: ChunkHeader,
    spec: KVSpec,
    *,
    key: str | None = None,
    tokens: np.ndarray | None = None,
    path: str = "",
) -> None:
    """Raise :class:`IntegrityError` unless the chunk is the one asked for, in this namespace."""
    where = f" ({path})" if path else ""
    if header.namespace != spec.namespace_id:
        raise ForeignChunk(
            f"chunk belongs to namespace {header.namespace!r}, not {spec.namespace_id!r}{where}"
        )
    if header.dtype != spec.dtype:
        raise IntegrityError(f"chunk dtype {header.dtype} != namespace dtype {spec.dtype}{where}")
    if header.shape != spec.chunk_shape(header.shape[2]):
        raise IntegrityError(f"chunk shape {header.shape} does not fit namespace {spec.namespace_id}{where}")
    if header.shape[2] > spec.chunk_tokens or header.shape[2] == 0:
        raise IntegrityError(f"chunk holds {header.shape[2]} tokens; namespace chunks hold 1..{spec.chunk_tokens}{where}")
    if key is not None and header.key != key:
        raise IntegrityError(f"chunk key {header.key[:16]}... is not the key asked for {key[:16]}...{where}")
    if tokens is not None and (len(tokens) != len(header.tokens) or not np.array_equal(tokens, header.tokens)):
        raise IntegrityError(f"chunk token ids do not match the tokens asked for{where}")


def verify_data(header: ChunkHeader, data) -> None:
    """Check the whole-tensor checksum of ``data`` (the tensor bytes)."""
    if xxhash.xxh3_64_hexdigest(data) != header.metadata["checksum"][8:]:
        raise IntegrityError(f"chunk {header.key[:16]}... data checksum mismatch: corrupt")


def as_array(header: ChunkHeader, data) -> np.ndarray:
    """A zero-copy array over the tensor bytes (valid as long as ``data`` is)."""
    from .spec import numpy_dtype

    return np.frombuffer(data, dtype=numpy_dtype(header.dtype), count=math.prod(header.shape)).reshape(header.shape)


def copy_verified(
    header: ChunkHeader,
    data,
    dest: np.ndarray,
    *,
    layers: range | None = None,
    take: int | None = None,
    verify: bool = True,
) -> None:
    """Copy (some layers, the first ``take`` tokens of) a chunk into ``dest``, verifying each layer.

    ``data`` holds the tensor bytes of the layers copied (all layers, or
    exactly the layers in ``layers``, contiguous). ``dest`` has shape
    ``[len(layers), planes, take, heads, dim]`` and any strides. A layer is
    hashed from ``dest`` right after its copy (hot in cache) when the copy
    is whole and contiguous, else from the source. On :class:`IntegrityError`
    the content of ``dest`` is undefined: the caller discards it.
    """
    layers = range(header.shape[0]) if layers is None else layers
    t = header.shape[2]
    take = t if take is None else take
    itemsize = DTYPES[header.dtype][1]
    raw = _RAW[itemsize]
    lshape = header.shape[1:]
    lb = header.layer_bytes
    mv = memoryview(data)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    if len(mv) < lb * len(layers):
        raise ChunkFormatError(f"chunk data is truncated: {len(mv)} bytes for {len(layers)} layers of {lb}")
    src = np.frombuffer(mv, dtype=raw, count=(lb // itemsize) * len(layers)).reshape((len(layers),) + lshape)
    dst = dest.view(raw) if dest.dtype != raw else dest
    whole = take == t
    for i, layer in enumerate(layers):
        d = dst[i]
        if whole:
            np.copyto(d, src[i])
            if verify:
                # the layer's source block is contiguous and still in cache after the copy: one piece
                check_layer(header, layer, d if d.flags.c_contiguous else src[i])
        else:
            if verify:
                check_layer(header, layer, mv[i * lb : (i + 1) * lb])
            np.copyto(d, src[i][:, :take])


def decode(buf, spec: KVSpec | None = None, *, key: str | None = None, tokens: np.ndarray | None = None,
           verify: bool = True) -> tuple[ChunkHeader, np.ndarray]:
    """Parse, check and copy out a whole chunk: ``(header, kv array)`` (one copy of the tensor bytes)."""
    header = parse_header(buf)
    if spec is not None:
        check_expected(header, spec, key=key, tokens=tokens)
    from .spec import numpy_dtype

    out = np.empty(header.shape, dtype=numpy_dtype(header.dtype))
    mv = memoryview(buf)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    copy_verified(header, mv[header.data_offset :], out, verify=verify)
    return header, out


def describe(header: ChunkHeader) -> dict[str, Any]:
    """Plain-JSON view of a header (CLI ``stat``)."""
    m = dict(header.metadata)
    m["tokens"] = header.tokens.tolist()
    return {
        "dtype": header.dtype,
        "shape": list(header.shape),
        "data_offset": header.data_offset,
        "nbytes": header.nbytes,
        "metadata": m,
    }
