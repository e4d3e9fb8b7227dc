"""The store benchmark runs end to end on every backend and reports every figure.

Only the report's shape is checked (every workload, every figure a number, the prune removed
every session it was given), never a timing: the machine running the tests is shared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import Backend
from tests.test_benchmark_smoke import parse_report, run_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "store.py"


def numbers(figures: Any) -> list[Any]:
    if isinstance(figures, dict):
        return [value for inner in figures.values() for value in numbers(inner)]
    return [figures]


async def test_quick_store_benchmark_reports_every_workload(backend: Backend) -> None:
    args = ["--quick", "--backend", backend.name]
    if backend.name != "sqlite":
        args += ["--url", backend.url]
    code, stdout, stderr = await run_script(SCRIPT, *args, within=600)
    assert code == 0, stderr
    report = parse_report(stdout)
    figures = report["figures"]
    assert set(figures) == {"listing", "per_user", "prune"}
    assert set(figures["listing"]) >= {"200", "2000", "ratio_largest_to_smallest_page_1_p50"}
    assert figures["prune"]["sessions"] == 1000
    assert figures["per_user"]["users"] == 500
    values = numbers(figures)
    assert values
    assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    # Latencies and rates are positive; only the "added" latencies may be zero or negative.
    timings = numbers({k: v for k, v in figures["prune"].items() if not k.startswith("added")})
    assert all(v > 0 for v in timings)
