"""Optional chunk signing for storage other parties can write (a shared bucket).

With a deployment key (``signing_key=``, ``$KVFS_SIGNING_KEY`` or
``$KVFS_SIGNING_KEY_FILE``), every chunk written carries
``layer_digests`` (a BLAKE2b-128 digest of each layer) and
``signature = "b2mac:" + keyed-BLAKE2b-256(canonical metadata)``; the
metadata includes the layer digests, so the signature authenticates every
byte, and a single layer read on its own is checked against its signed
digest. Every chunk read must carry a valid signature: unsigned, wrongly
signed or altered chunks are misses (:class:`~kvfs.errors.SignatureError`),
left in place, so that a node given the wrong key does not delete every chunk
it reads from a shared bucket; storing the chunk again replaces it. Without a key, checksums still catch corruption,
but anyone who can write the storage can plant KV (see docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import hmac
import os

from .errors import InvalidInput, SignatureError

PREFIX = "b2mac:"


class Signer:
    placeholder = PREFIX + "0" * 64

    def __init__(self, key: bytes) -> None:
        if not key:
            raise InvalidInput("the signing key is empty")
        self._key = hashlib.blake2b(key, digest_size=32, person=b"kvfs-sign").digest()

    @classmethod
    def from_config(cls, key: bytes | str | bool | None = None) -> "Signer | None":
        """``key`` given: that key; ``False``: no signing whatever the environment; ``None``: the environment."""
        if key is False:
            return None
        if key is None:
            env = os.environ.get("KVFS_SIGNING_KEY")
            path = os.environ.get("KVFS_SIGNING_KEY_FILE")
            if env:
                key = env
            elif path:
                try:
                    with open(path, "rb") as f:
                        key = f.read().strip()
                except OSError as e:
                    raise InvalidInput(f"cannot read KVFS_SIGNING_KEY_FILE {path}: {e.strerror}") from None
            else:
                return None
        if isinstance(key, str):
            key = key.encode()
        return cls(key)

    def _mac(self, meta: bytes) -> str:
        return PREFIX + hashlib.blake2b(meta, key=self._key, digest_size=32).hexdigest()

    def sign(self, meta: bytes) -> str:
        """The signature of a chunk's canonical metadata (which must include its ``layer_digests``)."""
        return self._mac(meta)

    def verify(self, header, path: str = "") -> None:
        """Check a chunk header's signature. Its layers are then checked against the signed digests
        (:func:`kvfs.chunk.check_layer`) as they are read."""
        from .chunk import _canonical_meta

        sig = header.metadata.get("signature")
        where = f" {path}" if path else ""
        if not sig:
            raise SignatureError(f"chunk{where} is not signed, and this store requires signatures")
        if header.layer_digests is None and header.shape[0]:
            raise SignatureError(f"chunk{where} is signed without layer digests: not a valid signed chunk")
        if not hmac.compare_digest(sig, self._mac(_canonical_meta(header.metadata))):
            raise SignatureError(f"chunk{where} has a wrong signature: not written with this deployment's key")
