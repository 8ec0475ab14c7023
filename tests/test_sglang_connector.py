"""KVFSHiCacheStorage: SGLang's HiCache storage interface on real kvfs stores.

The backend is created the way SGLang creates it (``StorageBackendFactory.create_backend("dynamic", ...)``)
and driven with real tensors in SGLang's page formats. SGLang's host KV pools need torchvision, which
cannot share a process with transformers unless a shim defines its C ops (see the engines README), so the
host-pool tests (``test_hostpool_*``) run in a subprocess that has torchvision on its path and the shim in a
sitecustomize: ``.ci/install`` puts torchvision (--no-deps) in ``.venv/hostpool-torchvision`` for that, and
``$KVFS_TORCHVISION_DIR`` points elsewhere. Without it they are skipped, saying so.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang")

from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig  # noqa: E402
from sglang.srt.mem_cache.storage import StorageBackendFactory  # noqa: E402

import kvfs  # noqa: E402
from kvfs.connectors.sglang import KVFSHiCacheStorage, page_chunk_key  # noqa: E402

from s3servers import moto_server, s3_bucket_url  # noqa: E402,F401

pytestmark = pytest.mark.engines

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TV_DIR = os.environ.get("KVFS_TORCHVISION_DIR") or os.path.join(REPO, ".venv", "hostpool-torchvision")
IN_HOSTPOOL_PROCESS = os.environ.get("KVFS_SGLANG_HOSTPOOL") == "1"
HAS_FSSPEC_BACKEND = importlib.util.find_spec("kvfs.backends._fsspec") is not None

L, H, D, P = 3, 2, 8, 4  # layers, KV heads, head size, page size
GEOMETRY = {"num_layers": L, "num_kv_heads": H, "head_dim": D, "dtype": "bfloat16", "page_size": P}


def storage_config(url: str, tp_rank: int = 0, tp_size: int = 1, **extra) -> HiCacheStorageConfig:
    return HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=False, model_name="test/llama",
        extra_config={"backend_name": "kvfs", "module_path": "kvfs.connectors.sglang",
                      "class_name": "KVFSHiCacheStorage", "interface_v1": 1, "url": url, **extra},
    )


def backend(url: str, **kw) -> KVFSHiCacheStorage:
    b = StorageBackendFactory.create_backend("dynamic", storage_config(url, **kw), None)
    assert isinstance(b, KVFSHiCacheStorage) and isinstance(b, HiCacheStorage)
    return b


def page(seed: int) -> torch.Tensor:
    """A flat page in SGLang's layer_first order [2, layers, page, heads, dim], as get_dummy_flat_data_page."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2 * L * P * H * D, generator=g).to(torch.bfloat16)


KEYS = [f"{i:064x}" for i in range(1, 6)]  # SGLang page keys are sha256 hex strings


@pytest.fixture(params=["lmdb", "file", "s3"])
def url(request, tmp_path):
    if request.param == "lmdb":
        return f"lmdb://{tmp_path}/store"
    if request.param == "file":
        return f"file://{tmp_path}/store"
    if not HAS_FSSPEC_BACKEND:
        pytest.skip("the fsspec (S3) backend is not in this tree yet")
    return request.getfixturevalue("s3_bucket_url")


@pytest.mark.skipif(IN_HOSTPOOL_PROCESS, reason="runs in the main test process")
def test_set_get_exists_round_trips(url):
    b = backend(url, **GEOMETRY)
    pages = [page(i) for i in range(len(KEYS))]
    assert not b.exists(KEYS[0]) and b.batch_exists(KEYS) == 0
    assert b.set(KEYS[0], pages[0])
    assert b.exists(KEYS[0]) and b.batch_exists(KEYS) == 1
    assert b.batch_set(KEYS[1:3], pages[1:3])
    assert b.batch_exists(KEYS) == 3
    assert b.set(KEYS[0], pages[0])  # again: already stored, still True
    # into a host buffer
    buf = torch.zeros_like(pages[0])
    assert b.get(KEYS[1], buf) is buf and torch.equal(buf, pages[1])
    outs = b.batch_get(KEYS[:4], [torch.zeros_like(pages[0]) for _ in range(4)])
    assert [o is not None for o in outs] == [True, True, True, False]
    assert all(torch.equal(o, p) for o, p in zip(outs[:3], pages[:3]))
    b.close()
    # another server (a new backend on the same URL) sees the same pages
    b2 = backend(url, **GEOMETRY)
    assert b2.batch_exists(KEYS) == 3
    assert torch.equal(b2.get(KEYS[2], torch.zeros_like(pages[0])), pages[2])
    b2.close()


