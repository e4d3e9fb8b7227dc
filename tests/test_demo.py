"""The README's first command: ``turnstore demo`` on a local SQLite file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from turnstore.cli.main import main


def test_demo_plays_the_branch_workflow(
    sqlite_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")
    assert main(["demo", "--db", str(sqlite_path)]) == 0
    out = capsys.readouterr().out
    assert "Branched at turn 2 into 'weather_focus'" in out
    assert "main                     8           3  *" in out
    assert "weather_focus            4           2" in out
    assert "weather_focus       2         1      58      14      72" in out
    assert "Session total: 254 tokens in 5 requests over 4 turns" in out
    assert "get_weather x1 (turn 2)" in out
    with sqlite3.connect(sqlite_path) as conn:
        assert conn.execute("SELECT count(*) FROM agent_messages").fetchone() == (10,)

    # Running it again replaces the file instead of piling onto it.
    assert main(["demo", "--db", str(sqlite_path)]) == 0
    with sqlite3.connect(sqlite_path) as conn:
        assert conn.execute("SELECT count(*) FROM agent_messages").fetchone() == (10,)
