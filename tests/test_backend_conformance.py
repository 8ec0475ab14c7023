"""Memory and LMDB backends pass the shared conformance suite."""

from __future__ import annotations

import tempfile

import pytest

from kvfs.backends._lmdb import LMDBBackend
from kvfs.backends._memory import MemoryBackend
from kvfs.testing import BackendSuite, backend_state_machine


class TestMemoryBackend(BackendSuite):
    @pytest.fixture
    def backend(self):
        with MemoryBackend() as b:
            yield b

    def reopen(self, backend):
        return None


class TestNamedMemoryBackend(BackendSuite):
    @pytest.fixture
    def backend(self, request):
        with MemoryBackend(f"suite-{request.node.name}") as b:
            yield b

    def reopen(self, backend):
        again = MemoryBackend(backend.name)  # shared by name while any holder is open
        backend.close()
        return again


class TestLMDBBackend(BackendSuite):
    @pytest.fixture
    def backend(self, tmp_path):
        with LMDBBackend(str(tmp_path / "db")) as b:
            yield b

    def reopen(self, backend):
        path = backend.path
        backend.close()
        return LMDBBackend(path)


TestMemoryMachine = backend_state_machine(lambda: MemoryBackend()).TestCase
TestLMDBMachine = backend_state_machine(lambda: LMDBBackend(tempfile.mkdtemp(prefix="kvfs-sm-"))).TestCase
