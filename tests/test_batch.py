"""The batch planner (BatchLLM): tries, groups, optimality, ordering, the cache simulation and `kvfs plan`."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from kvfs.cli import main as cli
from kvfs.connectors.batch import (RadixTrie, block_hashes, greedy_groups, plan_batch, simulate_lru,
                                   single_level_optimum)
from kvfs.errors import InvalidInput


def _load_bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "batch.py"
    spec = importlib.util.spec_from_file_location("kvfs_bench_batch", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _load_bench()


def check_plan(prompts, plan) -> None:
    """Every request is in exactly one group, and its prefix + suffix is its prompt."""
    seen = []
    for g in plan.groups:
        assert len(g.requests) == len(g.suffixes) >= 1
        for i, (r, suffix) in enumerate(zip(g.requests, g.suffixes)):
            assert np.array_equal(np.concatenate([g.prefix, suffix]), np.asarray(prompts[r], dtype=np.uint32))
            assert np.array_equal(g.prompt(i), np.asarray(prompts[r], dtype=np.uint32))
            seen.append(r)
        if g.size == 1:
            assert len(g.prefix) == 0  # nobody to share with: nothing to store
    assert sorted(seen) == list(range(len(prompts)))
    assert sorted(plan.order) == list(range(len(prompts)))
    rep = plan.report
    assert rep.requests == len(prompts) and rep.groups == len(plan.groups)
    assert rep.logical_tokens == sum(len(p) for p in prompts)
    assert rep.prefill_tokens == sum(g.prefill_tokens for g in plan.groups)
    assert rep.trie_tokens <= rep.single_level_tokens <= rep.prefill_tokens <= rep.logical_tokens
    assert [g.id for g in plan.groups] == list(range(len(plan.groups)))
    gid = plan.group_of()
    for g in plan.groups:
        assert all(gid[r] == g.id for r in g.requests)


# ---------------------------------------------------------------------------------------------- small stories
def test_documents_share_instruction_and_document():
    instr, doc_a, doc_b = [1, 2, 3], [10, 11, 12, 13], [20, 21, 22, 23]
    prompts = [instr + doc_a + [100], instr + doc_b + [101], instr + doc_a + [102], instr + doc_b + [103, 104],
               [7, 7]]
    plan = plan_batch(prompts)
    check_plan(prompts, plan)
    by_members = {tuple(sorted(g.requests)): g for g in plan.groups}
    assert set(by_members) == {(0, 2), (1, 3), (4,)}
    assert by_members[(0, 2)].prefix.tolist() == instr + doc_a
    assert by_members[(1, 3)].prefix.tolist() == instr + doc_b
    rep = plan.report
    assert rep.logical_tokens == 8 + 8 + 8 + 9 + 2
    assert rep.prefill_tokens == (7 + 1 + 1) + (7 + 1 + 2) + 2
    # trie: instr (3) + doc_a (4) + doc_b (4) + 4 suffix tokens + [7, 7]
    assert rep.trie_tokens == 3 + 4 + 4 + 1 + 1 + 1 + 2 + 2
    assert rep.saving == pytest.approx(1 - 21 / 35)


def test_duplicates_and_prompts_that_are_prefixes_of_others():
    prompts = [[5, 6, 7], [5, 6, 7], [5, 6], [5, 6, 7, 8], [9]]
    trie = RadixTrie([np.asarray(p, dtype=np.uint32) for p in prompts])
    assert trie.tokens == 5  # 5, 5 6, 5 6 7, 5 6 7 8, 9
    plan = plan_batch(prompts)
    check_plan(prompts, plan)
    g = next(g for g in plan.groups if 0 in g.requests)
    assert set(g.requests) >= {0, 1} and g.prefix.tolist() in ([5, 6, 7], [5, 6])
    assert plan.report.single_level_tokens == plan.report.prefill_tokens


def test_groups_ordered_decode_heavy_first():
    shared = list(range(100, 140))
    prompts = [shared + [1], shared + [2], [7] * 30 + [3], [7] * 30 + [4], [9, 9, 9]]
    decode = [10, 10, 500, 400, 3]
    plan = plan_batch(prompts, decode_tokens=decode)
    check_plan(prompts, plan)
    ratios = [g.decode_ratio for g in plan.groups]
    assert ratios == sorted(ratios, reverse=True)
    assert plan.order[:2] == [2, 3]  # the decode-heavy group first, its heaviest request first
    assert plan.groups[0].decode_tokens == 900
    # without estimates, groups keep the batch's order
    assert plan_batch(prompts).order == [0, 1, 2, 3, 4]


def test_min_shared_ignores_short_prefixes():
    prompts = [[1, 2, 3, 4], [1, 2, 5, 6], [1, 9, 9, 9]]
    assert plan_batch(prompts).report.shared_groups == 1
    plan = plan_batch(prompts, min_shared=3)
    check_plan(prompts, plan)
    assert plan.report.shared_groups == 0 and plan.report.prefill_tokens == 12
    assert plan_batch(prompts, method="greedy", min_shared=3).report.prefill_tokens == 12


def test_greedy_has_no_constant_factor_bound_and_dp_does_not_care():
    """A first-level prefix whose child fails the greedy's test by a hair hides long shared documents."""
    instr = list(range(1000, 1100))  # 100 tokens
    deep = [list(range(5000 + 2000 * k, 5000 + 2000 * k + 1000)) for k in range(2)]  # two 1000-token documents
    prompts = [instr + [1] + deep[k] + [20000 + i] for k in range(2) for i in range(25)] + [instr + [2]]
    greedy = plan_batch(prompts, method="greedy")
    dp = plan_batch(prompts)
    check_plan(prompts, greedy)
    check_plan(prompts, dp)
    # the greedy keeps one group at the instruction: the child [1] has (50 - 1) * 1 <= 100
    assert greedy.report.shared_groups == 1 and greedy.report.saving < 0.1
    assert dp.report.prefill_tokens == dp.report.single_level_tokens
    assert dp.report.saving > 0.9
    assert greedy.report.trie_gap_tokens == greedy.report.prefill_tokens - greedy.report.trie_tokens > 40_000


