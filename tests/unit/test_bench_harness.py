"""The benchmark harness: records carry same-run floors, failures fail the run, goals do not.

Why these tests: the harness is what makes performance claims comparable on a noisy machine
(DESIGN.md §9), so its bookkeeping — ratios, ``goal_met``, the ``calib`` yardstick, exit status
— must be right even though the figures themselves are never asserted.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest

from bench._harness import (
    Stat,
    current_context,
    format_table,
    main,
    make_record,
    normalize_record,
)

REPO = Path(__file__).resolve().parents[2]

FAKE_OK = """
from bench import make_record

async def run():
    return [
        make_record("fast", [10.0, 12.0, 11.0], "µs/op", floor=[5.0, 6.0, 5.5], goal=0.4,
                    better="lower"),
        make_record("rate", [50.0, 40.0, 45.0], "ops/s", floor=[100.0, 100.0, 90.0], goal=0.9,
                    better="higher"),
        {"name": "plain", "value": 3.0, "unit": "ms", "floor": 1.5, "goal": None},
    ]
"""

FAKE_CTX = """
from bench import BenchContext, current_context

async def run(ctx: BenchContext):
    assert current_context() is ctx
    assert ctx.scratch.is_dir()
    return [{"name": "ctx", "value": float(ctx.rounds), "unit": "rounds", "floor": None,
             "goal": None, "quick": ctx.quick, "scratch": str(ctx.scratch)}]
"""

FAKE_BOOM = """
async def run():
    raise RuntimeError("kaboom from the fake benchmark")
"""

FAKE_BAD_RECORD = """
async def run():
    return [{"name": "no-value", "unit": "µs"}]
