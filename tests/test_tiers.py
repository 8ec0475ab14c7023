"""Tiered stores on real backends: write-back, promotion, capacity eviction, pins, a lower tier that goes away."""

from __future__ import annotations

import errno
import os
import threading
import time

import numpy as np
import pytest
from s3servers import FaultyProxy, eventually, make_bucket, moto_server  # noqa: F401
from seaweed import SeaweedServer, seaweed_available

import kvfs
import kvfs.tiers as kvfs_tiers
from kvfs.catalog import key_of_path
from kvfs.errors import CacheMiss, NoSpace, StoreError

SPEC = kvfs.KVSpec("tier-test", num_layers=2, num_kv_heads=2, head_dim=64, dtype="float16", chunk_tokens=64)
CHUNK = SPEC.bytes_per_token * SPEC.chunk_tokens  # tensor bytes of one chunk (the file adds a 4 KiB header)


def _prompt(n_chunks: int, seed: int):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, 50_000, n_chunks * SPEC.chunk_tokens).tolist()
    kv = rng.standard_normal(SPEC.chunk_shape(len(toks))).astype(np.float16)
    return toks, kv


def _in_tier(store, tier: int, ns, toks) -> list[bool]:
    return store.tiers[tier].backend.exists_many([k.path for k in ns.keys(toks)])


def _block_writes(root, ns, toks):
    """Make the first chunk of ``toks`` unwritable in the file tier at ``root`` (a file where its shard directory
    must go); returns that file: unlink it to make the tier writable again."""
    shard = root / ns.keys(toks)[0].path.rsplit("/", 1)[0]
    shard.parent.mkdir(parents=True, exist_ok=True)
    shard.write_bytes(b"in the way")
    return shard


# ------------------------------------------------------------------------------------ write-back
@pytest.mark.s3
def test_writeback_is_bounded_and_flushed_on_close(moto_server):
    proxy = FaultyProxy(moto_server)
    bucket = make_bucket(moto_server)
    try:
        proxy.delay = 0.05  # a slow lower tier: the producer must wait, not pile up memory
        url = f"memory://::s3://{bucket}/kv?endpoint_url={proxy.endpoint}"
        bound = 2 * CHUNK
        store = kvfs.open(url, writeback_bytes=bound)
        peak = [0]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], store._writeback._queued_bytes)
                time.sleep(0.001)

        sampler = threading.Thread(target=sample)
        sampler.start()
        ns = store.namespace(SPEC)
        prompts = [_prompt(3, seed) for seed in range(4)]
        try:
            for toks, kv in prompts:
                ns.put(toks, kv)
            assert store._writeback.pending > 0, "write-back finished before put returned: not in the background"
        finally:
            stop.set()
            sampler.join()
            store.close()  # flushes the write-back queue
        assert 0 < peak[0] <= bound + 4096 * 2, f"write-back queue held {peak[0]} bytes (bound {bound})"
        import boto3

        listed = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").list_objects_v2(
            Bucket=bucket, Prefix="kv/")
        names = {o["Key"] for o in listed.get("Contents", [])}
        with kvfs.open("memory://") as scratch:
            keys = [k.path for toks, _ in prompts for k in scratch.namespace(SPEC).keys(toks)]
        assert {f"kv/{k}" for k in keys} <= names, "close() returned before every chunk was written back"
    finally:
        proxy.close()


def test_write_back_writes_side_by_side_but_each_path_in_order():
    """Queued copies go out on several threads (a bucket takes PUTs side by side), but two copies of one path
    (a chunk replaced while its first copy is queued) never at once, and the newer one last."""
    lock = threading.Lock()
    active: list[str] = []
    most = [0]
    same_at_once = [False]
    written = []

    def write(job, tier_index):
        with lock:
            same_at_once[0] |= job.path in active
            active.append(job.path)
            most[0] = max(most[0], len(active))
        time.sleep(0.02)
        with lock:
            active.remove(job.path)
            written.append((job.path, bytes(job.data)))
        return True

    wb = kvfs_tiers.WriteBack(write, max_bytes=1 << 20, threads=4)
    for v in range(6):
        wb.submit(kvfs_tiers.WriteJob("same", bytes([v]), [1], lambda ti: None))
        wb.submit(kvfs_tiers.WriteJob(f"other-{v}", b"x", [1], lambda ti: None))
    assert wb.close() == []
    assert [d for p, d in written if p == "same"] == [bytes([v]) for v in range(6)]
    assert len(written) == 12 and most[0] > 1 and not same_at_once[0]


