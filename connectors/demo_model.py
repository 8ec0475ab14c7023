"""Seeded random Llama models for the demo, the tests and the benchmarks.

No weights can be downloaded here, and none are needed to show what kvfs
does: a Llama-architecture model built from a config with seeded random
weights computes real attention KV, exactly like a trained one of the same
shape would, just with meaningless outputs. The same ``(size, seed, dtype)``
gives the same weights in every process, so the KV one process stores is the
KV another would compute.

    from kvfs.connectors.demo_model import build_model, demo_spec
    model = build_model("tiny")              # LlamaForCausalLM, eval mode
    spec = demo_spec("tiny", chunk_tokens=16)  # its KVSpec

Sizes (float32, CPU):

- ``"demo"``: 8 layers, hidden 512, 8 query / 2 KV heads of 64, vocab 32000
  (55 M parameters): a cold prefill of 4k tokens takes a few seconds on a
  laptop CPU, which is what ``kvfs demo`` and ``benchmarks/ttft.py`` need.
- ``"tiny"``: 2 layers, hidden 64, 4 query / 2 KV heads of 16, vocab 512:
  milliseconds per forward, for tests.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ..spec import KVSpec

SIZES: dict[str, dict[str, Any]] = {
    "demo": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=65536),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192),
}


def _check_size(size: str) -> dict[str, Any]:
    if size not in SIZES:
        raise ValueError(f"unknown demo model size {size!r}; choose one of {', '.join(SIZES)}")
    return SIZES[size]


def model_name(size: str = "demo", seed: int = 0) -> str:
    """The model name kvfs stores this model's KV under (size and seed included: other weights, other KV)."""
    _check_size(size)
    return f"kvfs-demo/llama-{size}-random-seed{seed}"


def build_config(size: str = "demo", seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaConfig:
    """The ``LlamaConfig`` of a demo model; its ``name_or_path`` is :func:`model_name`."""
    cfg = LlamaConfig(**_check_size(size), bos_token_id=None, eos_token_id=None, pad_token_id=None,
                      tie_word_embeddings=False, dtype=dtype)
    cfg._name_or_path = model_name(size, seed)
    return cfg


def build_model(size: str = "demo", seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` with seeded random weights, in eval mode, on the CPU.

    The weights depend only on ``(size, seed, dtype)``; the global torch RNG
    is left as it was.
    """
    cfg = build_config(size, seed, dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype).eval()
    model.config._name_or_path = model_name(size, seed)
    # no sampling defaults: the demo model has no generation config of its own
    model.generation_config.pad_token_id = None
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    return model


def demo_spec(size: str = "demo", seed: int = 0, dtype: torch.dtype = torch.float32,
              chunk_tokens: int = 256) -> KVSpec:
    """The :class:`kvfs.KVSpec` of ``build_model(size, seed, dtype)`` (what ``kvfs.connectors.hf`` derives)."""
    c = _check_size(size)
    return KVSpec(model_name(size, seed), num_layers=c["num_hidden_layers"], num_kv_heads=c["num_key_value_heads"],
                  head_dim=c["head_dim"], dtype=str(dtype).removeprefix("torch."), chunk_tokens=chunk_tokens)
