"""The FUSE mount, used the way an operator uses it: `kvfs mount`, then ls, cat, cp, rm, getfattr and
setfattr on real files, then `kvfs umount`. Mounts are real (libfuse3 through pyfuse3); the store is a real
LMDB (or file) store that this test process opens at the same time as the mount's server process."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

import kvfs
from kvfs.chunk import decode, parse_header
from kvfs.errors import IntegrityError, NotFound
from kvfs.fuse import mounted_fstype, process_alive
from s3servers import moto_server, s3_bucket_url  # noqa: F401  (fixtures)


def _why_fuse_unusable() -> str | None:
    try:
        import pyfuse3  # noqa: F401
        import trio  # noqa: F401
    except ImportError as e:
        return f"pyfuse3/trio are not installed ({e}): pip install 'kvfs[fuse]'"
    tool = shutil.which("fusermount3")
    if tool is None:
        return "fusermount3 is not installed (apt-get install fuse3)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist here (no FUSE in this kernel or container)"
    if os.getuid() == 0:
        try:
            os.close(os.open("/dev/fuse", os.O_RDWR))
        except OSError as e:
            return f"/dev/fuse cannot be opened here: {e.strerror}"
    elif not os.stat(tool).st_mode & stat.S_ISUID:
        return "fusermount3 is not setuid root and this is not root: unprivileged mounts are not possible"
    return None


_UNUSABLE = _why_fuse_unusable()
pytestmark = [pytest.mark.fuse, pytest.mark.timeout(120),
              pytest.mark.skipif(_UNUSABLE is not None, reason=f"FUSE unusable: {_UNUSABLE}")]
needs_attr = pytest.mark.skipif(shutil.which("getfattr") is None or shutil.which("setfattr") is None,
                                reason="getfattr/setfattr missing (apt-get install attr)")

SPEC = kvfs.KVSpec("test/fuse-bf16", num_layers=4, num_kv_heads=2, head_dim=16, dtype="bfloat16", chunk_tokens=32)
# 8 layers of 64 KiB: range reads, read-ahead and layer checks have something to chew on
WIDE = kvfs.KVSpec("test/fuse-f16", num_layers=8, num_kv_heads=4, head_dim=64, dtype="float16", chunk_tokens=64)


def tokens(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed + 1000).integers(0, 32000, n).tolist()


def kv(spec: kvfs.KVSpec, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(spec.chunk_shape(n), dtype=np.float32).astype(spec.numpy_dtype)


def put(url: str, spec: kvfs.KVSpec, n: int, seed: int) -> list[str]:
    """Store a prompt of ``n`` tokens; returns its chunk paths in order."""
    with kvfs.open(url) as store:
        ns = store.namespace(spec)
        toks = tokens(n, seed)
        ns.put(toks, kv(spec, n, seed))
        return [k.path for k in ns.keys(toks)]


def model_of(spec: kvfs.KVSpec, name: str) -> kvfs.KVSpec:
    """The same KV layout under its own model name: every test owns its part of the tree."""
    return kvfs.KVSpec(f"test/fuse-{name}", spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype,
                       spec.chunk_tokens)


def kvfs_cmd(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    script = os.path.join(os.path.dirname(sys.executable), "kvfs")
    base = [script] if os.path.exists(script) else [sys.executable, "-c", "from kvfs.cli import main; main()"]
    res = subprocess.run(base + list(args), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"kvfs {' '.join(args)} failed ({res.returncode}): {res.stderr}")
    return res


@pytest.fixture(scope="module", autouse=True)
def reaper():
    """Adopt the detached mount servers (as init would), so that umount tests can see them exit and reap them."""
    libc = ctypes.CDLL(None, use_errno=True)
    adopted = libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    yield adopted
    if adopted:
        libc.prctl(36, 0, 0, 0, 0)


def gone(pid: int, adopted: bool, timeout: float = 30) -> int | None:
    """Wait until the server ``pid`` no longer runs; its exit status if this process could reap it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if adopted:
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                got, status = 0, None
                if not process_alive(pid):
                    return None
            if got == pid:
                return os.waitstatus_to_exitcode(status)
        elif not process_alive(pid):
            return None
        time.sleep(0.02)
    raise AssertionError(f"mount server {pid} still runs {timeout} s after umount")


class Mounted:
    """``kvfs mount URL DIR [flags]`` ... ``kvfs umount DIR``, checking that the server exits cleanly."""

    def __init__(self, url: str, mnt: str, *flags: str, adopted: bool = True) -> None:
        self.url, self.mnt, self.flags, self.adopted = url, mnt, flags, adopted

    def __enter__(self) -> "Mounted":
        os.makedirs(self.mnt, exist_ok=True)
        kvfs_cmd("mount", "--log", self.mnt.rstrip("/") + ".log", *self.flags, self.url, self.mnt)
        assert mounted_fstype(self.mnt) == "fuse.kvfs"  # ready when the command returns
        self.pid = int(os.getxattr(self.mnt, "user.kvfs.pid"))
        return self

    def __exit__(self, *exc) -> None:
        res = kvfs_cmd("umount", self.mnt, check=False)
        if res.returncode != 0:  # leave no mount behind, then fail
            kvfs_cmd("umount", "--lazy", self.mnt, check=False)
            raise AssertionError(f"kvfs umount {self.mnt} failed: {res.stderr}")
        status = gone(self.pid, self.adopted)
        assert mounted_fstype(self.mnt) is None
        assert status in (0, None), f"mount server exited with status {status}"

    def path(self, store_path: str = "") -> str:
        return os.path.join(self.mnt, store_path)


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    return f"lmdb://{tmp_path_factory.mktemp('fuse')}/store"


