"""vkernel's benchmarks: every figure measured next to a floor from the same run.

Run them with ``make bench`` or ``python -m bench [-k SUBSTRING] [--quick]``.  A benchmark is a
module ``bench/bench_<name>.py`` defining ``async def run() -> list[dict]`` (or ``run(ctx)``
taking a :class:`BenchContext`); see :mod:`bench._harness` for the record format.
"""

from bench._harness import (
    BenchContext,
    Record,
    ServerProcess,
    Stat,
    calib,
    cpu_ns,
    current_context,
    make_record,
)

__all__ = [
    "BenchContext",
    "Record",
    "ServerProcess",
    "Stat",
    "calib",
    "cpu_ns",
    "current_context",
    "make_record",
]
