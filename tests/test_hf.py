"""The transformers connector: a real (tiny, seeded random) Llama reusing KV from real stores.

The reference is always the model itself without kvfs: ``model.generate``
(greedy) and a full forward pass.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import kvfs  # noqa: E402
from kvfs.connectors.demo_model import build_model, demo_spec  # noqa: E402
from kvfs.connectors.hf import CachedLM, kv_from_cache, kv_spec, output_cache, run_model  # noqa: E402

from bitrot import flip_bit  # noqa: E402
from s3servers import moto_server, s3_bucket_url  # noqa: E402,F401

CHUNK = 16
HAS_FSSPEC_BACKEND = importlib.util.find_spec("kvfs.backends._fsspec") is not None


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", seed=0)


def tokens(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 512, (n,), generator=g).tolist()


CONTEXT = tokens(1, 75)  # 4 whole chunks of 16 and a partial one of 11
QUESTIONS = [tokens(10 + i, 5 + i) for i in range(3)]


def reference(model, prompt: list[int], new: int = 8) -> list[int]:
    """Greedy tokens from transformers' own generate, without kvfs."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.fixture(params=["lmdb", "file", "s3"])
def url(request, tmp_path):
    if request.param == "lmdb":
        return f"lmdb://{tmp_path}/store"
    if request.param == "file":
        return f"file://{tmp_path}/store"
    if not HAS_FSSPEC_BACKEND:
        pytest.skip("the fsspec (S3) backend is not in this tree yet")
    return request.getfixturevalue("s3_bucket_url")


def test_spec_comes_from_the_model_config(model):
    assert kv_spec(model, chunk_tokens=CHUNK) == demo_spec("tiny", chunk_tokens=CHUNK)
    spec = kv_spec(build_model("tiny", dtype=torch.bfloat16))
    assert (spec.dtype, spec.num_layers, spec.num_kv_heads, spec.head_dim) == ("bfloat16", 2, 2, 16)
    # other weights, other namespace
    assert kv_spec(build_model("tiny", seed=1)).path != kv_spec(model).path