@pytest.fixture(scope="module")
def mounted(store_url, tmp_path_factory, reaper):
    put(store_url, SPEC, 100, seed=0)  # something to see from the start
    with Mounted(store_url, str(tmp_path_factory.mktemp("mnt")), adopted=reaper) as m:
        yield m


@pytest.fixture(scope="module")
def store(store_url, mounted):
    """This process's own handle on the mounted store (LMDB: both processes use it at once)."""
    with kvfs.open(store_url) as s:
        yield s


def read(path) -> bytes:
    with open(path, "rb") as f:  # closed at once, even when an assertion fails (a busy mount cannot unmount)
        return f.read()


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# ------------------------------------------------------------------------------------------ reading
def test_ls_R_lists_what_was_put(mounted, store, store_url):
    spec = model_of(SPEC, "ls")
    put(store_url, spec, 100, seed=1)
    put(store_url, spec, 70, seed=2)
    out = subprocess.run(["ls", "-R", mounted.path(spec.model_dir)], capture_output=True, text=True, check=True)
    seen, cwd = set(), None
    for line in out.stdout.splitlines():
        if line.endswith(":"):
            cwd = os.path.relpath(line[:-1], mounted.mnt)
        elif line and cwd is not None:
            seen.add(f"{cwd}/{line}")
    files = {e.path for e in store.ls(spec.model_dir, recursive=True)}
    assert files and len(files) == 4 + 3 + 1  # chunks of both prompts and the manifest
    dirs = {p.rsplit("/", 1)[0] for p in files} | {spec.path}
    assert seen == files | {d for d in dirs if d != spec.model_dir}


def test_cat_of_every_file_equals_store_cat(mounted, store, store_url):
    spec = model_of(SPEC, "cat")
    paths = put(store_url, spec, 100, seed=3)
    for p in paths + [f"{spec.path}/manifest.json"]:
        got = subprocess.run(["cat", mounted.path(p)], capture_output=True, check=True).stdout
        assert got == store.cat(p), p


def test_range_reads_are_exact_and_the_layers_they_need_verified(mounted, store, store_url):
    spec = model_of(WIDE, "ranges")
    path = put(store_url, spec, 64, seed=4)[0]
    want = store.cat(path)
    h = parse_header(want)
    lb = h.layer_bytes
    probes = [(0, 8), (100, 4096), (h.data_offset - 10, 20), (h.data_offset + 3 * lb - 5, 10),
              (h.data_offset + 5 * lb + 123, 2 * lb), (len(want) - 7, 100), (len(want), 10), (len(want) + 5, 10)]
    fd = os.open(mounted.path(path), os.O_RDONLY)
    try:
        for off, n in reversed(probes):  # backwards: no read-ahead helps
            assert os.pread(fd, n, off) == want[off : off + n], (off, n)
    finally:
        os.close(fd)
    with open(mounted.path(path), "rb") as f:  # and sequentially, in odd sizes
        parts = []
        while chunk := f.read(50_000):
            parts.append(chunk)
    assert b"".join(parts) == want


def test_safetensors_opens_a_chunk_on_the_mount(mounted, store, store_url):
    from safetensors import safe_open

    spec = model_of(WIDE, "safetensors")
    path = put(store_url, spec, 100, seed=5)[1]  # the second chunk: 36 tokens
    header, expect = decode(store.cat(path), spec)
    with safe_open(mounted.path(path), framework="numpy") as f:
        assert list(f.keys()) == ["kv"]
        meta = f.metadata()
        tensor = f.get_tensor("kv")
    assert meta["key"] == path.rsplit("/", 1)[1].removesuffix(".safetensors") and meta["namespace"] == spec.namespace_id
    assert tensor.shape == spec.chunk_shape(36) and np.array_equal(tensor, expect)


