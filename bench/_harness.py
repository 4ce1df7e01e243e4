"""The benchmark runner behind ``python -m bench``.

Why a harness and not timed unit tests (DESIGN.md §9): the project machine changes speed by
1.5–2× over minutes, so an absolute figure means nothing on its own.  Every figure a benchmark
reports therefore travels next to a *floor* measured in the same run, back to back, and is judged
as a ratio to it; every result file also carries the ``calib`` yardstick (best of 200
``sum(range(1000))``, in µs) so that runs taken at different times can be told apart.

Interface for benchmark modules (``bench/bench_<name>.py``)::

    async def run() -> list[dict[str, Any]]          # or:
    async def run(ctx: BenchContext) -> list[dict[str, Any]]

Each returned dict is a record; :func:`make_record` builds one from per-round samples.  The
harness validates every record, fills ``ratio`` (if absent) and ``goal_met``, prints a table and
writes ``<results>/<name>.json``.  A benchmark that raises (or returns malformed records) makes
the run exit non-zero; a goal not met does not (the machine is noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import dataclasses
import datetime
import importlib
import importlib.metadata
import inspect
import json
import math
import os
import pkgutil
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, TextIO

import grpc

Record = dict[str, Any]
Better = Literal["lower", "higher"]

#: Default number of interleaved rounds; perf-floor.md reports medians of 5, we take a little
#: more so one round disturbed by another process does not move the median.
DEFAULT_ROUNDS = 7
#: Rounds under ``--quick``: enough to exercise every code path, not to trust the figures.
QUICK_ROUNDS = 3

DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------------------------
# Context


@dataclasses.dataclass(frozen=True)
class BenchContext:
    """What the harness tells a benchmark about the current run.

    ``scratch`` is a private temporary folder (short path, so UNIX sockets fit in
    ``sun_path``) that the harness deletes after the benchmark returns.
    """

    quick: bool = False
    rounds: int = DEFAULT_ROUNDS
    scratch: Path = dataclasses.field(default_factory=lambda: Path(tempfile.gettempdir()))

    def n(self, full: int, quick: int) -> int:
        """Iterations per round: ``full`` normally, ``quick`` under ``--quick``."""
        return quick if self.quick else full


_CONTEXT: contextvars.ContextVar[BenchContext] = contextvars.ContextVar("bench_context")


def current_context() -> BenchContext:
    """The running benchmark's context, for modules whose ``run()`` takes no argument."""
    try:
        return _CONTEXT.get()
    except LookupError:
        return BenchContext()


# --------------------------------------------------------------------------------------------
# Yardstick and statistics


def calib() -> float:
    """The perf-floor yardstick: best of 200 ``sum(range(1000))``, in µs.

    It tracks how fast the (noisy, shared) machine is right now; record it with every result.
    """
    best = math.inf
    for _ in range(200):
        t = time.perf_counter()
        sum(range(1000))
        best = min(best, time.perf_counter() - t)
    return best * 1e6


