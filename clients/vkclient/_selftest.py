"""What the ported kernel selftests (uffd-stress, uffd-unit-tests) share."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vkclient._kernel import Process
    from vkclient.uffd import Userfaultfd


class FaulterRefs:
    """A test context's process and uffd, made by its set-up: ``p`` and ``fd`` once they
    exist (the dataclasses that mix this in declare ``proc`` and ``uffd`` as fields)."""

    proc: Process | None
    uffd: Userfaultfd | None

    @property
    def p(self) -> Process:
        """The test process."""
        assert self.proc is not None
        return self.proc

    @property
    def fd(self) -> Userfaultfd:
        """The test's uffd."""
        assert self.uffd is not None
        return self.uffd
