"""Pin + unpin over gRPC (GupService) against floors measured in the same run.

Why: a driver client pins and unpins through an RPC, and perf-floor.md says a unary call
costs ~700 µs of CPU and a bidi round trip ~240 µs: at 512 pages per unary call that caps
pin+unpin near 0.4 M pages/s whatever the kernel does. GupService.Batch carries many
512-page operations per message on one long-lived stream; these figures say how close that
gets to the kernel's own rate and to the issue's goal (≥ 1 M pages/s with 512-page calls).

The region is 32 MiB (8192 resident small pages) in a process of the daemon subprocess; the
kernel's own figure comes from a Kernel booted in this process with the same region. Rounds
alternate which side goes first.

Figures (pages/s count a page once when it has been pinned and unpinned):

- ``pin_unpin_stream``: the Batch stream, ``OPS_PER_MESSAGE`` pin_user_pages_fast(FOLL_WRITE)
  operations of 512 pages per message, each message also releasing (unpin) the previous
  message's handles, pfns returned as packed bytes. **Floor: the in-kernel pin + unpin rate**
  (pin_user_pages_fast + unpin_user_pages on the same 512-page chunks, in process, no RPC):
  it is the ceiling of any API over this kernel, so the ratio is the share of the kernel's
  speed the API keeps. (The other floor the issue names, the bidi round trip at 512 pages
  per trip, is what batching is there to beat; it is the floor of ``pin_unpin_bidi_1op``.)
- ``pin_unpin_stream_abs``: the same samples against the absolute goal, 1 M pages/s
  (ratio = value / 1e6, goal 1.0; no floor: the goal is not a measurement).
- ``pin_unpin_bidi_1op``: one 512-page pin and the previous unpin per message: the design
  without batching. Floor: the floor server's bidi ping-pong, as 512 pages per round trip.
- ``pin_unpin_unary``: a unary Gup then a unary Release per 512 pages. Floor: the floor
  server's sequential unary calls, two per 512 pages.
- ``gup_test_pin_fast_get`` / ``_put`` and ``gup_test_gup_fast_get`` / ``_put``: the
  gup_test ioctl, i.e. ``vkctl gup-test -a -m 128 -n 512`` and ``-u -m 128 -n 512``, in µs.
  Floor: Linux's reference figures (kernel-semantics C.2: the CKI run of the 128 MiB
  default, GUP_FAST get 36,058 / put 818 µs, PIN_FAST get 38,827 / put 2,214 µs). Not a
  same-run measurement and not the same machine, so no goal: printed side by side.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, cast

import numpy as np

from bench._floors import FloorClient, floor_server
from bench._harness import BenchContext, Record, make_record
from bench._vkernel import Vkernel, vkernel_daemon
from vkernel.kernel import gup, gup_fast, mm_api
from vkernel.kernel.kernel import Kernel, KernelConfig
from vkernel.kernel.uapi import (
    FOLL_WRITE,
    MADV_POPULATE_WRITE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
)
from vkernel.v1 import gup_service_pb2 as pb
from vkernel.v1 import gup_service_pb2_grpc as pb_grpc
from vkernel.v1 import memory_service_pb2 as mpb
from vkernel.v1 import memory_service_pb2_grpc as mpb_grpc
from vkernel.v1 import process_service_pb2

NR = 512
"""Pages per GUP call (the issue's 512-page calls; an x86 PMD)."""
REGION_PAGES = 8192
OPS_PER_MESSAGE = REGION_PAGES // NR // 2
"""Half the region per message, so the previous message's handles can be released in it."""
GOAL_ABS = 1e6
LINUX_REF = {  # kernel-semantics.md C.2, CKI reference run, 128 MiB
    ("PIN_FAST_BENCHMARK", "get"): 38_827,
    ("PIN_FAST_BENCHMARK", "put"): 2_214,
    ("GUP_FAST_BENCHMARK", "get"): 36_058,
    ("GUP_FAST_BENCHMARK", "put"): 818,
}


class Samples(dict[str, list[float]]):
    def add(self, key: str, value: float) -> None:
        self.setdefault(key, []).append(value)


# ---- the in-kernel floor -----------------------------------------------------------------------


async def _kernel_setup() -> tuple[Kernel, Any, int]:
    kernel = Kernel(KernelConfig(memory_bytes=256 << 20))
    task = kernel.spawn("floor", owner="bench")
    size = REGION_PAGES * PAGE_SIZE
    addr = await mm_api.sys_mmap(
        task, 0, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0
    )
    await mm_api.sys_madvise(task, addr, size, MADV_POPULATE_WRITE)
    return kernel, task, addr


async def _kernel_rate(kernel: Kernel, task: Any, addr: int, passes: int) -> float:
    """pin_user_pages_fast + unpin_user_pages over the region in 512-page calls: pages/s."""
    mm = task.mm
    pages = np.zeros(NR, dtype=np.int64)
    t0 = time.perf_counter()
    for _ in range(passes):
        for i in range(REGION_PAGES // NR):
            n = await gup_fast.pin_user_pages_fast(
                mm, addr + i * NR * PAGE_SIZE, NR, FOLL_WRITE, pages
            )
            if n != NR:
                raise RuntimeError(f"in-kernel pin returned {n}")
            gup.unpin_user_pages(kernel, pages, n)
    return passes * REGION_PAGES / (time.perf_counter() - t0)


# ---- the daemon --------------------------------------------------------------------------------


async def _daemon_setup(vk: Vkernel) -> tuple[int, int]:
    """A process with the region resident; returns (pid, addr)."""
    md = vk.metadata
    spawned = await vk.process.Spawn(
        process_service_pb2.SpawnRequest(name="bench-gup"), metadata=md
    )
    pid = spawned.process.pid
    mem = mpb_grpc.MemoryServiceStub(vk.channel)
    size = REGION_PAGES * PAGE_SIZE
    mapped = await mem.Mmap(
        mpb.MmapRequest(
            pid=pid,
            length=size,
            prot=PROT_READ | PROT_WRITE,
            flags=MAP_PRIVATE | MAP_ANONYMOUS,
            fd=-1,
        ),
        metadata=md,
    )
    await mem.Madvise(
        mpb.MadviseRequest(pid=pid, addr=mapped.addr, length=size, advice=MADV_POPULATE_WRITE),
        metadata=md,
    )
    return pid, mapped.addr


def _pin_op(pid: int, addr: int) -> pb.BatchOp:
    return pb.BatchOp(
        gup=pb.GupRequest(
            pid=pid,
            api=pb.GUP_API_PIN_USER_PAGES_FAST,
            start=addr,
            nr_pages=NR,
            gup_flags=FOLL_WRITE,
        )
    )


async def _stream_rate(call: Any, pid: int, addr: int, ops_per_message: int, passes: int) -> float:
    """Pin + unpin over the Batch stream: every message pins ``ops_per_message`` chunks and
    unpins the previous message's handles. Returns pages/s."""
    halves = [
        [addr + (h * ops_per_message + i) * NR * PAGE_SIZE for i in range(ops_per_message)]
        for h in range(2)
    ]
    if ops_per_message * 2 * NR > REGION_PAGES:
        raise ValueError("the region is too small")
    pending: list[int] = []
    messages = passes * (REGION_PAGES // NR) // ops_per_message
    t0 = time.perf_counter()
    for m in range(messages + 1):
        ops = [pb.BatchOp(release=pb.ReleaseRequest(handle=h)) for h in pending]
        if m < messages:
            ops += [_pin_op(pid, a) for a in halves[m % 2]]
        await call.write(pb.BatchRequest(ops=ops))
        resp = cast(pb.BatchResponse, await call.read())
        pending = []
        for r in resp.results:
            if r.errno:
                raise RuntimeError(f"batch op failed: errno {r.errno} {r.message}")
            if r.HasField("gup"):
                if r.gup.count != NR or len(r.gup.pfns) != NR * 8:
                    raise RuntimeError(f"pinned {r.gup.count} of {NR}")
                pending.append(r.gup.handle)
    return messages * ops_per_message * NR / (time.perf_counter() - t0)


async def _unary_rate(
    gupc: pb_grpc.GupServiceAsyncStub, md: Any, pid: int, addr: int, n: int
) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        chunk = addr + (i % (REGION_PAGES // NR)) * NR * PAGE_SIZE
        got = await gupc.Gup(
            pb.GupRequest(
                pid=pid,
                api=pb.GUP_API_PIN_USER_PAGES_FAST,
                start=chunk,
                nr_pages=NR,
                gup_flags=FOLL_WRITE,
            ),
            metadata=md,
        )
        await gupc.Release(pb.ReleaseRequest(handle=got.handle), metadata=md)
    return n * NR / (time.perf_counter() - t0)


async def _floor_rt(floor: FloorClient, stream: Any, n: int) -> tuple[float, float]:
    """(bidi round trip, sequential unary call), µs each."""
    t0 = time.perf_counter()
    for _ in range(n):
        await stream.write(b"\x08\x01")
        await stream.read()
    bidi = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for _ in range(n):
        await floor.unary(b"")
    unary = (time.perf_counter() - t0) / n * 1e6
    return bidi, unary


async def _gup_test(
    gupc: pb_grpc.GupServiceAsyncStub, vk: Vkernel, samples: Samples, pid: int, addr: int
) -> None:
    for cmd, name in (
        (pb.GUP_TEST_COMMAND_PIN_FAST_BENCHMARK, "PIN_FAST_BENCHMARK"),
        (pb.GUP_TEST_COMMAND_GUP_FAST_BENCHMARK, "GUP_FAST_BENCHMARK"),
    ):
        resp = await gupc.GupTest(
            pb.GupTestRequest(
                pid=pid,
                command=cmd,
                addr=addr,
                size=128 << 20,
                nr_pages_per_call=NR,
                gup_flags=FOLL_WRITE,
            ),
            metadata=vk.metadata,
        )
        if resp.size != 128 << 20 or resp.not_pinned:
            raise RuntimeError(f"{name}: size {resp.size}, {resp.not_pinned} not pinned")
        samples.add(f"{name}_get", resp.get_delta_usec)
        samples.add(f"{name}_put", resp.put_delta_usec)


async def _gup_test_setup(vk: Vkernel) -> tuple[int, int]:
    """`vkctl gup-test -m 128`'s set-up: a process with 128 MiB of /dev/zero faulted in."""
    md = vk.metadata
    spawned = await vk.process.Spawn(process_service_pb2.SpawnRequest(name="gup_test"), metadata=md)
    mem = mpb_grpc.MemoryServiceStub(vk.channel)
    size = 128 << 20
    pid = spawned.process.pid
    mapped = await mem.Mmap(
        mpb.MmapRequest(
            pid=pid,
            length=size,
            prot=PROT_READ | PROT_WRITE,
            flags=MAP_PRIVATE | MAP_ANONYMOUS,
            fd=-1,
        ),
        metadata=md,
    )
    await mem.Madvise(
        mpb.MadviseRequest(pid=pid, addr=mapped.addr, length=size, advice=MADV_POPULATE_WRITE),
        metadata=md,
    )
    return pid, mapped.addr


async def run(ctx: BenchContext) -> list[Record]:
    samples = Samples()
    passes = ctx.n(8, 2)
    n_unary = ctx.n(64, 8)
    n_rt = ctx.n(400, 40)
    kernel, ktask, kaddr = await _kernel_setup()
    async with contextlib.AsyncExitStack() as stack:
        floor = await stack.enter_async_context(floor_server(ctx.scratch))
        vk = await stack.enter_async_context(
            vkernel_daemon(ctx.scratch, extra_args=("--memory", "1G", "--no-prefault"))
        )
        fstream = floor.pingpong()
        stack.callback(fstream.cancel)
        gupc = pb_grpc.GupServiceStub(vk.channel)
        call = gupc.Batch(metadata=vk.metadata)
        stack.callback(call.cancel)
        pid, addr = await _daemon_setup(vk)
        tpid, taddr = await _gup_test_setup(vk)
        # Warm up every path once.
        await _kernel_rate(kernel, ktask, kaddr, 1)
        await _stream_rate(call, pid, addr, OPS_PER_MESSAGE, 1)
        await _stream_rate(call, pid, addr, 1, 1)
        await _unary_rate(gupc, vk.metadata, pid, addr, 4)
        await _floor_rt(floor, fstream, 20)
        for r in range(ctx.rounds):
            kernel_first = r % 2 == 0
            if kernel_first:
                samples.add("kernel", await _kernel_rate(kernel, ktask, kaddr, passes))
            samples.add("stream", await _stream_rate(call, pid, addr, OPS_PER_MESSAGE, passes))
            if not kernel_first:
                samples.add("kernel", await _kernel_rate(kernel, ktask, kaddr, passes))
            samples.add("bidi_1op", await _stream_rate(call, pid, addr, 1, max(1, passes // 4)))
            samples.add("unary", await _unary_rate(gupc, vk.metadata, pid, addr, n_unary))
            bidi_us, unary_us = await _floor_rt(floor, fstream, n_rt)
            samples.add("floor_bidi", NR / (bidi_us * 1e-6))
            samples.add("floor_unary", NR / (2 * unary_us * 1e-6))
            await _gup_test(gupc, vk, samples, tpid, taddr)
        audit = await mpb_grpc.MemoryServiceStub(vk.channel).Audit(
            mpb.AuditRequest(), metadata=vk.metadata
        )
        if not audit.clean:
            raise RuntimeError(f"daemon audit not clean: {list(audit.problems)[:5]}")
    if mm_api.audit(kernel):
        raise RuntimeError("in-process kernel audit not clean")
    common = {"pages_per_call": NR, "transport": "uds", "loop": "asyncio"}
    records = [
        make_record(
            "pin_unpin_stream",
            samples["stream"],
            "pages/s",
            floor=samples["kernel"],
            goal=None,
            better="higher",
            floor_basis="in-kernel pin_user_pages_fast + unpin_user_pages, same chunks, no RPC",
            ops_per_message=OPS_PER_MESSAGE,
            **common,
        ),
        make_record(
            "pin_unpin_stream_abs",
            samples["stream"],
            "pages/s",
            floor=None,
            goal=1.0,
            better="higher",
            note="absolute goal: >= 1 M pages/s (ratio = value / 1e6)",
            **common,
        ),
        make_record(
            "pin_unpin_bidi_1op",
            samples["bidi_1op"],
            "pages/s",
            floor=samples["floor_bidi"],
            goal=None,
            better="higher",
            floor_basis="bare bidi ping-pong round trip as 512 pages per round trip",
            **common,
        ),
        make_record(
            "pin_unpin_unary",
            samples["unary"],
            "pages/s",
            floor=samples["floor_unary"],
            goal=None,
            better="higher",
            floor_basis="bare sequential unary calls, two per 512 pages",
            **common,
        ),
    ]
    records[1]["ratio"] = records[1]["value"] / GOAL_ABS
    for name in ("PIN_FAST_BENCHMARK", "GUP_FAST_BENCHMARK"):
        for part in ("get", "put"):
            records.append(
                make_record(
                    f"gup_test_{name.split('_')[0].lower()}_fast_{part}",
                    samples[f"{name}_{part}"],
                    "µs",
                    floor=LINUX_REF[(name, part)],
                    goal=None,
                    better="lower",
                    command=f"vkctl gup-test {'-a' if name.startswith('PIN') else '-u'} "
                    "-m 128 -n 512",
                    floor_basis="Linux reference (kernel-semantics C.2, CKI run, other machine)",
                    linux_line=f"{name}: Time: get:{LINUX_REF[(name, 'get')]} "
                    f"put:{LINUX_REF[(name, 'put')]} us",
                )
            )
    return records