@dataclasses.dataclass(frozen=True)
class Stat:
    """Median [min–max] of repetitions — the form perf-floor.md reports everything in."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stat:
        """Summarise samples; raises on an empty sequence because a figure needs data."""
        if not samples:
            raise ValueError("no samples")
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))


def _ratio(value: float, floor: float, better: Better) -> float:
    """Floor-relative score where 1.0 means "as good as the floor" and higher is better."""
    if better == "lower":
        return floor / value if value > 0 else math.inf
    return value / floor if floor > 0 else math.inf


def make_record(
    name: str,
    value: Sequence[float] | float,
    unit: str,
    *,
    floor: Sequence[float] | float | None,
    goal: float | None,
    better: Better,
    **extra: Any,
) -> Record:
    """Build one record from per-round samples of the measured figure and of its floor.

    When ``value`` and ``floor`` are equally long sequences, round *i* of each was measured back
    to back, so the ratio is the median of the per-round (paired) ratios: a slow phase of the
    machine then hits both sides of a pair instead of skewing one median.  Otherwise the ratio
    is that of the medians.  ``goal`` is the minimum acceptable ratio.
    """
    rec: Record = {"name": name, "unit": unit, "better": better}
    values = [float(value)] if isinstance(value, int | float) else [float(v) for v in value]
    vs = Stat.of(values)
    rec.update(value=vs.median, min=vs.min, max=vs.max, rounds=vs.n)
    if floor is None:
        rec.update(floor=None, ratio=None)
    else:
        floors = [float(floor)] if isinstance(floor, int | float) else [float(f) for f in floor]
        fs = Stat.of(floors)
        rec.update(floor=fs.median, floor_min=fs.min, floor_max=fs.max)
        if len(floors) == len(values) and len(values) > 1:
            ratios = Stat.of([_ratio(v, f, better) for v, f in zip(values, floors, strict=True)])
            rec.update(ratio=ratios.median, ratio_min=ratios.min, ratio_max=ratios.max)
            rec["ratio_basis"] = "median of per-round paired ratios"
        else:
            rec["ratio"] = _ratio(vs.median, fs.median, better)
            rec["ratio_basis"] = "ratio of medians"
    rec["goal"] = goal
    rec.update(extra)
    return rec


_TIME_UNITS = ("ns", "µs", "us", "ms", "s")


def _infer_better(unit: str) -> Better | None:
    """Guess the direction of a unit for records that omit ``better``: times are lower-better,
    rates (anything per second) higher-better."""
    head = unit.split("/", 1)[0].strip()
    if "/s" in unit or unit.endswith("ps"):
        return "higher"
    if head in _TIME_UNITS:
        return "lower"
    return None


def _number(rec: Record, key: str, *, optional: bool) -> float | None:
    v = rec.get(key)
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
        raise ValueError(f"record {rec.get('name')!r}: {key!r} must be a number, got {v!r}")
    return float(v)


_GOAL_TEXT = re.compile(r"^\s*(?:ratio\s*)?(?:>=|≥)\s*([0-9]*\.?[0-9]+)\s*$")


def _parse_goal(name: str, text: str) -> float:
    """Accept a goal written as text ("ratio >= 0.7", "≥0.7"): it can only mean a minimum
    ratio, and a number is what the comparison and the JSON consumers need."""
    m = _GOAL_TEXT.match(text)
    if m is None:
        raise ValueError(
            f"record {name!r}: goal {text!r} is neither a number (the minimum ratio) nor "
            "of the form 'ratio >= X'"
        )
    return float(m.group(1))


def normalize_record(rec: Any) -> Record:
    """Validate one record and fill in ``ratio`` and ``goal_met``.

    Raises ``ValueError`` on a malformed record, so a broken benchmark fails the run loudly
    instead of writing figures nobody can compare.
    """
    if not isinstance(rec, dict):
        raise TypeError(f"a record must be a dict, got {type(rec).__name__}")
    out: Record = dict(rec)
    if not isinstance(out.get("name"), str) or not out["name"]:
        raise ValueError(f"record without a name: {rec!r}")
    if not isinstance(out.get("unit"), str):
        raise TypeError(f"record {out['name']!r}: 'unit' must be a string")
    value = _number(out, "value", optional=False)
    floor = _number(out, "floor", optional=True)
    if isinstance(out.get("goal"), str):
        out["goal_text"] = out["goal"]
        out["goal"] = _parse_goal(out["name"], out["goal"])
    goal = _number(out, "goal", optional=True)
    out.setdefault("floor", None)
    out["goal"] = goal
    ratio = _number(out, "ratio", optional=True)
    if ratio is None and floor is not None and value is not None:
        better = out.get("better") or _infer_better(out["unit"])
        if better not in ("lower", "higher"):
            raise ValueError(
                f"record {out['name']!r}: cannot tell whether {out['unit']!r} is better lower or "
                "higher; give 'better' or 'ratio'"
            )
        ratio = _ratio(value, floor, better)
    out["ratio"] = ratio
    out["goal_met"] = None if goal is None or ratio is None else ratio >= goal
    return out


# --------------------------------------------------------------------------------------------
# Server processes (floors and the daemon both run out of process, as in perf-floor.md)


def cpu_ns(pid: int) -> int:
    """On-CPU time of every thread of ``pid`` so far, from schedstat (ns)."""
    total = 0
    task_dir = f"/proc/{pid}/task"
    for tid in os.listdir(task_dir):
        try:
            with open(f"{task_dir}/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended between listdir and open
    return total


#: Options for readiness-probe channels only: a probe that races the server's bind would
#: otherwise leave the channel in gRPC's reconnect backoff (1 s and growing) and delay startup.
#: Measurement channels keep the defaults, the same for floor and daemon.
PROBE_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 100),
]


def probe_channel(target: str) -> grpc.aio.Channel:
    """An insecure channel for polling a starting server (fast reconnects)."""
    return grpc.aio.insecure_channel(target, options=PROBE_CHANNEL_OPTIONS)


class ServerProcess:
    """A server child process whose output goes to files, so a chatty log can never block it
    on a full pipe, and whose log tail can be quoted when it misbehaves."""

    def __init__(
        self,
        argv: Sequence[str],
        scratch: Path,
        label: str,
        *,
        quiet: Callable[[str], bool] | None = None,
    ) -> None:
        """Start ``argv``; ``quiet`` tells routine log lines to leave out of quoted tails."""
        self.label = label
        self._quiet = quiet
        self.log_path = scratch / f"{label}.log"
        self._log: TextIO = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_ns(self) -> int:
        return cpu_ns(self.proc.pid)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        kept = [ln for ln in text.splitlines() if not (self._quiet and self._quiet(ln))]
        return "\n".join(kept[-lines:])

    def check_alive(self) -> None:
        """Raise, quoting the log, if the server has exited."""
        rc = self.proc.poll()
        if rc is not None:
            raise RuntimeError(
                f"{self.label} (pid {self.pid}) exited with status {rc}; log tail:\n"
                f"{self.log_tail()}"
            )

    async def wait_until(
        self,
        probe: Callable[[], Awaitable[bool]],
        limit_s: float,
        what: str,
    ) -> None:
        """Poll ``probe`` until it returns true, failing early if the process dies.

        ``probe`` may raise ``OSError``, ``grpc.RpcError`` or ``TimeoutError`` while the server
        is still starting; those are retried and the last one is quoted on timeout.
        """
        deadline = time.monotonic() + limit_s
        last: BaseException | None = None
        while True:
            self.check_alive()
            try:
                if await probe():
                    return
            except (OSError, grpc.RpcError, TimeoutError) as exc:
                last = exc
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.label} (pid {self.pid}) not {what} after {limit_s:.0f} s"
                    f" (last error: {last!r}); log tail:\n{self.log_tail()}"
                )
            await asyncio.sleep(0.05)

    async def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it lingers past ``grace_s``; returns the exit status."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.to_thread(self.proc.wait, grace_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    await asyncio.to_thread(self.proc.wait)
            return self.proc.returncode
        finally:
            self._log.close()


# --------------------------------------------------------------------------------------------
# Discovery and running


@dataclasses.dataclass
class Outcome:
    """What one benchmark produced: records, or the error that stopped it."""

    name: str
    module: str
    records: list[Record] = dataclasses.field(default_factory=list)
    error: str | None = None
    path: Path | None = None


def discover(package: str = "bench") -> list[str]:
    """Names of the ``bench_*`` modules of ``package``, sorted, without importing them (an import
    error must count as that benchmark failing, not the whole run)."""
    pkg = importlib.import_module(package)
    return sorted(
        f"{package}.{m.name}"
        for m in pkgutil.iter_modules(pkg.__path__)
        if m.name.startswith("bench_") and not m.ispkg
    )


def short_name(module: str) -> str:
    """``bench.bench_transport`` → ``transport``: the results file name and table label."""
    return module.rsplit(".", 1)[-1].removeprefix("bench_")


async def _invoke(mod: ModuleType, ctx: BenchContext) -> Any:
    run = getattr(mod, "run", None)
    if run is None or not inspect.iscoroutinefunction(run):
        raise TypeError(f"{mod.__name__} must define `async def run()` or `async def run(ctx)`")
    params = [
        p
        for p in inspect.signature(run).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    token = _CONTEXT.set(ctx)
    try:
        return await (run(ctx) if params else run())
    finally:
        _CONTEXT.reset(token)


def _versions() -> dict[str, str | None]:
    def ver(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "grpcio": ver("grpcio"),
        "protobuf": ver("protobuf"),
        "numpy": ver("numpy"),
        "anyio": ver("anyio"),
        "vkernel": ver("vkernel"),
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            # --dirty: other engineers' uncommitted edits are part of what was measured.
            ["git", "describe", "--always", "--dirty", "--abbrev=7"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_one(module: str, ctx_args: dict[str, Any], results_dir: Path) -> Outcome:
    """Import and run one benchmark in a fresh event loop and write its results file."""
    outcome = Outcome(name=short_name(module), module=module)
    scratch = Path(tempfile.mkdtemp(prefix="vkb-"))
    ctx = BenchContext(scratch=scratch, **ctx_args)
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.perf_counter()
    calib_before = calib()
    try:
        mod = importlib.import_module(module)
        raw = asyncio.run(_invoke(mod, ctx))
        if not isinstance(raw, list):
            raise TypeError(f"run() must return a list of records, got {type(raw).__name__}")
        outcome.records = [normalize_record(r) for r in raw]
        for r in outcome.records:
            r.setdefault("benchmark", outcome.name)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        outcome.error = "".join(traceback.format_exception(exc)).rstrip()
        return outcome
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    doc = {
        "benchmark": outcome.name,
        "module": module,
        "timestamp": started.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "duration_s": round(time.perf_counter() - t0, 3),
        "calib": round(calib_before, 3),
        "calib_after": round(calib(), 3),
        "calib_unit": "µs (best of 200 sum(range(1000)))",
        **_versions(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "commit": _git_commit(),
        "quick": ctx.quick,
        "rounds": ctx.rounds,
        "records": outcome.records,
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    outcome.path = results_dir / f"{outcome.name}.json"
    outcome.path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return outcome


# --------------------------------------------------------------------------------------------
# Table


def fmt(v: Any) -> str:
    """Three significant-ish digits without scientific notation: figures are read by eye."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if not isinstance(v, int | float):
        return str(v)
    if math.isinf(v):
        return "inf"
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def fmt_ratio(v: Any) -> str:
    """Ratios and goals always with two decimals, so a column of them lines up."""
    if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
        return f"{v:.2f}"
    return fmt(v)


