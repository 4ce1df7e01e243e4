"""Fixtures for the userfaultfd tests: the mm fixtures (every kernel audited clean at teardown)."""

from __future__ import annotations

from tests.unit.mm.conftest import kernel, make_kernel, task

__all__ = ["kernel", "make_kernel", "task"]