def test_stat_and_statfs_show_the_store(mounted, store, store_url):
    spec = model_of(SPEC, "stat")
    path = put(store_url, spec, 32, seed=6)[0]
    entry = store.stat(path)
    st = os.stat(mounted.path(path))
    assert stat.S_ISREG(st.st_mode) and st.st_mode & 0o777 == 0o444
    assert st.st_size == entry.size == len(store.cat(path))
    assert abs(st.st_mtime - entry.created) < 1e-3
    assert abs(st.st_atime - store.stat(path).last_access) < 1e-3  # last access is the atime
    assert stat.S_ISDIR(os.stat(mounted.path(spec.path)).st_mode)
    du = subprocess.run(["du", "-sb", mounted.path(spec.model_dir)], capture_output=True, text=True, check=True)
    ns_bytes = sum(e.size for e in store.ls(spec.model_dir, recursive=True))
    assert int(du.stdout.split()[0]) == ns_bytes  # every byte counted once
    assert os.getxattr(mounted.path(spec.path), "user.kvfs.bytes") == str(store.stat(spec.path).size).encode()
    before = store.stat(path).last_access
    time.sleep(0.01)
    subprocess.run(["touch", mounted.path(path)], check=True)  # touch: used now, for LRU eviction
    assert store.stat(path).last_access > before
    vfs = os.statvfs(mounted.mnt)
    used = sum(u["used"] for u in store.usage())
    assert (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize == pytest.approx(used, abs=vfs.f_frsize)
    assert vfs.f_files == store.catalog.count() and vfs.f_namemax == 255


def test_a_chunk_the_catalog_knows_no_size_of_shows_its_true_size(mounted, store, store_url):
    from kvfs.catalog import key_of_path

    spec = model_of(SPEC, "probed")
    path = put(store_url, spec, 32, seed=13)[0]
    size = len(store.cat(path))
    store.catalog.set_size(key_of_path(path), 0)  # as when a lookup found it in a tier by probing
    assert os.stat(mounted.path(path)).st_size == size  # read from the chunk's header
    assert store.stat(path).size == size  # and written back to the catalog
    assert read(mounted.path(path)) == store.cat(path)


def test_chunks_stored_and_evicted_elsewhere_appear_and_vanish(mounted, store, store_url):
    spec = model_of(SPEC, "live")
    first = put(store_url, spec, 32, seed=7)[0]
    shard_dir = mounted.path(first.rsplit("/", 1)[0])
    assert wait_for(lambda: os.path.exists(mounted.path(first)))
    more = put(store_url, spec, 64, seed=8)  # another process stores chunks while mounted
    assert wait_for(lambda: all(os.path.exists(mounted.path(p)) for p in more), timeout=3)
    os.listdir(shard_dir)
    store.evict([first])  # ... and evicts one
    assert wait_for(lambda: not os.path.exists(mounted.path(first)), timeout=3)
    assert os.path.basename(first) not in (os.listdir(shard_dir) if os.path.isdir(shard_dir) else [])


# ------------------------------------------------------------------------------------------ managing
@needs_attr
def test_getfattr_shows_and_setfattr_sets_pins(mounted, store, store_url):
    spec = model_of(SPEC, "xattr")
    paths = put(store_url, spec, 64, seed=9)
    f = mounted.path(paths[1])
    out = subprocess.run(["getfattr", "-d", f], capture_output=True, text=True, check=True).stdout
    rec = store.records(paths[1])[0]
    for line in ('user.kvfs.tokens="32"', f'user.kvfs.parent="{rec.parent}"', 'user.kvfs.pinned="0"',
                 f'user.kvfs.hits="{rec.hits}"', f'user.kvfs.tier="{store.tiers[0].url.redacted()}"'):
        assert line in out, (line, out)
    subprocess.run(["setfattr", "-n", "user.kvfs.pinned", "-v", "1", f], check=True)
    assert store.stat(paths[1]).pinned
    subprocess.run(["setfattr", "-n", "user.kvfs.pinned", "-v", "1", f], check=True)  # a flag: still one pin
    assert store.stat(paths[1]).pins == 1
    got = subprocess.run(["getfattr", "--only-values", "-n", "user.kvfs.pinned", f], capture_output=True,
                         text=True, check=True).stdout
    assert got == "1"
    assert os.getxattr(mounted.path(spec.path), "user.kvfs.pinned") == b"1"  # a directory: chunks pinned under it
    subprocess.run(["setfattr", "-n", "user.kvfs.pinned", "-v", "0", f], check=True)
    assert not store.stat(paths[1]).pinned
    # a whole namespace at once
    os.setxattr(mounted.path(spec.path), "user.kvfs.pinned", b"1")
    assert all(store.stat(p).pinned for p in paths)
    os.setxattr(mounted.path(spec.path), "user.kvfs.pinned", b"0")
    assert not any(store.stat(p).pinned for p in paths)
    # the rest is read-only (setting the value it has is fine: cp -a, rsync -X), others do not exist
    os.setxattr(f, "user.kvfs.tokens", b"32")
    for name, value, code in (("user.kvfs.tokens", b"7", errno.EPERM), ("user.kvfs.pinned", b"maybe", errno.EINVAL),
                              ("user.other", b"x", errno.ENOTSUP)):
        with pytest.raises(OSError) as e:
            os.setxattr(f, name, value)
        assert e.value.errno == code, name
    with pytest.raises(OSError) as e:
        os.getxattr(f, "user.kvfs.nope")
    assert e.value.errno == errno.ENODATA


def test_rm_evicts_but_not_a_pinned_chunk(mounted, store, store_url):
    spec = model_of(SPEC, "rm")
    keep, drop = put(store_url, spec, 64, seed=10)
    store.pin(keep)
    res = subprocess.run(["rm", mounted.path(keep)], capture_output=True, text=True)
    assert res.returncode != 0 and "Operation not permitted" in res.stderr
    with pytest.raises(PermissionError) as e:
        os.unlink(mounted.path(keep))
    assert e.value.errno == errno.EPERM
    assert store.stat(keep).pinned and store.cat(keep)
    subprocess.run(["rm", mounted.path(drop)], check=True)
    with pytest.raises(NotFound):
        store.stat(drop)
    assert not os.path.exists(mounted.path(drop))
    shard = mounted.path(drop.rsplit("/", 1)[0])
    if keep.rsplit("/", 1)[0] != drop.rsplit("/", 1)[0]:
        assert os.listdir(shard) == []  # an emptied shard stays until rmdir, as on any filesystem
        os.rmdir(shard)
        assert not os.path.exists(shard)
    with pytest.raises(OSError) as e:
        os.rmdir(mounted.path(spec.path))
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(OSError) as e:
        os.unlink(mounted.path(f"{spec.path}/manifest.json"))
    assert e.value.errno == errno.EPERM


def test_a_plain_mount_refuses_every_other_change(mounted, store, store_url):
    spec = model_of(SPEC, "refuse")
    path = put(store_url, spec, 32, seed=11)[0]
    f = mounted.path(path)
    d = mounted.path(spec.path)
    attempts = {
        "create": lambda: open(os.path.join(d, "new.safetensors"), "wb"),
        "write in place": lambda: open(f, "r+b"),
        "truncate": lambda: os.truncate(f, 0),
        "mkdir": lambda: os.mkdir(os.path.join(d, "zz")),
        "rename": lambda: os.rename(f, f + ".old"),
        "chmod": lambda: os.chmod(f, 0o644),
        "link": lambda: os.link(f, os.path.join(d, "x")),
        "symlink": lambda: os.symlink(f, os.path.join(d, "y")),
    }
    for what, attempt in attempts.items():
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS, (what, e.value)
    assert store.cat(path) == read(f)


def test_a_corrupt_chunk_reads_eio_and_is_quarantined(mounted, store, store_url):
    spec = model_of(WIDE, "corrupt")
    path = put(store_url, spec, 64, seed=12)[0]
    good = store.cat(path)
    h = parse_header(good)
    bad = bytearray(good)
    bad[h.data_offset + 6 * h.layer_bytes + 77] ^= 0x40  # one bit of layer 6
    store.tiers[0].backend.put(path, bytes(bad))  # the store's bytes rot behind its back
    fd = os.open(mounted.path(path), os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, h.data_offset) == good[h.data_offset : h.data_offset + 4096]  # layer 0 is fine
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, h.data_offset + 6 * h.layer_bytes)
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
    with pytest.raises(IntegrityError):  # what this test tampered with is really corrupt
        store.validate_chunk(bytes(bad), path)
    # the server quarantined it: a miss from now on, everywhere
    assert wait_for(lambda: not store.records(spec.path))
    assert os.listdir(mounted.mnt)  # and the mount carries on


