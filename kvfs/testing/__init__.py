"""Test helpers shipped with kvfs: the backend conformance suite (pytest and Hypothesis)."""

from .backend_suite import BackendSuite, backend_state_machine

__all__ = ["BackendSuite", "backend_state_machine"]