@pytest.mark.skipif(IN_HOSTPOOL_PROCESS, reason="runs in the main test process")
def test_pages_are_ordinary_verified_kvfs_chunks(tmp_path):
    url = f"file://{tmp_path}/store"
    b = backend(url, **GEOMETRY)
    assert b.batch_set(KEYS[:2], [page(0), page(1)])
    ck = page_chunk_key(b.spec, KEYS[0])
    with kvfs.open(url) as store:
        (entry,) = [e for e in store.ls(b.spec.path, recursive=True) if e.path == ck.path]
        assert entry.tokens == P
        info = store.info(ck.path, verify=True)
        assert "sglang" in str(info)
        assert store.fsck(verify=True).clean  # the chain check holds for page chunks
    # a flipped byte: the page is a miss (and quarantined), never wrong KV
    with open(os.path.join(tmp_path, "store", ck.path), "r+b") as f:
        f.seek(-3, os.SEEK_END)
        x = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([x[0] ^ 0x10]))
    assert b.get(KEYS[0], torch.zeros_like(page(0))) is None
    assert b.batch_exists(KEYS) == 0
    assert b.get(KEYS[1], torch.zeros_like(page(0))) is not None
    b.close()


@pytest.mark.skipif(IN_HOSTPOOL_PROCESS, reason="runs in the main test process")
def test_namespaces_keep_models_and_ranks_apart(tmp_path):
    url = f"lmdb://{tmp_path}/store"
    a = backend(url, **GEOMETRY)
    assert a.set(KEYS[0], page(0))
    other_rank = backend(url, tp_rank=1, tp_size=2, **GEOMETRY)
    other_model = backend(url, **GEOMETRY, model="test/other")
    other_dtype = backend(url, **{**GEOMETRY, "dtype": "float16"})
    for b in (other_rank, other_model, other_dtype):
        assert not b.exists(KEYS[0])
        b.close()
    # SGLang page chunks are never reachable by token-keyed lookups in the same namespace
    ns = a.store.namespace(a.spec)
    assert ns.lookup([0] * P) == 0 and ns.lookup([0] * (3 * P)) == 0
    a.close()


@pytest.mark.skipif(IN_HOSTPOOL_PROCESS, reason="runs in the main test process")
def test_missing_geometry_and_bad_pages_are_refused(tmp_path):
    b = backend(f"lmdb://{tmp_path}/store")
    with pytest.raises(RuntimeError, match="register the host pool"):
        b.exists(KEYS[0])
    b.close()
    b = backend(f"lmdb://{tmp_path}/store", **GEOMETRY)
    with pytest.raises(ValueError, match="a page holds"):
        b.set(KEYS[0], torch.zeros(7, dtype=torch.bfloat16))
    assert b.clear() is False  # never wipes a shared store
    b.close()


def test_hybrid_models_extra_host_pools_are_refused_when_attached(tmp_path):
    from sglang.srt.mem_cache.hicache_storage import PoolName

    b = backend(f"lmdb://{tmp_path}/store")
    try:
        b.register_mem_host_pool_v2(object(), PoolName.KV)  # the KV pool itself, as a pool group lists it
        for extra in (PoolName.MAMBA, PoolName.SWA, "indexer"):
            with pytest.raises(ValueError, match=f"keeps '{getattr(extra, 'value', extra)}' state"):
                b.register_mem_host_pool_v2(object(), extra)
    finally:
        b.close()


@pytest.mark.skipif(IN_HOSTPOOL_PROCESS, reason="runs in the main test process")
@pytest.mark.parametrize("extra, error", [
    # a misspelt key was ignored: no geometry (a RuntimeError at the first call), or another namespace
    ({**GEOMETRY, "num_layer": L}, "unknown extra_config key 'num_layer'; did you mean 'num_layers'"),
    ({**GEOMETRY, "modle": "test/other"}, "did you mean 'model'"),
    # four of the five geometry keys were silently ignored
    ({k: v for k, v in GEOMETRY.items() if k != "dtype"}, "all of .* or none; missing dtype"),
    ({**GEOMETRY, "page_size": "4x"}, "page_size must be a whole number"),  # was int()'s own message
    ({**GEOMETRY, "num_layers": True}, "num_layers must be a whole number"),  # was read as 1
    ({**GEOMETRY, "url": 3}, "url must be a string"),
])
def test_bad_extra_config_is_refused_naming_the_key(tmp_path, extra, error):
    cfg = storage_config(f"lmdb://{tmp_path}/store")
    cfg.extra_config.update(extra)
    with pytest.raises(ValueError, match=error):
        StorageBackendFactory.create_backend("dynamic", cfg, None)
    # SGLang's own keys (and other components') share the dict and are left alone
    b = backend(f"lmdb://{tmp_path}/store", **{**GEOMETRY, "page_size": "4"}, prefetch_threshold=64)
    assert b.spec.chunk_tokens == P
    b.close()


