"""The ``kvfs`` command, driven as a user drives it: a real subprocess (exit status, stdout, stderr) and
click's runner, over real LMDB and file stores filled through the Python API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import kvfs
from bitrot import flip_bit
from kvfs.cli import main

SPEC = kvfs.KVSpec("test/cli-tiny", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", chunk_tokens=16)


def prompt(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed + 100).integers(0, 32000, n).tolist()


def kv_of(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SPEC.chunk_shape(n), dtype=np.float32).astype(np.float16)


# two prompts sharing their first 40 tokens: 3 + 2 chunks of the first, the second branches in chunk 2
P1 = prompt(70)
P2 = P1[:40] + prompt(30, seed=1)


def fill(url: str) -> dict[str, object]:
    """Put P1 and P2 into the store at ``url``; returns what was put (chunk paths, tokens, the namespace)."""
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        ns.put(P1, kv_of(70))
        ns.put(P2, kv_of(70, seed=1))
        keys = {k.path: k for k in ns.keys(P1) + ns.keys(P2)}
        return {"paths": sorted(keys), "tokens": sum(k.num_tokens for k in keys.values()), "ns": ns.path,
                "p1": [k.path for k in ns.keys(P1)]}


@pytest.fixture
def store_url(tmp_path):
    return f"lmdb://{tmp_path}/store"


@pytest.fixture
def filled(store_url):
    return fill(store_url)


def kvfs_cmd() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "kvfs")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "kvfs.cli"]


def run(*args: str, url: str | None = None, env: dict | None = None, check: int | None = 0,
        stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run the real ``kvfs`` command; ``check`` is the expected exit status (None: any)."""
    e = dict(os.environ)
    if url is not None:
        e["KVFS_URL"] = url
    e.update(env or {})
    p = subprocess.run(kvfs_cmd() + list(args), capture_output=True, text=True, env=e, timeout=120, input=stdin)
    if check is not None:
        assert p.returncode == check, f"exit {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    return p


def invoke(*args: str, url: str | None = None, code: int = 0):
    """Run ``kvfs`` in-process with click's runner."""
    full = (["--url", url] if url else []) + list(args)
    r = CliRunner().invoke(main, full, prog_name="kvfs", catch_exceptions=False)
    assert r.exit_code == code, f"exit {r.exit_code}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {stderr!r}"
    assert "Traceback" not in stderr
    return lines[0]


def chunk_paths(url: str) -> set[str]:
    doc = json.loads(invoke("ls", "-R", "--json", url=url).stdout)
    return {e["path"] for e in doc["entries"] if e["type"] == "chunk"}


# ------------------------------------------------------------------------------------------ listings
def test_ls_stat_du_json_reflect_what_was_put(store_url, filled):
    with kvfs.open(store_url) as store:
        sizes = {p: store.stat(p).size for p in filled["paths"]}
    doc = json.loads(invoke("ls", "--json", url=store_url).stdout)
    (model,) = doc["entries"]
    assert model["path"] == SPEC.model_dir and model["type"] == "model"
    assert model["tokens"] == filled["tokens"] == 70 + 38  # P2 shares 2 whole chunks with P1, then branches
    assert model["size"] == sum(sizes.values()) and model["chunks"] == len(filled["paths"])

    doc = json.loads(invoke("ls", "-R", "--json", filled["ns"], url=store_url).stdout)
    chunks = [e for e in doc["entries"] if e["type"] == "chunk"]
    assert sorted(e["path"] for e in chunks) == filled["paths"]
    for e in chunks:
        assert {"path", "size", "tokens", "pinned", "last_access"} <= set(e)
        assert e["size"] == sizes[e["path"]] and e["pinned"] is False and e["last_access"] > 0
    assert any(e["type"] == "manifest" for e in doc["entries"])

    first = filled["p1"][1]  # tokens 16..32, parent = chunk 0
    st = json.loads(invoke("stat", "--json", first, url=store_url).stdout)
    assert st["tokens"] == 16 and st["start"] == 16 and st["size"] == sizes[first]
    assert st["parent"] == filled["p1"][0].rsplit("/", 1)[1].removesuffix(".safetensors")
    assert st["header"]["shape"] == [2, 2, 16, 2, 8] and st["header"]["metadata"]["tokens"] == P1[16:32]
    assert st["checksum"].startswith("not verified")
    st = json.loads(invoke("stat", "--json", "--verify", first, url=store_url).stdout)
    assert st["checksum"] == "verified"
    ns = json.loads(invoke("stat", "--json", filled["ns"], url=store_url).stdout)
    assert ns["manifest"]["num_layers"] == 2 and ns["bytes_per_token"] == SPEC.bytes_per_token

    du = json.loads(invoke("du", "--json", url=store_url).stdout)
    assert du["bytes"] == sum(sizes.values()) and du["tokens"] == filled["tokens"]
    assert du["chunks"] == len(filled["paths"])
    ns_id = filled["ns"].split("/")[1]
    assert du["models"][SPEC.model_dir]["namespaces"][ns_id]["bytes"] == du["bytes"]
    (tier,) = du["tiers"].values()
    assert tier["bytes"] == du["bytes"] and tier["chunks"] == du["chunks"]