def test_a_submit_waiting_for_room_while_the_write_back_closes_is_written_or_refused():
    """A copy queued by a writer that waited for room in the queue while close() ran: close() writes it before
    it returns, or submit() refuses it (the store is closed); it is never left in a queue no thread drains, nor
    written by a thread started after close() returned."""
    for attempt in range(20):
        go = threading.Event()
        written = []

        def write(job, tier_index):
            go.wait(5)
            written.append(job.path)
            return True

        wb = kvfs_tiers.WriteBack(write, max_bytes=1, threads=2)
        wb.submit(kvfs_tiers.WriteJob("first", b"x", [1], lambda ti: None))
        closer = threading.Thread(target=wb.close)
        closer.start()
        time.sleep(0.02)  # close() waits for the first copy
        refused = []

        def submit():
            try:
                wb.submit(kvfs_tiers.WriteJob("second", b"y", [1], lambda ti: None))
            except StoreError:
                refused.append(True)

        submitter = threading.Thread(target=submit)
        submitter.start()
        time.sleep(0.02)  # it waits for room: the first copy holds the queue's bound
        go.set()
        closer.join(5)
        submitter.join(5)
        assert not closer.is_alive() and not submitter.is_alive()
        assert refused or "second" in written, f"attempt {attempt}: the second copy was accepted, never written"
        assert not any(t.is_alive() for t in wb._threads)


def test_flush_reports_writeback_failures_and_keeps_the_upper_copy(tmp_path):
    root = tmp_path / "files"
    with kvfs.open(f"memory://::file://{root}") as store:
        ns = store.namespace(SPEC)
        toks, kv = _prompt(2, 1)
        ns.put(toks, kv)
        store.flush()
        assert _in_tier(store, 1, ns, toks) == [True, True]
        # the lower tier's directory becomes unwritable (a file where a shard directory must go)
        toks2, kv2 = _prompt(1, 2)
        shard = _block_writes(root, ns, toks2)
        ns.put(toks2, kv2)
        with pytest.raises(StoreError) as ei:
            store.flush()
        assert ei.value.errno == errno.EIO and "written back" in str(ei.value)
        np.testing.assert_array_equal(ns.get(toks2), kv2)  # still served from the tier above
        with pytest.raises(StoreError):  # still owed, and still failing: every flush says so
            store.flush()
        # the lower tier is writable again: the copy owed since is written by the next flush, not forgotten
        shard.unlink()
        store.flush()
        assert _in_tier(store, 1, ns, toks2) == [True]
        rec = store.catalog.get(key_of_path(ns.keys(toks2)[0].path))
        assert rec.tiers & store.tiers[1].bit and store.catalog.owed() == []


def test_evicting_the_top_tier_keeps_chunks_not_yet_copied_below(tmp_path):
    """evict(tier=0) drops hot copies the tiers below also hold; a chunk whose write-back failed has its only
    copy there: it is kept (``not_copied``), and evicting it from every tier still removes it."""
    root = tmp_path / "files"
    with kvfs.open(f"lmdb://{tmp_path}/hot::file://{root}") as store:
        ns = store.namespace(SPEC)
        saved, kv = _prompt(2, 1)
        ns.put(saved, kv)
        store.flush()
        stuck, kv2 = _prompt(1, 2)
        shard = _block_writes(root, ns, stuck)  # its write-back fails
        ns.put(stuck, kv2)
        with pytest.raises(StoreError):
            store.flush()
        path = ns.keys(stuck)[0].path
        assert store.evict(all=True, tier=0, dry_run=True).not_copied == [path]
        res = store.evict(all=True, tier=0)
        assert res.not_copied == [path] and sorted(res.evicted) == sorted(k.path for k in ns.keys(saved))
        np.testing.assert_array_equal(ns.get(stuck), kv2)  # still there, in the top tier
        np.testing.assert_array_equal(ns.get(saved), kv)  # from the tier below
        shard.unlink()
        store.flush()  # written back now: the next eviction from the top tier takes it
        assert store.evict([path], tier=0).evicted == [path]
        np.testing.assert_array_equal(ns.get(stuck), kv2)
        assert store.evict([path]).evicted == [path] and ns.lookup(stuck) == 0  # from every tier: removed


def test_flush_counts_a_chunk_that_failed_twice_once(tmp_path):
    # a copy that failed before flush() is queued again by flush's resync and fails again: one chunk, not two
    root = tmp_path / "files"
    with kvfs.open(f"memory://::file://{root}") as store:
        ns = store.namespace(SPEC)
        toks, kv = _prompt(1, 5)
        _block_writes(root, ns, toks)
        ns.put(toks, kv)
        store._writeback.flush(take_errors=False)  # failed once; its error waits for flush()
        with pytest.raises(StoreError, match=r"^\[Errno 5\] 1 chunk\(s\) could not be written back"):
            store.flush()