def test_bad_input_is_refused_with_the_request_named():
    with pytest.raises(InvalidInput, match="empty"):
        plan_batch([])
    with pytest.raises(InvalidInput, match="request 1"):
        plan_batch([[1, 2], []])
    with pytest.raises(InvalidInput, match="request 2.*out of range"):
        plan_batch([[1], [2], [3, -1]])
    with pytest.raises(InvalidInput, match="request 0.*integers"):
        plan_batch([[1.5, 2]])
    with pytest.raises(InvalidInput, match="request 0"):
        plan_batch([[2**32]])
    with pytest.raises(InvalidInput, match="one per prompt"):
        plan_batch([[1], [2]], decode_tokens=[1])
    with pytest.raises(InvalidInput, match="request 1.*finite"):
        plan_batch([[1], [2]], decode_tokens=[1, -3])
    with pytest.raises(InvalidInput, match="method"):
        plan_batch([[1]], method="magic")
    with pytest.raises(InvalidInput, match="min_shared"):
        plan_batch([[1]], min_shared=0)
    with pytest.raises(InvalidInput, match="sequence"):
        plan_batch("1 2 3")


def test_lru_simulation_counts_leading_hits_only():
    a = np.arange(64, dtype=np.uint32)  # 4 blocks of 16
    b = np.concatenate([a[:32], np.arange(1000, 1032, dtype=np.uint32)])  # shares 2 blocks with a
    blocks = [block_hashes(a), block_hashes(b), block_hashes(a)]
    assert blocks[0][:2] == blocks[1][:2] and blocks[0][2] != blocks[1][2]
    run = simulate_lru(blocks, [0, 1, 2], capacity_blocks=100, lengths=[64, 64, 64])
    assert run.hit_tokens == 32 + 64 and run.prefill_tokens == 192 - 96
    small = simulate_lru(blocks, [0, 1, 2], capacity_blocks=4, lengths=[64, 64, 64])
    # b's two new blocks evict a's last two: a's second run hits its first two blocks only
    assert small.hit_tokens == 32 + 32
    assert simulate_lru(blocks, [0, 1, 2], capacity_blocks=0).hit_tokens == 0


# ---------------------------------------------------------------------------------------------- acceptance
@pytest.fixture(scope="module")
def snippet():
    prompts, decode = bench.snippet_workload()
    return prompts, decode, bench.cache_comparison(prompts, decode)


