"""The benchmark harness runs end to end on every backend and reports every workload.

Only the shape of the report is checked (every workload, every figure a positive number, no
failed turn), never a timing: the machine running the tests is shared and noisy.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Backend, unavailable

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
WORKLOADS = {"turn_cycle", "growth", "full_read", "analytics", "concurrency", "memory"}
ANALYTICS = {
    "get_session_usage_ms",
    "get_turn_usage_ms",
    "get_conversation_turns_ms",
    "get_tool_usage_ms",
    "find_turns_by_content_ms",
    "list_branches_ms",
}


async def run_script(script: Path, *args: str, within: float = 300) -> tuple[int, str, str]:
    """Run a benchmark script for at most ``within`` seconds; exit status, stdout, stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=within)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def run_quick(*args: str) -> tuple[int, str, str]:
    return await run_script(SCRIPT, "--quick", *args)


def parse_report(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith("BENCH_JSON ")]
    assert len(lines) == 1, stdout
    report: dict[str, Any] = json.loads(lines[0].removeprefix("BENCH_JSON "))
    return report


def is_positive_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


async def test_quick_benchmark_reports_every_workload(backend: Backend) -> None:
    args = ["--backend", backend.name]
    if backend.name != "sqlite":
        args += ["--url", backend.url]
    code, stdout, stderr = await run_quick(*args)
    assert code == 0, stderr

    report = parse_report(stdout)
    figures = report["figures"]
    assert set(figures) == WORKLOADS
    # The SDK is in the test extra; its class only exists for SQLite.
    impls = {"turnstore", "sdk"} if backend.name == "sqlite" else {"turnstore"}
    for workload, by_impl in figures.items():
        assert set(by_impl) == impls, workload
        for impl, metrics in by_impl.items():
            assert metrics, (workload, impl)
            bad = {name: value for name, value in metrics.items() if not is_positive_number(value)}
            assert not bad, (workload, impl, bad)

    sizes = report["sizes"]
    ours = {workload: by_impl["turnstore"] for workload, by_impl in figures.items()}
    assert set(ours["turn_cycle"]) == {
        "cycle_ms",
        "get_items_ms",
        "add_items_ms",
        "store_run_usage_ms",
    }
    for items in sizes["growth_items"]:
        for metric in ("add_items_ms", "get_items_20_ms", "branch_ms"):
            assert f"{metric}@{items}_items" in ours["growth"]
    for turns in sizes["branch_turns"]:
        assert f"branch_ms@{turns}_turns" in ours["growth"]
    assert set(ours["full_read"]) == {f"get_items_ms@{sizes['full_read_items']}_items"}
    assert set(ours["analytics"]) == ANALYTICS

    variants = {"closed", "wide"} if backend.name == "sqlite" else {"closed", "wide", "open"}
    assert set(ours["concurrency"]) == {
        f"{variant}_{figure}"
        for variant in variants
        for figure in ("turns_per_s", "p50_ms", "p95_ms")
    }
    # turnstore must not fail a single turn under concurrency, on any backend.
    assert report["errors"]["concurrency"]["turnstore"] == {
        variant: {"errors": 0, "locked": 0} for variant in variants
    }

    assert set(ours["memory"]) == {"baseline_peak_mb", "get_items_peak_mb", "iter_items_peak_mb"}
    memory_notes = report["notes"]["memory"]["turnstore"]
    assert {"get_items_delta_mb", "iter_items_delta_mb"} <= set(memory_notes)
    # The SDK's class may log lock timeouts on a busy machine; turnstore must log nothing.
    assert not any(name.startswith("turnstore") for name in report["logged_errors"])


@pytest.mark.parametrize("through", ["asyncpg", "sqlalchemy"])
async def test_round_trip_ceiling_script_prints_a_rate_per_count(
    postgres_url: str, through: str
) -> None:
    dsn = postgres_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    code, stdout, stderr = await run_script(
        SCRIPT.with_name("postgres_round_trips.py"),
        *("--dsn", dsn, "--through", through, "--round-trips", "1", "2"),
        *("--tasks", "3", "--turns", "2"),
        within=120,
    )
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert [line.split(":")[0].strip() for line in lines] == [
        "1 round trips per turn",
        "2 round trips per turn",
    ]
    assert all("turns/s" in line for line in lines)


async def test_server_floor_script_reports_rate_latency_and_cpu(postgres_url: str) -> None:
    if shutil.which("pgbench") is None:
        unavailable("postgres", "pgbench, which the server-floor script drives, is not on PATH")
    code, stdout, stderr = await run_script(
        SCRIPT.with_name("postgres_server_floor.py"),
        *("--url", postgres_url, "--clients", "2", "--seconds", "1", "--rate", "50"),
        within=120,
    )
    assert code == 0, stderr
    lines = [line for line in stdout.splitlines() if line.startswith("FLOOR_JSON ")]
    assert len(lines) == 1, stdout
    figures = json.loads(lines[0].removeprefix("FLOOR_JSON "))
    assert set(figures) == {
        "turns_per_s",
        "p50_ms",
        "p95_ms",
        "machine_cpu_ms_per_turn",
        "pgbench_cpu_ms_per_turn",
        "server_cpu_ms_per_turn",
        "machine_busy_share",
        "cpus",
    }
    assert all(is_positive_number(value) for value in figures.values()), figures


async def test_usage_rollup_benchmark_reports_its_figures() -> None:
    script = SCRIPT.parent / "usage_rollups.py"
    code, stdout, stderr = await run_script(script, "--quick")
    assert code == 0, stderr
    report = parse_report(stdout)
    assert report["backend"] == "sqlite"
    figures = {name: value for name, value in report.items() if name != "backend"}
    assert {
        "usage_write_with_models_p50_ms",
        "usage_write_previous_p50_ms",
        "rollup_large_over_small",
    } <= set(figures)
    assert all(is_positive_number(value) for value in figures.values()), figures


async def test_cold_start_script_reports_first_and_warm_calls(backend: Backend) -> None:
    args = ["--quick", "--backend", backend.name]
    if backend.name != "sqlite":
        args += ["--url", backend.url]
    code, stdout, stderr = await run_script(SCRIPT.with_name("cold_start.py"), *args, within=180)
    assert code == 0, stderr
    lines = [line for line in stdout.splitlines() if line.startswith("COLD_JSON ")]
    assert len(lines) == 1, stdout
    report = json.loads(lines[0].removeprefix("COLD_JSON "))
    assert set(report) == {backend.name}
    assert set(report[backend.name]) == {"create_tables", "no_create_tables", "sqlalchemy_floor"}
    for case, figures in report[backend.name].items():
        for name in ("import_ms", "first_ms", "warm_ms", "first_cpu_ms", "warm_cpu_ms"):
            assert is_positive_number(figures[name]), (case, name)
        assert is_positive_number(figures["process_ms"]), case
        if case != "sqlalchemy_floor":
            assert is_positive_number(figures["driver_import_ms"]), case
        assert figures["first_minus_warm_ms"] == pytest.approx(
            figures["first_ms"] - figures["warm_ms"], abs=0.02
        )
        assert figures["first_minus_warm_cpu_ms"] == pytest.approx(
            figures["first_cpu_ms"] - figures["warm_cpu_ms"], abs=0.02
        )
        # Nothing in the measured program involves SDK objects, so the SDK stays unimported.
        assert figures["sdk_imported"] is False, case