def _spread(rec: Record, key: str, lo: str, hi: str, form: Callable[[Any], str] = fmt) -> str:
    s = form(rec.get(key))
    if rec.get(lo) is not None and rec.get(hi) is not None:
        s += f" [{form(rec[lo])}–{form(rec[hi])}]"
    return s


def format_table(outcomes: Sequence[Outcome]) -> str:
    """One row per record: value and floor as median [min–max], ratio, goal, whether met."""
    header = ("benchmark", "name", "unit", "value", "floor", "ratio", "goal", "met")
    rows: list[tuple[str, ...]] = [header]
    for o in outcomes:
        if o.error is not None:
            rows.append((o.name, "FAILED", "", "", "", "", "", ""))
            continue
        for r in o.records:
            rows.append(
                (
                    o.name,
                    r["name"],
                    r["unit"],
                    _spread(r, "value", "min", "max"),
                    _spread(r, "floor", "floor_min", "floor_max"),
                    _spread(r, "ratio", "ratio_min", "ratio_max", fmt_ratio),
                    "–" if r.get("goal") is None else f"≥{fmt_ratio(r['goal'])}",
                    fmt(r.get("goal_met")),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


# --------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run vkernel's benchmarks; every figure is reported next to a floor "
        "measured in the same run.",
    )
    p.add_argument(
        "-k",
        dest="keywords",
        action="append",
        default=[],
        metavar="SUBSTRING",
        help="run only benchmarks whose module name contains SUBSTRING (repeatable: any)",
    )
    p.add_argument(
        "--quick", action="store_true", help="few iterations and rounds: a smoke test, not data"
    )
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per figure")
    p.add_argument(
        "--results-dir",
        type=Path,
        default=DEFAULT_RESULTS_DIR,
        help="where to write one JSON file per benchmark (default: bench/results)",
    )
    p.add_argument(
        "--package", default="bench", help="package whose bench_*.py modules are benchmarks"
    )
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected benchmarks; exit status 1 if any raised, 2 if none matched."""
    args = build_parser().parse_args(argv)
    modules = [
        m for m in discover(args.package) if not args.keywords or any(k in m for k in args.keywords)
    ]
    if args.list:
        print("\n".join(modules))
        return 0
    if not modules:
        print(f"no benchmark matches {args.keywords!r} in {args.package}", file=sys.stderr)
        return 2
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    if rounds < 1:
        print("--rounds must be at least 1", file=sys.stderr)
        return 2
    ctx_args = {"quick": args.quick, "rounds": rounds}
    outcomes: list[Outcome] = []
    for module in modules:
        print(f"== {short_name(module)} ({module}) calib {calib():.1f} µs", flush=True)
        outcome = run_one(module, ctx_args, args.results_dir)
        outcomes.append(outcome)
        if outcome.error is not None:
            print(f"!! benchmark {outcome.name} ({module}) raised:\n{outcome.error}", flush=True)
        else:
            print(format_table([outcome]), flush=True)
            print(f"-> {outcome.path}", flush=True)
    failed = [o for o in outcomes if o.error is not None]
    missed = [r for o in outcomes for r in o.records if r.get("goal_met") is False]
    if len(outcomes) > 1:
        print()
        print(format_table(outcomes))
    print(
        f"\n{len(outcomes)} benchmark(s), {sum(len(o.records) for o in outcomes)} record(s); "
        f"{len(missed)} goal(s) not met (reported, not failing); {len(failed)} failed"
        + (": " + ", ".join(o.name for o in failed) if failed else "")
    )
    return 1 if failed else 0