def test_human_listings(store_url, filled):
    out = invoke("ls", "-l", url=store_url).stdout
    assert "SIZE" in out and "TOKENS" in out and f"{SPEC.model_dir}/" in out and "KiB" in out
    out = invoke("ls", filled["ns"], url=store_url).stdout.split()
    assert "manifest.json" in out and len(out) == 1 + len({p.split("/")[2] for p in filled["paths"]})
    assert invoke("ls", "-R", filled["ns"], url=store_url).stdout.split().count(filled["paths"][0]) == 1
    tree = invoke("tree", filled["ns"], url=store_url).stdout
    # chunk 32..48 branches (P2 diverges at token 40): two children, drawn as ├── and └──
    assert "0..16" in tree and tree.count("32..48") == 2 and "├── " in tree and "└── " in tree
    assert "64..70" in tree and "48..64" in tree
    tree_json = json.loads(invoke("tree", "--json", filled["ns"], url=store_url).stdout)
    (root,) = tree_json["namespaces"][0]["roots"]
    assert [c["start"] for c in root["chain"]] == [16] and len(root["branches"]) == 2
    du = invoke("du", url=store_url).stdout
    assert "total" in du and "TIER" in du
    st = invoke("stat", filled["p1"][0], url=store_url).stdout
    assert "parent:" in st and "first chunk" in st and "float16" in st