@pytest.mark.skipif(IN_HOSTPOOL_PROCESS, reason="runs in the main test process")
def test_a_model_served_from_a_local_directory_is_named_by_its_contents(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"rope_theta": 10000}')
    (ckpt / "model.safetensors").write_bytes(b"weights one")

    def spec(**extra):
        cfg = storage_config(f"lmdb://{tmp_path}/store", **GEOMETRY, **extra)
        cfg.model_name = str(ckpt)
        b = StorageBackendFactory.create_backend("dynamic", cfg, None)
        try:
            return b.spec
        finally:
            b.close()

    first = spec()
    assert first.revision.startswith("local-") and spec() == first
    (ckpt / "model.safetensors").write_bytes(b"weights two")  # another checkpoint saved at that path
    assert spec().revision not in ("", first.revision)
    assert spec(revision="r1").revision == "r1"


# ------------------------------------------------------------------------------------ host pools
SHIM = textwrap.dedent('''
    import glob, os, importlib.util as u, torch
    s = u.find_spec("torchvision")
    try:
        s and torch.ops.load_library(glob.glob(os.path.join(os.path.dirname(s.origin), "_C*.so"))[0])
    except (OSError, IndexError):
        L = torch.library.Library("torchvision", "FRAGMENT")
        [L.define(o + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor") for o in ("nms", "qnms")]
''')


@pytest.mark.skipif(IN_HOSTPOOL_PROCESS, reason="this is the launcher")
def test_host_pools_in_a_subprocess(tmp_path):
    if not os.path.isdir(os.path.join(TV_DIR, "torchvision")):
        pytest.skip(f"torchvision for SGLang's host pools is not in {TV_DIR} (.ci/install puts it there; "
                    "or set KVFS_TORCHVISION_DIR)")
    (tmp_path / "shim").mkdir()
    (tmp_path / "shim" / "sitecustomize.py").write_text(SHIM)
    env = dict(os.environ, KVFS_SGLANG_HOSTPOOL="1",
               PYTHONPATH=os.pathsep.join([str(tmp_path / "shim"), TV_DIR] + sys.path))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "hostpool_",
                        os.path.abspath(__file__)], capture_output=True, text=True, timeout=300, env=env,
                       cwd=REPO)
    tail = r.stdout[-3000:] + r.stderr[-3000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], tail


def host_pool(layout: str, tokens: int = 64, dtype=torch.bfloat16, cls=None):
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    dev = MHATokenToKVPool(tokens, page_size=P, dtype=dtype, head_num=H, head_dim=D, layer_num=L,
                           device="cpu", enable_memory_saver=False, start_layer=0, end_layer=L - 1)
    return (cls or MHATokenToKVPoolHost)(dev.get_device_pool_infos()[0].buffer_info, 2.0, host_size=0, page_size=P,
                                layout=layout, pin_memory=False, device="cpu", device_capacity_tokens=dev.size,
                                start_layer=0, end_layer=L - 1)


def pool_page(pool, index: int) -> torch.Tensor:
    """A page of a host pool as [2, layers, page, heads, dim], through SGLang's own get_data_page."""
    data = pool.get_data_page(index, flat=False)
    if pool.layout == "layer_first":
        return data.clone()
    if pool.layout == "page_first":
        return data.permute(0, 2, 1, 3, 4).clone()
    if pool.layout == "page_first_direct":
        return data[:, 0].clone()
    return data[:, 0].permute(0, 3, 2, 1, 4).clone()  # page_head [2, H, P, L, D]


LAYOUTS = ["layer_first", "page_first", "page_first_direct", "page_head"]


