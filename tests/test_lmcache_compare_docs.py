"""The LMCache comparison rewrites only its own section of docs/benchmarks.md."""

from __future__ import annotations

import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _load():
    path = os.path.join(HERE, "..", "benchmarks", "lmcache_compare.py")
    spec = importlib.util.spec_from_file_location("lmcache_compare_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_write_docs_replaces_only_its_section(tmp_path):
    lc = _load()
    doc = tmp_path / "benchmarks.md"
    before = "# Benchmarks\n\n## Store throughput (core)\n\nkeep me\n\n## kvfs vs LMCache\n\nold figures\n"
    doc.write_text(before + "\n## Later section\n\nkeep me too\n")
    lc.write_docs("new figures\n", str(doc))
    text = doc.read_text()
    assert "old figures" not in text
    assert text.count("new figures") == 1
    assert "## Store throughput (core)\n\nkeep me\n" in text and "## Later section\n\nkeep me too\n" in text
    lc.write_docs("newer\n", str(doc))  # idempotent shape: a second rewrite leaves one copy
    text = doc.read_text()
    assert "new figures" not in text and text.count("newer") == 1 and text.endswith("keep me too\n")


def test_write_docs_at_end_of_file(tmp_path):
    lc = _load()
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## kvfs vs LMCache\n")
    lc.write_docs("figures\n", str(doc))
    assert doc.read_text() == "# Benchmarks\n\n## kvfs vs LMCache\n\nfigures\n"
