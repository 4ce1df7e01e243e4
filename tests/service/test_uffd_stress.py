"""``vkctl uffd-stress``: uffd-stress.c's bounce test over gRPC at small sizes
(kernel-semantics.md B.67), a corruption it must catch, and the command line; the ``daemon``
fixture's teardown checks the audit."""

from __future__ import annotations

import asyncio
import re
import struct
import sys
from collections.abc import Awaitable, Callable

import pytest

import vkclient
from tests.service.conftest import Daemon
from vkclient import uffd_stress
from vkclient.uffd_stress import COUNT_OFF, P, StressTest

_BOUNCE = re.compile(
    r"^bounces: (\d+), mode: ([a-z ]+), userfaults: ?"
    r"(?:(\d+) missing \(([\d+]+)\))? ?(?:(\d+) wp \(([\d+]+)\))?$"
)


def _bounces(lines: list[str]) -> list[re.Match[str]]:
    found = [_BOUNCE.match(line) for line in lines if line.startswith("bounces:")]
    assert all(found), lines
    return [m for m in found if m is not None]


async def _run(
    k: vkclient.Kernel,
    kind: str,
    mib: int,
    bounces: int,
    locker_ops: int,
    seed: int,
    before_stress: Callable[[StressTest], Awaitable[None]] | None = None,
) -> tuple[int, list[str]]:
    lines: list[str] = []
    rc = await uffd_stress.run(
        k,
        kind,
        mib,
        bounces,
        lines.append,
        nr_cpus=2,
        locker_ops=locker_ops,
        seed=seed,
        before_stress=before_stress,
    )
    return rc, lines


async def test_anon_bounces(daemon: Daemon, k: vkclient.Kernel) -> None:
    rc, lines = await _run(k, "anon", 4, 4, locker_ops=24, seed=1)
    assert rc == 0, lines
    assert lines[0] == "nr_pages: 1024, nr_pages_per_cpu: 512"
    bounces = _bounces(lines)
    # The modes cycle with the remaining count, as uffd-stress's bit tests do.
    assert [(int(m[1]), m[2]) for m in bounces] == [
        (3, "rnd racing read"),
        (2, "racing read"),
        (1, "rnd read"),
        (0, "read"),
    ]
    for m in bounces:
        # Anon uses uffd-wp: every page is installed write-protected, so each bounce's
        # locker writes take WP faults the readers resolve (two cpus: two per-cpu counts).
        assert int(m[5]) > 0, m[0]
        assert sum(map(int, m[6].split("+"))) == int(m[5])
        if m[3]:
            assert sum(map(int, m[4].split("+"))) == int(m[3])
    assert lines[-1].startswith("# anon 4 MiB, 4 bounces:")


@pytest.mark.parametrize(("kind", "bounces"), [("shmem", 4), ("shmem-private", 2)])
async def test_shmem_bounces(daemon: Daemon, k: vkclient.Kernel, kind: str, bounces: int) -> None:
    rc, lines = await _run(k, kind, 4, bounces, locker_ops=24, seed=2)
    assert rc == 0, lines
    found = _bounces(lines)
    assert [int(m[1]) for m in found] == list(range(bounces - 1, -1, -1))
    # The random modes' first locker access lands on a page no copier reached yet.
    assert sum(int(m[3] or 0) + int(m[5] or 0) for m in found) > 0, lines


async def test_poll_and_verify_modes(daemon: Daemon, k: vkclient.Kernel) -> None:
    """16 bounces on a small area: every mode combination (poll readers, verify) once."""
    rc, lines = await _run(k, "anon", 1, 16, locker_ops=4, seed=3)
    assert rc == 0, lines
    modes = [m[2] for m in _bounces(lines)]
    assert modes[0] == "rnd racing ver poll"
    assert len(set(modes)) == 16


async def test_corrupt_counter_is_caught(daemon: Daemon, k: vkclient.Kernel) -> None:
    injected: list[int] = []

    async def corrupt(t: StressTest) -> None:
        if injected:
            return
        injected.append(7)
        # A wrong counter in src page 7: the COPY into dst carries it, and either a locker
        # taking that page or the verification must notice.
        await t.p.write(t.area_src + 7 * P + COUNT_OFF, struct.pack("<Q", 12345))

    rc, lines = await _run(k, "anon", 1, 2, locker_ops=4, before_stress=corrupt, seed=4)
    assert rc == 1
    assert lines[-2].startswith("ERROR: "), lines
    assert "memory corruption" in lines[-2] or "error area_count 12345" in lines[-2], lines


async def test_corrupt_mutex_is_caught(daemon: Daemon, k: vkclient.Kernel) -> None:
    """A lock word left set (a page copied with its mutex held) is corruption too."""

    async def corrupt(t: StressTest) -> None:
        await t.p.write(t.area_src, struct.pack("<Q", 1))

    rc, lines = await _run(k, "shmem", 1, 1, locker_ops=4, before_stress=corrupt, seed=5)
    assert rc == 1
    assert "ERROR: " in lines[-2]
    assert "page_nr 0 memory corruption: mutex" in lines[-2], lines


def test_parse_runs() -> None:
    assert uffd_stress.parse_runs(["anon", "20", "16", "shmem", "20", "16"]) == [
        ("anon", 20, 16),
        ("shmem", 20, 16),
    ]
    for bad in (["anon", "20"], ["hugetlb", "1", "1"], ["anon", "0", "1"], ["anon", "1", "0"]):
        with pytest.raises(ValueError):
            uffd_stress.parse_runs(bad)


async def test_vkctl_uffd_stress(daemon: Daemon) -> None:
    """The command line: a run per triple, audit clean after each, exit 0."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vkclient.vkctl",
        "--addr",
        daemon.addr,
        "uffd-stress",
        "anon",
        "1",
        "2",
        "shmem-private",
        "1",
        "1",
        "--locker-ops",
        "4",
        "--cpus",
        "2",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    text = out.decode()
    assert proc.returncode == 0, (text, err.decode())
    assert text.count("nr_pages: 256, nr_pages_per_cpu:") == 2
    assert "# anon 1 MiB, 2 bounces:" in text
    assert "# shmem-private 1 MiB, 1 bounces:" in text
    assert "ERROR" not in text