def test_snippet_workload_shape(snippet):
    prompts, decode, _ = snippet
    assert 200 * 4 <= len(prompts) <= 200 * 32
    assert all(1008 <= len(p) <= 2248 for p in prompts)


def test_snippet_plan_is_near_both_optima(snippet):
    prompts, decode, c = snippet
    plan = c["plan"]
    check_plan(prompts, plan)
    rep = plan.report
    assert rep.shared_groups == 200
    assert rep.trie_saving - rep.saving <= 0.015
    assert rep.single_level_saving - rep.saving <= 0.015
    assert rep.prefill_tokens == rep.single_level_tokens  # the dp plan is the single-level optimum
    greedy = plan_batch(prompts, decode_tokens=decode, method="greedy").report
    assert rep.trie_saving - greedy.saving <= 0.015 and rep.single_level_saving - greedy.saving <= 0.015


def test_snippet_plan_order_beats_fcfs_lru_by_20_points(snippet):
    _, _, c = snippet
    assert c["capacity_blocks"] == c["working_set_blocks"] // 4
    assert c["planned"].hit_ratio - c["fcfs"].hit_ratio >= 0.20
    # and the planned order comes close to the trie optimum with a quarter of the cache
    assert c["plan"].report.trie_saving - c["planned"].hit_ratio < 0.02


def test_chat_workload_truncation_and_plan():
    prompts, decode = bench.chat_workload(conversations=40)
    plan = plan_batch(prompts, decode_tokens=decode)
    check_plan(prompts, plan)
    assert max(len(p) for p in prompts) <= 2048
    c = bench.cache_comparison(prompts, decode)
    assert c["planned"].hit_ratio > c["fcfs"].hit_ratio


# ---------------------------------------------------------------------------------------------- properties
def brute_single_level(prompts: list[list[int]]) -> int:
    """Best saving over every assignment of each request to one of its prefixes (by brute force)."""
    n = len(prompts)

    def lcp(a, b):
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        return k

    # a group's best prefix is its members' common prefix: some pairwise LCP (or 0)
    cands = [sorted({0} | {lcp(prompts[i], prompts[j]) for j in range(n) if j != i}) for i in range(n)]
    best = 0
    for choice in itertools.product(*cands):
        groups: dict[tuple, int] = {}
        for i, k in enumerate(choice):
            if k:
                key = tuple(prompts[i][:k])
                groups[key] = groups.get(key, 0) + 1
        best = max(best, sum((c - 1) * len(k) for k, c in groups.items()))
    return best


def first_level_saving(prompts: list[list[int]]) -> int:
    trie = RadixTrie([np.asarray(p, dtype=np.uint32) for p in prompts])
    return sum((trie.count[c] - 1) * trie.depth[c] for c in trie.children[0])


prompt_lists = st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=7), min_size=1, max_size=5)


@settings(max_examples=150, deadline=None)
@given(prompt_lists)
def test_dp_is_the_single_level_optimum(prompts):
    trie = RadixTrie([np.asarray(p, dtype=np.uint32) for p in prompts])
    saving, assign = single_level_optimum(trie)
    assert saving == brute_single_level(prompts)
    assert trie.tokens == len({tuple(p[:k]) for p in prompts for k in range(1, len(p) + 1)})
    plan = plan_batch(prompts)
    check_plan(prompts, plan)
    assert plan.report.logical_tokens - plan.report.prefill_tokens == saving


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=30), min_size=1, max_size=40),
       st.lists(st.integers(0, 500), min_size=40, max_size=40), st.sampled_from(["dp", "greedy"]),
       st.integers(1, 4))
def test_random_batches_plan_consistently(prompts, decode, method, min_shared):
    plan = plan_batch(prompts, decode_tokens=decode[: len(prompts)], method=method, min_shared=min_shared)
    check_plan(prompts, plan)
    for g in plan.groups:
        if g.size > 1:
            assert len(g.prefix) >= min_shared
        d = [decode[r] / len(prompts[r]) for r in g.requests]
        assert d == sorted(d, reverse=True)
    ratios = [g.decode_ratio for g in plan.groups]
    assert ratios == sorted(ratios, reverse=True)
    if method == "greedy" and min_shared == 1:
        saved = plan.report.logical_tokens - plan.report.prefill_tokens
        assert saved >= first_level_saving(prompts)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=30), min_size=1, max_size=40))
