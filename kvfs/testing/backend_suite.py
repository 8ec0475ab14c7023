"""The conformance suite every kvfs backend (and every backend wrapper) passes.

Subclass :class:`BackendSuite` in a test module and provide a ``backend``
fixture that yields a fresh, empty backend::

    class TestLMDB(BackendSuite):
        @pytest.fixture
        def backend(self, tmp_path):
            with LMDBBackend(str(tmp_path / "db")) as b:
                yield b

Optionally override :meth:`BackendSuite.reopen` to check persistence.
:func:`backend_state_machine` builds a Hypothesis state machine comparing a
backend with a dict under random sequences of operations.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Callable

import pytest

from kvfs.backends import Backend, ByteRange, InvalidKey

K1 = "m/ns-1/aa/aa00.safetensors"
K2 = "m/ns-1/ab/ab00.safetensors"
K3 = "m/ns-2/aa/aa01.safetensors"
MANIFEST = "m/ns-1/manifest.json"


def _b(x) -> bytes:
    return None if x is None else bytes(x)


class BackendSuite:
    """Behaviour shared by every backend. Subclasses provide the ``backend`` fixture."""

    #: set False for backends without persistence across reopen (memory://)
    persistent = True

    def reopen(self, backend: Backend) -> Backend | None:
        """Close ``backend`` and open it again on the same storage; None if not supported."""
        return None

    # -- missing keys ------------------------------------------------------------------------
    def test_missing_key_is_none_everywhere(self, backend: Backend):
        assert backend.get(K1) is None
        assert backend.get_many([K1, K2]) == [None, None]
        assert backend.stat(K1) is None
        assert backend.exists_many([K1]) == [False]
        assert backend.readinto(K1, bytearray(4)) is None
        assert backend.get_ranges([ByteRange(K1, 0, 4)]) == [None]
        with backend.views([K1]) as views:
            assert views == [None]
        backend.delete_many([K1])  # a no-op, not an error

    # -- round trips ---------------------------------------------------------------------------
    def test_put_get_roundtrip(self, backend: Backend):
        backend.put_many({K1: b"hello", K2: bytearray(b"world!"), K3: memoryview(b"x" * 10000)})
        assert _b(backend.get(K1)) == b"hello"
        assert [_b(v) for v in backend.get_many([K2, K1, K3])] == [b"world!", b"hello", b"x" * 10000]
        assert backend.exists_many([K1, "m/ns-1/zz/none.safetensors", K3]) == [True, False, True]
        info = backend.stat(K3)
        assert info is not None and info.size == 10000

    def test_empty_value(self, backend: Backend):
        backend.put(K1, b"")
        assert _b(backend.get(K1)) == b""
        assert backend.stat(K1).size == 0

    def test_overwrite_replaces_whole_value(self, backend: Backend):
        backend.put(K1, b"a" * 1000)
        backend.put(K1, b"b" * 10)
        assert _b(backend.get(K1)) == b"b" * 10
        assert backend.stat(K1).size == 10

    def test_values_are_copies_not_aliases_of_later_writes(self, backend: Backend):
        buf = bytearray(b"abc")
        backend.put(K1, bytes(buf))
        got = _b(backend.get(K1))
        backend.put(K1, b"xyz")
        assert got == b"abc"

    def test_large_value(self, backend: Backend):
        data = os.urandom(3 << 20)
        backend.put(K1, data)
        assert _b(backend.get(K1)) == data

    def test_ranges_and_readinto(self, backend: Backend):
        data = bytes(range(256)) * 64
        backend.put(K1, data)
        got = backend.get_ranges([ByteRange(K1, 10, 20), ByteRange(K1, 4000, None), ByteRange(K1, 16380, 17000)])
        assert [_b(g) for g in got] == [data[10:20], data[4000:], data[16380:]]
        buf = bytearray(100)
        assert backend.readinto(K1, buf, 50) == 100
        assert bytes(buf) == data[50:150]
        tail = bytearray(100)
        assert backend.readinto(K1, tail, len(data) - 30) == 30
        assert bytes(tail[:30]) == data[-30:]
        fn = getattr(backend, "readinto_ranges", None)
        if fn is not None:
            a, b = bytearray(8), bytearray(16)
            assert fn(K1, [(0, a), (1000, b)]) == [8, 16]
            assert bytes(a) == data[:8] and bytes(b) == data[1000:1016]
            assert fn("m/ns-1/zz/none.safetensors", [(0, bytearray(4))]) is None

    def test_views(self, backend: Backend):
        backend.put_many({K1: b"one", K2: b"two"})
        with backend.views([K1, "m/x/yy/missing", K2]) as views:
            assert [None if v is None else bytes(v) for v in views] == [b"one", None, b"two"]

    # -- delete and list -------------------------------------------------------------------------
    def test_delete_many(self, backend: Backend):
        backend.put_many({K1: b"1", K2: b"2", K3: b"3"})
        backend.delete_many([K1, K3, "m/ns-9/aa/none"])
        assert backend.exists_many([K1, K2, K3]) == [False, True, False]

    def test_list_prefix(self, backend: Backend):
        backend.put_many({K1: b"1", K2: b"2", K3: b"3", MANIFEST: b"{}"})
        assert sorted(backend.list("")) == sorted([K1, K2, K3, MANIFEST])
        assert sorted(backend.list("m/ns-1/")) == sorted([K1, K2, MANIFEST])
        assert sorted(backend.list("m/ns-1/aa/")) == [K1]
        assert list(backend.list("nothing/")) == []

    # -- keys ------------------------------------------------------------------------------------
    @pytest.mark.parametrize("bad", ["", "/abs/key", "a/../b", "a//b", "./a", "a/\x00b", "a\nb",
                                     "x" * 600, "a/" + "y" * 300])
    def test_bad_keys_are_refused(self, backend: Backend, bad):
        with pytest.raises(InvalidKey) as ei:
            backend.put(bad, b"v")
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(InvalidKey):
            backend.get_many([bad])
        assert list(backend.list("")) == []

    def test_unicode_keys(self, backend: Backend):
        k = "modèle/ns-1/aa/aa00.safetensors"
        backend.put(k, b"v")
        assert _b(backend.get(k)) == b"v"
        assert list(backend.list("modèle/")) == [k]

    # -- concurrency -------------------------------------------------------------------------------
    def test_concurrent_writers_and_readers_see_whole_values(self, backend: Backend):
        a, b = b"A" * (1 << 20), b"B" * (1 << 19)
        backend.put(K1, a)
        errors: list[str] = []
        stop = threading.Event()

        def writer():
            for i in range(20):
                backend.put(K1, a if i % 2 else b)
            stop.set()

        def reader():
            while not stop.is_set():
                v = _b(backend.get(K1))
                if v not in (a, b):
                    errors.append(f"torn read of {len(v) if v else v} bytes")

        threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors

    # -- persistence ---------------------------------------------------------------------------------
    def test_reopen_keeps_data(self, backend: Backend):
        backend.put_many({K1: b"persist", K2: b"me"})
        backend.flush()
        again = self.reopen(backend)
        if again is None:
            pytest.skip("this backend does not persist across reopen")
        try:
            assert [_b(v) for v in again.get_many([K1, K2])] == [b"persist", b"me"]
        finally:
            again.close()


def backend_state_machine(factory: Callable[[], Backend], max_examples: int = 60):
    """A Hypothesis state machine class comparing the backend made by ``factory`` with a dict.

    Use: ``TestMemoryMachine = backend_state_machine(lambda: MemoryBackend()).TestCase``
    """
    from hypothesis import settings, strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

    keys = st.sampled_from([K1, K2, K3, MANIFEST, "m/ns-2/ff/ff99.safetensors"])
    values = st.binary(max_size=2048)

    class BackendMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.backend = factory()
            self.model: dict[str, bytes] = {}

        @rule(items=st.dictionaries(keys, values, min_size=1, max_size=3))
        def put_many(self, items):
            self.backend.put_many(items)
            self.model.update(items)

        @rule(ks=st.lists(keys, max_size=3))
        def delete_many(self, ks):
            self.backend.delete_many(ks)
            for k in ks:
                self.model.pop(k, None)

        @rule(ks=st.lists(keys, min_size=1, max_size=4))
        def get_many(self, ks):
            assert [_b(v) for v in self.backend.get_many(ks)] == [self.model.get(k) for k in ks]

        @rule(ks=st.lists(keys, min_size=1, max_size=4))
        def exists_many(self, ks):
            assert self.backend.exists_many(ks) == [k in self.model for k in ks]

        @precondition(lambda self: bool(self.model))
        @rule(data=st.data())
        def ranged(self, data):
            k = data.draw(st.sampled_from(sorted(self.model)))
            v = self.model[k]
            start = data.draw(st.integers(0, len(v)))
            end = data.draw(st.integers(start, len(v) + 10))
            (got,) = self.backend.get_ranges([ByteRange(k, start, end)])
            assert _b(got) == v[start:end]

        @invariant()
        def listing_matches(self):
            assert sorted(self.backend.list("")) == sorted(self.model)

        def teardown(self) -> None:
            self.backend.close()

    BackendMachine.TestCase.settings = settings(max_examples=max_examples, stateful_step_count=20, deadline=None)
    return BackendMachine
