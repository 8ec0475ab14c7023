"""CacheBlend (kvfs.connectors.blend): documents' KV reused at any position, a few tokens recomputed.

References are always the model itself: a full forward pass (``model(...)``)
and transformers' own ``generate``. Fidelity is measured on a seeded random
Llama whose attention has a trained model's structure (an attention sink and
sparse content matches, damped residual branches; see tests/blend_models.py
for why and how).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

import kvfs  # noqa: E402
from kvfs.connectors.blend import (  # noqa: E402
    BlendedLM, CausalTail, KeyRotation, attend, causal_mask, rotate_keys)
from kvfs.connectors.demo_model import build_model  # noqa: E402
from kvfs.connectors.hf import kv_from_cache, output_cache, run_model  # noqa: E402
from kvfs.errors import InvalidInput  # noqa: E402

from bitrot import flip_bit  # noqa: E402
from blend_models import BOS, build_sparse_llama, kl_divergence, rag_prompt  # noqa: E402

CHUNK = 16
GRID = (0.0, 0.05, 0.15, 0.3, 0.5, 1.0)


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny", seed=0)  # 2 layers, no BOS: segments computed at positions from 0


@pytest.fixture(scope="module")
def sparse():
    return build_sparse_llama("small", seed=0)  # 6 layers, BOS: segments computed after it, from position 1


def rand_tokens(seed: int, n: int, vocab: int = 512, low: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, (n,), generator=g).tolist()


def full_logits(model, prefix, segments, query) -> torch.Tensor:
    ids = torch.tensor([list(prefix) + [t for s in segments for t in s] + list(query)])
    with torch.no_grad():
        return model(ids).logits[0, -1]


def small_llama(rope: dict | None = None, model_type: str = "llama", **over) -> torch.nn.Module:
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, bos_token_id=None,
              eos_token_id=None, pad_token_id=None)
    kw.update(over)
    if rope is not None:
        kw["rope_parameters"] = rope
    if model_type == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        cfg = Qwen3Config(**kw)
        cls = Qwen3ForCausalLM
    else:
        cfg, cls = LlamaConfig(**kw), LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(cfg).eval()
    model.config._name_or_path = f"kvfs-test/{model_type}-{(rope or {}).get('rope_type', 'default')}"
    return model


LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}
ROPES = {
    "default": None,
    "llama3": LLAMA3,
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
}


# ---------------------------------------------------------------------------------------------- RoPE
@pytest.mark.parametrize("rope", list(ROPES))
def test_rotating_keys_by_a_delta_equals_computing_them_there(rope):
    model = small_llama(ROPES[rope])
    ids = torch.tensor([rand_tokens(1, 40, 128)])
    with torch.no_grad():
        at = {p: output_cache(model(ids, position_ids=torch.arange(p, p + 40)[None], use_cache=True))
              for p in (1, 700, 3001)}
    for src, dst in [(1, 3001), (3001, 1), (1, 700), (700, 3001)]:
        for layer in range(3):
            moved = rotate_keys(model, at[src].layers[layer].keys, src, dst)
            torch.testing.assert_close(moved, at[dst].layers[layer].keys, atol=1e-5, rtol=0)
    # per-token positions: layer 0's keys (a function of the token alone and its position) computed at
    # scattered positions, moved to consecutive ones
    src = torch.randperm(3000, generator=torch.Generator().manual_seed(2))[:40]
    with torch.no_grad():
        scattered = output_cache(model(ids, position_ids=src[None], use_cache=True))
    moved = rotate_keys(model, scattered.layers[0].keys, src, 1)
    torch.testing.assert_close(moved, at[1].layers[0].keys, atol=1e-5, rtol=0)


def test_rope_that_cannot_be_moved_is_refused(tmp_path):
    longrope = {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0, "short_factor": [1.0] * 8,
                "long_factor": [2.0] * 8, "original_max_position_embeddings": 1024}
    with pytest.raises(InvalidInput, match="longrope"):
        KeyRotation(small_llama(longrope))
    # dynamic NTK: fine below the original context, refused beyond it (its frequencies depend on the length)
    model = small_llama(ROPES["dynamic"], max_position_embeddings=64)
    with kvfs.open("memory://") as store, BlendedLM(model, store, chunk_tokens=CHUNK) as lm:
        seg, query = rand_tokens(3, 30, 128), rand_tokens(4, 3, 128)
        b = lm.prefill([], [seg], query, ratio=1.0)
        torch.testing.assert_close(b.logits, full_logits(model, [], [seg], query), atol=1e-5, rtol=0)
        with pytest.raises(InvalidInput, match="dynamic RoPE.*original context"):
            lm.prefill([], [seg, seg, seg], query)


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("check_layer", [1, 2, 4])
def test_full_ratio_reproduces_a_full_prefill(sparse, tmp_path, check_layer):
    prefix, segs, query = rag_prompt(sparse, 7)
    ref = full_logits(sparse, prefix, segs, query)
    with BlendedLM(sparse, f"lmdb://{tmp_path}/s", chunk_tokens=CHUNK, ratio=1.0, check_layer=check_layer) as lm:
        cold = lm.prefill(prefix, segs, query)  # segments computed here, then stored
        assert (cold.segments_computed, cold.segments_loaded) == (4, 0)
        warm = lm.prefill(prefix, segs[::-1], query)  # another order: every segment loaded, re-rotated
        assert (warm.segments_computed, warm.segments_loaded) == (0, 4)
        assert warm.prefix_reused == len(prefix) - 1  # the prefix went through the prefix cache
        torch.testing.assert_close(cold.logits, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(warm.logits, full_logits(sparse, prefix, segs[::-1], query), atol=1e-5, rtol=0)
        assert len(warm.selected) == warm.segment_tokens and warm.ratio == 1.0


@pytest.mark.parametrize("kind", ["llama3-rope", "qwen3", "tiny-no-prefix"])
def test_full_ratio_is_exact_on_other_llama_family_models(kind, tiny):
    if kind == "tiny-no-prefix":
        model, prefix = tiny, []
    elif kind == "qwen3":  # per-head q/k norms
        model, prefix = small_llama(model_type="qwen3", layer_types=None), rand_tokens(0, 5, 128)
    else:
        model, prefix = small_llama(LLAMA3), rand_tokens(0, 5, 128)
    vocab = model.config.vocab_size
    segs = [rand_tokens(10 + i, n, vocab) for i, n in enumerate((20, 1, 37))]
    query = rand_tokens(9, 1, vocab)
    with kvfs.open("memory://") as store, BlendedLM(model, store, chunk_tokens=CHUNK) as lm:
        lm.prefill(prefix, segs, query)  # stores the segments
        b = lm.prefill(prefix, segs[1:] + segs[:1], query, ratio=1.0)
        assert b.segments_loaded == 3
        torch.testing.assert_close(b.logits, full_logits(model, prefix, segs[1:] + segs[:1], query), atol=1e-5,
                                   rtol=0)


def test_generation_at_full_ratio_is_token_identical_to_transformers(sparse):
    prefix, segs, query = rag_prompt(sparse, 3)
    prompt = prefix + [t for s in segs for t in s] + query
    want = sparse.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    with kvfs.open("memory://") as store, BlendedLM(sparse, store, chunk_tokens=CHUNK, ratio=1.0) as lm:
        first = lm.generate(prefix, segs, query, max_new_tokens=8)
        assert first.tokens == want and first.stored_segments == 4
        again = lm.generate(prefix, segs, query, max_new_tokens=8)
        assert again.tokens == want and again.prefill.segments_loaded == 4 and again.stored_segments == 0


def test_plain_reuse_is_the_stored_kv_moved_to_its_positions(sparse):
    """ratio=0 is exactly: the prefix's KV, each segment's KV computed alone and re-rotated, then the query."""
    prefix, segs, query = rag_prompt(sparse, 5)
    with kvfs.open("memory://") as store, BlendedLM(sparse, store, chunk_tokens=CHUNK) as lm:
        b = lm.prefill(prefix, segs, query, ratio=0)
        assert b.recomputed == 0 and b.ratio == 0.0
        # the reference, by hand: transformers computes every piece, kvfs is not involved
        with torch.no_grad():
            pre = kv_from_cache(output_cache(sparse(torch.tensor([prefix]), use_cache=True)))
            parts, pos = [pre], len(prefix)
            for s in segs:
                kv = kv_from_cache(output_cache(sparse(torch.tensor([[BOS] + s]), use_cache=True)))[:, :, 1:]
                kv[:, 0] = rotate_keys(sparse, kv[:, 0].transpose(1, 2), 1, pos).transpose(1, 2)
                parts.append(kv)
                pos += len(s)
            kv = torch.cat(parts, dim=2)
            cache = DynamicCache([(kv[i, 0].transpose(0, 1)[None], kv[i, 1].transpose(0, 1)[None])
                                  for i in range(kv.shape[0])])
            ref = run_model(sparse, torch.tensor([query]), cache).logits[0, -1]
        torch.testing.assert_close(b.logits, ref, atol=1e-5, rtol=0)
        assert b.prompt_tokens == pos + len(query) == b.cache.get_seq_length()


def test_causal_mask_is_exact():
    qpos = torch.tensor([3, 5, 9])
    m = causal_mask(qpos, 10)
    assert m.tolist() == [[j <= p for j in range(10)] for p in (3, 5, 9)]
    # the last positions in order run as plain causal attention: the same result as the dense mask
    tail = causal_mask(torch.arange(4, 10), 10)
    assert tail == CausalTail(6, 10)
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    dense = torch.arange(10)[None] <= torch.arange(4, 10)[:, None]
    torch.testing.assert_close(attend(q, k, v, tail, 0.3), attend(q, k, v, dense, 0.3))
    assert causal_mask(torch.arange(7, 10), 10).tolist() == dense[3:].tolist()  # few queries: a dense mask
    q = torch.randn(1, 4, 10, 8)
    torch.testing.assert_close(attend(q, k, v, causal_mask(torch.arange(10), 10), 0.3),
                               attend(q, k, v, torch.ones(10, 10, dtype=torch.bool).tril(), 0.3))


# ---------------------------------------------------------------------------------------------- fidelity
@pytest.mark.parametrize("seed", [0, 1])
def test_fidelity_recovers_most_of_the_gap_and_beats_random_selection(seed):
    model = build_sparse_llama("small", seed=seed)
    kl = {r: [] for r in GRID}
    rand = []
    with kvfs.open("memory://") as store, BlendedLM(model, store, chunk_tokens=CHUNK) as lm:
        for p in range(5):
            prefix, segs, query = rag_prompt(model, 100 + p)
            ref = full_logits(model, prefix, segs, query)
            for r in GRID:
                kl[r].append(kl_divergence(ref, lm.prefill(prefix, segs, query, ratio=r).logits))
            rand += [kl_divergence(ref, lm.prefill(prefix, segs, query, ratio=0.15, selection="random", seed=s).logits)
                     for s in range(4)]
    mean = {r: float(np.mean(v)) for r, v in kl.items()}
    gap = mean[0.0]
    assert gap > 1e-3, f"no gap to recover: {mean}"  # reusing KV blindly does change the answer
    assert mean[1.0] < 1e-9
    recovered = (gap - mean[0.15]) / gap
    assert recovered >= 0.5, f"r=0.15 recovers {recovered:.0%} of the gap: {mean}"
    assert mean[0.15] < float(np.mean(rand)), f"random selection {np.mean(rand)} beats the deviation {mean[0.15]}"
    # more recompute never makes it worse (up to 1 % of the gap: at the noise floor, recomputing more tokens
    # changes which of the tiny diffuse deviations remain)
    for lo, hi in zip(GRID, GRID[1:]):
        assert mean[hi] <= mean[lo] + 0.01 * gap, f"KL rises from r={lo} to r={hi}: {mean}"


def test_planted_dependency_is_caught_by_the_selection():
    """A marker entity in the first document; entity tokens of its topic in later documents attend to it
    (a logit above the sink's), so their KV depends on another document; the query ends with the topic.
    The tokens recomputed at r = 0.15 must include >= 90 % of those dependents."""
    model = build_sparse_llama("small", seed=3)
    by_topic: dict[int, list[int]] = {}
    for v in model.entities:
        by_topic.setdefault(model.topic_of[v], []).append(v)
    topic = max(by_topic, key=lambda t: len(by_topic[t]))
    marker, related = by_topic[topic][0], by_topic[topic][1:] or by_topic[topic]
    plain = [v for v in range(1, model.config.vocab_size) if v not in set(model.entities)]
    g = torch.Generator().manual_seed(11)

    def filler(n: int) -> list[int]:
        return [plain[int(i)] for i in torch.randint(0, len(plain), (n,), generator=g)]

    segs = [filler(32) for _ in range(4)]
    segs[0][10] = marker
    dependents = []  # prompt positions
    prefix = [BOS] + filler(3)
    for j, spots in ((1, (4, 20, 29)), (2, (2, 15, 27)), (3, (6, 12, 22, 30))):
        for k, p in enumerate(spots):
            segs[j][p] = related[k % len(related)]
            dependents.append(len(prefix) + 32 * j + p)
    # distractors: entities of other topics mentioned inside one document only (no cross-document dependency)
    others = [v for t, vs in by_topic.items() if t != topic for v in vs[:1]]
    for j in range(4):
        segs[j][1] = others[j % len(others)]
        segs[j][25] = others[j % len(others)]
    query = filler(7) + [marker]
    ref = full_logits(model, prefix, segs, query)
    with kvfs.open("memory://") as store, BlendedLM(model, store, chunk_tokens=CHUNK) as lm:
        b = lm.prefill(prefix, segs, query, ratio=0.15)
        caught = len(set(dependents) & set(b.selected.tolist()))
        assert caught >= 0.9 * len(dependents), f"selected {sorted(b.selected)}, dependents {dependents}"
        rnd = lm.prefill(prefix, segs, query, ratio=0.15, selection="random", seed=0)
        assert len(set(dependents) & set(rnd.selected.tolist())) < 0.5 * len(dependents)
        reuse = kl_divergence(ref, lm.prefill(prefix, segs, query, ratio=0).logits)
        blended = kl_divergence(ref, b.logits)
        assert blended < 0.2 * reuse, (blended, reuse)


# ---------------------------------------------------------------------------------------------- storage
def test_segments_are_stored_once_position_independent_with_their_positions(sparse, tiny, tmp_path):
    prefix, segs, query = rag_prompt(sparse, 2)
    with BlendedLM(sparse, f"lmdb://{tmp_path}/s", chunk_tokens=CHUNK) as lm:
        out = lm.generate(prefix, segs[:2], query, max_new_tokens=2)
        assert out.stored_segments == 2 and out.prefill.segments_computed == 2
        # another prefix, other documents around them: the stored ones are found and loaded
        b = lm.prefill([BOS, 9, 9], [segs[3], segs[1], segs[0]], query)
        assert (b.segments_loaded, b.segments_computed) == (2, 1)
        kv, first = lm.ns.get_segment(segs[0])
        assert first == 1  # computed after the BOS
        torch.testing.assert_close(torch.from_numpy(np.asarray(kv)), lm.compute_segment(segs[0]), atol=0, rtol=0)
    with BlendedLM(sparse, f"lmdb://{tmp_path}/s", chunk_tokens=CHUNK) as lm:  # another process, later
        assert all(lm.has_segment(s) for s in (segs[0], segs[1], segs[3])) and not lm.has_segment(segs[2])
    # a model without BOS computes segments from position 0
    with kvfs.open("memory://") as store, BlendedLM(tiny, store, chunk_tokens=CHUNK) as lm:
        doc = rand_tokens(5, 20)
        lm.store_segment(doc)
        assert lm.ns.get_segment(doc)[1] == 0


def test_chunk_metadata_records_how_the_keys_were_rotated(sparse, tmp_path):
    from kvfs.chunk import parse_header

    seg = rag_prompt(sparse, 4)[1][0]
    with BlendedLM(sparse, f"file://{tmp_path}/s", chunk_tokens=CHUNK) as lm:
        lm.store_segment(seg)
        keys = lm.ns.segment_keys(seg)
    for k in keys:
        with open(os.path.join(tmp_path, "s", k.path), "rb") as f:
            h = parse_header(f.read())
        assert h.kind == "segment" and h.positions == 1 + k.start
        assert h.metadata["keys"] == "post-rope"
        assert '"rope_type":"default"' in h.metadata["rope"] and '"rope_theta":500000.0' in h.metadata["rope"]


def test_a_segment_stored_at_other_positions_is_moved_from_there(sparse):
    prefix, segs, query = rag_prompt(sparse, 6)
    with kvfs.open("memory://") as store, BlendedLM(sparse, store, chunk_tokens=CHUNK) as lm:
        want = lm.prefill(prefix, segs, query, ratio=0).logits  # segments computed at positions from 1
    with kvfs.open("memory://") as store, BlendedLM(sparse, store, chunk_tokens=CHUNK) as lm:
        # another writer computed segment 2 (after its BOS) at positions from 40 and recorded that
        seg = segs[2]
        with torch.no_grad():
            cache = output_cache(sparse(torch.tensor([[BOS] + seg]), position_ids=torch.arange(39, 40 + len(seg))[None],
                                        use_cache=True))
        lm.ns.put_segment(seg, kv_from_cache(cache)[:, :, 1:].contiguous(), positions=40, extra=lm._extra)
        got = lm.prefill(prefix, segs, query, ratio=0)
        assert (got.segments_loaded, got.segments_computed) == (1, 3)
        torch.testing.assert_close(got.logits, want, atol=1e-5, rtol=0)


def test_a_corrupt_segment_chunk_is_recomputed_not_used(sparse, tmp_path, caplog):
    prefix, segs, query = rag_prompt(sparse, 8)
    url = f"file://{tmp_path}/s"
    with BlendedLM(sparse, url, chunk_tokens=CHUNK) as lm:
        lm.generate(prefix, segs, query, max_new_tokens=1)
        bad = lm.ns.segment_keys(segs[1])[1]
        want = {r: lm.prefill(prefix, segs, query, ratio=r).logits for r in (0.0, 1.0)}
    # bit rot in the last layer of one chunk: found when that layer is loaded, after earlier layers were used
    flip_bit(os.path.join(tmp_path, "s", bad.path), -7)
    with BlendedLM(sparse, url, chunk_tokens=CHUNK) as lm:
        with caplog.at_level("WARNING", logger="kvfs"):
            got = lm.prefill(prefix, segs, query, ratio=0.0)
        assert "quarantined" in caplog.text and bad.hex in caplog.text
        assert (got.segments_loaded, got.segments_computed) == (3, 1)
        torch.testing.assert_close(got.logits, want[0.0], atol=1e-5, rtol=0)
        # stored again (prefill stores what it computed); the next prefill loads all of them, exactly
        again = lm.prefill(prefix, segs, query, ratio=1.0)
        assert again.segments_loaded == 4
        torch.testing.assert_close(again.logits, want[1.0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("stored_with", ["other rope", "no rope metadata"])
def test_segments_stored_with_other_rope_settings_are_not_reused(sparse, caplog, stored_with):
    prefix, segs, query = rag_prompt(sparse, 9)
    with kvfs.open("memory://") as store, BlendedLM(sparse, store, chunk_tokens=CHUNK) as lm:
        want = lm.prefill(prefix, segs, query, ratio=0).logits
    with kvfs.open("memory://") as store, BlendedLM(sparse, store, chunk_tokens=CHUNK) as lm:
        other = dict(lm._extra, rope='{"factor":8.0,"rope_theta":500000.0,"rope_type":"linear"}')
        if stored_with == "no rope metadata":  # ns.put_segment by hand: how its keys were rotated is unknown
            other = None
        lm.ns.put_segment(segs[0], lm.compute_segment(segs[0]), positions=1, extra=other)
        with caplog.at_level("WARNING", logger="kvfs"):
            got = lm.prefill(prefix, segs, query, ratio=0)
        assert "other RoPE settings" in caplog.text
        assert got.segments_computed == 4
        torch.testing.assert_close(got.logits, want, atol=1e-5, rtol=0)
        # replaced by what was computed: not recomputed on every later prompt
        assert lm.ns.get_segment(segs[0])[1] == 1
        again = lm.prefill(prefix, segs, query, ratio=0)
        assert (again.segments_loaded, again.segments_computed) == (4, 0)
        torch.testing.assert_close(again.logits, want, atol=1e-5, rtol=0)


def test_rope_settings_compare_numbers_not_their_spelling():
    """A config.json's rope_theta 500000.0 and a config built with 500000 are the same RoPE: segments are shared
    (not refused, recomputed and rewritten by each in turn)."""
    as_int = small_llama({"rope_type": "default", "rope_theta": 500000})
    as_float = small_llama({"rope_type": "default", "rope_theta": 500000.0})
    segs, query = [rand_tokens(40 + i, 20, 128) for i in range(2)], rand_tokens(43, 3, 128)
    with kvfs.open("memory://") as store:
        with BlendedLM(as_int, store, chunk_tokens=CHUNK) as lm:
            for s in segs:
                lm.store_segment(s)
        with BlendedLM(as_float, store, chunk_tokens=CHUNK) as lm:
            b = lm.prefill([], segs, query, ratio=1.0)
            assert (b.segments_loaded, b.segments_computed) == (2, 0)
            torch.testing.assert_close(b.logits, full_logits(as_float, [], segs, query), atol=1e-5, rtol=0)


def test_segments_computed_without_the_bos_are_not_reused_by_a_model_that_uses_it(sparse, caplog):
    """bos is not part of the namespace: a BlendedLM(bos=None) stores segments computed from position 0 without
    the attention sink, whose KV differs in every layer past 0; one that computes them after the BOS must not
    load them (re-rotating from 0 fixes the positions, not the missing context)."""
    prefix, segs, query = rag_prompt(sparse, 5)
    with kvfs.open("memory://") as store, BlendedLM(sparse, store, chunk_tokens=CHUNK) as lm:
        want = lm.prefill(prefix, segs, query, ratio=0).logits
    with kvfs.open("memory://") as store:
        with BlendedLM(sparse, store, chunk_tokens=CHUNK, bos=None) as other:
            for s in segs:
                other.store_segment(s)
        with BlendedLM(sparse, store, chunk_tokens=CHUNK) as lm:
            with caplog.at_level("WARNING", logger="kvfs"):
                got = lm.prefill(prefix, segs, query, ratio=0)
            assert "computed after 'none'" in caplog.text
            assert got.segments_computed == 4
            torch.testing.assert_close(got.logits, want, atol=1e-5, rtol=0)
            # what it computed replaced the unusable chunks (a plain put keeps chunks whose keys are stored)
            again = lm.prefill(prefix, segs, query, ratio=0)
            assert (again.segments_loaded, again.segments_computed) == (4, 0)
            torch.testing.assert_close(again.logits, want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- knobs
def test_auto_ratio_follows_load_and_compute_speeds(sparse):
    prefix, segs, query = rag_prompt(sparse, 10)
    with kvfs.open("memory://") as store, BlendedLM(sparse, store, chunk_tokens=CHUNK, ratio="auto") as lm:
        lm.prefill(prefix, segs, query)
        b = lm.prefill(prefix, segs, query)
        assert 0.15 <= b.ratio <= 1.0 and b.load_layer_s > 0
        # the blend at the ratio it picked is the blend at that ratio
        fixed = lm.prefill(prefix, segs, query, ratio=b.ratio)
        torch.testing.assert_close(b.logits, fixed.logits, atol=0, rtol=0)
        # the policy: recompute as much as the next layer's load hides, not below the floor, at most all
        assert lm._auto_ratio(full_layer_s=1.0, load_layer_s=0.01) == 0.15
        assert lm._auto_ratio(full_layer_s=1.0, load_layer_s=0.4) == pytest.approx(0.4)
        assert lm._auto_ratio(full_layer_s=1.0, load_layer_s=3.0) == 1.0
    with kvfs.open("memory://") as store, BlendedLM(sparse, store, chunk_tokens=CHUNK, ratio="auto",
                                                   min_ratio=0.5) as lm:
        assert lm.prefill(prefix, segs, query).ratio >= 0.5


def test_no_segments_and_one_token_pieces(sparse):
    with kvfs.open("memory://") as store, BlendedLM(sparse, store, chunk_tokens=CHUNK) as lm:
        for prefix, segs, query in [([BOS, 5, 6], [], [7, 8]), ([BOS], [[9]], [10]), ([], [[BOS, 3, 4]], [5])]:
            for r in (0.0, 0.15, 1.0):
                b = lm.prefill(prefix, segs, query, ratio=r)
                if r == 1.0 or not segs:
                    torch.testing.assert_close(b.logits, full_logits(sparse, prefix, segs, query), atol=1e-5, rtol=0)


def test_bad_input_is_refused_clearly(sparse, tiny):
    with kvfs.open("memory://") as store, BlendedLM(sparse, store, chunk_tokens=CHUNK) as lm:
        with pytest.raises(InvalidInput, match="query must hold at least one token"):
            lm.prefill([BOS], [[1, 2]], [])
        with pytest.raises(InvalidInput, match="segment 1 is empty"):
            lm.prefill([BOS], [[1, 2], []], [3])
        with pytest.raises(InvalidInput, match="ratio"):
            lm.prefill([BOS], [[1, 2]], [3], ratio=1.5)
        with pytest.raises(InvalidInput, match="check_layer"):
            lm.prefill([BOS], [[1, 2]], [3], check_layer=0)
        with pytest.raises(InvalidInput, match="check_layer"):
            lm.prefill([BOS], [[1, 2]], [3], check_layer=6)
        with pytest.raises(InvalidInput, match="selection"):
            lm.prefill([BOS], [[1, 2]], [3], selection="best")
        with pytest.raises(InvalidInput, match="token id -2"):
            lm.prefill([BOS], [[1, -2]], [3])
    with pytest.raises(InvalidInput, match="deviation"):
        BlendedLM(tiny, "memory://", deviation="q")
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).eval()
    with pytest.raises(InvalidInput, match="'gpt2'"):
        BlendedLM(gpt2, "memory://", model_name="gpt2-test")


def test_a_refused_blend_closes_the_store_it_opened(tiny):
    # a store opened from a URL for a BlendedLM refused after it is closed again: a named memory:// store
    # lives while any store of this process holds it, so what a leaked one kept would still be there
    spec = kvfs.KVSpec("kvfs-test/leak", num_layers=1, num_kv_heads=1, head_dim=4, dtype="float32", chunk_tokens=4)
    with pytest.raises(InvalidInput, match="deviation"):
        BlendedLM(tiny, "memory://blend-refused", deviation="q")
    with kvfs.open("memory://blend-refused") as store:
        store.namespace(spec).put([1, 2, 3, 4], np.ones(spec.chunk_shape(4), np.float32))
    with kvfs.open("memory://blend-refused") as store:
        assert store.namespace(spec).lookup([1, 2, 3, 4]) == 0


def test_a_flat_list_of_tokens_as_segments_is_refused_saying_how_to_fix_it(tiny):
    with kvfs.open("memory://") as store, BlendedLM(tiny, store, chunk_tokens=CHUNK) as lm:
        for flat in ([1, 2, 3], torch.tensor([1, 2, 3]), np.array([1, 2, 3])):
            with pytest.raises(InvalidInput, match=r"one flat sequence of token ids: pass \[tokens\]"):
                lm.prefill([5, 6], flat, [7])
        with pytest.raises(InvalidInput, match="segment 1: token ids must be integers"):
            lm.prefill([5, 6], [[1, 2], [3, "x"]], [7])
        with pytest.raises(InvalidInput, match="segments must be a list of token-id sequences"):
            lm.generate([5, 6], "a document", [7])
        assert lm.prefill([5, 6], np.array([[1, 2], [3, 4]]), [7]).segment_tokens == 4  # a 2-D array: rows


def test_a_sliding_window_model_is_refused_even_with_a_spec():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MistralForCausalLM(cfg).eval()
    spec = kvfs.KVSpec("kvfs-test/mistral-swa", num_layers=3, num_kv_heads=2, head_dim=16, dtype="float32",
                       chunk_tokens=CHUNK)
    # Mistral's attention modules do not carry the window (its mask does): blending with full attention would
    # differ from the model past 8 tokens
    with kvfs.open("memory://") as store:
        with pytest.raises(InvalidInput, match="sliding_window=8"):
            BlendedLM(model, store, spec=spec)


def test_bfloat16_model_blends_and_stores_bf16(tmp_path):
    model = build_model("tiny", seed=0, dtype=torch.bfloat16)
    segs = [rand_tokens(20 + i, 24) for i in range(3)]
    query = rand_tokens(30, 4)
    with BlendedLM(model, f"lmdb://{tmp_path}/s", chunk_tokens=CHUNK) as lm:
        assert lm.spec.dtype == "bfloat16"
        lm.prefill([], segs, query)
        b = lm.prefill([], segs[::-1], query, ratio=1.0)
        assert b.segments_loaded == 3 and b.logits.dtype == torch.bfloat16
        ref = full_logits(model, [], segs[::-1], query)
        assert (b.logits.float() - ref.float()).abs().max() < 0.05