def test_an_open_chunk_evicted_elsewhere_keeps_its_attributes_and_reads_estale(mounted, store, store_url):
    """An open file whose chunk another process evicts: fstat still answers, and a read of bytes not yet
    served answers ESTALE (as documented), not ENOENT from the kernel's re-check of the attributes."""
    spec = model_of(WIDE, "stale")
    path = put(store_url, spec, 64, seed=14)[0]
    good = store.cat(path)
    fd = os.open(mounted.path(path), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel read-ahead: the end is not cached
        assert os.pread(fd, 4096, 0) == good[:4096]
        assert store.evict([path]).evicted == [path]
        time.sleep(1.6)  # past the attribute timeout and the time an open file holds its LMDB view
        assert os.fstat(fd).st_size == len(good)
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, len(good) - 4096)
        assert e.value.errno == errno.ESTALE
    finally:
        os.close(fd)
    with open(mounted.mnt.rstrip("/") + ".log") as f:  # the log names the chunk (not the inode its fh number is)
        assert f"read({path}): the chunk was evicted while open" in f.read()
    assert wait_for(lambda: not os.path.exists(mounted.path(path)))


# ------------------------------------------------------------------------------------------ importing
@pytest.fixture(scope="module")
def rw(tmp_path_factory, reaper):
    base = tmp_path_factory.mktemp("rw")
    url = f"lmdb://{base}/store"
    put(url, SPEC, 32, seed=20)  # the namespace exists here
    with Mounted(url, str(base / "mnt"), "--read-write", adopted=reaper) as m:
        with kvfs.open(url) as s:
            m.store = s
            yield m


@pytest.fixture(scope="module")
def donor(tmp_path_factory):
    """Another store, with chunks of the same namespace (and of another one) as files on local disk."""
    base = tmp_path_factory.mktemp("donor")
    url = f"lmdb://{base}/store"
    paths = put(url, SPEC, 100, seed=21)
    other = put(url, WIDE, 64, seed=22)
    files = {}
    with kvfs.open(url) as s:
        for p in paths + other:
            files[p] = base / p.rsplit("/", 1)[1]
            files[p].write_bytes(s.cat(p))
    return paths, other, files


def cp(src, dst) -> subprocess.CompletedProcess:
    return subprocess.run(["cp", str(src), str(dst)], capture_output=True, text=True)


def test_cp_of_a_valid_chunk_imports_it(rw, donor):
    paths, _, files = donor
    ns_dir = rw.path(SPEC.path)
    assert cp(files[paths[0]], ns_dir + "/").returncode == 0  # into the namespace directory
    shard = rw.path(paths[1].rsplit("/", 1)[0])
    os.makedirs(shard, exist_ok=True)  # or into its shard, made by mkdir if new
    assert cp(files[paths[1]], shard + "/").returncode == 0
    for p in paths[:2]:
        assert rw.store.cat(p) == files[p].read_bytes()
        assert read(rw.path(p)) == files[p].read_bytes()
    assert cp(files[paths[0]], ns_dir + "/").returncode == 0  # again: already held, nothing to do
    assert os.path.basename(paths[0]) in os.listdir(rw.path(paths[0].rsplit("/", 1)[0]))


def test_cp_of_a_bad_chunk_fails_einval_and_stores_nothing(rw, donor, tmp_path):
    paths, other, files = donor
    ns_dir = rw.path(SPEC.path)
    before = {r.key for r in rw.store.records()}
    good = files[paths[2]].read_bytes()
    h = parse_header(good)
    name = os.path.basename(paths[2])
    corrupt = bytearray(good)
    corrupt[h.data_offset + 5] ^= 1
    cases = {
        "corrupt": (name, bytes(corrupt)),
        "truncated": (name, good[:-100]),
        "named for another chunk": (os.path.basename(paths[3]), good),
        "of another namespace": (os.path.basename(other[0]), files[other[0]].read_bytes()),
        "not a chunk": (name, b'{"hello": "world"}'),
    }
    for what, (target, data) in cases.items():
        src = tmp_path / f"{what.replace(' ', '-')}.bin"
        src.write_bytes(data)
        res = cp(src, os.path.join(ns_dir, target))
        assert res.returncode != 0 and "Invalid argument" in res.stderr, (what, res.stderr)
        assert target not in os.listdir(ns_dir), what
    res = cp(files[paths[2]], os.path.join(ns_dir, "notes.txt"))
    assert res.returncode != 0 and "Invalid argument" in res.stderr
    assert {r.key for r in rw.store.records()} == before  # nothing stored
    for p in (paths[2], paths[3], other[0]):
        assert not os.path.exists(rw.path(p))
    # what a failed cp wrote is never read back: not over a stored chunk, not under a name stored later
    stored = paths[0]
    if not os.path.exists(rw.path(stored)):  # the test before imports it; this test must not depend on that
        assert cp(files[stored], ns_dir + "/").returncode == 0
    res = cp(tmp_path / "corrupt.bin", rw.path(stored))
    assert res.returncode != 0 and "Invalid argument" in res.stderr
    assert read(rw.path(stored)) == files[stored].read_bytes() == rw.store.cat(stored)
    assert cp(files[paths[2]], ns_dir + "/").returncode == 0
    assert read(rw.path(paths[2])) == good
    assert read(os.path.join(ns_dir, name)) == good


