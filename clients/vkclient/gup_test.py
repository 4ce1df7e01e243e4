"""vkctl gup-test: the port of tools/testing/selftests/mm/gup_test.c (Linux 6.12).

Like the selftest it creates a process, maps ``-m`` MiB of /dev/zero (anonymous memory,
MAP_PRIVATE or with ``-S`` MAP_SHARED), advises THP on (``-t``) or off (``-T``), faults every
page in from user space (one MADV_POPULATE_WRITE: write faults on every page, as the
selftest's ``p[0] = 0`` loop does), then issues the gup_test "ioctl" (GupService.GupTest) ``-r``
times from ``-j`` threads. The kernel runs the chosen entry point over the range in ``-n``
pages per call, timing the GUP loop and the release (microseconds, ``ktime_us_delta``), and
this prints the selftest's lines in kselftest TAP form::

    TAP version 13
    1..1
    # PIN_FAST_BENCHMARK: Time: get:1234 put:567 us
    ok 1 ioctl status 0
    # Totals: pass:1 fail:0 xfail:0 xpass:0 skip:0 error:0

Flags: -a PIN_FAST_BENCHMARK, -b PIN_BASIC_TEST, -c DUMP_USER_PAGES_TEST (page indices as
arguments, page 0 by default; -p dumps with pin_user_pages), -L PIN_LONGTERM_BENCHMARK,
-u GUP_FAST_BENCHMARK (the default), -U GUP_BASIC_TEST, -F raw gup_flags, -w/-W write on/off,
-z the selftest's FOLL_TOUCH (0x02, which is FOLL_GET in 6.12: pin commands then fail, as on
Linux), -m MiB, -n pages per call (-1: the whole range), -r repeats, -j threads, -t/-T THP,
-S shared. -H (hugetlb) and -f (a file other than /dev/zero) are not modelled: skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from vkclient._kernel import Kernel, Process
from vkclient.constants import (
    MADV_HUGEPAGE,
    MADV_NOHUGEPAGE,
    MADV_POPULATE_WRITE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
)
from vkernel.v1 import gup_service_pb2 as pb

MB = 1 << 20
FOLL_WRITE = 0x01
SELFTEST_FOLL_TOUCH = 0x02
"""gup_test.c still says ``#define FOLL_TOUCH 0x02``; in 6.12 that value is FOLL_GET (C.3)."""
GUP_TEST_FLAG_DUMP_PAGES_USE_PIN = 0x1
GUP_TEST_MAX_PAGES_TO_DUMP = 8

COMMANDS = {
    pb.GUP_TEST_COMMAND_GUP_FAST_BENCHMARK: "GUP_FAST_BENCHMARK",
    pb.GUP_TEST_COMMAND_PIN_FAST_BENCHMARK: "PIN_FAST_BENCHMARK",
    pb.GUP_TEST_COMMAND_PIN_LONGTERM_BENCHMARK: "PIN_LONGTERM_BENCHMARK",
    pb.GUP_TEST_COMMAND_GUP_BASIC_TEST: "GUP_BASIC_TEST",
    pb.GUP_TEST_COMMAND_PIN_BASIC_TEST: "PIN_BASIC_TEST",
    pb.GUP_TEST_COMMAND_DUMP_USER_PAGES_TEST: "DUMP_USER_PAGES_TEST",
}
BENCHMARKS = (
    pb.GUP_TEST_COMMAND_GUP_FAST_BENCHMARK,
    pb.GUP_TEST_COMMAND_PIN_FAST_BENCHMARK,
    pb.GUP_TEST_COMMAND_PIN_LONGTERM_BENCHMARK,
)


def build_parser(prog: str = "vkctl gup-test") -> argparse.ArgumentParser:
    """gup_test's command line as a parser of its own."""
    p = argparse.ArgumentParser(prog=prog, description="port of the kernel's gup_test selftest")
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """gup_test's getopt string "m:r:n:F:f:abcj:tTLUuwWSHpz" as argparse options."""
    cmd = p.add_argument_group("command (the last one given wins, as with getopt)")
    for flag, value in (
        ("-a", pb.GUP_TEST_COMMAND_PIN_FAST_BENCHMARK),
        ("-b", pb.GUP_TEST_COMMAND_PIN_BASIC_TEST),
        ("-c", pb.GUP_TEST_COMMAND_DUMP_USER_PAGES_TEST),
        ("-L", pb.GUP_TEST_COMMAND_PIN_LONGTERM_BENCHMARK),
        ("-u", pb.GUP_TEST_COMMAND_GUP_FAST_BENCHMARK),
        ("-U", pb.GUP_TEST_COMMAND_GUP_BASIC_TEST),
    ):
        cmd.add_argument(flag, dest="cmd", action="store_const", const=value, help=COMMANDS[value])
    p.set_defaults(cmd=pb.GUP_TEST_COMMAND_GUP_FAST_BENCHMARK)
    p.add_argument("-p", dest="use_pin", action="store_true", help="-c dumps with pin_user_pages")
    p.add_argument("-F", dest="gup_flags", type=lambda s: int(s, 0), default=0, help="gup_flags")
    p.add_argument("-j", dest="nthreads", type=int, default=1, help="threads")
    p.add_argument("-m", dest="size_mb", type=int, default=128, help="size in MiB")
    p.add_argument("-r", dest="repeats", type=int, default=1, help="repeats")
    p.add_argument("-n", dest="nr_pages", type=int, default=1, help="pages per call (-1: all)")
    p.add_argument("-t", dest="thp", action="store_const", const=1, help="MADV_HUGEPAGE")
    p.add_argument("-T", dest="thp", action="store_const", const=0, help="MADV_NOHUGEPAGE")
    p.add_argument("-w", dest="write", action="store_const", const=1, help="FOLL_WRITE (default)")
    p.add_argument("-W", dest="write", action="store_const", const=0, help="no FOLL_WRITE")
    p.set_defaults(write=1, thp=-1)
    p.add_argument("-S", dest="shared", action="store_true", help="MAP_SHARED")
    p.add_argument("-H", dest="hugetlb", action="store_true", help="MAP_HUGETLB (not modelled)")
    p.add_argument("-z", dest="touch", action="store_true", help="the selftest's FOLL_TOUCH")
    p.add_argument("-f", dest="file", default="/dev/zero", help="file to map (/dev/zero only)")
    p.add_argument("pages", nargs="*", type=lambda s: int(s, 0), help="-c: page indices to dump")