def test_a_second_outage_soon_after_the_first_is_resynced_too(tmp_path, monkeypatch):
    """A lower tier that fails again moments after it came back (within the resync interval): the copies that
    failed the second time are queued again by a later write that succeeds, without a flush (a serving
    process never calls one). They were owed until the process exited: never in the lower tier, and never
    evictable from the upper one."""
    import kvfs.store

    monkeypatch.setattr(kvfs.store, "RESYNC_INTERVAL_S", 1.0)
    root = tmp_path / "files"
    with kvfs.open(f"memory://::file://{root}") as store:
        ns = store.namespace(SPEC)

        def fail_then_recover(seed_failing, seed_ok):
            toks = _prompt(1, seed_failing)[0]
            shard = _block_writes(root, ns, toks)  # this chunk's write-back fails
            ns.put(*_prompt(1, seed_failing))
            store._writeback.flush(take_errors=False)
            shard.unlink()
            ns.put(*_prompt(1, seed_ok))  # a write-back that succeeds: the tier is back
            store._writeback.flush(take_errors=False)
            return toks

        first = fail_then_recover(11, 12)
        deadline = time.monotonic() + 10
        while _in_tier(store, 1, ns, first) != [True] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _in_tier(store, 1, ns, first) == [True]  # queued again when the tier came back
        second = fail_then_recover(13, 14)  # fails and recovers again at once: no second pass yet
        time.sleep(1.2)
        ns.put(*_prompt(1, 15))  # a later write-back succeeds, past the interval
        deadline = time.monotonic() + 10
        while _in_tier(store, 1, ns, second) != [True] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _in_tier(store, 1, ns, second) == [True], store.catalog.owed()
        assert store.catalog.owed() == []


def test_a_copy_owed_by_a_chunk_no_tier_above_holds_any_more_is_forgiven(tmp_path):
    """Written to the top tier; its copy to the middle tier failed, the one to the bottom tier landed; then it
    was evicted from the top by hand: nothing above the middle tier holds it, so nothing is owed any more."""
    root = tmp_path / "files"
    with kvfs.open(f"memory://::file://{root}::lmdb://{tmp_path}/l") as store:
        ns = store.namespace(SPEC)
        toks, kv = _prompt(1, 3)
        shard = _block_writes(root, ns, toks)
        ns.put(toks, kv)
        with pytest.raises(StoreError):
            store.flush()
        assert len(store.catalog.owed()) == 1
        store.evict([ns.keys(toks)[0].path], tier=0)
        shard.unlink()
        store.flush()  # resyncs: no source above the file tier; forgiven, not kept forever
        assert store.catalog.owed() == []
        np.testing.assert_array_equal(ns.get(toks), kv)  # from the bottom tier