def test_two_checkpoints_saved_at_one_path_do_not_share_a_namespace(tmp_path, monkeypatch):
    """A model loaded from a directory has no hub commit: its revision is a fingerprint of its config and
    weights, so a fine-tune saved over a checkpoint (or ./ckpt in two working directories) gets its own KV."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ckpt = tmp_path / "ckpt"
    build_model("tiny", seed=0).save_pretrained(ckpt)
    first = kv_spec(AutoModelForCausalLM.from_pretrained(ckpt))
    assert first.revision.startswith("local-") and first.model == str(ckpt)
    assert kv_spec(AutoModelForCausalLM.from_pretrained(ckpt)) == first  # the same weights: the same namespace
    assert list((tmp_path / "cache" / "kvfs" / "model-fingerprints").glob("*.json"))  # hashed once, then cached
    (ckpt / "optimizer.pt").write_bytes(b"trainer state")  # a Trainer checkpoint's other files are not the model
    assert kv_spec(AutoModelForCausalLM.from_pretrained(ckpt)) == first
    build_model("tiny", seed=1).save_pretrained(ckpt)  # other weights, same path, same shapes
    second = kv_spec(AutoModelForCausalLM.from_pretrained(ckpt))
    assert second.revision.startswith("local-") and second.path != first.path
    # an explicit revision, or a hub commit, is used as given
    assert kv_spec(AutoModelForCausalLM.from_pretrained(ckpt), revision="v2").revision == "v2"


def test_cold_then_warm_generation_is_token_identical(model, url):
    with CachedLM(model, url, chunk_tokens=CHUNK) as lm:
        for i, q in enumerate(QUESTIONS):
            prompt = CONTEXT + q
            out = lm.generate(prompt, 8)
            assert out.tokens == reference(model, prompt)
            if i == 0:
                assert out.prefill.reused == 0 and out.stored_chunks == len(lm.ns.keys(prompt)) == 5
            else:
                # the whole context, including 11 tokens of the first request's partial chunk
                assert out.prefill.reused == len(CONTEXT)
                assert out.prefill.computed == len(q)


@pytest.mark.parametrize("layerwise", [True, False], ids=["layerwise", "load-first"])
def test_logits_match_a_full_forward(model, url, layerwise):
    prompt = CONTEXT + QUESTIONS[0]
    with torch.inference_mode():
        full = model(torch.tensor([prompt])).logits[0, -1]
    with CachedLM(model, url, chunk_tokens=CHUNK, layerwise=layerwise) as lm:
        cold = lm.prefill(prompt)
        lm.store_prompt(prompt, cold.cache)
        warm = lm.prefill(prompt)
    assert cold.reused == 0
    assert warm.reused == len(prompt) - 1  # never the last token: its logits are the output
    torch.testing.assert_close(cold.logits, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(warm.logits, full, atol=1e-5, rtol=0)


def test_a_model_on_the_cpu_loads_its_prefix_first_by_default(model, url):
    with CachedLM(model, url, chunk_tokens=CHUNK) as lm:
        assert lm.device.type == "cpu" and lm.layerwise is False
        lm.generate(CONTEXT + QUESTIONS[0], max_new_tokens=1)
        warm = lm.prefill(CONTEXT + QUESTIONS[0])
    # loaded whole before the forward: plain cache layers, no layer waiting on a prefetch
    assert warm.reused == len(CONTEXT + QUESTIONS[0]) - 1
    assert all(type(layer).__name__ == "DynamicLayer" for layer in warm.cache.layers)



def test_a_loaded_prefix_is_viewed_not_copied_again(model, tmp_path):
    """load_prefix reads the prefix once into one buffer; its cache layers view that buffer (DynamicCache(pairs)
    would concatenate each layer into new memory first), and the forward on top still matches a full one."""
    prompt = CONTEXT + QUESTIONS[0]
    with CachedLM(model, f"lmdb://{tmp_path}/kv", chunk_tokens=CHUNK) as lm:
        lm.generate(prompt, 1)
        n, cache = lm.load_prefix(prompt[:-1])
        assert n == len(prompt) - 1  # the prompt minus its last token, the partial last chunk included
        storages = {t.untyped_storage().data_ptr() for layer in cache.layers for t in (layer.keys, layer.values)}
        assert len(storages) == 1
        assert cache.get_seq_length() == n
        torch.testing.assert_close(kv_from_cache(cache), torch.from_numpy(lm.ns.get(prompt[:n])), atol=0, rtol=0)
        with torch.inference_mode():
            out = run_model(model, torch.tensor([prompt[n:]]), cache)
            ref = model(torch.tensor([prompt]), use_cache=True)
    torch.testing.assert_close(out.logits[0, -1], ref.logits[0, -1], atol=1e-4, rtol=1e-4)
    assert output_cache(out).get_seq_length() == len(prompt)

def test_stored_kv_is_what_the_model_computed(model, url):
    prompt = CONTEXT + QUESTIONS[1]
    with torch.inference_mode():
        ref = output_cache(model(torch.tensor([prompt]), use_cache=True))
    with CachedLM(model, url, chunk_tokens=CHUNK) as lm:
        lm.generate(prompt, 1)
        got = lm.ns.get(prompt)
    torch.testing.assert_close(torch.from_numpy(got), kv_from_cache(ref), atol=1e-6, rtol=0)


RESTART = textwrap.dedent("""
    import json, sys
    from kvfs.connectors.demo_model import build_model
    from kvfs.connectors.hf import CachedLM
    url, prompt = sys.argv[1], json.loads(sys.argv[2])
    with CachedLM(build_model("tiny", seed=0), url, chunk_tokens=16) as lm:
        out = lm.generate(prompt, 8)
    print(json.dumps({"tokens": out.tokens, "reused": out.prefill.reused}))