def test_rsync_style_temporary_file_then_rename_imports(rw, donor):
    paths, _, files = donor
    ns_dir = rw.path(SPEC.path)
    tmp = os.path.join(ns_dir, ".incoming.XYZ123")
    with open(tmp, "wb") as f:  # rsync writes a temporary name, closes it ...
        f.write(files[paths[3]].read_bytes())
    assert ".incoming.XYZ123" in os.listdir(ns_dir)
    os.rename(tmp, os.path.join(ns_dir, os.path.basename(paths[3])))  # ... and renames it into place
    assert rw.store.cat(paths[3]) == files[paths[3]].read_bytes()
    assert not os.path.exists(tmp)
    bad = os.path.join(ns_dir, ".bad.XYZ")
    with open(bad, "wb") as f:
        f.write(files[paths[3]].read_bytes()[:-1])
    with pytest.raises(OSError) as e:
        os.rename(bad, os.path.join(ns_dir, os.path.basename(paths[2])))
    assert e.value.errno == errno.EINVAL
    os.unlink(bad)
    assert ".bad.XYZ" not in os.listdir(ns_dir)
    with pytest.raises(OSError) as e:  # stored chunks are named by their content
        os.rename(rw.path(paths[3]), rw.path(paths[3]) + ".x")
    assert e.value.errno == errno.EPERM


def test_a_new_namespace_is_made_with_mkdir_and_its_manifest(rw, donor):
    _, other, files = donor
    ns = WIDE.path
    assert not os.path.exists(rw.path(ns))
    os.makedirs(rw.path(ns))
    chunk = files[other[0]]
    res = cp(chunk, rw.path(ns) + "/")  # no manifest yet: the namespace is unknown
    assert res.returncode != 0 and "Invalid argument" in res.stderr
    manifest = rw.path(ns) + "/manifest.json"
    with open(manifest, "wb") as f:
        f.write(b'{"not": "a manifest"}')  # closes with EINVAL ...
        with pytest.raises(OSError) as e:
            f.flush()
            os.fsync(f.fileno())
    assert e.value.errno == errno.EINVAL
    with open(manifest, "wb") as f:
        f.write(WIDE.manifest_bytes())
    assert read(manifest) == WIDE.manifest_bytes()
    assert cp(chunk, rw.path(ns) + "/").returncode == 0
    assert rw.store.cat(other[0]) == chunk.read_bytes()
    assert rw.store.spec_of(ns) == WIDE


def fresh_chunks(tmp_path, n_tokens: int, seed: int) -> dict:
    """Chunk files of SPEC that no store in this module holds yet: {store path: file}."""
    url = f"lmdb://{tmp_path}/src"
    paths = put(url, SPEC, n_tokens, seed=seed)
    files = {}
    with kvfs.open(url) as s:
        for p in paths:
            files[p] = tmp_path / os.path.basename(p)
            files[p].write_bytes(s.cat(p))
    return files


