"""``kvfs://`` through fsspec: the same namespace as the CLI, chunks as the bytes ``store.cat`` gives."""

from __future__ import annotations

import errno
import pickle

import fsspec
import numpy as np
import pytest
from s3servers import moto_server, s3_bucket_url  # noqa: F401  (fixtures)
from bitrot import flip_bit
from test_cli import P1, P2, SPEC, fill, kv_of

import kvfs
from kvfs.fsspec import KVFileSystem


@pytest.fixture
def url(tmp_path):
    return f"lmdb://{tmp_path}/store"


@pytest.fixture
def filled(url):
    return fill(url)


@pytest.fixture
def fs(url, filled):
    with fsspec.filesystem("kvfs", url=url) as f:
        yield f


def test_registered_with_fsspec_and_exported():
    assert fsspec.get_filesystem_class("kvfs") is KVFileSystem
    assert kvfs.KVFileSystem is KVFileSystem


def test_ls_info_exists(fs, filled):
    assert fs.ls("", detail=False) == [SPEC.model_dir]
    (model,) = fs.ls("")
    assert model["type"] == "directory" and model["size"] == 0 and model["tokens"] == filled["tokens"]
    assert fs.ls(SPEC.model_dir, detail=False) == [filled["ns"]]
    listing = fs.ls(filled["ns"], detail=True)
    assert listing[0]["name"] == f"{filled['ns']}/manifest.json" and listing[0]["type"] == "file"
    assert all(e["type"] == "directory" for e in listing[1:])
    files = fs.find(filled["ns"])
    assert sorted(f for f in files if f.endswith(".safetensors")) == filled["paths"]
    chunk = filled["p1"][0]
    info = fs.info("kvfs://" + chunk)
    assert info["name"] == chunk and info["type"] == "file" and info["tokens"] == 16 and not info["pinned"]
    assert fs.ls(chunk) == [info]  # ls of a file is its info, as in every fsspec filesystem
    assert fs.exists(chunk) and fs.isfile(chunk) and fs.isdir(filled["ns"])
    assert not fs.exists(chunk.replace(".safetensors", ".bin")) and not fs.exists("no/such")
    with pytest.raises(FileNotFoundError):
        fs.info("no-such-model")
    assert fs.ukey(chunk) == chunk.rsplit("/", 1)[1].removesuffix(".safetensors")
    assert fs.modified(chunk).timestamp() == pytest.approx(info["created"])
    assert fs.du(filled["ns"]) == sum(fs.info(p)["size"] for p in files)


def test_cat_and_open_read_the_same_bytes_as_store_cat(url, fs, filled):
    with kvfs.open(url) as store:
        expected = {p: store.cat(p) for p in filled["paths"]}
    for p in filled["paths"]:
        assert fs.cat(p) == expected[p]
        with fs.open(p, "rb") as f:
            assert f.read() == expected[p]
    p = filled["p1"][2]
    data = expected[p]
    assert fs.cat_file(p, 0, 8) == data[:8]
    assert fs.cat_file(p, -16) == data[-16:]
    assert fs.cat_file(p, 4096, 4100) == data[4096:4100]
    with fs.open(p, "rb", block_size=512) as f:  # ranged reads through small blocks
        f.seek(4096)
        assert f.read(100) == data[4096:4196]
        f.seek(10)
        assert f.read(5) == data[10:15]
        assert f.size == len(data)
    with fs.open(p, "rb", verify=True) as f:
        assert f.read() == data
    assert fs.cat(f"{filled['ns']}/manifest.json") == SPEC.manifest_bytes()


def test_fsspec_open_gives_bytes_safetensors_opens(url, filled):
    from safetensors.numpy import load

    p = filled["p1"][1]  # tokens 16..32 of P1
    with fsspec.open(f"kvfs://{p}", "rb", url=url) as f:
        tensors = load(f.read())
    assert list(tensors) == ["kv"]
    np.testing.assert_array_equal(tensors["kv"], kv_of(70)[:, :, 16:32])