""")


def run_in_new_process(url: str, prompt: list[int]) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", RESTART, url, json.dumps(prompt)], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_reuse_across_a_process_restart(model, url):
    # another process computes and stores the context, then exits; this one opens the store afresh
    first = run_in_new_process(url, CONTEXT + QUESTIONS[0])
    assert first["reused"] == 0
    assert first["tokens"] == reference(model, CONTEXT + QUESTIONS[0])
    with CachedLM(model, url, chunk_tokens=CHUNK) as lm:
        out = lm.generate(CONTEXT + QUESTIONS[1], 8)
    assert out.prefill.reused == len(CONTEXT)
    assert out.tokens == reference(model, CONTEXT + QUESTIONS[1])


def test_a_corrupt_chunk_is_recomputed_not_used(model, tmp_path, caplog):
    url = f"file://{tmp_path}/store"
    prompt = CONTEXT + QUESTIONS[0]
    with CachedLM(model, url, chunk_tokens=CHUNK) as lm:
        lm.generate(prompt, 8)
        third = lm.ns.keys(prompt)[2]
    # flip one byte of the third chunk's KV data on disk (bit rot)
    path = os.path.join(tmp_path, "store", third.path)
    flip_bit(path, -100)
    with CachedLM(model, url, chunk_tokens=CHUNK) as lm:
        with caplog.at_level("WARNING", logger="kvfs"):
            out = lm.generate(prompt, 8)
        assert "quarantined" in caplog.text and third.hex in caplog.text
        assert out.prefill.reused == 2 * CHUNK  # stops before the corrupt chunk
        assert out.tokens == reference(model, prompt)
        again = lm.generate(prompt, 8)  # the recomputed chunk was stored again
        assert again.prefill.reused == len(prompt) - 1
        assert again.tokens == out.tokens


def test_partial_chunk_sharing_and_short_prompts(model, tmp_path):
    with CachedLM(model, f"lmdb://{tmp_path}/s", chunk_tokens=CHUNK) as lm:
        one = lm.generate([7], 4)  # a one-token prompt: nothing to reuse, still works
        assert one.prefill.reused == 0 and one.tokens == reference(model, [7], 4)
        lm.generate(CONTEXT, 4)
        # shares 40 of CONTEXT's tokens: 2 whole chunks and 8 tokens of the third
        prompt = CONTEXT[:40] + tokens(99, 9)
        out = lm.generate(prompt, 6)
        assert out.prefill.reused == 40
        assert out.tokens == reference(model, prompt, 6)


def test_a_tokenizers_output_is_refused_saying_what_to_pass(model):
    from transformers import BatchEncoding

    enc = BatchEncoding({"input_ids": torch.tensor([[0, 0, 5, 6]]), "attention_mask": torch.tensor([[0, 0, 1, 1]])})
    with CachedLM(model, "memory://", chunk_tokens=CHUNK) as lm:
        with pytest.raises(kvfs.InvalidInput, match=r"enc\['input_ids'\].*no attention mask"):
            lm.generate(enc, 2)
        with pytest.raises(kvfs.InvalidInput, match=r"enc\['input_ids'\]"):
            lm.prefill({"input_ids": [5, 6]})


def test_load_false_is_the_full_prefill_baseline(model, tmp_path):
    url = f"lmdb://{tmp_path}/s"
    prompt = CONTEXT + QUESTIONS[2]
    with CachedLM(model, url, chunk_tokens=CHUNK) as lm:
        lm.generate(prompt, 2)
    with CachedLM(model, url, chunk_tokens=CHUNK, load=False, save=False) as base:
        out = base.generate(prompt, 8)
    assert out.prefill.reused == 0 and out.stored_chunks == 0
    assert out.tokens == reference(model, prompt)


def test_bfloat16_model(tmp_path):
    m = build_model("tiny", dtype=torch.bfloat16)
    with CachedLM(m, f"lmdb://{tmp_path}/s", chunk_tokens=CHUNK) as lm:
        prompt = CONTEXT + QUESTIONS[0]
        lm.generate(prompt, 2)
        got = lm.ns.get(prompt)
        assert lm.spec.dtype == "bfloat16" and str(got.dtype) == "bfloat16"
        warm = lm.prefill(prompt)
    with torch.inference_mode():
        full = m(torch.tensor([prompt])).logits[0, -1]
    assert warm.reused == len(prompt) - 1
    torch.testing.assert_close(warm.logits, full, atol=0.05, rtol=0.05)


def test_multi_query_falcon_stores_its_one_kv_head(tmp_path):
    """Falcon's multi-query attention caches one KV head, which its config says only through ``multi_query``
    (``num_kv_heads`` keeps the query head count): the namespace must have one head, or nothing is stored."""
    from transformers import FalconConfig, FalconForCausalLM

    cfg = FalconConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
                       new_decoder_architecture=False, bos_token_id=None, eos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        falcon = FalconForCausalLM(cfg).eval()
    falcon.generation_config.eos_token_id = falcon.generation_config.pad_token_id = None
    assert kv_spec(falcon, model_name="me/falcon").num_kv_heads == 1
    prompt = CONTEXT + QUESTIONS[0]
    with CachedLM(falcon, f"lmdb://{tmp_path}/s", model_name="me/falcon", chunk_tokens=CHUNK) as lm:
        cold = lm.generate(prompt, 6)
        warm = lm.generate(prompt, 6)
    assert cold.stored_chunks == 5 and warm.prefill.reused == len(prompt) - 1
    assert cold.tokens == warm.tokens == reference(falcon, prompt, 6)


def test_models_without_a_name_or_with_sliding_windows_are_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig

    anon = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2))
    with pytest.raises(kvfs.InvalidInput, match="model_name="):
        kv_spec(anon)
    assert kv_spec(anon, model_name="me/anon").model == "me/anon"
    sliding = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, sliding_window=16)
    sliding._name_or_path = "me/mistral"
    with pytest.raises(kvfs.InvalidInput, match="full-attention"):
        kv_spec(sliding)
    from transformers import DeepseekV3Config

    mla = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                           v_head_dim=12, n_routed_experts=2, num_experts_per_tok=1)
    with pytest.raises(kvfs.InvalidInput, match="latent attention"):  # K and V of other sizes: not one tensor
        kv_spec(mla, model_name="me/deepseek")
    with CachedLM(anon, f"lmdb://{tmp_path}/s", model_name="me/anon") as lm:
        with pytest.raises(kvfs.InvalidInput, match="one prompt at a time"):
            lm.prefill(torch.zeros((2, 4), dtype=torch.long))


def test_kvfs_demo_runs_on_the_embedded_store_and_shows_the_reuse(tmp_path):
    from click.testing import CliRunner

    from kvfs.cli import main

    r = CliRunner().invoke(main, ["demo", "--size", "tiny", "--context-tokens", "300", "--questions", "3",
                                  "--new-tokens", "4"])
    assert r.exit_code == 0, r.output
    assert "RANDOM weights" in r.output and "CPU" in r.output
    assert "identical to the full-prefill baseline" in r.output
    rows = [ln.split() for ln in r.output.splitlines() if ln.startswith("request ")]
    assert [int(row[3].replace(",", "")) for row in rows] == [0, 300, 300]  # tokens reused
    assert f"kvfs ls -l {kv_spec(build_model('tiny')).model_dir}" in r.output
    assert ".safetensors" in r.output  # the listing of what was stored
    # the same with an explicit store URL
    r = CliRunner().invoke(main, ["--url", f"file://{tmp_path}/s", "demo", "--size", "tiny",
                                  "--context-tokens", "100", "--questions", "2", "--new-tokens", "2"])
    assert r.exit_code == 0, r.output
    assert f"file://{tmp_path}/s" in r.output
