"""Many OS processes on one store (scripts/stress.py), small enough for every test run."""

from __future__ import annotations

import os

from scripts.stress import run_stress

from tests.conftest import Backend

# TURNSTORE_STRESS_SEED replays a failing run's choices (the seed is in the failure message).
SEED = int(os.environ.get("TURNSTORE_STRESS_SEED", "20261121"))


async def test_processes_mixing_every_operation_keep_the_store_consistent(
    backend: Backend,
) -> None:
    report = await run_stress(
        backend.url, processes=4, ops=40, seed=SEED, engine_options=backend.engine_options
    )
    assert report.problems == [], f"seed {SEED}:\n{report.summary()}"
    # The run exercised what it claims to: writes and branch changes on shared sessions.
    ran = report.operations
    for operation in ("own append", "shared append", "wild append", "wild pop", "own branch"):
        assert ran[operation] > 0, report.summary()