def test_a_chunk_the_catalog_knows_no_size_of_reads_whole(url, filled):
    """A chunk the catalog learned of by probing a tier (another node wrote it) has no size recorded: info,
    ls and open take its true size from its header, so reads do not end at byte 0."""
    from kvfs.catalog import key_of_path

    p = filled["p1"][0]
    with kvfs.open(url) as store:
        good = store.cat(p)
        store.catalog.set_size(key_of_path(p), 0)
    with fsspec.filesystem("kvfs", url=url) as fs:
        assert fs.info(p)["size"] == len(good)
        assert {e["name"]: e["size"] for e in fs.ls(p.rsplit("/", 1)[0])}[p] == len(good)
        with fs.open(p, "rb") as f:
            assert f.read() == good
        assert fs.cat_file(p, 4096, 4200) == good[4096:4200]
    other = filled["p1"][1]  # a probed chunk whose header does not parse: EIO, and left out of listings
    with kvfs.open(url) as store:
        store.catalog.set_size(key_of_path(other), 0)
        store.tiers[0].backend.put(other, b"\xff" * 64)
    with fsspec.filesystem("kvfs", url=url) as fs:
        with pytest.raises(OSError) as e:
            fs.info(other)
        assert e.value.errno == errno.EIO
        listing = fs.ls(other.rsplit("/", 1)[0], detail=False)
        assert other not in listing

@pytest.mark.parametrize("how", ["open", "range", "cat"])
def test_a_corrupt_chunk_is_never_read_through_fsspec(tmp_path, how):
    """Every way of reading a chunk through fsspec checks it: ranged reads layer by layer, as the FUSE mount."""
    url = f"file://{tmp_path}/files"
    filled = fill(url)
    victim = filled["p1"][1]
    with kvfs.open(url) as store:
        good = store.cat(victim)
    from kvfs.chunk import parse_header

    header = parse_header(good)
    lb = header.layer_bytes
    flip_bit(f"{tmp_path}/files/{victim}", header.data_offset + lb + 7)  # layer 1
    with fsspec.filesystem("kvfs", url=url) as fs:
        # bytes before the bad layer are verified too, and served
        assert fs.cat_file(victim, 0, header.data_offset + lb) == good[: header.data_offset + lb]
        with pytest.raises(OSError) as e:
            if how == "open":
                with fs.open(victim, "rb") as f:
                    f.read()
            elif how == "range":
                fs.cat_file(victim, header.data_offset + lb, header.data_offset + lb + 16)
            else:
                fs.cat(victim)
        assert e.value.errno == errno.EIO and "failed its checks" in str(e.value)
        assert not fs.exists(victim)  # quarantined, as any read that finds it corrupt does


def test_fsspec_ranged_reads_need_a_valid_signature_in_a_signed_store(tmp_path, monkeypatch):
    url = f"lmdb://{tmp_path}/store"
    filled = fill(url)  # written without a key: unsigned chunks
    monkeypatch.setenv("KVFS_SIGNING_KEY", "the deployment key")
    with fsspec.filesystem("kvfs", url=url, read_only=True) as fs:
        with pytest.raises(OSError) as e:
            with fs.open(filled["p1"][0], "rb") as f:
                f.read()
        assert e.value.errno == errno.EIO and "not signed" in str(e.value)
        with pytest.raises(OSError):
            fs.cat_file(filled["p1"][0], 0, 64)


def test_rm_evicts_and_pinned_chunks_are_refused(url, fs, filled):
    a, b = filled["p1"][3], filled["p1"][4]
    fs.rm(b)
    assert not fs.exists(b)
    with kvfs.open(url) as store:
        with pytest.raises(kvfs.NotFound):
            store.stat(b)
        store.pin(a)
    with pytest.raises(PermissionError) as e:
        fs.rm(a)
    assert e.value.errno == errno.EPERM and "pinned" in str(e.value)
    assert fs.exists(a)
    fs.rm(a, force=True)
    assert not fs.exists(a)
    with pytest.raises(IsADirectoryError):
        fs.rm(filled["ns"])
    with pytest.raises(PermissionError):
        fs.rm(f"{filled['ns']}/manifest.json")
    with kvfs.open(url) as store:
        store.pin(filled["p1"][0])
    with pytest.raises(PermissionError):
        fs.rm(filled["ns"], recursive=True)  # evicts the rest, then says what it refused
    assert [p for p in fs.find(filled["ns"]) if p.endswith(".safetensors")] == [filled["p1"][0]]
    with pytest.raises(FileNotFoundError):
        fs.rm("no-such-model/x", recursive=True)