def test_greedy_between_first_level_and_dp(prompts):
    trie = RadixTrie([np.asarray(p, dtype=np.uint32) for p in prompts])
    best, _ = single_level_optimum(trie)
    assign = greedy_groups(trie)
    counts: dict[int, int] = {}
    for node in assign.tolist():
        counts[node] = counts.get(node, 0) + 1
    greedy = sum((c - 1) * trie.depth[v] for v, c in counts.items() if v)
    assert first_level_saving(prompts) <= greedy <= best


# ---------------------------------------------------------------------------------------------- the CLI
def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_cli_plan_writes_requests_in_plan_order(tmp_path):
    instr = list(range(50, 80))
    docs = [list(range(1000 * d, 1000 * d + 40)) for d in range(3)]
    reqs = [{"id": f"{d}-{q}", "prompt_token_ids": instr + docs[d] + [5000 + q], "max_tokens": 10 * (d + 1)}
            for q in range(3) for d in range(3)]
    batch = _write(tmp_path / "batch.jsonl", reqs[:4] + [""] + [list(range(7, 12))] + reqs[4:])
    out = tmp_path / "ordered.jsonl"
    r = CliRunner().invoke(cli, ["plan", str(batch), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "tokens to prefill" in r.output and "trie optimum" in r.output and str(out) in r.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 10
    assert sorted(x["kvfs_index"] for x in lines) == list(range(10))
    groups = [x["kvfs_group"] for x in lines]
    assert groups == sorted(groups)  # groups contiguous, in plan order
    assert lines[0]["id"].startswith("2-")  # the most decode-heavy document first
    by_group: dict[int, list] = {}
    for x in lines:
        by_group.setdefault(x["kvfs_group"], []).append(x)
        if "id" in x:
            assert x == {**reqs[[q["id"] for q in reqs].index(x["id"])], "kvfs_group": x["kvfs_group"],
                         "kvfs_prefix_tokens": x["kvfs_prefix_tokens"], "kvfs_index": x["kvfs_index"]}
    assert sorted(len(v) for v in by_group.values()) == [1, 3, 3, 3]
    assert {x["kvfs_prefix_tokens"] for x in lines if "id" in x} == {70}
    bare = next(x for x in lines if "id" not in x)
    assert bare["prompt_token_ids"] == list(range(7, 12)) and bare["kvfs_prefix_tokens"] == 0
    # re-planning the ordered file replaces the kvfs fields instead of duplicating them
    out2 = tmp_path / "again.jsonl"
    assert CliRunner().invoke(cli, ["plan", str(out), "-o", str(out2)]).exit_code == 0
    assert [json.loads(x) for x in out2.read_text().splitlines()][0]["kvfs_index"] in range(10)


def test_cli_plan_json_report(tmp_path):
    batch = _write(tmp_path / "b.jsonl", [{"body": {"prompt": [1, 2, 3, 4, 5], "max_tokens": 4}},
                                           {"body": {"prompt": [1, 2, 3, 4, 6], "max_tokens": 4}}])
    r = CliRunner().invoke(cli, ["plan", str(batch), "--json", "--method", "greedy"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["report"]["logical_tokens"] == 10 and doc["report"]["prefill_tokens"] == 6
    assert doc["report"]["method"] == "greedy" and doc["report"]["saving"] == pytest.approx(0.4)
    assert doc["groups"] == [{"id": 0, "prefix_tokens": 4, "requests": [0, 1], "prefill_tokens": 6,
                              "decode_ratio": pytest.approx(8 / 6)}]


@pytest.mark.parametrize("content, message", [
    ('{"prompt_token_ids": [1, 2]}\n{"prompt_token_ids": [1, 2\n', ":2: not JSON"),
    ('{"prompt_token_ids": [1]}\n\n{"prompt_token_ids": [1, -5]}\n', ":3: bad token ids"),
    ('{"tokens": [1, 2.5]}\n', ":1: bad token ids"),
    ('{"tokens": [4294967296]}\n', ":1: bad token ids"),
    ('{"tokens": []}\n', ":1: 'tokens' is empty"),
    ('{"max_tokens": 3}\n', ":1: no prompt"),
    ('"just a string"\n', ":1: expected a JSON object"),
    ('{"tokens": [1], "max_tokens": -1}\n', ":1: 'max_tokens' must be a number >= 0"),
    ('{"prompt": "what is this"}\n', ":1: the prompt is text: pass --tokenizer"),
    ("\n  \n", "the batch is empty"),
    ('{"body": {"messages": [{"role": "user", "content": "hi"}]}}\n', ":1: chat 'messages' are not planned"),
])
def test_cli_plan_refuses_bad_batches(tmp_path, content, message):
    batch = tmp_path / "bad.jsonl"
    batch.write_text(content)
    out = tmp_path / "out.jsonl"
    r = CliRunner().invoke(cli, ["plan", str(batch), "--out", str(out)])
    assert r.exit_code == 2
    assert message in r.output and "kvfs plan" in r.output
    assert not out.exists()
    assert os.listdir(tmp_path) == ["bad.jsonl"]  # nothing half-written


def test_cli_plan_missing_file(tmp_path):
    r = CliRunner().invoke(cli, ["plan", str(tmp_path / "nope.jsonl")])
    assert r.exit_code == 2 and "cannot read" in r.output


def test_cli_plan_output_folder_missing_names_the_output(tmp_path):
    batch = _write(tmp_path / "b.jsonl", [[1, 2, 3], [1, 2, 4]])
    out = tmp_path / "no-such-dir" / "o.jsonl"
    r = CliRunner().invoke(cli, ["plan", str(batch), "-o", str(out)])
    assert r.exit_code == 2 and f"cannot write {out}" in r.output and ".kvfs-plan-" not in r.output


def test_cli_plan_reads_a_file_with_a_utf8_bom(tmp_path):
    batch = tmp_path / "bom.jsonl"
    batch.write_bytes(b"\xef\xbb\xbf" + b'{"tokens": [1, 2, 3]}\n{"tokens": [1, 2, 4]}\n')
    out = tmp_path / "o.jsonl"
    r = CliRunner().invoke(cli, ["plan", str(batch), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert [json.loads(x)["kvfs_prefix_tokens"] for x in out.read_text().splitlines()] == [2, 2]


def test_cli_plan_reads_stdin_with_a_utf8_bom(tmp_path):
    out = tmp_path / "o.jsonl"
    data = b"\xef\xbb\xbf" + b'{"tokens": [1, 2, 3]}\n{"tokens": [1, 2, 4]}\n'
    r = CliRunner().invoke(cli, ["plan", "-", "-o", str(out)], input=data)
    assert r.exit_code == 0, r.output
    assert [json.loads(x)["kvfs_prefix_tokens"] for x in out.read_text().splitlines()] == [2, 2]


def test_cli_plan_output_of_indented_bare_lists_is_json(tmp_path):
    batch = _write(tmp_path / "b.jsonl", ["  [1, 2, 3]", "\t[1, 2, 4]  "])
    out = tmp_path / "o.jsonl"
    r = CliRunner().invoke(cli, ["plan", str(batch), "-o", str(out)])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["prompt_token_ids"] for x in lines] == [[1, 2, 3], [1, 2, 4]]
    assert [x["kvfs_prefix_tokens"] for x in lines] == [2, 2]


def test_cli_plan_replanning_keeps_unicode_text_as_written(tmp_path):
    batch = tmp_path / "b.jsonl"
    batch.write_text('{"tokens": [1, 2, 3], "note": "café ☕"}\n{"tokens": [1, 2, 4], "note": "日本"}\n',
                     encoding="utf-8")
    once, twice = tmp_path / "o1.jsonl", tmp_path / "o2.jsonl"
    assert CliRunner().invoke(cli, ["plan", str(batch), "-o", str(once)]).exit_code == 0
    assert CliRunner().invoke(cli, ["plan", str(once), "-o", str(twice)]).exit_code == 0
    text = twice.read_text(encoding="utf-8")
    assert "café ☕" in text and "日本" in text
    assert [json.loads(x)["kvfs_prefix_tokens"] for x in text.splitlines()] == [2, 2]


def _local_tokenizer(directory: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "[UNK] summarize this document : the cat sat on a mat dog ran far question what who".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(directory)
    return directory


def test_cli_plan_tokenizes_text_with_a_local_tokenizer(tmp_path):
    tok = _local_tokenizer(tmp_path / "tok")
    doc = "summarize this document : the cat sat on a mat the dog ran far"
    batch = _write(tmp_path / "b.jsonl", [{"prompt": f"{doc} question what"}, {"text": f"{doc} question who"},
                                           {"prompt_token_ids": [3, 3, 3]}])
    out = tmp_path / "o.jsonl"
    r = CliRunner().invoke(cli, ["plan", str(batch), "--tokenizer", str(tok), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    doc_ = json.loads(r.output)
    shared = [g for g in doc_["groups"] if len(g["requests"]) > 1]
    assert shared == [{"id": shared[0]["id"], "prefix_tokens": 15, "requests": [0, 1], "prefill_tokens": 17,
                       "decode_ratio": 0.0}]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[0]["prompt"].endswith("what") and lines[0]["kvfs_prefix_tokens"] == 15


def test_cli_plan_unloadable_tokenizer(tmp_path):
    batch = _write(tmp_path / "b.jsonl", [{"prompt": "hello"}])
    r = CliRunner().invoke(cli, ["plan", str(batch), "--tokenizer", str(tmp_path / "no-such-tokenizer")])
    assert r.exit_code == 2 and "cannot load tokenizer" in r.output and "offline" in r.output


# ---------------------------------------------------------------------------------------------- the runner
RUN_CHUNK = 16


@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from kvfs.connectors.demo_model import build_model

    return build_model("tiny", seed=0)  # a seeded random LlamaForCausalLM from a LlamaConfig, float32


def _rand(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 512, n).tolist()


def runner_batch() -> tuple[list[list[int]], list[int]]:
    """Three documents behind one instruction, three questions each; two loners; a duplicate prompt."""
    instr = _rand(1, 20)
    docs = [_rand(10 + d, 30 + 17 * d) for d in range(3)]
    prompts = [instr + docs[d] + _rand(100 + 10 * d + q, 3 + q) for q in range(3) for d in range(3)]
    prompts += [_rand(7, 12), _rand(8, 40), list(prompts[4])]
    new = [2 + (i % 4) for i in range(len(prompts))]
    return prompts, new


def reference_tokens(model, prompt: list[int], new: int) -> list[int]:
    import torch

    out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False)
    return out[0, len(prompt):].tolist()


def _pins(store) -> dict[str, int]:
    return {r.key: r.pins for r in store.records("") if r.pins}


@pytest.mark.parametrize("workers", [1, 2])
def test_runner_is_token_identical_and_computes_each_prefix_once(tiny, tmp_path, workers):
    from kvfs.connectors.batch_runner import BatchRunner
    from kvfs.connectors.hf import CachedLM

    prompts, new = runner_batch()
    plan = plan_batch(prompts, decode_tokens=new)
    assert plan.report.shared_groups == 3
    seen_pinned: list[bool] = []
    with CachedLM(tiny, f"lmdb://{tmp_path}/store", chunk_tokens=RUN_CHUNK, save=False) as lm:
        def check(res):  # the group's prefix is pinned while its requests run
            g = plan.groups[res.group]
            if g.size > 1:
                seen_pinned.append(all(lm.store.records(p.key.path)[0].pins >= 1 for p in lm.ns.plan(g.prefix)))

        result = BatchRunner(lm, kv_budget="64MiB", workers=workers).run(plan, new, on_result=check)
        assert not result.failed
        for i, p in enumerate(prompts):
            assert result.outputs[i] == reference_tokens(tiny, p, new[i]), i
        shared = [g for g in plan.groups if g.size > 1]
        # each prefix once, and the instruction (20 tokens) only once: later prefixes reuse it from kvfs
        assert result.prefix_tokens_computed == sum(len(g.prefix) for g in shared) - 20 * (len(shared) - 1)
        for g in shared:
            for r, s in zip(g.requests, g.suffixes):
                res = result.results[r]
                assert res.reused == (len(g.prefix) if len(s) else len(g.prefix) - 1)
                assert res.reused + res.computed == len(prompts[r])
        # at most the plan's count (kvfs also reuses across groups), plus the duplicate of a prefix, which
        # computes that prefix's last token again (its logits are the first output)
        assert plan.report.trie_tokens <= result.prompt_tokens_computed <= plan.report.prefill_tokens + 1
        assert result.prompt_tokens_reused + result.prompt_tokens_computed - result.prefix_tokens_computed == \
            plan.report.logical_tokens
        assert seen_pinned and all(seen_pinned)
        assert _pins(lm.store) == {}  # every prefix unpinned once its group was done
        assert result.peak_kv_bytes <= result.kv_budget
        if workers == 2:
            assert result.peak_requests >= 2


def test_runner_releases_pins_when_requests_fail(tiny, tmp_path):
    from kvfs.connectors.batch_runner import BatchRunner
    from kvfs.connectors.hf import CachedLM

    prompts, new = runner_batch()
    prompts[3] = prompts[3][:-1] + [600]  # token 600 is outside the tiny model's vocabulary (512)
    bad_prefix = [700] + _rand(50, 30)
    prompts += [bad_prefix + [1], bad_prefix + [2]]  # a group whose shared prefix itself cannot be computed
    new += [2, 2]
    plan = plan_batch(prompts, decode_tokens=new)
    with CachedLM(tiny, f"lmdb://{tmp_path}/store", chunk_tokens=RUN_CHUNK, save=False) as lm:
        result = BatchRunner(lm, kv_budget="64MiB", workers=2).run(plan, new)
        failed = {r.index for r in result.failed}
        assert failed == {3, len(prompts) - 2, len(prompts) - 1}
        assert all(isinstance(r.error, IndexError) for r in result.failed)
        assert list(result.prefix_errors) == [plan.group_of()[len(prompts) - 1]]
        for i, p in enumerate(prompts):
            if i not in failed:
                assert result.outputs[i] == reference_tokens(tiny, p, new[i])
        assert _pins(lm.store) == {}


def test_runner_admits_requests_by_kv_bytes(tiny, tmp_path):
    from kvfs.connectors.batch_runner import BatchRunner
    from kvfs.connectors.hf import CachedLM

    prompts, new = runner_batch()
    plan = plan_batch(prompts, decode_tokens=new)
    with CachedLM(tiny, "memory://", chunk_tokens=RUN_CHUNK, save=False) as lm:
        bpt = lm.spec.bytes_per_token
        needs = [(len(p) + n) * bpt for p, n in zip(prompts, new)]
        # no two requests fit together; the larger ones do not fit at all and run alone
        one = BatchRunner(lm, kv_budget=2 * min(needs) - 1, workers=4).run(plan, new)
        assert one.peak_requests == 1 and one.peak_kv_bytes == max(needs)
        two = BatchRunner(lm, kv_budget=max(needs) + min(needs), workers=4).run(plan, new)
        assert two.peak_requests == 2 and two.peak_kv_bytes <= two.kv_budget
        tight = BatchRunner(lm, kv_budget=1, workers=2).run(plan, new)  # each request alone, none refused
        assert not tight.failed and tight.peak_requests == 1
        assert one.outputs == tight.outputs
        with pytest.raises(InvalidInput):
            BatchRunner(lm, kv_budget=0)
        with pytest.raises(InvalidInput):
            BatchRunner(lm, workers=0)
        with pytest.raises(InvalidInput, match="one per request"):
            BatchRunner(lm).run(plan, [1, 2])
        with pytest.raises(InvalidInput, match="request 0"):
            BatchRunner(lm).run(plan, 0)


def test_runner_takes_numpy_token_counts(tiny):
    """max_new_tokens as numpy (an array per request, or one np.int64): what plan_batch's decode_tokens takes."""
    from kvfs.connectors.batch_runner import BatchRunner
    from kvfs.connectors.hf import CachedLM

    prompts, new = runner_batch()
    prompts, new = prompts[:4], np.asarray(new[:4])
    plan = plan_batch(prompts, decode_tokens=new)
    with CachedLM(tiny, "memory://", chunk_tokens=RUN_CHUNK, save=False) as lm:
        per = BatchRunner(lm).run(plan, new)
        assert not per.failed
        assert per.outputs == [reference_tokens(tiny, p, int(n)) for p, n in zip(prompts, new)]
        one = BatchRunner(lm).run(plan, np.int64(2))
        assert not one.failed and [len(t) for t in one.outputs] == [2] * 4
        with pytest.raises(InvalidInput, match="request 1: max_new_tokens must be an integer >= 1"):
            BatchRunner(lm).run(plan, np.array([2, 0, 2, 2]))
        with pytest.raises(InvalidInput, match="one integer per request"):
            BatchRunner(lm).run(plan, None)


def test_runner_prefix_can_be_evicted_after_its_group(tiny, tmp_path):
    """Pins hold only while a group runs: afterwards eviction may take the prefix (and pinned ones refuse)."""
    from kvfs.connectors.batch_runner import BatchRunner
    from kvfs.connectors.hf import CachedLM

    prompts, new = runner_batch()
    plan = plan_batch(prompts, decode_tokens=new)
    with CachedLM(tiny, f"lmdb://{tmp_path}/store", chunk_tokens=RUN_CHUNK, save=False) as lm:
        during: list[int] = []

        def try_evict(res):
            g = plan.groups[res.group]
            if g.size > 1:
                during.append(len(lm.store.evict([p.key.path for p in lm.ns.plan(g.prefix)]).refused))

        BatchRunner(lm, workers=1).run(plan, new, on_result=try_evict)
        assert during and all(n > 0 for n in during)
        shared = [g for g in plan.groups if g.size > 1]
        paths = sorted({p.key.path for g in shared for p in lm.ns.plan(g.prefix)})  # groups share the instruction
        res = lm.store.evict(paths)
        assert not res.refused and len(res.evicted) == len(paths)


def test_runner_waits_for_room_when_pinned_prefixes_fill_the_store(tiny):
    """A tier too small for two groups' prefixes: the next group waits for the previous one to unpin."""
    from kvfs.connectors.batch_runner import BatchRunner
    from kvfs.connectors.hf import CachedLM

    prompts, new = runner_batch()
    plan = plan_batch(prompts, decode_tokens=new)
    shared = [g for g in plan.groups if g.size > 1]
    from kvfs.connectors.hf import kv_spec

    chunk_bytes = RUN_CHUNK * kv_spec(tiny).bytes_per_token + 4096  # a whole chunk file: data and header
    capacity = int(1.5 * max(len(g.prefix) for g in shared) / RUN_CHUNK + 2) * chunk_bytes
    with CachedLM(tiny, f"memory://?capacity={capacity}", chunk_tokens=RUN_CHUNK, save=False) as lm:
        result = BatchRunner(lm, kv_budget="1GiB", workers=2).run(plan, new)
        assert not result.failed and not result.prefix_errors
        for g in shared:  # every request found its group's whole prefix in kvfs
            for r, s in zip(g.requests, g.suffixes):
                assert result.results[r].reused == (len(g.prefix) if len(s) else len(g.prefix) - 1)
        for i, p in enumerate(prompts):
            assert result.outputs[i] == reference_tokens(tiny, p, new[i])
        assert _pins(lm.store) == {}


def test_runner_with_save_reuses_deeper_prefixes_than_its_groups(tiny, tmp_path):
    """Conversation turns: with the connector storing every prompt, a turn reuses the whole previous turn."""
    from kvfs.connectors.batch_runner import BatchRunner
    from kvfs.connectors.hf import CachedLM

    system = _rand(1, 24)
    prompts = []
    for c in range(2):
        history = list(system)
        for t in range(3):
            history += _rand(100 * c + t, 10)
            prompts.append(list(history))
    plan = plan_batch(prompts)
    with CachedLM(tiny, f"lmdb://{tmp_path}/store", chunk_tokens=RUN_CHUNK, save=True) as lm:
        result = BatchRunner(lm, workers=1).run(plan, 3)
        assert not result.failed
        for i, p in enumerate(prompts):
            assert result.outputs[i] == reference_tokens(tiny, p, 3)
        last_turns = [2, 5]
        for r in last_turns:  # the previous turn (its whole prompt) was stored and is reused
            assert result.results[r].reused == len(prompts[r - 1])
        assert result.prompt_tokens_computed < plan.report.prefill_tokens
        assert _pins(lm.store) == {}
