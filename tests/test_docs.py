"""Every document runs: README.md and docs/*.md, each executed block by block by tests/docs_runner.py.

Each document runs in a fresh work directory with its own HOME (so ``~/.cache/kvfs``, the default
store, is the test's), no ``$KVFS_URL``, no AWS credentials but the ones the document gives, the
venv's ``bin`` first on PATH, and the servers it talks to started here: a moto S3 server on the port
the documents use (127.0.0.1:5123) with their buckets. Absolute ``/tmp/kvfs-*`` paths a document
uses are removed before and after it runs, and FUSE mounts it leaves are unmounted.

A block that does not run is a documented exception: an HTML comment right before it says why
(``<!-- docs-test: skip REASON -->``, or ``<!-- docs-test: instead REASON`` with a quicker equivalent),
and :data:`EXCEPTIONS` below lists every one, so that a new exception is a visible change here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import docs_runner  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
S3_PORT = 5123  # the endpoint the documents use: http://127.0.0.1:5123
S3_BUCKETS = ["kvfs-demo", "team-kv"]

#: Every block that does not run as written: (document, text the block starts with) -> why.
#: The same reason is in the document, in the comment before the block.
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("README.md", "python3 -m venv .venv"): "instead: installing is .ci/install's; the demo on the tiny model",
    ("README.md", "bash .ci/install"): "skip: it is this test suite",
    ("docs/quickstart.md", "python3 -m venv .venv"): "instead: installing is .ci/install's; the tiny demo",
    ("docs/quickstart.md", "bash .ci/install"): "skip: it is this test suite",
    ("docs/connectors.md", "from transformers import AutoModelForCausalLM"): "skip: downloads the weights",
    ("docs/connectors.md", "vllm serve"): "skip: a GPU and the model's weights",
    ("docs/connectors.md", "from vllm import LLM"): "skip: a GPU and the model's weights",
    ("docs/connectors.md", "python -m sglang.launch_server"): "skip: a GPU and the model's weights",
    ("docs/batch.md", "$ kvfs plan snippets.jsonl"): "skip: the benchmark's 40 MB workload",
}


def _doc_id(p: Path) -> str:
    return str(p.relative_to(ROOT))


def _runnable_code(doc: Path) -> str:
    return "\n".join(b.code for b in docs_runner.blocks(doc.read_text(encoding="utf-8")) if b.lang)


def _doc_params() -> list:
    """One parameter per document, marked ``s3`` / ``fuse`` when it needs the S3 server or a mount."""
    out = []
    for doc in DOCS:
        code = _runnable_code(doc)
        marks = ([pytest.mark.s3] if f"127.0.0.1:{S3_PORT}" in code else []) + \
                ([pytest.mark.fuse] if "kvfs mount" in code else [])
        out.append(pytest.param(doc, marks=marks, id=_doc_id(doc)))
    return out


def _fuse_unusable() -> str | None:
    try:
        import pyfuse3  # noqa: F401
        import trio  # noqa: F401
    except ImportError as e:
        return f"pyfuse3/trio are not installed ({e})"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (apt-get install fuse3)"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as e:
        return f"/dev/fuse cannot be opened here: {e.strerror}"
    return None


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto on 127.0.0.1:5123, the endpoint the documents use (their buckets: :func:`_reset_buckets`)."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:  # moto exits the process on a taken port: check first
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will (TIME_WAIT is fine)
        try:
            s.bind(("127.0.0.1", S3_PORT))
        except OSError as e:
            pytest.fail(f"port {S3_PORT}, the documents' S3 endpoint, is taken ({e.strerror}): free it")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{S3_PORT}"
    server.stop()


def _reset_buckets(endpoint: str) -> None:
    import boto3

    s3 = boto3.resource("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")
    for name in S3_BUCKETS:
        bucket = s3.Bucket(name)
        if bucket.creation_date is not None:
            bucket.objects.all().delete()
            bucket.delete()
        bucket.create()


def _tmp_paths(text: str) -> set[str]:
    """Top-level ``/tmp/kvfs-*`` paths the document's code blocks use."""
    code = "\n".join(b.code + (b.replacement or "") for b in docs_runner.blocks(text))
    return {m.group(0) for m in re.finditer(r"/tmp/kvfs-[A-Za-z0-9_.-]+", code)}