def test_default_url_is_kvfs_url_then_embedded_store(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("KVFS_URL", raising=False)
    fill(f"lmdb://{tmp_path}/cache/kvfs")  # the embedded default store
    assert invoke("ls").stdout.split() == [f"{SPEC.model_dir}/"]
    other = f"lmdb://{tmp_path}/other"
    os.makedirs(f"{tmp_path}/other")
    monkeypatch.setenv("KVFS_URL", other)
    r = invoke("ls")
    assert r.stdout == "" and "catalog is empty" in r.stderr
    assert invoke("ls", url=f"lmdb://{tmp_path}/cache/kvfs").stdout.split() == [f"{SPEC.model_dir}/"]


# ------------------------------------------------------------------------------------------ pins and eviction
def test_pin_then_evict_all_refuses_pinned_and_force_evicts(store_url, filled):
    pinned = filled["p1"][0]
    run("pin", pinned, url=store_url)
    p = run("evict", "--all", url=store_url, check=1)
    line = one_error_line(p.stderr)
    assert "refused" in line and "pinned" in line and pinned in line and "--force" in line
    assert f"evicted {len(filled['paths']) - 1} chunk(s)" in p.stdout
    assert chunk_paths(store_url) == {pinned}
    with kvfs.open(store_url) as store:  # the bytes are still there and still good
        assert store.cat(pinned)[:8]

    doc = json.loads(run("evict", "--all", "--json", url=store_url, check=1).stdout)
    assert doc["refused"] == [pinned] and doc["evicted"] == []

    p = run("evict", "--all", "--force", url=store_url)
    assert "evicted 1 chunk(s)" in p.stdout and p.stderr == ""
    assert chunk_paths(store_url) == set()


def test_dry_run_changes_nothing(store_url, filled):
    with kvfs.open(store_url) as store:
        before = sorted(store.catalog.scan(), key=lambda r: r.key)
        data = {p: store.cat(p) for p in filled["paths"]}
        before = sorted(store.catalog.scan(), key=lambda r: r.key)  # after the reads touched them
    r = invoke("evict", "--all", "--dry-run", url=store_url)
    assert r.stdout.count("would evict ") == len(filled["paths"]) + 1
    doc = json.loads(invoke("evict", "--older-than", "0s", "--dry-run", "--json", url=store_url).stdout)
    assert doc["dry_run"] and sorted(doc["evicted"]) == filled["paths"]
    assert doc["freed_bytes"] == sum(r.size for r in before)
    with kvfs.open(store_url) as store:
        assert sorted(store.catalog.scan(), key=lambda r: r.key) == before
        assert {p: store.cat(p) for p in filled["paths"]} == data


def test_evict_older_than_to_size_and_paths(store_url, filled):
    import time

    from kvfs.catalog import key_of_path

    with kvfs.open(store_url) as store:  # two chunks last read three days ago
        store.catalog.touch([key_of_path(p) for p in filled["paths"][:2]], now=time.time() - 3 * 86400)
        sizes = {r.path: r.size for r in store.catalog.scan()}
    r = invoke("evict", "--older-than", "2d", url=store_url)
    assert r.stdout.startswith("evicted 2 chunk(s)")
    assert chunk_paths(store_url) == set(filled["paths"][2:])
    keep = sorted(sizes[p] for p in filled["paths"][2:])
    limit = sum(keep) - keep[0]  # one chunk too many
    r = invoke("evict", "--to-size", str(limit), url=store_url)
    assert r.stdout.startswith("evicted 1 chunk(s)")
    assert sum(sizes[p] for p in chunk_paths(store_url)) <= limit
    r = invoke("evict", filled["ns"], url=store_url)
    assert chunk_paths(store_url) == set()


def test_evict_to_a_size_pinned_chunks_keep_it_above_is_a_refusal(store_url, filled):
    invoke("pin", filled["ns"], url=store_url)
    p = run("evict", "--to-size", "0", url=store_url, check=1)
    assert "refused to evict" in one_error_line(p.stderr)
    invoke("unpin", filled["ns"], url=store_url)
    one = filled["p1"][0]
    invoke("pin", one, url=store_url)
    with kvfs.open(store_url) as store:
        pinned_size = store.records(one)[0].size
    # room enough for the pinned chunk: the others go, nothing is refused
    doc = json.loads(invoke("evict", "--to-size", str(pinned_size), "--json", url=store_url).stdout)
    assert doc["refused"] == [] and len(doc["evicted"]) == len(filled["paths"]) - 1


def test_evict_skips_chunks_someone_else_evicted_after_the_plan(store_url, filled):
    from kvfs.cli.manage import _evict_batch

    gone, kept = filled["p1"][4], filled["p1"][3]
    with kvfs.open(store_url) as store:
        store.evict([gone])  # another process, between `kvfs evict` planning and evicting
        res = _evict_batch(store, [gone, kept], force=False, tier=None)
        assert res.evicted == [kept] and res.refused == []
    assert chunk_paths(store_url) == set(filled["paths"]) - {gone, kept}


def test_pin_and_unpin_a_prompt_from_a_tokens_file(store_url, filled, tmp_path):
    as_json = tmp_path / "p1.json"
    as_json.write_text(json.dumps(P1))
    as_text = tmp_path / "p1.txt"
    as_text.write_text("\n".join(" ".join(map(str, P1[i : i + 10])) for i in range(0, 70, 10)))
    r = invoke("pin", "--tokens-file", str(as_json), "--namespace", filled["ns"], url=store_url)
    assert "pinned 5 chunk(s)" in r.stdout and "70 of its 70 tokens" in r.stdout
    doc = json.loads(invoke("ls", "-R", "--json", url=store_url).stdout)
    assert {e["path"] for e in doc["entries"] if e.get("pinned")} == set(filled["p1"])
    # the same prompt as whitespace-separated ints, on stdin
    p = run("unpin", "--tokens-file", "-", "--namespace", filled["ns"], url=store_url, stdin=as_text.read_text())
    assert "unpinned 5 chunk(s)" in p.stdout
    doc = json.loads(invoke("ls", "-R", "--json", url=store_url).stdout)
    assert not any(e.get("pinned") for e in doc["entries"])
    # a prefix path pins everything under it
    invoke("pin", filled["ns"], url=store_url)
    assert json.loads(invoke("du", "--json", url=store_url).stdout)["chunks"] == len(filled["paths"])
    assert json.loads(invoke("stat", "--json", filled["ns"], url=store_url).stdout)["pins"] == len(filled["paths"])
    # a prompt that is not stored at all
    other = tmp_path / "other.json"
    other.write_text(json.dumps(prompt(20, seed=9)))
    r = invoke("pin", "--tokens-file", str(other), "--namespace", filled["ns"], url=store_url, code=1)
    assert "none of the prompt's 20 tokens are stored" in r.stderr


# ------------------------------------------------------------------------------------------ tiers, copies, checks
def test_prefetch_brings_chunks_into_the_fastest_tier(tmp_path):
    url = f"lmdb://{tmp_path}/hot::file://{tmp_path}/cold"
    filled = fill(url)
    with kvfs.open(url) as store:
        store.flush()
    invoke("evict", "--all", "--tier", "0", url=url)
    doc = json.loads(invoke("ls", "-R", "--json", url=url).stdout)
    assert all(e["tiers"] == [f"file://{tmp_path}/cold"] for e in doc["entries"] if e["type"] == "chunk")
    toks = tmp_path / "p1.json"
    toks.write_text(json.dumps(P1))
    p = run("prefetch", "--tokens-file", str(toks), "--namespace", filled["ns"], url=url)
    assert "fetched 5 chunk(s)" in p.stdout
    doc = json.loads(invoke("ls", "-R", "--json", url=url).stdout)
    hot = {e["path"] for e in doc["entries"] if f"lmdb://{tmp_path}/hot" in e.get("tiers", [])}
    assert hot == set(filled["p1"])
    doc = json.loads(invoke("prefetch", "--json", filled["ns"], url=url).stdout)
    assert doc["fetched"] == len(filled["paths"]) - 5 and doc["already"] == 5 and doc["failed"] == 0


def test_prefetch_into_a_tier_too_small_says_what_did_not_stay(tmp_path):
    big = f"lmdb://{tmp_path}/hot::lmdb://{tmp_path}/cold"
    filled = fill(big)
    with kvfs.open(big) as store:
        store.flush()
        total = sum(r.size for r in store.records(filled["ns"]))
    invoke("evict", "--all", "--tier", "0", url=big)
    small = f"lmdb://{tmp_path}/hot?capacity={total // 2}::lmdb://{tmp_path}/cold"
    doc = json.loads(run("prefetch", "--json", filled["ns"], url=small).stdout)
    with kvfs.open(small) as store:
        in_top = sum(1 for r in store.records(filled["ns"]) if r.tiers & store.tiers[0].bit)
    assert doc["fetched"] == len(filled["paths"]) and doc["already"] == 0
    assert doc["evicted"] > 0 and in_top == doc["fetched"] - doc["evicted"]
    invoke("evict", "--all", "--tier", "0", url=big)
    p = run("prefetch", filled["ns"], url=small)
    assert f"fetched {len(filled['paths'])} chunk(s)" in p.stdout
    assert f"{doc['evicted']} of the chunks fetched are not in" in p.stderr and "evicted again" in p.stderr


@pytest.mark.parametrize("dst_scheme", ["file", "lmdb"])
def test_cp_copies_chunks_byte_exact_and_skips_what_is_there(store_url, filled, tmp_path, dst_scheme):
    dst = f"{dst_scheme}://{tmp_path}/copy"
    p = run("cp", store_url, dst)
    assert f"copied {len(filled['paths'])} chunk(s)" in p.stdout and "skipped 0" in p.stdout
    assert chunk_paths(dst) == set(filled["paths"])
    with kvfs.open(store_url) as src, kvfs.open(dst) as out:
        for path in filled["paths"]:
            assert out.cat(path) == src.cat(path)
        # and the copy serves KV through the API: same namespace, same tensors
        assert out.namespace(SPEC).get(P2).tobytes() == src.namespace(SPEC).get(P2).tobytes()
    doc = json.loads(run("cp", "--json", store_url, dst).stdout)
    assert doc["copied"] == 0 and doc["skipped"] == len(filled["paths"]) and doc["failed"] == []
    # a chunk removed behind the destination catalog's back (as another node evicting from a shared tier)
    # is copied again: the skip is confirmed by the destination's backend, not taken from its catalog
    gone = filled["paths"][3]
    from kvfs.backends import open_backend

    b = open_backend(dst)
    b.delete_many([gone])
    b.close()
    doc = json.loads(invoke("cp", "--json", store_url, dst).stdout)
    assert doc["copied"] == 1 and doc["skipped"] == len(filled["paths"]) - 1
    with kvfs.open(store_url) as src, kvfs.open(dst) as out:
        assert out.cat(gone) == src.cat(gone)
    # a sub-path copies only what is under it
    one = filled["p1"][0]
    dst2 = f"{dst_scheme}://{tmp_path}/copy2"
    run("cp", store_url, dst2, one)
    assert chunk_paths(dst2) == {one}


def test_verify_reports_and_quarantines_a_corrupt_copy(tmp_path):
    url = f"file://{tmp_path}/files"
    filled = fill(url)
    victim = filled["p1"][2]
    flip_bit(f"{tmp_path}/files/{victim}", 5000, 0xFF)
    r = invoke("verify", url=url, code=1)
    assert victim in r.stdout and "checksum" in r.stdout
    assert "1 copy failed" in r.stderr
    doc = json.loads(invoke("verify", "--json", url=url, code=1).stdout)
    assert doc["failed"] == 1 and [x["path"] for x in doc["results"] if not x["ok"]] == [victim]
    st = json.loads(invoke("stat", "--json", "--verify", victim, url=url, code=1).stdout)
    assert st["checksum"].startswith("failed")
    assert os.path.exists(f"{tmp_path}/files/{victim}")  # nothing removed without --quarantine
    invoke("verify", "--quarantine", url=url, code=1)
    assert not os.path.exists(f"{tmp_path}/files/{victim}")
    r = invoke("verify", url=url)
    assert f"{len(filled['paths']) - 1} ok, 0 failed" in r.stdout


def test_a_corrupt_chunk_is_named_as_failing_its_checks_not_as_missing(tmp_path):
    url = f"file://{tmp_path}/files"
    filled = fill(url)
    victim = filled["p1"][1]
    flip_bit(f"{tmp_path}/files/{victim}", 6000, 0xFF)
    st = json.loads(invoke("stat", "--json", "--verify", victim, url=url, code=1).stdout)
    assert "failed its checks" in st["checksum"] and "checksum mismatch" in st["checksum"], st["checksum"]
    assert "no such" not in st["checksum"]
    doc = json.loads(run("cp", "--json", url, f"lmdb://{tmp_path}/copy", check=1).stdout)
    assert [f["path"] for f in doc["failed"]] == [victim]
    assert "failed its checks" in doc["failed"][0]["error"] and "no such" not in doc["failed"][0]["error"]


def test_cp_from_an_unsigned_store_into_a_signed_one_says_how(store_url, filled, tmp_path):
    key = tmp_path / "key"
    key.write_text("a deployment key")
    p = run("cp", store_url, f"lmdb://{tmp_path}/signed", env={"KVFS_SIGNING_KEY_FILE": str(key)}, check=1)
    assert "--source-unsigned" in one_error_line(p.stderr.splitlines()[-1])
    run("cp", "--source-unsigned", store_url, f"lmdb://{tmp_path}/signed", env={"KVFS_SIGNING_KEY_FILE": str(key)})


@pytest.mark.parametrize("path", ["", "/", " "])
def test_an_empty_path_never_selects_the_whole_store(store_url, filled, path):
    for cmd in ("evict", "pin", "unpin", "prefetch"):
        if path == "/" and cmd != "evict":
            continue  # `pin /`, `unpin --reset /`, `prefetch /` say what they mean
        p = run(cmd, path, url=store_url, check=2)
        assert "whole store" in one_error_line(p.stderr)
    with pytest.raises(kvfs.InvalidInput, match="all=True"):
        with kvfs.open(store_url) as store:
            store.evict([path])
    assert chunk_paths(store_url) == set(filled["paths"])
    doc = json.loads(invoke("ls", "-R", "--json", url=store_url).stdout)
    assert not any(e.get("pinned") for e in doc["entries"])
    if path == "/":  # said in so many words: every chunk
        assert f"pinned {len(filled['paths'])} chunk(s)" in run("pin", "/", url=store_url).stdout
        assert f"unpinned {len(filled['paths'])} chunk(s)" in run("unpin", "--reset", "/", url=store_url).stdout


def test_unpin_counts_only_chunks_it_unpinned(store_url, filled):
    one = filled["p1"][0]
    assert "pinned 1 chunk(s)" in invoke("pin", one, url=store_url).stdout
    assert f"unpinned 1 chunk(s)" in invoke("unpin", filled["ns"], url=store_url).stdout
    assert "unpinned 0 chunk(s)" in invoke("unpin", filled["ns"], url=store_url).stdout


def test_overlapping_paths_pin_and_count_each_chunk_once(store_url, filled):
    """A directory and a chunk inside it (or NS and NS/) name some chunks twice: each is pinned once."""
    one = filled["p1"][0]
    shard = one.rsplit("/", 1)[0]
    r = invoke("pin", filled["ns"], shard, one, filled["ns"] + "/", url=store_url)
    assert f"pinned {len(filled['paths'])} chunk(s)" in r.stdout
    doc = json.loads(invoke("ls", "-R", "--json", filled["ns"], url=store_url).stdout)
    assert {e["pins"] for e in doc["entries"] if e["type"] == "chunk"} == {1}
    r = invoke("unpin", one, "/", url=store_url)
    assert f"unpinned {len(filled['paths'])} chunk(s)" in r.stdout
    doc = json.loads(invoke("ls", "-R", "--json", filled["ns"], url=store_url).stdout)
    assert {e["pins"] for e in doc["entries"] if e["type"] == "chunk"} == {0}


def test_a_manifest_path_is_refused_not_a_silent_zero(store_url, filled):
    """A manifest holds no chunks: evict, pin, unpin and prefetch of it say so instead of acting on 0 chunks."""
    manifest = f"{filled['ns']}/manifest.json"
    for args in (["evict"], ["evict", "--dry-run"], ["pin"], ["unpin"], ["prefetch"]):
        p = run(*args, manifest, url=store_url, check=1)
        line = one_error_line(p.stderr)
        assert line.startswith(f"kvfs {args[0]}:") and "manifest" in line and "not a chunk" in line
        assert p.stdout == ""
    assert chunk_paths(store_url) == set(filled["paths"])
    assert json.loads(invoke("stat", "--json", manifest, url=store_url).stdout)["type"] == "manifest"


def test_stat_verify_of_a_directory_is_refused_not_a_silent_success(store_url, filled):
    """`stat --verify` reads one chunk; on a directory it would read nothing and exit 0."""
    for path, where in ((filled["ns"], f"kvfs verify {filled['ns']}"), ("/", "kvfs verify`"),
                        (f"{filled['ns']}/manifest.json", f"kvfs verify {filled['ns']}`")):
        p = run("stat", "--verify", path, url=store_url, check=2)
        line = one_error_line(p.stderr)
        assert "--verify checks one chunk" in line and where in line and p.stdout == ""
    st = json.loads(invoke("stat", "--verify", "--json", filled["p1"][0], url=store_url).stdout)
    assert st["checksum"] == "verified"


def test_ls_recursive_of_a_missing_path_is_an_error(store_url, filled):
    model = SPEC.model_dir
    for path in ("no-such-model", model[:-2], f"{model}/no-such-ns", f"{filled['ns']}/zz"):
        for flags in (["-R"], ["-R", "--json"], ["-lR"]):
            p = run("ls", *flags, path, url=store_url, check=1)
            assert "no such" in one_error_line(p.stderr) and path in p.stderr and p.stdout == ""
    assert invoke("ls", "-R", model, url=store_url).stdout.split().count(filled["paths"][0]) == 1


def test_cp_of_a_path_the_source_lacks_creates_no_destination(store_url, filled, tmp_path):
    dst = tmp_path / "typo-dst"
    p = run("cp", store_url, f"file://{dst}", "no-such-model", check=1)
    assert "no-such-model" in one_error_line(p.stderr)
    assert not dst.exists()  # refused before anything was created
    # a manifest alone is no chunk to copy: said, not "copied 0 chunk(s)"
    p = run("cp", store_url, f"file://{dst}", f"{filled['ns']}/manifest.json", check=1)
    assert "not a chunk" in one_error_line(p.stderr) and filled["ns"] in p.stderr
    assert not dst.exists()


def test_cp_names_its_own_urls_in_errors_not_url_option(store_url, filled, tmp_path):
    """cp ignores --url: a bad SRC_URL or DST_URL is named as such."""
    p = run("cp", f"lmdb://{tmp_path}/no-such-src", f"lmdb://{tmp_path}/d", check=1)
    line = one_error_line(p.stderr)
    assert "no kvfs store" in line and "SRC_URL" in line and "--url" not in line
    p = run("cp", "s4://bucket/kv", f"lmdb://{tmp_path}/d", check=2)
    line = one_error_line(p.stderr)
    assert "bad store URL" in line and "SRC_URL" in line and "--url" not in line
    p = run("cp", store_url, "s4://bucket/kv", check=2)
    line = one_error_line(p.stderr)
    assert "bad store URL" in line and "DST_URL" in line and "--url" not in line
    assert "--url" in one_error_line(run("--url", "s4://bucket/kv", "ls", check=2).stderr)


def test_cp_from_a_store_whose_catalog_is_empty_says_so(tmp_path):
    src = f"file://{tmp_path}/files"
    fill(src)
    shutil.rmtree(f"{tmp_path}/files/.kvfs/catalog")  # as on a node that never saw these writes
    p = run("cp", src, f"lmdb://{tmp_path}/copy")
    assert "copied 0 chunk(s)" in p.stdout
    assert "catalog is empty" in one_error_line(p.stderr) and "fsck" in p.stderr


def test_verify_quarantine_reports_only_what_it_removed(tmp_path):
    url = f"file://{tmp_path}/files"
    filled = fill(url)
    gone = filled["p1"][2]
    os.remove(f"{tmp_path}/files/{gone}")  # deleted by hand: the catalog still lists it
    r = invoke("verify", url=url, code=1)
    assert "missing from the tier" in r.stdout
    line = one_error_line(r.stderr)
    assert "kvfs fsck" in line and "--quarantine" not in line  # --quarantine would not fix it
    r = invoke("verify", "--quarantine", url=url, code=1)
    assert "quarantined" not in r.stdout
    doc = json.loads(invoke("verify", "--quarantine", "--json", url=url, code=1).stdout)
    assert doc["failed"] == 1 and doc["quarantined"] is False
    invoke("fsck", url=url)
    assert f"{len(filled['paths']) - 1} ok, 0 failed" in invoke("verify", url=url).stdout


@pytest.mark.parametrize("scheme", ["lmdb", "file"])
def test_a_moved_or_symlinked_store_still_serves_and_evicts_its_chunks(tmp_path, scheme):
    """The catalog lives inside the store; which tier it belongs to must not depend on the path it was opened by
    (mv, cp -r, a symlink, another mount point in a container)."""
    old, new, link = tmp_path / "old", tmp_path / "new", tmp_path / "link"
    filled = fill(f"{scheme}://{old}")
    with kvfs.open(f"{scheme}://{old}") as store:
        expected = store.namespace(SPEC).get(P2).tobytes()
    os.rename(old, new)
    os.symlink(new, link)
    for where in (new, link):
        with kvfs.open(f"{scheme}://{where}") as store:
            ns = store.namespace(SPEC)
            assert ns.lookup(P1) == len(P1)
            assert ns.get(P2).tobytes() == expected
    doc = json.loads(invoke("verify", "--json", url=f"{scheme}://{new}").stdout)
    assert doc["failed"] == 0 and len(doc["results"]) == len(filled["paths"])
    r = invoke("evict", filled["p1"][0], url=f"{scheme}://{link}")
    assert "evicted 1 chunk(s)" in r.stdout
    with kvfs.open(f"{scheme}://{new}") as store:
        assert store.namespace(SPEC).lookup(P1) == 0
        assert filled["p1"][0] not in {r.path for r in store.records("")}


def test_evict_reports_only_chunks_it_removed(tmp_path):
    url = f"lmdb://{tmp_path}/hot::lmdb://{tmp_path}/cold"
    filled = fill(url)
    with kvfs.open(url) as store:
        store.flush()
    assert f"evicted {len(filled['paths'])} chunk(s) from tier 0" in invoke("evict", "--all", "--tier", "0",
                                                                             url=url).stdout
    # nothing is in tier 0 any more: a second eviction from it removes, and reports, nothing
    doc = json.loads(invoke("evict", "--all", "--tier", "0", "--json", url=url).stdout)
    assert doc["evicted"] == [] and doc["freed_bytes"] == 0
    assert len(json.loads(invoke("evict", "--all", "--json", url=url).stdout)["evicted"]) == len(filled["paths"])
    assert json.loads(invoke("evict", "--all", "--json", url=url).stdout)["evicted"] == []


def test_evict_from_the_top_tier_keeps_the_only_copy_of_a_chunk_not_yet_written_back(tmp_path):
    url = f"lmdb://{tmp_path}/hot::file://{tmp_path}/files"
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        stuck = ns.keys(P1)[0].path
        shard = tmp_path / "files" / stuck.rsplit("/", 1)[0]
        shard.parent.mkdir(parents=True)
        shard.write_bytes(b"in the way")  # the first chunk's write-back to the file tier fails
        ns.put(P1, kv_of(70))
        with pytest.raises(kvfs.StoreError):
            store.flush()
    p = run("evict", "--all", "--tier", "0", url=url, check=1)
    line = one_error_line(p.stderr)
    assert "kept 1 chunk(s) whose only copy is in tier 0" in line and stuck in line
    assert "evicted 4 chunk(s) from tier 0" in p.stdout  # the others are in the file tier
    doc = json.loads(run("evict", "--all", "--tier", "0", "--json", url=url, check=1).stdout)
    assert doc["not_copied"] == [stuck] and doc["evicted"] == []
    with kvfs.open(url) as store:
        np.testing.assert_array_equal(store.namespace(SPEC).get(P1), kv_of(70))


def test_mount_refuses_a_mistyped_store_directory(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        p = run("mount", f"lmdb://{tmp_path}/no-such-store", str(mnt), check=None)
    finally:
        if os.path.ismount(mnt):  # the bug this guards against: a new, empty store mounted
            run("umount", str(mnt), check=None)
    assert p.returncode == 1
    line = one_error_line(p.stderr)
    assert line.startswith("kvfs mount:") and "does not exist" in line
    assert not os.path.exists(f"{tmp_path}/no-such-store")
    p = run("umount", str(mnt), check=1)
    assert one_error_line(p.stderr).startswith("kvfs umount:")


def test_cp_replaces_a_damaged_manifest_in_the_destination(store_url, filled, tmp_path):
    dst = tmp_path / "files"
    bad = json.loads(SPEC.manifest_bytes())
    bad["num_layers"] = SPEC.num_layers + 2  # not what the namespace's name (a hash of its manifest) says
    (dst / filled["ns"]).mkdir(parents=True)
    (dst / filled["ns"] / "manifest.json").write_text(json.dumps(bad))
    run("cp", store_url, f"file://{dst}")
    assert (dst / filled["ns"] / "manifest.json").read_bytes() == SPEC.manifest_bytes()
    shutil.rmtree(dst / ".kvfs" / "catalog")  # a catalog rebuilt from the files finds every chunk usable
    run("fsck", url=f"file://{dst}")
    with kvfs.open(f"file://{dst}") as store:
        assert store.namespace(SPEC).lookup(P2) == len(P2)


def test_fsck_rebuilds_a_lost_catalog(tmp_path):
    url = f"file://{tmp_path}/files"
    filled = fill(url)
    shutil.rmtree(f"{tmp_path}/files/.kvfs/catalog")  # as on a node that never saw these writes
    r = invoke("ls", url=url)
    assert r.stdout == "" and "kvfs fsck" in r.stderr
    doc = json.loads(invoke("fsck", "--dry-run", "--json", url=url).stdout)
    assert doc["dry_run"] and len(doc["added"]) == len(filled["paths"])
    assert chunk_paths(url) == set()
    r = invoke("fsck", url=url)
    assert f"{len(filled['paths'])} chunk(s) in 1 namespace(s)" in r.stdout
    assert chunk_paths(url) == set(filled["paths"])
    assert "catalog is up to date" in invoke("fsck", "--verify", url=url).stdout


def test_fsck_names_a_namespace_whose_manifest_is_gone(tmp_path):
    url = f"file://{tmp_path}/files"
    filled = fill(url)
    shutil.rmtree(f"{tmp_path}/files/.kvfs/catalog")
    os.remove(f"{tmp_path}/files/{filled['ns']}/manifest.json")
    r = invoke("fsck", url=url)
    assert f"{len(filled['paths'])} chunk(s) in 1 namespace(s) with no manifest.json" in r.stderr
    assert filled["ns"] in r.stderr and "not kvfs chunks" not in r.stderr
    assert json.loads(invoke("fsck", "--dry-run", "--json", url=url).stdout)["unmanifested"]
    assert os.path.exists(f"{tmp_path}/files/{filled['paths'][0]}")  # reported, never deleted


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "args, code, words",
    [
        (["--url", "not-a-url", "ls"], 2, ["bad store URL", "not-a-url"]),
        (["--url", "nosuchscheme://x", "ls"], 2, ["unknown storage scheme", "nosuchscheme"]),
        (["--url", "lmdb:///nonexistent/kvfs-store", "ls"], 1, ["no kvfs store", "/nonexistent/kvfs-store"]),
        (["--url", "memory://::file:///nonexistent/kvfs-files", "ls"], 1, ["no kvfs store", "/nonexistent/kvfs-files"]),
        (["--url", "lmdb:///tmp?bogus_option=1", "ls"], 2, ["bogus_option"]),
        (["ls", "no-such-model"], 1, ["no such", "no-such-model"]),
        (["stat", "m/ns/ab/" + "ab" * 32 + ".safetensors"], 1, ["no such"]),
        (["evict", "--to-size", "12parsecs"], 2, ["--to-size", "not a size", "12parsecs"]),
        (["evict", "--older-than", "soon"], 2, ["--older-than", "not a duration", "soon"]),
        (["evict", "--older-than", "nan"], 2, ["--older-than", "not a duration", "nan"]),
        (["evict"], 2, ["say what to evict"]),
        (["pin"], 2, ["give chunk or directory paths"]),
        (["pin", "--tokens-file", "/nonexistent.json", "--namespace", "a/b"], 2, ["cannot read"]),
        (["prefetch", "--namespace", "a/b"], 2, ["--tokens-file"]),
        (["frobnicate"], 2, ["No such command", "frobnicate"]),
        (["--frob", "ls"], 2, ["--frob"]),
    ],
)
def test_errors_are_one_clear_line_and_a_nonzero_exit(store_url, args, code, words):
    fill(store_url)
    p = run(*args, url=store_url, check=code)
    line = one_error_line(p.stderr)
    assert line.startswith("kvfs")
    for w in words:
        assert w in line, line
    assert p.stdout == ""


def test_bad_tokens_files(store_url, filled, tmp_path):
    bad = tmp_path / "bad.json"
    for text, word in [("[1, 2, \"x\"]", "not an integer"), ("1 2 three", "not an integer"), ("", "no token ids"),
                       ("[1, -5]", "out of range"), ("{\"a\": 1}", "JSON list")]:
        bad.write_text(text)
        r = CliRunner().invoke(main, ["--url", store_url, "pin", "--tokens-file", str(bad), "--namespace",
                                      filled["ns"]])
        assert r.exit_code == 2, r.output
        assert word in one_error_line(r.stderr)
    bad.write_text("[1, 2]")
    r = CliRunner().invoke(main, ["--url", store_url, "pin", "--tokens-file", str(bad), "--namespace", "a/b/c"])
    assert r.exit_code == 2 and "namespace path" in r.stderr
    r = CliRunner().invoke(main, ["--url", store_url, "pin", "--tokens-file", str(bad), "--namespace", "m/nope"])
    assert r.exit_code == 1 and "not in this store" in one_error_line(r.stderr)


def test_ctrl_c_exits_130_with_one_line(store_url, filled):
    """A command interrupted (here blocked reading its tokens from stdin) exits as shells expect (128 + SIGINT)."""
    import signal
    import time

    env = dict(os.environ, KVFS_URL=store_url)
    p = subprocess.Popen(kvfs_cmd() + ["pin", "--tokens-file", "-", "--namespace", filled["ns"]], env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # started, and waiting on stdin (not still importing: SIGINT kills then)
        try:
            with open(f"/proc/{p.pid}/wchan") as f:
                if "pipe_read" in f.read():
                    break
        except OSError:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, (out, err)
    assert one_error_line(err) == "kvfs pin: interrupted"


def test_debug_shows_the_traceback(store_url, filled):
    p = run("--debug", "ls", "no-such-model", url=store_url, check=1)
    assert "Traceback" in p.stderr and "NotFound" in p.stderr


def test_a_command_whose_module_cannot_load_fails_alone(monkeypatch):
    from kvfs import cli

    monkeypatch.setitem(cli.COMMANDS, "broken", "kvfs.cli.no_such_module:cmd")
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0 and "broken" in r.stdout and "ls" in r.stdout
    r = CliRunner().invoke(main, ["broken", "x"])
    assert r.exit_code == 1 and "cannot run here" in one_error_line(r.stderr)


# ------------------------------------------------------------------------------------------ start-up, progress
def test_help_lists_every_command_without_importing_the_store():
    code = (
        "import sys\n"
        "from kvfs.cli import main, COMMANDS\n"
        "import click\n"
        "ctx = click.Context(main)\n"
        "for name in COMMANDS: assert main.get_command(ctx, name) is not None, name\n"
        "heavy = [m for m in ('numpy', 'lmdb', 'kvfs.store', 'torch', 's3fs') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    out = run("--help").stdout
    for name in ("ls", "stat", "tree", "pin", "unpin", "evict", "prefetch", "du", "cp", "verify", "fsck"):
        assert f"  {name} " in out


def test_progress_bar_only_on_a_terminal(store_url, filled, tmp_path):
    import pty

    p = run("cp", store_url, f"lmdb://{tmp_path}/a")
    assert "copying" not in p.stdout + p.stderr and "%" not in p.stdout + p.stderr
    master, slave = pty.openpty()
    env = dict(os.environ, KVFS_URL=store_url, COLUMNS="100")
    proc = subprocess.Popen(kvfs_cmd() + ["cp", store_url, f"lmdb://{tmp_path}/b"], stdout=slave, stderr=slave,
                            env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO once the child has closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=60) == 0
    out = b"".join(chunks).decode(errors="replace")
    assert "copying" in out and "100%" in out and "copied 8 chunk(s)" in out
