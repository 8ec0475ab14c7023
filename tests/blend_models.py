"""Seeded random Llama models whose attention behaves like a trained model's, for CacheBlend fidelity.

Why not the plain demo model: a Llama with i.i.d. Gaussian weights attends
*diffusely* (every token spreads its attention over every earlier token), so
putting a document after other documents changes every token's KV by about
the same amount, and no selection of 15 % of the tokens can restore much. A
trained model does not look like that: most attention goes to an attention
sink (the BOS) and a few content matches, so only the tokens with a strong
dependency on another document deviate much (the observation CacheBlend
rests on). The model built here has exactly that structure, and nothing
else that is not random:

* **Attention sink.** The BOS embedding has a direction of its own; every
  query has a constant part (``q_proj`` bias) on the lowest-frequency RoPE
  dimension and the BOS key is large on it, so every token gives the BOS a
  logit of ``sink`` (8) at any distance. The BOS value is zero: attending to
  it changes nothing (as in trained models).
* **Sparse content matches.** A fraction ``topic_frac`` of the vocabulary are
  *entity* tokens, each of one of ``topics`` topics (an embedding direction of
  its own). Queries and keys carry the topic on a RoPE dimension of low
  frequency (position-independent over a few thousand tokens), so an entity
  token attends to earlier tokens of its topic with a logit of ``match`` (10)
  — above the sink: a strong, sparse dependency.
* **Random background.** Everything else in ``q_proj``/``k_proj`` is Gaussian
  with attention logits of standard deviation about ``content`` (0.7: a
  moderate logit scale, so attention is not chaotic); values, MLP and LM head
  are Gaussian.
* **Damped residual branches.** ``o_proj`` and ``down_proj`` are scaled by
  ``damp`` (0.5), so each layer changes the residual stream by a fraction of
  its size and a perturbation of one token's KV does not blow up over layers.

RoPE theta is 500000 (Llama 3's), so the topic and sink dimensions rotate by
well under a radian across the prompts used here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SIZES: dict[str, dict[str, Any]] = {
    # tests: milliseconds per prefill of ~150 tokens
    "small": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    # the benchmark: the shape of kvfs.connectors.demo_model's "demo" size
    "demo": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=64),
}
BOS = 0


def build_sparse_llama(size: str = "small", seed: int = 0, *, topics: int = 15, topic_frac: float = 0.1,
                       gamma: float = 4.0, sink: float = 8.0, match: float = 10.0, content: float = 0.7,
                       damp: float = 0.5, out: float = 4.0, theta: float = 500000.0) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` (float32, eval) with the structure described in the module doc."""
    dims = SIZES[size]
    hidden, heads, kv, hd = dims["hidden_size"], dims["num_attention_heads"], dims["num_key_value_heads"], \
        dims["head_dim"]
    vocab, inter = dims["vocab_size"], dims["intermediate_size"]
    cfg = LlamaConfig(**dims, max_position_embeddings=8192, bos_token_id=BOS, eos_token_id=None, pad_token_id=None,
                      tie_word_embeddings=False, attention_bias=True,
                      rope_parameters={"rope_type": "default", "rope_theta": theta})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).eval()
    model.config._name_or_path = f"kvfs-test/sparse-llama-{size}-seed{seed}"
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std

    # hidden coordinates: 0 = BOS, 1..topics = topics, the rest random
    free = torch.arange(1 + topics, hidden)
    emb = torch.zeros(vocab, hidden)
    emb[:, free] = randn(vocab, len(free), std=1.0)
    emb[BOS] = 0.0
    emb[BOS, 0] = math.sqrt(hidden)  # RMS-normalized, the BOS is exactly its own direction
    entities = (torch.randperm(vocab - 1, generator=g)[: int(topic_frac * (vocab - 1))] + 1).tolist()
    for i, v in enumerate(entities):
        emb[v, 1 + i % topics] = gamma
    # RoPE pairs (i, i + hd/2), lowest frequency first: the sink on the lowest, topics on the next ones
    half = hd // 2
    stable = [d for i in range(half - 1, -1, -1) for d in (i, i + half)]
    sink_dim, topic_dims = stable[0], stable[1 : 1 + topics]
    root = math.sqrt(hd)  # transformers scales logits by 1/sqrt(head_dim)
    # q_i ~ N(0, bg^2 * len(free)) on unit coordinates; q.k / sqrt(hd) then has std bg^2 * len(free) = content
    bg = math.sqrt(content / len(free))
    beta = math.sqrt(match * root) / gamma
    sink_q = math.sqrt(sink * root)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(emb)
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            wq = torch.zeros(heads * hd, hidden)
            wk = torch.zeros(kv * hd, hidden)
            wq[:, free] = randn(heads * hd, len(free), std=bg)
            wk[:, free] = randn(kv * hd, len(free), std=bg)
            qb = torch.zeros(heads * hd)
            for h in range(heads):
                wq[h * hd + sink_dim] = 0.0
                qb[h * hd + sink_dim] = sink_q
                for t, d in enumerate(topic_dims):
                    wq[h * hd + d, 1 + t] = beta
            for h in range(kv):
                wk[h * hd + sink_dim] = 0.0
                wk[h * hd + sink_dim, 0] = sink_q / math.sqrt(hidden)
                for t, d in enumerate(topic_dims):
                    wk[h * hd + d, 1 + t] = beta
            attn.q_proj.weight.copy_(wq)
            attn.q_proj.bias.copy_(qb)
            attn.k_proj.weight.copy_(wk)
            attn.k_proj.bias.zero_()
            wv = randn(kv * hd, hidden, std=1 / math.sqrt(hidden))
            wv[:, 0] = 0.0  # the sink's value is zero
            attn.v_proj.weight.copy_(wv)
            attn.v_proj.bias.zero_()
            attn.o_proj.weight.copy_(randn(hidden, heads * hd, std=damp / math.sqrt(heads * hd)))
            attn.o_proj.bias.zero_()
            mlp.gate_proj.weight.copy_(randn(inter, hidden, std=1 / math.sqrt(hidden)))
            mlp.up_proj.weight.copy_(randn(inter, hidden, std=1 / math.sqrt(hidden)))
            mlp.down_proj.weight.copy_(randn(hidden, inter, std=damp / math.sqrt(inter)))
        model.lm_head.weight.copy_(randn(vocab, hidden, std=out / math.sqrt(hidden)))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    model.entities = entities  # entity token ids, for prompt builders
    model.topic_of = {v: i % topics for i, v in enumerate(entities)}
    return model


