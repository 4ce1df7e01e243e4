"""Fixtures for the O_DIRECT tests: the fs kernels (audited clean at teardown)."""

from __future__ import annotations

from tests.unit.fs.conftest import kernel, make_fs_kernel, task

__all__ = ["kernel", "make_fs_kernel", "task"]