"""


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A throwaway package of benchmark modules, importable under a unique name."""
    name = f"fakebench_{uuid.uuid4().hex[:8]}"
    pkg = tmp_path / "src" / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "bench_ok.py").write_text(FAKE_OK)
    (pkg / "bench_ctx.py").write_text(FAKE_CTX)
    (pkg / "bench_boom.py").write_text(FAKE_BOOM)
    (pkg / "bench_badrecord.py").write_text(FAKE_BAD_RECORD)
    (pkg / "helper.py").write_text("raise AssertionError('not a benchmark, never imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    return name


def _load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def test_paired_ratio_is_the_median_of_per_round_ratios_and_higher_is_better() -> None:
    rec = make_record(
        "x", [10.0, 20.0, 40.0], "µs", floor=[5.0, 20.0, 20.0], goal=0.7, better="lower"
    )
    assert rec["value"] == 20.0
    assert (rec["min"], rec["max"]) == (10.0, 40.0)
    assert rec["floor"] == 20.0
    assert rec["ratio"] == 0.5  # per-round 0.5, 1.0, 0.5
    assert (rec["ratio_min"], rec["ratio_max"]) == (0.5, 1.0)
    rate = make_record("r", 50.0, "calls/s", floor=100.0, goal=0.7, better="higher")
    assert rate["ratio"] == 0.5


def test_normalize_fills_ratio_from_the_unit_and_goal_met() -> None:
    slow = normalize_record({"name": "t", "value": 2.0, "unit": "ms", "floor": 1.0, "goal": 0.7})
    assert slow["ratio"] == 0.5
    assert slow["goal_met"] is False
    fast = normalize_record(
        {"name": "r", "value": 90.0, "unit": "calls/s", "floor": 100.0, "goal": 0.7}
    )
    assert fast["ratio"] == pytest.approx(0.9)
    assert fast["goal_met"] is True
    texted = normalize_record(
        {"name": "g", "value": 2.0, "unit": "ns/op", "floor": 1.0, "goal": "ratio >= 0.4"}
    )
    assert texted["goal"] == 0.4
    assert texted["goal_text"] == "ratio >= 0.4"
    assert texted["goal_met"] is True
    info = normalize_record({"name": "i", "value": 1.0, "unit": "pages"})
    assert info["floor"] is None
    assert info["ratio"] is None
    assert info["goal_met"] is None


@pytest.mark.parametrize(
    "bad",
    [
        {"unit": "µs", "value": 1.0},
        {"name": "n", "unit": "µs"},
        {"name": "n", "unit": "µs", "value": math.nan},
        {"name": "n", "unit": "widgets", "value": 1.0, "floor": 2.0},
        {"name": "n", "value": 1.0},
        {"name": "n", "unit": "µs", "value": 1.0, "floor": 1.0, "goal": "fast enough"},
        ["not", "a", "dict"],
    ],
)
def test_malformed_records_are_rejected(bad: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        normalize_record(bad)


def test_stat_is_median_min_max() -> None:
    assert Stat.of([3.0, 1.0, 2.0]) == Stat(2.0, 1.0, 3.0, 3)
    with pytest.raises(ValueError, match="no samples"):
        Stat.of([])


def test_context_outside_a_run_is_the_full_default() -> None:
    assert current_context().quick is False


def test_run_writes_one_file_per_benchmark_and_fails_on_a_raising_one(
    fake_package: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "results"
    status = main(["--package", fake_package, "--results-dir", str(results), "--quick"])
    out = capsys.readouterr().out
    assert status == 1
    assert "benchmark boom" in out
    assert "kaboom from the fake benchmark" in out
    assert "benchmark badrecord" in out
    assert sorted(p.name for p in results.iterdir()) == ["ctx.json", "ok.json"]

    ok = _load(results / "ok.json")
    for key in ("calib", "timestamp", "python", "grpcio", "numpy", "records"):
        assert key in ok
    assert 0 < ok["calib"] < 10_000
    assert ok["quick"] is True
    by_name = {r["name"]: r for r in ok["records"]}
    for rec in by_name.values():
        assert {"name", "value", "unit", "floor", "ratio", "goal", "goal_met"} <= rec.keys()
    assert by_name["fast"]["goal_met"] is True
    assert by_name["rate"]["goal_met"] is False  # reported in the table, not a failure
    assert by_name["plain"]["ratio"] == 0.5
    assert "NO" in out

    ctx = _load(results / "ctx.json")["records"][0]
    assert ctx["quick"] is True
    assert ctx["value"] == 3.0  # QUICK_ROUNDS
    assert not Path(ctx["scratch"]).exists()  # the scratch folder is cleaned up


def test_missed_goals_alone_do_not_fail_and_k_selects(
    fake_package: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "results"
    assert main(["--package", fake_package, "--results-dir", str(results), "-k", "ok"]) == 0
    assert [p.name for p in results.iterdir()] == ["ok.json"]
    assert "1 goal(s) not met" in capsys.readouterr().out
    assert main(["--package", fake_package, "-k", "nothing-matches"]) == 2


def test_rounds_option_reaches_the_benchmark(fake_package: str, tmp_path: Path) -> None:
    results = tmp_path / "results"
    assert (
        main(
            ["--package", fake_package, "--results-dir", str(results), "-k", "ctx", "--rounds", "5"]
        )
        == 0
    )
    assert _load(results / "ctx.json")["records"][0]["value"] == 5.0


def test_table_shows_median_and_spread() -> None:
    from bench._harness import Outcome

    rec = normalize_record(
        make_record(
            "u",
            [700.0, 800.0, 900.0],
            "µs/call",
            floor=[560.0, 560.0, 720.0],
            goal=0.7,
            better="lower",
        )
    )
    table = format_table([Outcome("transport", "bench.bench_transport", [rec])])
    assert "800 [700–900]" in table
    assert "560 [560–720]" in table
    assert "≥0.70" in table


def test_quick_transport_against_the_real_daemon(tmp_path: Path) -> None:
    """The CLI end to end: floor server and daemon as processes, five floor-paired figures."""
    results = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "-k",
            "transport",
            "--quick",
            "--rounds",
            "2",
            "--results-dir",
            str(results),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = _load(results / "transport.json")
    names = {r["name"] for r in doc["records"]}
    assert {"unary_seq", "unary_c8", "bidi_pingpong"} <= names
    for rec in doc["records"]:
        assert rec["floor"] > 0
        assert rec["ratio"] > 0
    assert textwrap.dedent(doc["benchmark"]) == "transport"