class _Tap:
    """kselftest.h's output: the header, the plan, ok/not ok lines and the totals."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.n = 0
        self.passed = 0
        self.failed = 0
        self.skipped = 0

    def print(self, line: str) -> None:
        self.out.write(line + "\n")

    def msg(self, text: str) -> None:
        """ksft_print_msg()."""
        for line in text.splitlines() or [""]:
            self.print(f"# {line}")

    def result(self, ok: bool, text: str) -> None:
        """ksft_test_result()."""
        self.n += 1
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        self.print(f"{'ok' if ok else 'not ok'} {self.n} {text}")

    def totals(self) -> None:
        self.print(
            f"# Totals: pass:{self.passed} fail:{self.failed} xfail:0 xpass:0 "
            f"skip:{self.skipped} error:0"
        )


async def _thread(
    proc: Process,
    args: argparse.Namespace,
    addr: int,
    size: int,
    nr_per_call: int,
    gup_flags: int,
    test_flags: int,
    which: list[int],
    tap: _Tap,
    lock: asyncio.Lock,
) -> int:
    """gup_thread(): the ioctl ``repeats`` times (benchmarks) or once (tests)."""
    name = COMMANDS[args.cmd]
    repeats = args.repeats if args.cmd in BENCHMARKS else 1
    status = 0
    for _ in range(repeats):
        try:
            resp = await proc.gup_test(
                args.cmd, addr, size, nr_per_call, gup_flags, test_flags, which
            )
        except OSError as e:
            status = -1
            async with lock:
                tap.msg(f"{name} ioctl failed: {os.strerror(e.errno or errno.EIO)}")
            break
        async with lock:
            if args.cmd in BENCHMARKS:
                line = f"{name}: Time: get:{resp.get_delta_usec} put:{resp.put_delta_usec} us"
                if resp.size != size:
                    line += f", truncated (size: {resp.size})"
                tap.msg(line)
            else:
                tap.msg(f"{name}: done")
                if resp.size != size:
                    tap.msg(f"Truncated (size: {resp.size})")
            for d in resp.dumped:
                tap.msg(
                    f"page[{d.index}]: refcount:{d.refcount} mapcount:{d.mapcount} "
                    f"pincount:{d.pincount} pfn:{d.pfn:#x} flags: {'|'.join(d.flag_names)}"
                )
            if resp.not_pinned:
                tap.msg(f"WARNING: {resp.not_pinned} pages are NOT dma-pinned")
                status = -1
    async with lock:
        tap.result(status == 0, f"ioctl status {status}")
    return status


async def run(k: Kernel, argv: Sequence[str], out: TextIO | None = None) -> int:
    """Run gup_test with ``argv`` on the kernel ``k``; returns the exit status."""
    return await run_args(k, build_parser().parse_args(list(argv)), out)


async def run_args(k: Kernel, args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run gup_test with parsed ``args`` (see :func:`add_arguments`)."""
    tap = _Tap(out or sys.stdout)
    tap.print("TAP version 13")
    if args.hugetlb or args.file != "/dev/zero":
        tap.print("1..0 # SKIP hugetlb and file mappings are not modelled by vkernel")
        return 4  # KSFT_SKIP
    size = args.size_mb * MB
    nr_per_call = size // PAGE_SIZE if args.nr_pages < 0 else args.nr_pages
    gup_flags = args.gup_flags | (FOLL_WRITE if args.write else 0)
    gup_flags |= SELFTEST_FOLL_TOUCH if args.touch else 0
    test_flags = GUP_TEST_FLAG_DUMP_PAGES_USE_PIN if args.use_pin else 0
    which: list[int] = []
    if args.cmd == pb.GUP_TEST_COMMAND_DUMP_USER_PAGES_TEST:
        # .which_pages is 1-based so that 0 means "nothing"; the command line is 0-based.
        which = [i + 1 for i in args.pages[:GUP_TEST_MAX_PAGES_TO_DUMP]] or [1]
    tap.print(f"1..{args.nthreads}")
    flags = (MAP_SHARED if args.shared else MAP_PRIVATE) | MAP_ANONYMOUS
    async with await k.spawn("gup_test") as proc:
        addr = await proc.mmap(size, PROT_READ | PROT_WRITE, flags)
        if args.thp == 1:
            await proc.madvise(addr, size, MADV_HUGEPAGE)
        elif args.thp == 0:
            await proc.madvise(addr, size, MADV_NOHUGEPAGE)
        # Fault them in here, from user space.
        await proc.madvise(addr, size, MADV_POPULATE_WRITE)
        lock = asyncio.Lock()
        statuses = await asyncio.gather(
            *(
                _thread(
                    proc, args, addr, size, nr_per_call, gup_flags, test_flags, which, tap, lock
                )
                for _ in range(args.nthreads)
            )
        )
    tap.totals()
    return 0 if all(s == 0 for s in statuses) else 1