def _unmount_under(*dirs: Path | str) -> None:
    with open("/proc/self/mounts") as f:
        points = [ln.split()[1] for ln in f if ln.split()[2].startswith("fuse")]
    for p in points:
        if any(p == str(d) or p.startswith(str(d).rstrip("/") + "/") for d in dirs):
            subprocess.run(["fusermount3", "-u", "-z", p], capture_output=True)


def _env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KVFS_", "AWS_", "XDG_", "PYTEST", "VIRTUAL_ENV"))}
    home = work / "home"
    (home / ".cache").mkdir(parents=True)
    (work / "run").mkdir()
    env.update(
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),  # the default store is ~/.cache/kvfs, the test's own
        XDG_RUNTIME_DIR=str(work / "run"),  # FUSE mounts' pid and log files
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        AWS_EC2_METADATA_DISABLED="true",  # no instance-metadata probing for credentials
        HF_HUB_OFFLINE="1",  # no network: models are built from configs
        VLLM_TARGET_DEVICE="cpu",  # vLLM's configs on a machine without a GPU
        TOKENIZERS_PARALLELISM="false",
    )
    return env


@pytest.mark.timeout(300)
@pytest.mark.parametrize("doc", _doc_params())
def test_document_runs(doc: Path, tmp_path: Path, request):
    text = doc.read_text(encoding="utf-8")
    code = _runnable_code(doc)
    if not code:
        pytest.skip(f"{_doc_id(doc)} has no shell or Python block")
    if "kvfs mount" in code and (why := _fuse_unusable()):
        pytest.skip(f"FUSE unusable here: {why}")
    if f"127.0.0.1:{S3_PORT}" in code:
        _reset_buckets(request.getfixturevalue("s3_endpoint"))
    work = tmp_path / "work"
    work.mkdir()
    tmp_paths = _tmp_paths(text)
    for p in tmp_paths:
        shutil.rmtree(p, ignore_errors=True)
    try:
        r = subprocess.run([sys.executable, str(ROOT / "tests" / "docs_runner.py"), str(doc), str(work)],
                           env=_env(tmp_path), capture_output=True, text=True, timeout=290)
    finally:
        _unmount_under(tmp_path, *tmp_paths)
        for p in tmp_paths:
            shutil.rmtree(p, ignore_errors=True)
    assert r.returncode == 0, f"{_doc_id(doc)} failed:\n{r.stdout[-8000:]}\n{r.stderr[-4000:]}"
    assert "DONE" in r.stdout


def test_every_block_that_does_not_run_is_a_listed_exception():
    found = {}
    for doc in DOCS:
        for b in docs_runner.blocks(doc.read_text(encoding="utf-8")):
            if b.lang and b.directive in ("skip", "instead"):
                assert b.reason, f"{_doc_id(doc)}:{b.line}: a {b.directive} needs a reason"
                if b.directive == "instead":
                    assert b.replacement and b.replacement.strip(), f"{_doc_id(doc)}:{b.line}: instead of what?"
                key = next((k for k in EXCEPTIONS if k[0] == _doc_id(doc) and b.code.startswith(k[1])), None)
                assert key is not None, (f"{_doc_id(doc)}:{b.line} is not run ({b.directive}: {b.reason}); "
                                         "list it in EXCEPTIONS if it must not run")
                assert EXCEPTIONS[key].startswith(b.directive), key
                found[key] = b
    assert set(found) == set(EXCEPTIONS), f"listed but not in the documents: {set(EXCEPTIONS) - set(found)}"


_LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    out = set()
    prose = docs_runner.FENCE.sub("", text)
    for m in re.finditer(r"^#{1,6}\s+(.*?)\s*$", prose, re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        out.add(slug)
    return out


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_links_resolve(doc: Path):
    text = doc.read_text(encoding="utf-8")
    prose = docs_runner.FENCE.sub("", text)
    for m in _LINK.finditer(prose):
        target = m.group("target")
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        assert dest.exists(), f"{_doc_id(doc)}: link to {target}: no such file"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest.read_text(encoding="utf-8")), f"{_doc_id(doc)}: no anchor {target}"


def test_every_document_is_linked_from_the_index_and_the_readme():
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "](docs/README.md)" in readme
    for doc in DOCS:
        if doc.parent.name != "docs" or doc.name == "README.md":
            continue
        assert f"]({doc.name}" in index, f"docs/README.md does not link {doc.name}"
        assert f"](docs/{doc.name}" in readme, f"README.md does not link docs/{doc.name}"