def test_writes_are_refused_with_a_clear_error(fs, filled):
    with pytest.raises(OSError) as e:
        fs.open(filled["p1"][0], "wb")
    assert e.value.errno == errno.EROFS and "kvfs cp" in str(e.value)
    for call in (lambda: fs.pipe_file("a/b/cd/x.safetensors", b"x"), lambda: fs.mkdir("x")):
        with pytest.raises(OSError):
            call()
    with pytest.raises(IsADirectoryError):
        fs.open(filled["ns"], "rb")


def test_a_directory_is_not_read_as_an_empty_file(fs, filled):
    for read in (lambda p: fs.cat_file(p), lambda p: fs.cat_file(p, 0, 10), lambda p: fs.cat_file(p, start=5),
                 lambda p: fs.cat_ranges([p], [0], [10], on_error="raise")):
        for p in ("", filled["ns"], filled["p1"][0].rsplit("/", 1)[0]):
            with pytest.raises(IsADirectoryError):
                read(p)


def test_instances_are_not_cached_and_close_their_store(url, filled):
    a = fsspec.filesystem("kvfs", url=url)
    b = fsspec.filesystem("kvfs", url=url)
    assert a is not b and a.store is not b.store
    a.close()
    assert a.store._closed and not b.store._closed
    assert b.ls("", detail=False) == [SPEC.model_dir]  # closing one does not break the other
    c = pickle.loads(pickle.dumps(b))  # e.g. sent to a dask worker: reopens the same store
    assert c.store is not b.store and c.ls("", detail=False) == [SPEC.model_dir]
    c.close()
    b.close()
    b.close()  # idempotent
    with kvfs.open(url) as store, KVFileSystem(store=store) as d:
        assert d.ls("", detail=False) == [SPEC.model_dir]
    # a store handed in stays the caller's: closing the filesystem leaves it open until the with-block ends


def test_default_store_is_kvfs_url(url, filled, monkeypatch):
    monkeypatch.setenv("KVFS_URL", url)
    with fsspec.filesystem("kvfs") as f:
        assert f.ls("", detail=False) == [SPEC.model_dir]


def test_chaining_over_file_storage(tmp_path):
    root = f"{tmp_path}/files"
    filled = fill(f"file://{root}")
    fs, path = fsspec.core.url_to_fs(f"kvfs::file://{root}")
    try:
        assert path == "" and fs.ls("", detail=False) == [SPEC.model_dir]
        assert fs.store.redacted_url == f"file://{root}"
    finally:
        fs.close()
    chunk = filled["p1"][0]
    with fsspec.open(f"kvfs://{chunk}::file://{root}", "rb") as f:
        data = f.read()
    with kvfs.open(f"file://{root}") as store:
        assert data == store.cat(chunk)


def test_chaining_a_kvfs_only_scheme_is_refused_by_fsspec(url, filled):
    with pytest.raises(ValueError, match="lmdb"):  # documented: give such stores as url=
        fsspec.core.url_to_fs(f"kvfs::{url}")
    with pytest.raises(kvfs.InvalidInput):
        KVFileSystem(url=url, target_protocol="file", fo="/tmp/x")


@pytest.mark.s3
def test_over_s3_by_url_and_by_chaining(tmp_path, s3_bucket_url, moto_server):
    filled = fill(s3_bucket_url)
    with fsspec.filesystem("kvfs", url=s3_bucket_url) as fs:
        assert fs.ls("", detail=False) == [SPEC.model_dir]
        data = fs.cat(filled["p1"][0])
    bucket_path = s3_bucket_url.split("?", 1)[0]
    fs, _ = fsspec.core.url_to_fs(f"kvfs::{bucket_path}", s3={"endpoint_url": moto_server})
    with fs:
        assert fs.store.redacted_url == f"{bucket_path}?endpoint_url={moto_server}"
        assert fs.cat(filled["p1"][0]) == data
        with fs.open(filled["p1"][0], "rb", block_size=1024) as f:
            f.seek(4096)
            assert f.read(64) == data[4096:4160]
    with kvfs.open(s3_bucket_url) as store:  # P2 reuses P1's first two whole chunks, then its own
        assert P1[:40] == P2[:40]
        assert store.namespace(SPEC).get(P2).tobytes() == np.concatenate(
            [kv_of(70)[:, :, :32], kv_of(70, seed=1)[:, :, 32:]], axis=2).tobytes()
