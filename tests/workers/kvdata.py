"""Deterministic prompts and KV shared by tests and worker processes: any reader can check what it got."""

from __future__ import annotations

import numpy as np

import kvfs

SPEC = kvfs.KVSpec("crash/tiny", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", chunk_tokens=16)


def prompt(i: int) -> list[int]:
    rng = np.random.default_rng(1000 + i)
    shared = np.random.default_rng(7).integers(0, 1000, 24).tolist()  # prompts share a prefix
    return shared + rng.integers(0, 1000, int(rng.integers(8, 80))).tolist()


def expected_kv(tokens) -> np.ndarray:
    """KV as a pure function of (position, token), the way a causal model's KV depends on its prefix."""
    t = np.asarray(tokens, dtype=np.int64)
    pos = np.arange(len(t), dtype=np.int64)
    val = ((t * 31 + pos * 7) % 2048).astype(np.float32) / 64.0
    shape = SPEC.chunk_shape(len(t))
    grid = np.arange(shape[0] * shape[1] * shape[3] * shape[4], dtype=np.float32).reshape(
        shape[0], shape[1], 1, shape[3], shape[4]) / 1024.0
    return (grid + val[None, None, :, None, None]).astype(np.float16)
