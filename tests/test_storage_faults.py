"""Storage faults on the embedded store: a full map, a full disk, a directory we may not write."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import kvfs
from kvfs.errors import NoSpace, StoreError

SPEC = kvfs.KVSpec("faults/tiny", num_layers=4, num_kv_heads=4, head_dim=64, dtype="float16", chunk_tokens=64)
# one chunk: 4 layers * 2 * 64 tokens * 4 heads * 64 dim * 2 bytes = 256 KiB (+ 4 KiB header)


def kv_for(tokens):
    rng = np.random.default_rng(len(tokens) + int(tokens[0]))
    return rng.standard_normal(SPEC.chunk_shape(len(tokens)), dtype=np.float32).astype(np.float16)


def prompts(n):
    return [[i * 1000 + j for j in range(64)] for i in range(n)]


def _fill_until_full(ns):
    stored = []
    for p in prompts(200):
        try:
            ns.put(p, kv_for(p))
        except NoSpace as e:
            return stored, e
        stored.append(p)
    raise AssertionError("the store never filled up")


def _check_recovers(store, ns, stored, err):
    assert err.errno == errno.ENOSPC and isinstance(err, OSError)
    for p in stored:  # nothing half-written, everything before the error intact
        assert ns.get(p).tobytes() == kv_for(p).tobytes()
    assert store.fsck(verify=True).clean
    store.evict(all=True)
    p = prompts(300)[-1]
    ns.put(p, kv_for(p))  # usable again once space is freed
    assert ns.get(p).tobytes() == kv_for(p).tobytes()


def test_lmdb_map_full_is_enospc_and_recoverable(tmp_path):
    with kvfs.open(f"lmdb://{tmp_path}/s?map_size=4MiB") as store:
        ns = store.namespace(SPEC)
        stored, err = _fill_until_full(ns)
        assert 3 <= len(stored) < 16
        assert "map_size" in str(err)  # says how to fix it
        _check_recovers(store, ns, stored, err)


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_disk_full_is_enospc_and_recoverable(small_tmpfs):
    with kvfs.open(f"lmdb://{small_tmpfs}/s") as store:
        ns = store.namespace(SPEC)
        stored, err = _fill_until_full(ns)
        assert stored
        _check_recovers(store, ns, stored, err)


def test_permission_denied_names_the_directory(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user for the check")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    os.chmod(tmp_path, 0o755)
    code = textwrap.dedent(f"""
        import os, sys
        import tempfile, kvfs
        kvfs.open("lmdb://" + tempfile.mkdtemp()).close()  # load every module as root (root's python
        os.setgid(65534); os.setuid(65534)                 # is unreadable to nobody), then drop privileges
        try:
            kvfs.open("lmdb://{locked}/store")
        except PermissionError as e:
            print("EACCES" if e.errno == 13 else e.errno, e)
            sys.exit(0)
        sys.exit("no error")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, XDG_CACHE_HOME="/tmp"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("EACCES") and str(locked) in out.stdout
