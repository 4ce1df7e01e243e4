"""Fixtures for GUP-fast: the mm fixtures (kernels audited clean at teardown) plus walkers."""

from __future__ import annotations

from tests.unit.mm.conftest import kernel, make_kernel, task

__all__ = ["kernel", "make_kernel", "task"]