def test_shell_redirection_into_the_mount_imports(rw, tmp_path):
    """`cat chunk > MOUNT/ns/<hash>.safetensors`: the shell closes a descriptor of the new, still empty
    file before cat writes to its copy; that close must not refuse the file for good."""
    files = fresh_chunks(tmp_path, 64, seed=30)
    (path, src), (path2, src2) = files.items()
    dst = rw.path(f"{SPEC.path}/{os.path.basename(path)}")
    res = subprocess.run(["sh", "-c", 'cat "$1" > "$2"', "sh", str(src), dst], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert rw.store.cat(path) == src.read_bytes()
    assert read(rw.path(path)) == src.read_bytes()
    res = subprocess.run(["sh", "-c", 'cat "$1" > "$2"', "sh", str(src), rw.path(path)], capture_output=True,
                         text=True)  # over the stored chunk: the same bytes, nothing to do
    assert res.returncode == 0, res.stderr
    # the same through dup'ed descriptors, as any program that hands a file to a child does
    fd = os.open(rw.path(f"{SPEC.path}/{os.path.basename(path2)}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    fd2 = os.dup(fd)
    with pytest.raises(OSError) as e:
        os.close(fd)  # nothing written yet: not a chunk (yet)
    assert e.value.errno == errno.EINVAL
    os.write(fd2, src2.read_bytes())
    os.close(fd2)
    assert rw.store.cat(path2) == src2.read_bytes()
    # a file closed for good while empty is still refused, and not left behind
    name = "0" * 64 + ".safetensors"
    with pytest.raises(OSError) as e:
        with open(rw.path(f"{SPEC.path}/{name}"), "wb"):
            pass
    assert e.value.errno == errno.EINVAL
    assert wait_for(lambda: name not in os.listdir(rw.path(SPEC.path)))


def test_a_new_file_removed_while_open_is_not_stored(rw, tmp_path):
    files = fresh_chunks(tmp_path, 32, seed=31)
    ((path, src),) = files.items()
    dst = rw.path(f"{SPEC.path}/{os.path.basename(path)}")
    with open(dst, "wb") as f:
        f.write(src.read_bytes())
        f.flush()
        os.unlink(dst)  # removed before it was closed: gone, as on any filesystem
    assert os.path.basename(path) not in os.listdir(rw.path(SPEC.path))
    assert not os.path.exists(rw.path(path))
    with pytest.raises(NotFound):
        rw.store.stat(path)


@needs_attr
def test_a_pin_set_on_a_new_file_can_be_taken_back(rw, tmp_path):
    files = fresh_chunks(tmp_path, 32, seed=32)
    ((path, src),) = files.items()
    dst = rw.path(f"{SPEC.path}/{os.path.basename(path)}")
    with open(dst, "wb") as f:
        os.setxattr(dst, "user.kvfs.pinned", b"1")
        os.removexattr(dst, "user.kvfs.pinned")  # setfattr -x: not pinned after all
        with pytest.raises(OSError) as e:
            os.removexattr(dst, "user.other")
        assert e.value.errno == errno.ENODATA
        f.write(src.read_bytes())
    assert rw.store.cat(path) == src.read_bytes() and not rw.store.stat(path).pinned


def test_cp_into_a_full_store_fails_enospc_and_leaves_no_file(tmp_path, reaper):
    """The store cannot take the chunk (its only tier is full of pinned chunks): cp reports ENOSPC, and the
    name is not left in the directory as if it had been stored."""
    files = fresh_chunks(tmp_path, 64, seed=33)
    (path, src), _ = files.items()
    url = f"lmdb://{tmp_path}/store?capacity=30KiB"  # room for one chunk of SPEC (20 KiB)
    put(url, SPEC, 32, seed=34)
    with kvfs.open(url) as s:
        s.pin(SPEC.path)
    with Mounted(url, str(tmp_path / "mnt"), "--read-write", adopted=reaper) as m:
        ns_dir = m.path(SPEC.path)
        res = cp(src, ns_dir + "/")
        assert res.returncode != 0 and "No space left on device" in res.stderr, res.stderr
        assert wait_for(lambda: os.path.basename(path) not in os.listdir(ns_dir))
        assert not os.path.exists(os.path.join(ns_dir, os.path.basename(path)))
    with kvfs.open(url) as s:
        with pytest.raises(NotFound):
            s.stat(path)


# ------------------------------------------------------------------------------------------ lifecycle
def test_umount_waits_for_the_server_and_leaves_no_process(tmp_path, reaper):
    url = f"lmdb://{tmp_path}/store"
    put(url, SPEC, 40, seed=30)
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    kvfs_cmd("mount", "--log", str(tmp_path / "server.log"), url, mnt)
    pid = int(os.getxattr(mnt, "user.kvfs.pid"))
    assert process_alive(pid)
    f = open(os.path.join(mnt, SPEC.path, "manifest.json"), "rb")
    res = kvfs_cmd("umount", mnt, check=False)  # busy: refused, still mounted
    assert res.returncode == 1 and "busy" in res.stderr
    assert mounted_fstype(mnt) == "fuse.kvfs" and process_alive(pid)
    f.close()
    kvfs_cmd("umount", mnt)
    assert not process_alive(pid)  # gone by the time umount returns
    assert gone(pid, reaper) in (0, None)
    assert mounted_fstype(mnt) is None
    res = kvfs_cmd("umount", mnt, check=False)
    assert res.returncode == 1 and "not mounted" in res.stderr


def test_mount_errors_are_reported_and_leave_nothing_running(tmp_path, reaper):
    mnt = str(tmp_path / "mnt")
    log = str(tmp_path / "server.log")
    res = kvfs_cmd("mount", "--log", log, f"lmdb://{tmp_path}/s", mnt, check=False)
    assert res.returncode != 0 and "not a directory" in res.stderr
    os.makedirs(mnt)
    res = kvfs_cmd("mount", "--log", log, "nosuchscheme://x", mnt, check=False)
    assert res.returncode != 0 and "nosuchscheme" in res.stderr
    assert mounted_fstype(mnt) is None
    res = kvfs_cmd("mount", "--log", log, f"lmdb://{tmp_path}/typo", mnt, check=False)
    assert res.returncode == 1 and "does not exist" in res.stderr and mounted_fstype(mnt) is None
    os.makedirs(f"{tmp_path}/s")
    with Mounted(f"lmdb://{tmp_path}/s", mnt, adopted=reaper):
        res = kvfs_cmd("mount", "--log", log, f"lmdb://{tmp_path}/s", mnt, check=False)
        assert res.returncode != 0 and "already" in res.stderr


def test_mount_errors_show_words_and_no_secrets(tmp_path, reaper):
    """A failed mount names the store as the server's log does (secret-looking options hidden), and the
    errors read like every other kvfs command's: the words, no ``[Errno N]``."""
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    url = f"lmdb://{tmp_path}/s?secret_key=hunter2&bogus=1"  # an option LMDB does not take: the server fails
    res = kvfs_cmd("mount", "--read-write", "--log", str(tmp_path / "server.log"), url, mnt, check=False)
    assert res.returncode == 1 and mounted_fstype(mnt) is None
    line = res.stderr.strip().splitlines()[0]
    assert line.startswith("kvfs mount: cannot mount lmdb://") and "secret_key=***" in line, line
    assert "hunter2" not in res.stderr and "[Errno" not in res.stderr
    res = kvfs_cmd("umount", mnt, check=False)
    assert res.returncode == 1 and res.stderr.strip() == f"kvfs umount: {mnt} is not mounted"


def mount_options(mnt: str) -> tuple[str, set[str]]:
    """(source, options) of the mount at ``mnt``, from /proc/self/mountinfo."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mnt:
                sep = fields.index("-")
                return fields[sep + 2], set(fields[5].split(",")) | set(fields[sep + 3].split(","))
    raise AssertionError(f"{mnt} is not mounted")


def test_mount_options_suit_a_cache(mounted, tmp_path, reaper):
    source, opts = mount_options(mounted.mnt)
    assert source == "kvfs" and mounted_fstype(mounted.mnt) == "fuse.kvfs"
    assert {"default_permissions", "nosuid", "nodev", "noexec"} <= opts and "allow_other" not in opts
    if os.getuid() != 0:
        try:
            with open("/etc/fuse.conf") as f:
                allowed = any(line.strip() == "user_allow_other" for line in f)
        except OSError:
            allowed = False
        if not allowed:
            pytest.skip("--allow-other needs root or user_allow_other in /etc/fuse.conf")
    mnt = str(tmp_path / "mnt")
    os.makedirs(tmp_path / "store")  # an empty store: a read-only mount refuses a directory that does not exist
    with Mounted(f"lmdb://{tmp_path}/store", mnt, "--allow-other", adopted=reaper):
        assert "allow_other" in mount_options(mnt)[1]


def test_sigterm_unmounts_and_exits_cleanly(tmp_path, reaper):
    url = f"lmdb://{tmp_path}/store"
    put(url, SPEC, 32, seed=33)
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    kvfs_cmd("mount", "--log", str(tmp_path / "server.log"), url, mnt)
    pid = int(os.getxattr(mnt, "user.kvfs.pid"))
    os.kill(pid, 15)
    assert gone(pid, reaper) in (0, None)
    assert wait_for(lambda: mounted_fstype(mnt) is None)


def test_foreground_mount_serves_until_unmounted(tmp_path):
    url = f"lmdb://{tmp_path}/store"
    path = put(url, SPEC, 32, seed=31)[0]
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    script = os.path.join(os.path.dirname(sys.executable), "kvfs")
    base = [script] if os.path.exists(script) else [sys.executable, "-c", "from kvfs.cli import main; main()"]
    proc = subprocess.Popen(base + ["mount", "--foreground", "--log", str(tmp_path / "server.log"), url, mnt],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: mounted_fstype(mnt) == "fuse.kvfs" and os.path.exists(os.path.join(mnt, path)), 30)
        with kvfs.open(url) as s:
            assert read(os.path.join(mnt, path)) == s.cat(path)
        kvfs_cmd("umount", mnt)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
    assert mounted_fstype(mnt) is None


def test_a_failing_backend_answers_eio_and_the_mount_carries_on(tmp_path, reaper):
    url = f"file://{tmp_path}/files"
    a, b = put(url, SPEC, 64, seed=32)
    with Mounted(url, str(tmp_path / "mnt"), adopted=reaper) as m:
        victim = tmp_path / "files" / a
        victim.unlink()
        victim.mkdir()  # the backend's read now fails with EISDIR: an I/O error, not a missing chunk
        with pytest.raises(OSError) as e:
            read(m.path(a))
        assert e.value.errno == errno.EIO
        with kvfs.open(url) as s:
            assert read(m.path(b)) == s.cat(b)


@pytest.mark.s3
def test_a_store_on_s3_reads_back_through_the_mount(tmp_path, s3_bucket_url, reaper):
    spec = model_of(WIDE, "s3")
    paths = put(s3_bucket_url, spec, 100, seed=35)
    with Mounted(s3_bucket_url, str(tmp_path / "mnt"), adopted=reaper) as m, kvfs.open(s3_bucket_url) as s:
        assert sorted(os.listdir(m.path(spec.path))) == sorted({p.split("/")[2] for p in paths} | {"manifest.json"})
        want = s.cat(paths[0])
        h = parse_header(want)
        fd = os.open(m.path(paths[0]), os.O_RDONLY)
        try:  # a ranged read of one layer on the remote tier
            off = h.data_offset + 3 * h.layer_bytes + 1000
            assert os.pread(fd, 5000, off) == want[off : off + 5000]
        finally:
            os.close(fd)
        for p in paths:
            assert read(m.path(p)) == s.cat(p)


def test_a_hung_backend_answers_eio_after_the_io_timeout(tmp_path, reaper):
    url = f"file://{tmp_path}/files"
    a, b = put(url, SPEC, 64, seed=34)
    with Mounted(url, str(tmp_path / "mnt"), "--io-timeout", "1", adopted=reaper) as m:
        victim = tmp_path / "files" / a
        victim.unlink()
        os.mkfifo(victim)  # opening it blocks until a writer comes: a backend that hangs
        try:
            t0 = time.monotonic()
            with pytest.raises(OSError) as e:
                read(m.path(a))
            assert e.value.errno == errno.EIO and time.monotonic() - t0 < 30
            with kvfs.open(url) as s:  # the mount still answers
                assert read(m.path(b)) == s.cat(b)
        finally:
            fd = os.open(victim, os.O_RDWR | os.O_NONBLOCK)  # let the abandoned read finish
            os.close(fd)


# ------------------------------------------------------------------------------------------ the reader
def test_a_small_range_reads_one_layer_and_sequential_reads_read_ahead(tmp_path):
    from kvfs.fuse._reader import READAHEAD, ChunkReader

    url = f"lmdb://{tmp_path}/store"
    path = put(url, WIDE, 64, seed=40)[0]
    with kvfs.open(url) as store:
        want = store.cat(path)
        r = ChunkReader(store, path)
        r.open()
        lb = r.header.layer_bytes
        off = r.header.data_offset + 5 * lb + 100
        r._next = 1 << 40  # a reader that just read elsewhere: random access
        assert r.read_cached(off, 4096) is None
        assert r.plan(off, 4096) == (5, 6, 6)  # one layer, not the chunk
        r.fetch(5, 6)
        assert bytes(r.read_cached(off, 4096)) == want[off : off + 4096]
        r2 = ChunkReader(store, path)
        r2.open()
        assert r2.plan(0, 128 << 10) == (0, min(8, READAHEAD // lb), 2)  # from the start: a window ahead
        bad = bytearray(want)
        bad[r.header.data_offset + 2 * lb] ^= 1
        store.tiers[0].backend.put(path, bytes(bad))
        # r holds its view of the chunk (an LMDB snapshot of the intact bytes): it still serves them
        r.fetch(6, 7)
        assert bytes(r.read_cached(off + lb, 4096)) == want[off + lb : off + lb + 4096]
        r.close()
        r = ChunkReader(store, path)
        r.open()
        with pytest.raises(IntegrityError):
            r.fetch(2, 3)
        r3 = ChunkReader(store, path)
        r3.open()
        r3.fetch(0, 8, need=1)  # read-ahead over a corrupt layer: the layers before it are kept
        assert bytes(r3.read_cached(r.header.data_offset, 2 * lb)) == want[r.header.data_offset:][: 2 * lb]
        assert r3.read_cached(r.header.data_offset + 2 * lb, 10) is None
        with pytest.raises(IntegrityError):
            r3.fetch(2, 8, need=3)


def test_a_mapped_chunk_is_served_in_place_and_its_view_let_go(tmp_path):
    """LMDB chunks are checked and served from the map (no copy); the view (a read transaction) is let go
    after HOLD_SECONDS, never while a read waits on it, and by the store's close at the latest."""
    from kvfs.fuse._reader import HOLD_SECONDS, ChunkReader

    url = f"lmdb://{tmp_path}/store"
    path = put(url, WIDE, 64, seed=41)[0]
    store = kvfs.open(url)
    try:
        want = store.cat(path)
        r = ChunkReader(store, path)
        r.open()
        lb, d0 = r.header.layer_bytes, r.header.data_offset
        r.fetch(0, 4)
        got = r.read_cached(d0, 2 * lb)
        assert bytes(got) == want[d0 : d0 + 2 * lb]
        assert r._mapped is not None and r._mapped.open
        assert all(not w[3] for w in r._windows)  # slices of the map: nothing copied, nothing pooled
        later = time.monotonic() + HOLD_SECONDS + 1
        r.busy = 1  # a read waits on a fetch: its slice may come from the view
        assert not r.expire(later) and r._mapped is not None
        r.busy = 0
        assert r.expire(later) and r._mapped is None
        assert r.read_cached(d0, 10) is None  # the windows sliced from it are gone with it
        r.fetch(1, 2)  # taken again on the next read
        assert bytes(r.read_cached(d0 + lb, 100)) == want[d0 + lb : d0 + lb + 100]
        held = r._mapped
        r2 = ChunkReader(store, path)
        r2.open()
        r2.fetch(0, 1)
    finally:
        store.close()
    assert not held.open and not r2._mapped.open  # the store ended them before closing LMDB
    assert r.read_cached(d0 + lb, 100) is None  # nothing served from a closed view
    r.close()


def test_a_release_during_read_ahead_lets_the_read_ahead_finish_the_close(tmp_path):
    from kvfs.fuse._reader import ChunkReader

    url = f"lmdb://{tmp_path}/store"
    path = put(url, WIDE, 64, seed=42)[0]
    with kvfs.open(url) as store:
        r = ChunkReader(store, path)
        r.open()
        r.fetch(0, 1)
        r._sequential = True
        assert r.prefetch_plan() is not None  # a read-ahead is scheduled ...
        r.close()  # ... and the file is released before it ran: close leaves the view to it
        assert r._mapped is not None
        r.fetch_ahead(1, 4)  # nothing fetched for a closed file; the view is let go
        assert r._mapped is None and not r._windows


def test_an_idle_open_file_does_not_keep_an_lmdb_snapshot(tmp_path, reaper):
    """An open file reads from a held LMDB read transaction; the mount lets it go after HOLD_SECONDS even if
    the file stays open (an old snapshot would stop LMDB reusing pages: the file would grow)."""
    from kvfs.fuse._reader import HOLD_SECONDS

    url = f"lmdb://{tmp_path}/store"
    path = put(url, WIDE, 64, seed=43)[0]
    probe = ("import lmdb, sys; e = lmdb.open(sys.argv[1], readonly=True, lock=True, max_dbs=64); "
             "print(e.readers())")

    def active_readers() -> int:
        out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "store")], capture_output=True,
                             text=True, check=True).stdout
        # one line per reader slot: pid, thread, txnid ("-" when no transaction is open)
        return sum(1 for line in out.splitlines()[1:] if line.split() and line.split()[-1] != "-")

    with kvfs.open(url) as s:
        want = s.cat(path)
    with Mounted(url, str(tmp_path / "mnt"), adopted=reaper) as m:
        with open(m.path(path), "rb", buffering=0) as f:
            assert f.read(4096) == want[:4096]
            assert f.read(100_000) == want[4096:104_096]
            assert active_readers() >= 1  # the open file's view
            time.sleep(HOLD_SECONDS * 2 + 1)
            assert active_readers() == 0  # let go while the file is still open
            f.seek(len(want) - 70_000)
            assert f.read() == want[-70_000:]  # and taken again when needed


def test_open_files_past_the_mapped_limit_copy_instead(tmp_path, monkeypatch):
    """Each held view takes an LMDB reader slot: past MAX_MAPPED open files, reads copy through short views."""
    from kvfs.fuse import _reader

    monkeypatch.setattr(_reader, "MAX_MAPPED", _reader._slots_used + 2)
    url = f"lmdb://{tmp_path}/store"
    paths = put(url, WIDE, 192, seed=44)
    with kvfs.open(url) as store:
        readers = []
        for p in paths:
            r = _reader.ChunkReader(store, p)
            r.open()
            r.fetch(0, 2)
            d0 = r.header.data_offset
            assert bytes(r.read_cached(d0, 1000)) == store.cat(p)[d0 : d0 + 1000]
            readers.append(r)
        assert [r._mapped is not None for r in readers] == [True, True, False]
        assert all(w[3] for w in readers[2]._windows)  # the third copied into pooled buffers
        readers[0].close()  # its slot comes back
        r = _reader.ChunkReader(store, paths[2])
        r.open()
        r.fetch(0, 1)
        assert r._mapped is not None
        for x in readers[1:] + [r]:
            x.close()
