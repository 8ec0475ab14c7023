"""Optional chunk signing for storage other parties can write (a shared bucket).

With a deployment key (``signing_key=``, ``$KVFS_SIGNING_KEY`` or
``$KVFS_SIGNING_KEY_FILE``), every chunk written carries
``signature = "b2mac:" + keyed-BLAKE2b-256(canonical metadata || tensor bytes)``
and every chunk read must carry a valid one: unsigned, wrongly signed or
altered chunks are misses. Without a key, checksums still catch corruption,
but anyone who can write the storage can plant KV (see docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import hmac
import os

from .errors import IntegrityError, InvalidInput

PREFIX = "b2mac:"


class Signer:
    placeholder = PREFIX + "0" * 64

    def __init__(self, key: bytes) -> None:
        if not key:
            raise InvalidInput("the signing key is empty")
        self._key = hashlib.blake2b(key, digest_size=32, person=b"kvfs-sign").digest()

    @classmethod
    def from_config(cls, key: bytes | str | None = None) -> "Signer | None":
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

    def _mac(self, meta: bytes, data) -> str:
        h = hashlib.blake2b(key=self._key, digest_size=32)
        h.update(len(meta).to_bytes(8, "little"))
        h.update(meta)
        h.update(data)
        return PREFIX + h.hexdigest()

    def sign(self, meta: bytes, data) -> str:
        return self._mac(meta, data)

    def verify(self, header, data, path: str = "") -> None:
        from .chunk import _canonical_meta

        sig = header.metadata.get("signature")
        where = f" {path}" if path else ""
        if not sig:
            raise IntegrityError(f"chunk{where} is not signed, and this store requires signatures")
        if not hmac.compare_digest(sig, self._mac(_canonical_meta(header.metadata), data)):
            raise IntegrityError(f"chunk{where} has a wrong signature: not written with this deployment's key")