@pytest.mark.skipif(not IN_HOSTPOOL_PROCESS, reason="runs in the host-pool subprocess")
@pytest.mark.parametrize("write_layout", LAYOUTS)
def test_hostpool_zero_copy_round_trip_between_pools(tmp_path, write_layout):
    url = f"lmdb://{tmp_path}/store"
    src = host_pool(write_layout)
    w = StorageBackendFactory.create_backend("dynamic", storage_config(url), src)
    w.register_mem_pool_host(src)  # what SGLang's cache controller does after creating the backend
    idx = src.alloc(len(KEYS) * P)
    g = torch.Generator().manual_seed(7)
    src.kv_buffer.copy_(torch.randn(src.kv_buffer.shape, generator=g).to(torch.bfloat16))
    want = [pool_page(src, int(idx[i * P])) for i in range(len(KEYS))]
    assert w.batch_set_v1(KEYS, idx) == [True] * len(KEYS)
    assert w.batch_exists(KEYS) == len(KEYS)
    # every layout reads back exactly what any layout wrote
    for read_layout in LAYOUTS:
        dst = host_pool(read_layout)
        r = StorageBackendFactory.create_backend("dynamic", storage_config(url), dst)
        r.register_mem_pool_host(dst)
        didx = dst.alloc(len(KEYS) * P)
        assert r.batch_get_v1(KEYS, didx) == [True] * len(KEYS)
        for i in range(len(KEYS)):
            assert torch.equal(pool_page(dst, int(didx[i * P])), want[i]), (write_layout, read_layout, i)
        # the generic path agrees: get() into SGLang's own dummy flat page
        if read_layout == "layer_first":
            flat = r.get(KEYS[1], dst.get_dummy_flat_data_page())
            assert torch.equal(flat.reshape(2, L, P, H, D), want[1])
        r.close()
    w.close()


@pytest.mark.skipif(not IN_HOSTPOOL_PROCESS, reason="runs in the host-pool subprocess")
def test_hostpool_missing_pages_stop_a_zero_copy_read(tmp_path):
    url = f"lmdb://{tmp_path}/store"
    pool = host_pool("page_first")
    b = StorageBackendFactory.create_backend("dynamic", storage_config(url), pool)
    b.register_mem_pool_host(pool)
    idx = pool.alloc(3 * P)
    assert b.batch_set_v1([KEYS[0], KEYS[2]], torch.cat([idx[:P], idx[2 * P:]])) == [True, True]
    assert b.batch_exists(KEYS[:3]) == 1
    assert b.batch_get_v1(KEYS[:3], idx) == [True, False, True]
    with pytest.raises(ValueError, match="host indices"):
        b.batch_get_v1(KEYS[:3], idx[:5])
    b.close()


@pytest.mark.skipif(not IN_HOSTPOOL_PROCESS, reason="runs in the host-pool subprocess")
def test_hostpool_pools_kvfs_cannot_keep_apart_are_refused(tmp_path):
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    url = f"lmdb://{tmp_path}/store"
    # SGLang keeps fp8 KV as uint8 bytes: e4m3 and e5m2 pools look alike (was: "unsupported KV dtype torch.uint8")
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        pool = host_pool("page_first", dtype=dtype)
        b = StorageBackendFactory.create_backend("dynamic", storage_config(url), pool)
        with pytest.raises(ValueError, match="fp8 KV as raw bytes"):
            b.register_mem_pool_host(pool)
        b.close()

    class ScaledPool(MHATokenToKVPoolHost):  # as MHATokenToKVPoolMXFP8Host: more per page than the KV buffer
        pass

    pool = host_pool("page_first", cls=ScaledPool)
    b = StorageBackendFactory.create_backend("dynamic", storage_config(url), pool)
    with pytest.raises(ValueError, match="handles MHATokenToKVPoolHost pools, not ScaledPool"):
        b.register_mem_pool_host(pool)
    b.close()


@pytest.mark.skipif(IN_HOSTPOOL_PROCESS, reason="runs in the main test process")
def test_a_page_without_a_valid_signature_is_replaced_by_the_next_set(tmp_path, monkeypatch):
    """A signing server finds an unsigned page (left in place, a miss): its next set of that page writes it
    signed. It used to count the page as stored by its catalog record and skip it, a miss forever."""
    url = f"file://{tmp_path}/store"
    unsigned = backend(url, **GEOMETRY)
    assert unsigned.set(KEYS[0], page(0))
    unsigned.close()
    monkeypatch.setenv("KVFS_SIGNING_KEY", "team key")
    signed = backend(url, **GEOMETRY)
    assert signed.get(KEYS[0], torch.zeros_like(page(0))) is None
    assert signed.batch_exists(KEYS[:1]) == 0
    assert signed.set(KEYS[0], page(0))
    assert torch.equal(signed.get(KEYS[0], torch.zeros_like(page(0))), page(0))
    signed.close()