def rag_prompt(model: LlamaForCausalLM, seed: int, *, segments: int = 4, segment_tokens: int = 32,
               query_tokens: int = 8, prefix_tokens: int = 4, entities: int = 3, mentions: int = 2
               ) -> tuple[list[int], list[list[int]], list[int]]:
    """``(prefix, segments, query)``: documents of random plain tokens, each mentioning ``mentions`` times
    some of ``entities`` entities of distinct topics (so documents depend on each other), and a query
    that ends with the entity most documents mention (so the answer depends on the documents and on how
    they relate). The prefix starts with the BOS."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ent_set = set(model.entities)
    plain = [v for v in range(1, vocab) if v not in ent_set]

    def pick(seq: list[int], n: int) -> list[int]:
        return [seq[int(i)] for i in torch.randint(0, len(seq), (n,), generator=g)]

    chosen: list[int] = []
    for v in pick(model.entities, 200):
        if all(model.topic_of[v] != model.topic_of[c] for c in chosen):
            chosen.append(v)
        if len(chosen) == entities:
            break
    docs = []
    for _ in range(segments):
        doc = pick(plain, segment_tokens)
        for p in torch.randperm(segment_tokens, generator=g)[:mentions].tolist():
            doc[p] = pick(chosen, 1)[0]
        docs.append(doc)
    # the query asks about the entity that most documents mention (a retrieved set is about its subject)
    spread = [sum(e in doc for doc in docs) for e in chosen]
    query = pick(plain, query_tokens)
    query[-1] = chosen[spread.index(max(spread))]
    return [BOS] + pick(plain, prefix_tokens - 1), docs, query


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(ref || other) of the next-token distributions, in nats (float64)."""
    p = torch.log_softmax(ref_logits.double(), -1)
    q = torch.log_softmax(logits.double(), -1)
    return float((p.exp() * (p - q)).sum())
