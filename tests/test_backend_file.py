"""file:// : one safetensors file per chunk, atomic puts, preadv reads, O_DIRECT, errno mapping, crash safety."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest

import kvfs
from kvfs.backends import ByteRange, InvalidKey, open_backend
from kvfs.backends._file import RESERVED, TMP_SUFFIX, FileBackend, kvikio_status
from kvfs.errors import BackendUnavailable, InvalidURL, NoSpace, PermissionDenied
from kvfs.testing import BackendSuite, backend_state_machine

SPEC = kvfs.KVSpec("file-test", num_layers=4, num_kv_heads=2, head_dim=64, dtype="float16", chunk_tokens=16)
IS_ROOT = os.geteuid() == 0


def _kv(spec, n, seed=0):
    return np.random.default_rng(seed).standard_normal(spec.chunk_shape(n)).astype(np.float16)


def _tokens(n, seed=0):
    return np.random.default_rng(seed + 100).integers(0, 50_000, n).tolist()


# ------------------------------------------------------------------------------------ conformance
class TestFileBackendConformance(BackendSuite):
    @pytest.fixture
    def backend(self, tmp_path):
        with FileBackend(str(tmp_path / "files")) as b:
            yield b

    def reopen(self, backend):
        backend.close()
        return FileBackend(backend.root)


class TestFileBackendFsyncAlways(BackendSuite):
    @pytest.fixture
    def backend(self, tmp_path):
        with FileBackend(str(tmp_path / "files"), fsync="always", direct="auto") as b:
            yield b

    def reopen(self, backend):
        backend.close()
        return FileBackend(backend.root, fsync="always")


TestFileMachine = backend_state_machine(lambda: FileBackend(tempfile.mkdtemp(prefix="kvfs-file-sm-"))).TestCase


# ------------------------------------------------------------------------------------ layout
def test_chunk_is_a_safetensors_file_with_aligned_data(tmp_path):
    from safetensors import safe_open

    root = tmp_path / "store"
    toks = _tokens(40)
    kv = _kv(SPEC, 40)
    with kvfs.open(f"file://{root}") as store:
        ns = store.namespace(SPEC)
        assert ns.put(toks, kv) == 3  # two whole chunks and a partial one
        keys = ns.keys(toks)
    for k in keys:
        path = root / k.path
        assert path.is_file(), f"{k.path} is not a file under {root}"
        assert k.path.split("/")[2] == k.hex[:2]  # hash-sharded directory
        raw = path.read_bytes()
        hlen = int.from_bytes(raw[:8], "little")
        assert (8 + hlen) % 4096 == 0, "tensor data must start at a multiple of 4096"
        with safe_open(str(path), framework="numpy") as f:
            t = f.get_tensor("kv")
        np.testing.assert_array_equal(t.view(np.float16), kv[:, :, k.start : k.end])
    assert (root / SPEC.path / "manifest.json").is_file()
    assert (root / RESERVED / "catalog").is_dir()
    # reopen: the catalog came back from <root>/.kvfs/catalog and the data reads byte-exact
    with kvfs.open(f"file://{root}") as store:
        ns = store.namespace(SPEC)
        assert ns.lookup(toks) == 40
        np.testing.assert_array_equal(ns.get(toks), kv)
        assert sorted(store.tiers[0].backend.list("")) == sorted([k.path for k in keys] + [f"{SPEC.path}/manifest.json"])


def test_reserved_and_temporary_names_are_never_keys(tmp_path):
    b = FileBackend(str(tmp_path))
    for bad in (RESERVED, f"{RESERVED}/catalog/data.mdb", f"{RESERVED}/x"):
        with pytest.raises(InvalidKey):
            b.put(bad, b"x")
    b.put("m/ns/aa/aa.safetensors", b"data")
    # a stray temporary file next to a chunk (e.g. written by an older version) is not listed
    (tmp_path / "m/ns/aa" / f"junk{TMP_SUFFIX}").write_bytes(b"partial")
    assert list(b.list("")) == ["m/ns/aa/aa.safetensors"]
    assert list(b.list("m/ns/a")) == ["m/ns/aa/aa.safetensors"]
    assert list(b.list("m/ns/b")) == []


def test_readinto_ranges_scatters_adjacent_parts_and_stops_at_eof(tmp_path):
    b = FileBackend(str(tmp_path))
    data = np.random.default_rng(1).integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    b.put("k/v", data)
    bufs = [bytearray(1000), bytearray(24), np.zeros(5000, np.uint8), bytearray(10), bytearray(200)]
    offs = [0, 1000, 1024, 50_000, 99_900]  # three adjacent, one alone, one crossing the end
    got = b.readinto_ranges("k/v", list(zip(offs, bufs)))
    assert got == [1000, 24, 5000, 10, 100]
    for off, buf, n in zip(offs, bufs, got):
        assert bytes(memoryview(buf)[:n]) == data[off : off + n]
    assert b.readinto_ranges("k/none", [(0, bytearray(4))]) is None
    # a 2-d destination (one layer's K and V planes) is filled through its raw bytes
    dest = np.zeros((2, 64), np.uint16)
    assert b.readinto_ranges("k/v", [(128, dest)]) == [256]
    assert dest.tobytes() == data[128:384]
    # byte ranges: several of one key with one open file
    got = b.get_ranges([ByteRange("k/v", 10, 20), ByteRange("k/v", 99_990, None), ByteRange("k/v", 200_000, None),
                        ByteRange("k/missing", 0, 3)])
    assert [None if g is None else bytes(g) for g in got] == [data[10:20], data[99_990:], b"", None]


def test_direct_io_reads_aligned_buffers_and_falls_back_for_others(tmp_path):
    b = FileBackend(str(tmp_path), direct="true")
    assert b.direct, "ext4 supports O_DIRECT; the probe should have found it"
    data = os.urandom(3 * 4096 + 100)
    b.put("k/v", data)
    aligned = mmap.mmap(-1, 2 * 4096)  # page aligned: eligible for O_DIRECT
    assert b.readinto_ranges("k/v", [(4096, aligned)]) == [2 * 4096]
    assert bytes(aligned) == data[4096 : 3 * 4096]
    odd = bytearray(4096 + 7)  # not aligned: buffered read, same bytes
    assert b.readinto_ranges("k/v", [(3, odd)]) == [len(odd)]
    assert bytes(odd) == data[3 : 3 + len(odd)]
    tail = mmap.mmap(-1, 4096)  # aligned read crossing the end of the file is short, not an error
    assert b.readinto_ranges("k/v", [(3 * 4096, tail)]) == [100]
    assert bytes(tail[:100]) == data[-100:]


@contextlib.contextmanager
def _mounted(fstype: str, options: str = ""):
    if not IS_ROOT:
        pytest.skip(f"mounting a {fstype} needs root")
    d = tempfile.mkdtemp(prefix=f"kvfs-{fstype}-")
    cmd = ["mount", "-t", fstype] + (["-o", options] if options else []) + [fstype, d]
    if subprocess.run(cmd, capture_output=True).returncode != 0:
        os.rmdir(d)
        pytest.skip(f"cannot mount a {fstype} here")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", d], capture_output=True)
        os.rmdir(d)


def test_direct_io_falls_back_cleanly_where_the_filesystem_refuses_it(caplog):
    with _mounted("ramfs") as d:  # ramfs refuses O_DIRECT opens with EINVAL
        with caplog.at_level("WARNING", logger="kvfs"):
            b = FileBackend(os.path.join(d, "s"), direct="true")
        assert not b.direct
        assert "O_DIRECT" in caplog.text
        data = os.urandom(3 * 4096)
        b.put("k/v", data)
        buf = mmap.mmap(-1, 4096)
        assert b.readinto_ranges("k/v", [(4096, buf)]) == [4096]
        assert bytes(buf) == data[4096:8192]


def test_full_device_is_nospace_and_leaves_nothing_behind():
    with _mounted("tmpfs", "size=1m") as d:
        b = FileBackend(os.path.join(d, "s"))
        b.put("m/ns/aa/small", b"x" * 1000)
        with pytest.raises(NoSpace) as ei:
            b.put("m/ns/bb/big", b"y" * (2 << 20))
        assert ei.value.errno == errno.ENOSPC
        assert "m/ns/bb/big" in str(ei.value)
        assert list(b.list("")) == ["m/ns/aa/small"]
        assert os.listdir(os.path.join(d, "s", RESERVED, "tmp")) == []
        # the store sees ENOSPC as an OSError with errno, and what was there is still there
        assert bytes(b.get("m/ns/aa/small")) == b"x" * 1000


_AS_NOBODY = textwrap.dedent(
    """
    import errno, os, sys
    from kvfs.backends._file import FileBackend  # import first: the interpreter may not be readable by nobody
    from kvfs.errors import PermissionDenied
    os.setgid(65534); os.setuid(65534)
    root, key = sys.argv[1], sys.argv[2]
    try:
        b = FileBackend(root)
        b.put(key, b"data")
    except PermissionDenied as e:
        print("DENIED", e.errno, e)
    else:
        print("WROTE")
    """
)


@pytest.mark.skipif(not IS_ROOT, reason="root bypasses permissions; the test drops to nobody")
def test_permission_denied_names_the_directory():
    base = tempfile.mkdtemp(prefix="kvfs-perm-")
    try:
        os.chmod(base, 0o755)
        locked = os.path.join(base, "locked")
        os.makedirs(locked, mode=0o755)
        run = lambda root, key: subprocess.run(  # noqa: E731
            [sys.executable, "-c", _AS_NOBODY, root, key], capture_output=True, text=True, timeout=60
        )
        # the store directory itself cannot be created
        out = run(os.path.join(locked, "store"), "m/ns/aa/k")
        assert out.stdout.startswith("DENIED 13"), out.stdout + out.stderr
        assert os.path.join(locked, "store") in out.stdout
        # the store exists and is writable by nobody, but one shard directory is not
        store = os.path.join(base, "store")
        FileBackend(store).put("m/ns/aa/first", b"x")
        for d, _, _ in os.walk(store):
            os.chmod(d, 0o777)
        os.chmod(os.path.join(store, "m/ns/aa"), 0o555)
        out = run(store, "m/ns/aa/second")
        assert out.stdout.startswith("DENIED 13"), out.stdout + out.stderr
        assert "m/ns/aa/second" in out.stdout
        assert os.listdir(os.path.join(store, RESERVED, "tmp")) == []
    finally:
        subprocess.run(["rm", "-rf", base])


def test_a_file_where_the_store_directory_should_be(tmp_path):
    f = tmp_path / "plain"
    f.write_bytes(b"x")
    with pytest.raises(OSError) as ei:
        FileBackend(str(f))
    assert str(f) in str(ei.value)


def test_bad_options_are_clear(tmp_path):
    with pytest.raises(InvalidURL, match="fsync"):
        open_backend(f"file://{tmp_path}?fsync=sometimes")
    with pytest.raises(InvalidURL, match="direct"):
        open_backend(f"file://{tmp_path}?direct=maybe")
    with pytest.raises(InvalidURL, match="bogus"):
        open_backend(f"file://{tmp_path}?bogus=1")
    b = open_backend(f"file://{tmp_path}?fsync=always&direct=auto")
    assert b.fsync == "always" and b.direct


def test_usage_and_flush(tmp_path):
    b = FileBackend(str(tmp_path))
    b.put("a/b", b"x" * 10_000)
    used, avail = b.usage()
    st = os.statvfs(tmp_path)
    # the filesystem's free space, give or take what other processes wrote or freed in between (seen in a run)
    assert abs(avail - st.f_bavail * st.f_frsize) <= 256 << 20 and used > 0
    b.flush()  # syncfs: must not raise
    FileBackend(str(tmp_path / "n"), fsync="never").flush()


def test_kvikio_is_detected_once_and_says_which_path(caplog):
    mod, why = kvikio_status()
    assert kvikio_status() == (mod, why)
    if mod is None:
        assert why.startswith("POSIX I/O")
        with pytest.raises(BackendUnavailable, match="kvikio"):
            FileBackend(tempfile.mkdtemp(), kvikio="true")
    else:
        assert "kvikio.CuFile" in why


@pytest.mark.gpu
def test_kvikio_reads_and_writes_device_buffers(tmp_path):
    import torch

    mod, why = kvikio_status()
    if mod is None:
        pytest.skip(why)
    b = FileBackend(str(tmp_path), kvikio="true")
    data = np.random.default_rng(2).integers(0, 256, 3 << 20, dtype=np.uint8)
    b.put("k/host", data.tobytes())
    dev = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    host = bytearray(4096)
    assert b.readinto_ranges("k/host", [(4096, dev), (4096 + (1 << 20), host)]) == [1 << 20, 4096]
    assert bytes(dev.cpu().numpy()) == data[4096 : 4096 + (1 << 20)].tobytes()
    assert bytes(host) == data[4096 + (1 << 20) : 8192 + (1 << 20)].tobytes()
    src = torch.arange(1 << 20, dtype=torch.int32, device="cuda")
    b.put("k/dev", src)
    assert bytes(b.get("k/dev")) == src.cpu().numpy().tobytes()
    # a verified store read through the file tier into a device tensor's host mirror stays byte-exact
    with kvfs.open(f"file://{tmp_path}/store") as store:
        ns = store.namespace(SPEC)
        toks, kv = _tokens(32), _kv(SPEC, 32)
        ns.put(toks, kv)
        np.testing.assert_array_equal(ns.get(toks), kv)


# ------------------------------------------------------------------------------------ crash safety
_WRITER = textwrap.dedent(
    """
    import os, sys
    from kvfs.backends._file import FileBackend
    b = FileBackend(sys.argv[1])
    b.put("m/ns/00/done", b"complete")
    print("ready", flush=True)
    big = os.urandom(1 << 20) * 256  # 256 MiB: the kill lands inside a write
    i = 0
    while True:
        b.put(f"m/ns/{i % 256:02x}/big-{i}", big)
        i += 1
    """
)


def test_sigkill_mid_put_leaves_no_visible_partial_file_and_reopens_clean(tmp_path):
    root = str(tmp_path / "store")
    tmp_dir = os.path.join(root, RESERVED, "tmp")
    p = subprocess.Popen([sys.executable, "-c", _WRITER, root], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until a temporary file is being filled
            names = os.listdir(tmp_dir)
            sizes = [os.stat(os.path.join(tmp_dir, n)).st_size for n in names if os.path.exists(os.path.join(tmp_dir, n))]
            if any(0 < s < (256 << 20) for s in sizes):
                break
            time.sleep(0.001)
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(30)
    assert p.returncode == -signal.SIGKILL
    leftovers = os.listdir(tmp_dir)
    assert leftovers and all(n.endswith(TMP_SUFFIX) and f".{p.pid}." in n for n in leftovers)
    b = FileBackend(root)  # reopen: the dead writer's temporary files are removed
    assert os.listdir(tmp_dir) == []
    keys = list(b.list(""))
    assert "m/ns/00/done" in keys
    for k in keys:  # every visible value is whole
        size = b.stat(k).size
        assert size in (len(b"complete"), 256 << 20), f"{k} is {size} bytes: a partial file is visible"


def test_temporary_files_of_live_writers_are_kept(tmp_path):
    b = FileBackend(str(tmp_path))
    tmp_dir = os.path.join(str(tmp_path), RESERVED, "tmp")
    mine = os.path.join(tmp_dir, os.path.basename(b._tmp_name()))
    open(mine, "wb").close()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        host = os.path.basename(mine).split(".")[0]
        live = os.path.join(tmp_dir, f"{host}.{other.pid}.abcdef{TMP_SUFFIX}")
        open(live, "wb").close()
        FileBackend(str(tmp_path))
        assert os.path.exists(live) and os.path.exists(mine)
    finally:
        other.kill()
        other.wait()
    FileBackend(str(tmp_path))
    assert not os.path.exists(live)


def test_store_over_file_tier_sigkilled_mid_put_reopens_and_fscks_clean(tmp_path):
    root = tmp_path / "store"
    script = textwrap.dedent(
        f"""
        import numpy as np, kvfs
        spec = kvfs.KVSpec("crash", 32, 8, 128, dtype="float16")
        with kvfs.open("file://{root}") as s:
            ns = s.namespace(spec)
            rng = np.random.default_rng(0)
            first = rng.integers(0, 1000, 256).tolist()
            ns.put(first, np.ones(spec.chunk_shape(256), np.float16))
            s.flush()
            print("ready", flush=True)
            while True:
                toks = rng.integers(0, 1000, 256 * 8).tolist()
                ns.put(toks, np.ones(spec.chunk_shape(len(toks)), np.float16))
        """
    )
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(30)
    with kvfs.open(f"file://{root}") as store:
        report = store.fsck(verify=True)
        assert not report.corrupt and not report.foreign, report.to_dict()
        assert report.chunks >= 1
        assert os.listdir(root / RESERVED / "tmp") == []


def test_store_reads_through_o_direct_are_exact(tmp_path):
    spec = kvfs.KVSpec("direct-test", num_layers=4, num_kv_heads=8, head_dim=128, dtype="float16", chunk_tokens=256)
    toks, kv = _tokens(600, 5), _kv(spec, 600, 5)  # planes of 512 KiB: aligned reads into kvfs's arrays
    with kvfs.open(f"file://{tmp_path}/s?direct=true") as store:
        assert store.tiers[0].backend.direct
        ns = store.namespace(spec)
        ns.put(toks, kv)
        got = ns.get(toks)
        np.testing.assert_array_equal(got, kv)
        out = np.zeros_like(kv)  # unaligned caller array: buffered reads, same bytes
        np.testing.assert_array_equal(ns.get(toks, out=out), kv)


def test_read_only_filesystem_needs_readonly_and_then_serves_reads():
    from kvfs.errors import ReadOnlyStore

    with _mounted("tmpfs", "size=16m") as d:
        root = os.path.join(d, "s")
        FileBackend(root).put("m/ns/aa/k", b"kept")
        if subprocess.run(["mount", "-o", "remount,ro", d], capture_output=True).returncode != 0:
            pytest.skip("cannot remount read-only here")
        with pytest.raises(ReadOnlyStore) as ei:
            FileBackend(root)
        assert ei.value.errno == errno.EROFS and root in str(ei.value)
        b = FileBackend(root, readonly="true")
        assert bytes(b.get("m/ns/aa/k")) == b"kept" and list(b.list("")) == ["m/ns/aa/k"]
        with pytest.raises(ReadOnlyStore):
            b.put("m/ns/aa/other", b"x")
        with pytest.raises(ReadOnlyStore):
            b.delete_many(["m/ns/aa/k"])
        b.flush()


# ------------------------------------------------------------------------ puts from the caller's KV
def _kv_layouts(spec, n, seed):
    """The same KV in the layouts engines hand kvfs: one contiguous array, chunks of a prompt-wide array
    (contiguous planes), and token-major memory (nothing contiguous: written through a scratch copy)."""
    kv = _kv(spec, n, seed)
    token_major = np.ascontiguousarray(kv.transpose(2, 0, 1, 3, 4)).transpose(1, 2, 0, 3, 4)
    assert not token_major[:, 0].flags.c_contiguous
    return kv, {"contiguous": kv.copy(), "token-major": token_major}


@pytest.mark.parametrize("signed", [False, True])
def test_file_puts_written_from_the_callers_kv_equal_encoded_chunks(tmp_path, signed):
    """file:// writes each chunk straight from the caller's arrays (no encoded copy); the files are byte for byte
    the chunks ``encode`` makes (what LMDB stores), in every source layout, signed or not."""
    key = "k" * 32 if signed else None
    toks = _tokens(100, 7)  # 6 whole chunks of 16 and a partial one
    kv, layouts = _kv_layouts(SPEC, 100, 7)
    with kvfs.open(f"lmdb://{tmp_path}/ref", signing_key=key) as ref:
        ref.namespace(SPEC).put(toks, kv)
        expected = {r.path: ref.cat(r.path) for r in ref.records("")}
    assert len(expected) == 7
    for name, src in layouts.items():
        with kvfs.open(f"file://{tmp_path}/{name}", signing_key=key) as store:
            assert store.tiers[0].backend.pending_puts
            ns = store.namespace(SPEC)
            assert ns.put(toks, src) == 7
            got = {r.path: store.cat(r.path) for r in store.records("")}
            assert got == expected, name
            np.testing.assert_array_equal(ns.get(toks), kv)
            assert store.fsck(verify=True).clean
            assert os.listdir(os.path.join(store.tiers[0].backend.root, RESERVED, "tmp")) == []


def test_pwritev_all_writes_past_iov_max_resuming_where_each_call_stopped(tmp_path):
    """More views than one pwritev takes: each call writes part, the next resumes after it (a short write's
    path); empty views are skipped."""
    from kvfs.backends._file import _IOV_MAX as IOV_MAX, _pwritev_all

    rng = np.random.default_rng(3)
    views = [memoryview(rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes())
             for _ in range(IOV_MAX * 2 + 17)]
    views.insert(5, memoryview(b""))
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        _pwritev_all(fd, list(views), 4096)
        _pwritev_all(fd, [memoryview(b"head")], 0)
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data[:4] == b"head" and data[4:4096] == bytes(4092)
    assert data[4096:] == b"".join(bytes(v) for v in views)


def test_put_failing_midway_into_file_leaves_no_partial_chunk(tmp_path, monkeypatch):
    """A write that fails after some layers (disk full here) leaves neither a visible file nor a catalog
    record for that chunk, and the store keeps working."""
    import kvfs.backends._file as fb

    real = fb._pwritev_all
    calls = {"n": 0}

    def flaky(fd, views, offset):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, views, offset)

    monkeypatch.setattr(fb, "_pwritev_all", flaky)
    toks = _tokens(16, 9)
    kv = _kv(SPEC, 16, 9)
    with kvfs.open(f"file://{tmp_path}/s") as store:
        ns = store.namespace(SPEC)
        with pytest.raises(NoSpace):
            ns.put(toks, kv)
        assert ns.lookup(toks) == 0 and store.records("") == []
        assert os.listdir(os.path.join(store.tiers[0].backend.root, RESERVED, "tmp")) == []
        monkeypatch.setattr(fb, "_pwritev_all", real)
        assert ns.put(toks, kv) == 1
        np.testing.assert_array_equal(ns.get(toks), kv)


def test_segment_puts_into_file_equal_encoded_chunks(tmp_path):
    """CacheBlend segments (position-independent keys, extra metadata) take the same copy-once path."""
    toks = _tokens(40, 11)
    kv = _kv(SPEC, 40, 11)
    extra = {"rope": "unrotated"}
    with kvfs.open(f"lmdb://{tmp_path}/ref") as ref, kvfs.open(f"file://{tmp_path}/f") as store:
        assert ref.namespace(SPEC).put_segment(toks, kv, positions=5, extra=extra) == 3
        assert store.namespace(SPEC).put_segment(toks, kv, positions=5, extra=extra) == 3
        expected = {r.path: ref.cat(r.path) for r in ref.records("")}
        assert {r.path: store.cat(r.path) for r in store.records("")} == expected


def test_a_batch_that_fails_part_way_records_the_chunks_already_in_place(tmp_path, monkeypatch):
    """ENOSPC on the 4th file written by one put of 6 chunks: the put fails, and the files renamed into place
    before it are in the catalog (counted against the tier, found by lookups, evictable); nothing else is."""
    import kvfs.backends._file as fb

    real = fb._pwritev_all
    files: set[int] = set()

    def flaky(fd, views, offset):
        files.add(os.fstat(fd).st_ino)
        if len(files) >= 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, views, offset)

    toks = _tokens(6 * 16, 21)
    kv = _kv(SPEC, 6 * 16, 21)
    with kvfs.open(f"file://{tmp_path}/s") as store:
        ns = store.namespace(SPEC)
        ns.put(_tokens(16, 22), _kv(SPEC, 16, 22))  # the namespace's manifest, and one chunk, in place first
        store.evict(all=True)
        monkeypatch.setattr(fb, "_pwritev_all", flaky)
        with pytest.raises(NoSpace):
            ns.put(toks, kv)
        records = store.records("")
        assert 1 <= len(records) < 6
        backend = store.tiers[0].backend
        on_disk = {k for k in backend.list("") if k.endswith(".safetensors")}
        assert {r.path for r in records} == on_disk  # every chunk file in place is recorded
        assert store.catalog.used(store.tiers[0].slot) == sum(backend.stat(r.path).size for r in records)
        assert ns.lookup(toks) == 16 * len(records)  # the leading chunks, written one after another
        monkeypatch.setattr(fb, "_pwritev_all", real)
        assert ns.put(toks, kv) == 6 - len(records)  # the retry writes only what is missing
        np.testing.assert_array_equal(ns.get(toks), kv)


def test_chunks_in_place_after_a_failed_batch_into_a_top_tier_are_also_copied_below(tmp_path, monkeypatch):
    """In a tiered store, the chunks recorded after a failed batch write are queued to the tier below like any
    other: a chunk only in the top tier could never be evicted from it."""
    calls = {"n": 0}
    real = FileBackend._posix_write

    def flaky(self, tmp, value):
        calls["n"] += 1
        if calls["n"] == 4:  # the second chunk of a batch (batches are as many chunks as the pool has workers)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tmp, value)

    toks = _tokens(6 * 16, 23)
    kv = _kv(SPEC, 6 * 16, 23)
    with kvfs.open(f"file://{tmp_path}/top::lmdb://{tmp_path}/low") as store:
        ns = store.namespace(SPEC)
        ns.put(_tokens(16, 24), _kv(SPEC, 16, 24))  # the namespace's manifests first
        store.flush()
        store.evict(all=True)
        monkeypatch.setattr(FileBackend, "_posix_write", flaky)
        with pytest.raises(NoSpace):
            ns.put(toks, kv)
        store.flush()  # waits for the copies to the tier below
        records = store.records("")
        assert len(records) == 3  # the chunks written before the failure
        top, low = store.tiers
        assert all(r.tiers == top.bit | low.bit for r in records)
        assert {k for k in top.backend.list("") if k.endswith(".safetensors")} == {r.path for r in records}
        monkeypatch.setattr(FileBackend, "_posix_write", real)
        assert ns.put(toks, kv) == 3
        np.testing.assert_array_equal(ns.get(toks), kv)
