"""Shared test set-up: no test touches ~/.cache or a user's $KVFS_URL."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest

_SESSION_TMP = tempfile.mkdtemp(prefix="kvfs-tests-")
os.environ.pop("KVFS_URL", None)
os.environ.pop("KVFS_SIGNING_KEY", None)
os.environ.pop("KVFS_SIGNING_KEY_FILE", None)
os.environ["XDG_CACHE_HOME"] = os.path.join(_SESSION_TMP, "xdg-cache")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

sys.path.insert(0, os.path.dirname(__file__))


def pytest_terminal_summary(terminalreporter):
    from fault_report import lines

    found = lines()
    if found:
        terminalreporter.section("fault suites")
        for line in found:
            terminalreporter.write_line(line)


def pytest_addoption(parser):
    parser.addoption("--soak", action="store_true", help="run long soak versions of fault tests")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_gpu = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on a GPU machine: pytest -m gpu)")
    skip_soak = pytest.mark.skip(reason="soak test: run with --soak")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not config.getoption("--soak"):
            item.add_marker(skip_soak)


@pytest.fixture
def store_dir(tmp_path):
    return str(tmp_path / "store")


@pytest.fixture
def lmdb_url(store_dir):
    return f"lmdb://{store_dir}"
