"""benchmarks/moving.py runs end to end in its quick mode and reports every figure.

Only the report's shape is checked (every figure a positive number), never a timing.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_benchmark_smoke import is_positive_number, run_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "moving.py"
FIGURES = {
    "sessions",
    "items",
    "floor_rows_per_s",
    "floor_peak_rss_mb",
    "copy_rows_per_s",
    "copy_items_per_s",
    "copy_seconds",
    "copy_peak_rss_mb",
    "copy_to_floor",
    "export_sqlite_items_per_s",
    "export_file_mb",
    "moves_peak_rss_mb",
} | {
    f"{kind}_{backend}_items_per_s"
    for kind in ("import", "export")
    for backend in ("sqlite", "postgres", "mysql")
}


async def test_quick_moving_benchmark_reports_every_figure(
    postgres_url: str, mysql_url: str
) -> None:
    code, stdout, stderr = await run_script(
        SCRIPT, "--quick", "--postgres", postgres_url, "--mysql", mysql_url, within=600
    )
    assert code == 0, stderr
    lines = [line for line in stdout.splitlines() if line.startswith("COPY_JSON ")]
    assert len(lines) == 1, stdout
    figures = json.loads(lines[0].removeprefix("COPY_JSON "))
    assert set(figures) == FIGURES
    assert all(is_positive_number(value) for value in figures.values()), figures
    assert figures["items"] == 100 * figures["sessions"]
