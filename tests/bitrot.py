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