_KILLED_WRITER = """
import os, signal, sys
import numpy as np
import kvfs
from test_tiers import SPEC, _prompt
store = kvfs.open(sys.argv[1])
toks, kv = _prompt(3, 90)
store.namespace(SPEC).put(toks, kv)
assert store._writeback.pending, "the write-back finished before the kill: nothing was lost"
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.s3
def test_copies_a_killed_process_owed_the_bucket_are_written_by_the_next_process(moto_server, tmp_path):
    """A process killed while its chunks' copies to the bucket were queued: they are in its local tier only. The
    next process to open the store queues them again (they would otherwise never reach the bucket, where other
    nodes look, and could never be evicted from the local tier, which gives up only chunks a lower tier holds)."""
    import subprocess
    import sys

    proxy = FaultyProxy(moto_server)
    bucket = make_bucket(moto_server)
    try:
        url = f"lmdb://{tmp_path}/local?capacity={8 * (CHUNK + 4096)}::s3://{bucket}/kv?endpoint_url={proxy.endpoint}"
        proxy.delay = 1.0  # each PUT to the bucket takes a second: the kill comes first
        env = dict(os.environ, PYTHONPATH=os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        p = subprocess.run([sys.executable, "-c", _KILLED_WRITER, url], env=env, capture_output=True, text=True)
        assert p.returncode == -9, p.stderr
        proxy.delay = 0.0
        toks, kv = _prompt(3, 90)
        with kvfs.open(url) as store:
            ns = store.namespace(SPEC)
            assert ns.lookup(toks) == len(toks)  # the local tier has them
            store.flush()  # waits for the copies queued again at open
            assert _in_tier(store, 1, ns, toks) == [True, True, True]
            assert store.catalog.owed() == []
            assert all(r.tiers & store.tiers[1].bit for r in store.records(""))
            for seed in range(91, 95):  # so the local tier can make room by giving them up
                ns.put(*_prompt(3, seed))
                store.flush()
            assert store.catalog.used(store.tiers[0].slot) <= 8 * (CHUNK + 4096)
        with kvfs.open(f"memory://::s3://{bucket}/kv?endpoint_url={proxy.endpoint}") as other:  # another node
            np.testing.assert_array_equal(other.namespace(SPEC).get(toks), kv)
    finally:
        proxy.close()


@pytest.mark.s3
def test_chunks_evicted_while_their_write_back_is_in_flight_stay_evicted(moto_server):
    """evict(all=True) right after a put, with the copies to a slow S3 tier still queued: the eviction waits for
    them, so the store ends empty (a copy landing after it would have put the chunk back in the S3 tier); evicting
    only the top tier keeps the S3 copies."""
    proxy = FaultyProxy(moto_server)
    bucket = make_bucket(moto_server)
    try:
        proxy.delay = 0.2
        with kvfs.open(f"memory://::s3://{bucket}/kv?endpoint_url={proxy.endpoint}") as store:
            ns = store.namespace(SPEC)
            toks, kv = _prompt(3, 70)
            ns.put(toks, kv)
            assert store._writeback.pending > 0, "write-back finished before the eviction: nothing in flight"
            assert len(store.evict(all=True).evicted) == 3
            store.flush()
            assert store.records("") == [] and ns.lookup(toks) == 0
            assert _in_tier(store, 1, ns, toks) == [False, False, False]
            ns.put(toks, kv)
            assert store._writeback.pending > 0
            assert len(store.evict(all=True, tier=0).evicted) == 3  # only the memory tier
            assert _in_tier(store, 1, ns, toks) == [True, True, True] and ns.lookup(toks) == len(toks)
            np.testing.assert_array_equal(ns.get(toks), kv)  # from S3
    finally:
        proxy.close()


@pytest.mark.s3
@pytest.mark.parametrize("status,code", [(403, "AccessDenied"), (503, "ServiceUnavailable")])
def test_a_bucket_that_keeps_failing_does_not_stall_flush_chunk_by_chunk(moto_server, status, code):
    """A bucket that refuses every write (wrong credentials) or keeps answering 503: the first chunk's write-back
    fails (at once for a 403; after its retries for a 503), and the chunks queued behind it fail fast instead of
    each going through the same retries again: flush()/close() do not take minutes with a full queue."""
    proxy = FaultyProxy(moto_server)
    bucket = make_bucket(moto_server)
    try:
        with kvfs.open(f"memory://::s3://{bucket}/kv?endpoint_url={proxy.endpoint}&timeout=2") as store:
            ns = store.namespace(SPEC)
            proxy.fail(100_000, status, code)
            toks, kv = _prompt(10, 80)
            t0 = time.monotonic()
            ns.put(toks, kv)
            with pytest.raises(StoreError) as ei:
                store.flush()
            took = time.monotonic() - t0
            assert "10 chunk(s)" in str(ei.value)
            assert took < (3 if status == 403 else 15), f"flush took {took:.1f} s failing 10 write-backs"
            np.testing.assert_array_equal(ns.get(toks), kv)  # still served from the memory tier
            proxy.reset()
    finally:
        proxy.close()


# ------------------------------------------------------------------------------------ promotion
@pytest.mark.parametrize("lower", ["file", "lmdb"])
def test_lower_tier_hits_are_promoted(tmp_path, lower):
    url = f"memory://::{lower}://{tmp_path}/{lower}"
    toks, kv = _prompt(3, 3)
    with kvfs.open(url) as store:
        store.namespace(SPEC).put(toks, kv)
    with kvfs.open(url) as store:  # a new process-local memory tier: empty
        ns = store.namespace(SPEC)
        assert _in_tier(store, 0, ns, toks) == [False] * 3
        assert ns.lookup(toks) == len(toks)
        np.testing.assert_array_equal(ns.get(toks), kv)
        assert _in_tier(store, 0, ns, toks) == [True] * 3, "a hit in the lower tier was not promoted"
        recs = store.records(SPEC.path)
        assert all(r.tiers & store.tiers[0].bit and r.tiers & store.tiers[1].bit for r in recs)
        # the next read is served from memory: remove the lower copies behind the store's back
        store.tiers[1].backend.delete_many([k.path for k in ns.keys(toks)])
        np.testing.assert_array_equal(ns.get(toks), kv)


def test_layer_subset_read_from_a_file_tier_promotes_whole_chunks(tmp_path):
    url = f"memory://::file://{tmp_path}/f"
    toks, kv = _prompt(2, 4)
    with kvfs.open(url) as store:
        store.namespace(SPEC).put(toks, kv)
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        plan = ns.plan(toks)
        dest = np.zeros(SPEC.chunk_shape(len(toks)), np.float16).view(np.uint16)
        assert ns.read(plan, dest[1:2], layers=range(1, 2)) == [True, True]
        np.testing.assert_array_equal(dest[1:2].view(np.float16), kv[1:2])
        assert _in_tier(store, 0, ns, toks) == [True, True]
        np.testing.assert_array_equal(ns.get(toks), kv)


@pytest.mark.s3
def test_prefetch_from_a_bucket_that_stopped_answering_gives_up_after_one_deadline(moto_server, tmp_path):
    """A bucket whose server stops answering: prefetch waits out its deadline once, not once per chunk (a
    namespace of thousands of chunks would take hours), and reports every chunk as not fetched."""
    proxy = FaultyProxy(moto_server)
    bucket = make_bucket(moto_server)
    try:
        url = f"lmdb://{tmp_path}/hot::s3://{bucket}/kv?endpoint_url={proxy.endpoint}"
        toks, kv = _prompt(6, 95)
        with kvfs.open(url) as store:  # filled with the default deadline: a loaded machine may take over 1 s
            ns = store.namespace(SPEC)
            ns.put(toks, kv)
            store.flush()
            store.evict(all=True, tier=0)
            assert _in_tier(store, 1, ns, toks) == [True] * 6
        with kvfs.open(url + "&timeout=1&retries=0") as store:
            ns = store.namespace(SPEC)
            proxy.delay = 5.0  # every request now outlives the 1 s deadline
            t0 = time.monotonic()
            counts = store.prefetch([SPEC.path])
            took = time.monotonic() - t0
            assert counts["failed"] == 6 and counts["fetched"] == 0, counts
            assert took < 3.5, f"prefetch took {took:.1f} s: it waited out the deadline chunk after chunk"
            proxy.delay = 0.0
            # a later prefetch asks the bucket again (once the backend stops failing fast: a few seconds)
            deadline = time.monotonic() + 20
            while (got := store.prefetch([SPEC.path]))["fetched"] != 6 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert got["fetched"] == 6, got
            np.testing.assert_array_equal(ns.get(toks), kv)
    finally:
        proxy.close()


def test_prefetch_fetches_what_it_can_in_batches_and_counts_the_rest(tmp_path, monkeypatch):
    """Chunks are read from the lower tier a batch at a time; in a batch, a chunk that fails its checks is
    quarantined and one gone from the tier is a failure, and neither keeps the others from being fetched."""
    import kvfs.store
    from bitrot import flip_bit

    monkeypatch.setattr(kvfs.store, "PREFETCH_BATCH_CHUNKS", 3)  # 7 chunks: batches of 3, 3 and 1
    root = tmp_path / "files"
    toks, kv = _prompt(7, 101)
    with kvfs.open(f"lmdb://{tmp_path}/hot::file://{root}") as store:
        ns = store.namespace(SPEC)
        ns.put(toks, kv)
        store.flush()
        store.evict(all=True, tier=0)
        paths = [k.path for k in ns.keys(toks)]
        flip_bit(str(root / paths[1]), -100)  # corrupt in the only tier holding it
        os.remove(root / paths[4])  # gone behind the store's back
        seen = []
        counts = store.prefetch([SPEC.path], progress=seen.append)
        assert (counts["fetched"], counts["failed"], counts["already"]) == (5, 2, 0), counts
        assert len(seen) == 7
        assert _in_tier(store, 0, ns, toks) == [i not in (1, 4) for i in range(7)]
        assert store.prefetch([SPEC.path])["already"] == 5
        assert ns.lookup(toks) == SPEC.chunk_tokens  # chunk 1 quarantined: the prefix stops there
        np.testing.assert_array_equal(ns.get(toks[:SPEC.chunk_tokens]), kv[:, :, :SPEC.chunk_tokens])


@pytest.mark.s3
def test_prefetch_reads_a_bucket_side_by_side(moto_server, tmp_path):
    proxy = FaultyProxy(moto_server)
    bucket = make_bucket(moto_server)
    try:
        with kvfs.open(f"lmdb://{tmp_path}/hot::s3://{bucket}/kv?endpoint_url={proxy.endpoint}") as store:
            ns = store.namespace(SPEC)
            toks, kv = _prompt(8, 102)
            ns.put(toks, kv)
            store.flush()
            store.evict(all=True, tier=0)
            proxy.reset()
            proxy.delay = 0.05  # a bucket's latency: one GET at a time would take 8 x 50 ms
            assert store.prefetch([SPEC.path])["fetched"] == 8
            assert proxy.max_inflight > 1, "prefetch read the bucket one chunk at a time"
            np.testing.assert_array_equal(ns.get(toks), kv)
    finally:
        proxy.close()


@pytest.mark.s3
def test_lookups_do_not_each_wait_out_the_deadline_of_a_bucket_that_stopped_answering(moto_server, tmp_path):
    """While the shared bucket does not answer, a lookup of a prompt the local tiers do not hold asks it; one
    such lookup waits out the deadline, the next ones are misses at once (an engine's every new request used to
    wait ``timeout``, 30 s by default); once the bucket answers again, its chunks are found again."""
    proxy = FaultyProxy(moto_server)
    bucket = make_bucket(moto_server)
    try:
        other, kv = _prompt(2, 96)
        with kvfs.open(f"s3://{bucket}/kv?endpoint_url={moto_server}", catalog=str(tmp_path / "b")) as writer:
            # another node (its own catalog: this one learns of the chunks from the bucket alone)
            writer.namespace(SPEC).put(other, kv)
        with kvfs.open(f"memory://::s3://{bucket}/kv?endpoint_url={proxy.endpoint}&timeout=1&retries=0",
                       catalog=str(tmp_path / "a")) as store:
            ns = store.namespace(SPEC)
            proxy.delay = 5.0  # the server stops answering
            t0 = time.monotonic()
            assert ns.lookup(_prompt(1, 97)[0]) == 0
            assert 0.9 < time.monotonic() - t0 < 3
            for seed in (98, 99, 100):
                t0 = time.monotonic()
                assert ns.lookup(_prompt(1, seed)[0]) == 0
                assert time.monotonic() - t0 < 0.5, "a lookup waited out the deadline again"
            assert ns.lookup(other) == 0  # a miss while the bucket is down, never a wait
            proxy.delay = 0.0
            deadline = time.monotonic() + 20
            while ns.lookup(other) != len(other) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert ns.lookup(other) == len(other)
            np.testing.assert_array_equal(ns.get(other), kv)
    finally:
        proxy.close()


# ------------------------------------------------------------------------------------ capacity
def test_capacity_evicts_lru_to_the_watermark_keeps_pins_and_loses_nothing_below(tmp_path):
    size = CHUNK + 4096  # one chunk file
    capacity = int(4.5 * size)
    url = f"memory://?capacity={capacity}&watermark=0.5::file://{tmp_path}/f"
    prompts = [_prompt(1, 10 + i) for i in range(10)]
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        ns.put(*prompts[0])
        store.flush()
        assert ns.pin(prompts[0][0]) == 1
        used = []
        for toks, kv in prompts[1:]:
            ns.put(toks, kv)
            store.flush()  # written back: the memory copy becomes evictable
            used.append(store.catalog.used(store.tiers[0].slot))
            assert used[-1] <= capacity
        # eviction happened and went down to the watermark, not just under the capacity
        assert min(used[3:]) <= 0.5 * capacity + size
        top = [_in_tier(store, 0, ns, toks)[0] for toks, _ in prompts]
        assert top[0], "the pinned chunk was evicted"
        assert top[-1], "the newest chunk should be in memory"
        assert not all(top), "nothing was evicted from the full tier"
        assert sum(top) * size <= capacity
        # the least recently used went first
        first_kept = [i for i, t in enumerate(top) if t and i > 0][0]
        assert not any(top[1:first_kept])
        # nothing is lost from the lower tier: every chunk is there and reads back exact
        assert all(_in_tier(store, 1, ns, toks)[0] for toks, _ in prompts)
        for toks, kv in prompts:
            np.testing.assert_array_equal(ns.get(toks), kv)
        assert store.usage()[0]["used"] <= capacity


@pytest.mark.parametrize("url", ["lmdb://{d}/s?capacity={cap}", "memory://?capacity={cap}::file://{d}/f"])
def test_concurrent_writers_never_take_a_tier_over_its_capacity(tmp_path, url):
    """Threads putting side by side into a tier with a capacity: each write makes room for itself only, so
    the tier never holds more than its capacity (writers used to count the same free space, each wrote, and
    the tier went over), and a full last tier of evictable chunks never refuses a put with NoSpace (a writer
    used to find the room it had just made taken by the others)."""
    size = CHUNK + 4096
    cap = 12 * size
    store = kvfs.open(url.format(d=tmp_path, cap=cap))
    tier = store.tiers[0]
    ns = store.namespace(SPEC)
    peak = [0]
    errors: list[BaseException] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], store.catalog.used(tier.slot))

    def writer(seed):
        try:
            for i in range(15):
                ns.put(*_prompt(2, 1000 * seed + i))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=writer, args=(s,)) for s in range(6)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stop.set()
        sampler.join()
    try:
        assert not errors, f"a put failed: {errors[0]!r}"
        assert peak[0] <= cap, f"the tier held {peak[0]} bytes, over its capacity of {cap}"
        held = [k for k in tier.backend.list("") if k.endswith(".safetensors")]
        assert sum(tier.backend.stat(k).size for k in held) == store.catalog.used(tier.slot) <= cap
    finally:
        store.close()


def test_reads_refresh_lru_order(tmp_path):
    size = CHUNK + 4096
    url = f"memory://?capacity={int(3.5 * size)}&watermark=0.7::file://{tmp_path}/f"
    prompts = [_prompt(1, 30 + i) for i in range(5)]
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        for toks, kv in prompts[:3]:
            ns.put(toks, kv)
            store.flush()
            time.sleep(0.01)
        ns.get(prompts[0][0])  # the oldest becomes the most recently used
        time.sleep(0.01)
        for toks, kv in prompts[3:]:
            ns.put(toks, kv)
            store.flush()
        top = [_in_tier(store, 0, ns, toks)[0] for toks, _ in prompts]
        assert top[0] and not top[1], top


def test_a_full_tier_of_pinned_chunks_spills_to_the_next_tier(tmp_path):
    size = CHUNK + 4096
    url = f"memory://?capacity={2 * size}::file://{tmp_path}/f"
    a, b, c = (_prompt(1, 40 + i) for i in range(3))
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        for toks, kv in (a, b):
            ns.put(toks, kv)
            store.flush()
            ns.pin(toks)
        ns.put(*c)  # memory is full of pinned chunks: c goes straight to the file tier
        store.flush()
        assert [_in_tier(store, 0, ns, t[0])[0] for t in (a, b, c)] == [True, True, False]
        assert _in_tier(store, 1, ns, c[0]) == [True]
        np.testing.assert_array_equal(ns.get(c[0]), c[1])


def test_write_back_passes_over_a_middle_tier_full_of_pinned_chunks(tmp_path):
    """A middle (cache) tier full of pinned chunks: a chunk's copy goes on to the tier below, as a put would,
    and nothing is owed to the full tier: flush() succeeds (it used to fail on every call, forever, though the
    chunk was safe in the bottom tier)."""
    size = CHUNK + 4096
    url = f"memory://::lmdb://{tmp_path}/mid?capacity={2 * size}::file://{tmp_path}/bottom"
    a, b = _prompt(2, 45), _prompt(1, 46)
    with kvfs.open(url) as store:
        ns = store.namespace(SPEC)
        ns.put(*a)
        store.flush()
        ns.pin(a[0])  # the middle tier is full of pinned chunks
        ns.put(*b)
        store.flush()
        store.flush()
        assert store.catalog.owed() == []
        assert _in_tier(store, 1, ns, b[0]) == [False] and _in_tier(store, 2, ns, b[0]) == [True]
        assert store.catalog.used(store.tiers[1].slot) <= 2 * size
        store.evict(all=True, tier=0)
        np.testing.assert_array_equal(ns.get(b[0]), b[1])  # from the bottom tier


def test_last_tier_full_of_pinned_chunks_is_nospace(tmp_path):
    size = CHUNK + 4096
    with kvfs.open(f"file://{tmp_path}/f?capacity={2 * size}") as store:
        ns = store.namespace(SPEC)
        toks, kv = _prompt(2, 50)
        ns.put(toks, kv)
        ns.pin(toks)
        more, kv2 = _prompt(1, 51)
        with pytest.raises(NoSpace) as ei:
            ns.put(more, kv2)
        assert ei.value.errno == errno.ENOSPC and "pinned" in str(ei.value)
        np.testing.assert_array_equal(ns.get(toks), kv)
        ns.unpin(toks)
        ns.put(more, kv2)  # now the LRU unpinned chunks make room
        np.testing.assert_array_equal(ns.get(more), kv2)



def test_a_chunk_pinned_while_an_eviction_runs_is_not_evicted(tmp_path):
    # an eviction chooses its victims from the catalog before it removes them: a pin taken in between must hold
    # (the removal checks pins in its own transaction), else a pin that returned is silently lost
    tiny = kvfs.KVSpec("pin-race", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float16", chunk_tokens=16)
    with kvfs.open(f"lmdb://{tmp_path}/s") as store:
        ns = store.namespace(tiny)
        filler = list(range(100_000, 100_000 + 16 * 100))  # pinned (refused): they keep each eviction busy
        ns.put(filler, np.ones(tiny.chunk_shape(len(filler)), np.float16))
        ns.pin(filler)
        toks = list(range(16))
        kv = np.full(tiny.chunk_shape(16), 3, np.float16)
        path = ns.keys(toks)[0].path
        paths = [path] + [k.path for k in ns.keys(filler)]  # the chunk's record is read first
        stop = threading.Event()

        def evictor():
            while not stop.is_set():
                try:
                    store.evict(paths)
                except kvfs.errors.NotFound:
                    pass  # not stored again yet

        th = threading.Thread(target=evictor)
        th.start()
        lost = 0
        try:
            for _ in range(60):
                ns.put(toks, kv)
                try:
                    if not store.pin(path):
                        continue  # evicted between the lookup of its record and the pin: nothing was pinned
                except kvfs.errors.NotFound:
                    continue  # evicted before the pin: nothing was pinned
                time.sleep(0.01)
                try:
                    held = store.unpin(path)  # 1: the pin held the chunk
                except kvfs.errors.NotFound:
                    held = 0
                lost += not held
        finally:
            stop.set()
            th.join()
        assert lost == 0, f"{lost} pinned chunk(s) evicted"


# ------------------------------------------------------------------------------------ a lower tier goes away
def _eventually(op):
    return eventually(op, (StoreError, CacheMiss))


@pytest.mark.s3
@pytest.mark.skipif(not seaweed_available(), reason="SeaweedFS is not installed")
def test_store_stays_usable_while_the_s3_tier_is_down_and_recovers():
    with SeaweedServer() as server:
        bucket = server.make_bucket()
        s3 = server.url(bucket, timeout=3, retries=1)
        toks, kv = _prompt(4, 60)
        with kvfs.open(f"memory://::{s3}") as writer:
            writer.namespace(SPEC).put(toks, kv)
        with kvfs.open(f"memory://::{s3}") as store:  # its own empty memory tier: reads go to S3
            ns = store.namespace(SPEC)
            server.pause()  # the server stops answering
            t0 = time.monotonic()
            with pytest.raises(CacheMiss):
                ns.get(toks)
            assert time.monotonic() - t0 < 2 * 3 + 4, "a read from a stopped server must give up within its timeout"
            # the store is still usable: the memory tier takes new data and serves it
            other, kv_other = _prompt(4, 61)
            ns.put(other, kv_other)
            np.testing.assert_array_equal(ns.get(other), kv_other)
            t0 = time.monotonic()
            with pytest.raises(StoreError) as ei:  # the write-back cannot reach the bucket: flush says so
                store.flush()
            assert ei.value.errno == errno.EIO and "timed out" in str(ei.value)
            assert time.monotonic() - t0 < 2 * 3 + 4, "queued write-backs must fail fast once the tier timed out"
            server.resume()
            # asked again once the backend stops failing fast (a few seconds after the last timeout)
            np.testing.assert_array_equal(_eventually(lambda: ns.get(toks)), kv)
            np.testing.assert_array_equal(ns.get(other), kv_other)  # still served from memory
            # killed: write-back fails and flush says so; restarted: everything works again
            server.kill()
            third, kv3 = _prompt(1, 62)
            ns.put(third, kv3)
            with pytest.raises(StoreError) as ei:
                store.flush()
            assert ei.value.errno == errno.EIO
            np.testing.assert_array_equal(ns.get(third), kv3)
            server.start(same_ports=True)
            time.sleep(kvfs_tiers.DOWN_SECONDS)  # write-back to a tier that just failed resumes after this
            fourth, kv4 = _prompt(1, 63)
            ns.put(fourth, kv4)
            _eventually(store.flush)  # (failing fast at first, while the backend waits to ask the server again)
            assert store.tiers[1].backend.exists_many([ns.keys(fourth)[0].path]) == [True]
        with kvfs.open(f"memory://::{s3}") as fresh:
            ns = fresh.namespace(SPEC)
            for t, k in ((toks, kv), (fourth, kv4)):
                np.testing.assert_array_equal(ns.get(t), k)


def test_a_copy_landing_after_its_chunk_was_evicted_records_only_that_tier(tmp_path):
    # a resync reads a chunk's record, queues its owed copy and records it with that record once written; if the
    # chunk was evicted meanwhile, the record made again must name only the tier written, or the tiers it names
    # from before hold bytes their usage never counted (and a later put there is not counted either)
    with kvfs.open(f"lmdb://{tmp_path}/a::file://{tmp_path}/b") as store:
        ns = store.namespace(SPEC)
        toks, kv = _prompt(1, 70)
        ns.put(toks, kv)
        store.flush()
        key = f"{ns.path}/{ns.keys(toks)[0].hex}"
        store.pin(ns.keys(toks)[0].path)
        rec = store.catalog.get(key)  # as a resync holds it while the copy is on its way
        assert rec.tiers == store.tiers[0].bit | store.tiers[1].bit and rec.pins == 1
        store.evict(all=True, force=True)
        store.catalog.add([(rec, None)], store.tiers[1].slot)  # the copy lands: the write-back records it
        assert store.catalog.get(key).tiers == store.tiers[1].bit
        assert store.catalog.get(key).pins == 0  # (the pin went with the eviction: not brought back by it)
        ns.put(toks, kv)  # stored again in the top tier: counted there
        for t in store.tiers:
            assert store.catalog.used(t.slot) == sum(r.size for r in store.catalog.scan() if r.tiers & t.bit)


@pytest.mark.parametrize("op", ["pin", "unpin"])
def test_a_chunk_evicted_between_the_plan_and_the_pin_change(tmp_path, monkeypatch, op):
    """``ns.pin`` stops at a chunk evicted since its plan: a prefix cut there never reaches the chunks after it,
    so no unpin of the prompt could take pins on them back (it pinned them all). ``ns.unpin`` goes past it: it
    takes back the pins ``ns.pin`` took, which no later plan of the prompt would reach again."""
    from kvfs.namespace import Namespace

    spec = kvfs.KVSpec("race/pins", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float16", chunk_tokens=4)
    toks = list(range(16))
    with kvfs.open(f"lmdb://{tmp_path}/s") as store:
        ns = store.namespace(spec)
        ns.put(toks, np.zeros(spec.chunk_shape(16), np.float16))
        paths = [k.path for k in ns.keys(toks)]
        if op == "unpin":
            assert ns.pin(toks) == 4
        real_plan = Namespace.plan

        def plan_then_evict(self, tokens):
            plan = real_plan(self, tokens)
            store.evict([paths[1]], force=True)  # another thread's eviction, between the plan and the pin change
            return plan

        monkeypatch.setattr(Namespace, "plan", plan_then_evict)
        getattr(ns, op)(toks)
        monkeypatch.undo()
        pins = {e.path: e.pins for e in store.ls(spec.path, recursive=True) if e.kind == "chunk"}
        assert pins == {paths[0]: int(op == "pin"), paths[2]: 0, paths[3]: 0}, pins
