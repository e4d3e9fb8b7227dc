"""Session ids the command line prints: unambiguous, never trimmed, never read as markup.

Ids are identities: ``" chat"`` and ``"chat"`` are two sessions. Printed bare, the leading
space vanished in ``turnstore sessions``, a right-to-left override reordered the line, and
``[bold]`` in an id was drawn bold on a terminal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.helpers import run_result, turn
from tests.migration_helpers import run_cli
from turnstore import AdvancedSQLiteSession, dispose_engines
from turnstore.cli import common
from turnstore.cli.main import app

# Each id with how every command prints it.
IDS = {
    "plain": "plain",
    " lead": "' lead'",
    "trail ": "'trail '",
    "two  spaces": "'two  spaces'",
    "tab\there": "'tab\\there'",
    "\u202eevil": "'\\u202eevil'",
    "[bold]loud[/bold]": "[bold]loud[/bold]",
    "'quoted'": "\"'quoted'\"",
    "": "''",
}


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), env={common.URL_VARIABLE: None})


@pytest.fixture
async def url(tmp_path: Path) -> str:
    path = tmp_path / "ids.db"
    for session_id in IDS:
        async with AdvancedSQLiteSession(
            session_id=session_id, db_path=path, create_tables=True
        ) as session:
            await session.add_items(turn("hello there"))
            await session.store_run_usage(run_result(), model="gpt-4o-mini")
    await dispose_engines()
    return f"sqlite+aiosqlite:///{path}"


def test_shown_id_quotes_only_what_could_be_misread() -> None:
    for session_id, shown in IDS.items():
        assert common.shown_id(session_id) == shown, session_id
    assert common.shown_id("caf\u00e9-\u65e5\u672c") == "caf\u00e9-\u65e5\u672c"
    assert common.shown_id("a\x1bb") == "'a\\x1bb'"
    assert common.shown_id("\u00a0nbsp") == "'\\xa0nbsp'"


def test_sessions_search_tree_and_usage_print_ids_unambiguously(url: str) -> None:
    listed = invoke("sessions", "--url", url)
    assert listed.exit_code == 0, listed.stderr
    # "2026-12-06 21:55:01  <id>  user=-  items=2  hello there"
    columns = [line[21 : line.index("  user=")] for line in listed.stdout.splitlines()]
    assert sorted(columns) == sorted(IDS.values())
    # --json keeps every id exact.
    data = json.loads(invoke("sessions", "--url", url, "--json").stdout)
    assert sorted(s["session_id"] for s in data["sessions"]) == sorted(IDS)

    # "2026-12-06 21:55:01  <id> main:1  user: hello there"
    found = invoke("search", "hello", "--url", url, "--limit", "100").stdout.splitlines()
    assert {line[21 : line.index(" main:1  ")] for line in found} == set(IDS.values())
    for session_id, shown in IDS.items():
        tree = invoke("tree", session_id, "--url", url)
        assert tree.exit_code == 0, (session_id, tree.stderr)
        assert tree.stdout.splitlines()[0] == shown
    usage = invoke("usage", "--by", "session", "--url", url).stdout.splitlines()[1:-1]
    assert len(usage) == len(IDS)
    for shown in IDS.values():
        assert any(line.startswith(f"{shown} ") for line in usage), shown


def test_a_terminal_never_reads_markup_in_an_id(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "is_terminal", lambda _stream: True)
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "160")
    tree = invoke("tree", "[bold]loud[/bold]", "--url", url)
    assert tree.exit_code == 0, tree.stderr
    assert tree.stdout.splitlines()[0] == "[bold]loud[/bold]"
    usage = invoke("usage", "--by", "session,model", "--url", url)
    assert usage.exit_code == 0, usage.stderr
    assert "[bold]loud[/bold]" in usage.stdout
    assert "' lead'" in usage.stdout
    shown = invoke("show", "[bold]loud[/bold]", "--url", url)
    assert shown.exit_code == 0, shown.stderr
    assert "user: hello there" in shown.stdout


def test_rm_names_the_exact_session_it_asks_about_and_deletes(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = invoke("rm", " lead", "--url", url)
    assert refused.exit_code == common.ExitCode.NOT_CONFIRMED
    assert "deleting session ' lead' removes it" in refused.stderr
    with monkeypatch.context() as patch:
        patch.setattr(common, "stdin_is_terminal", lambda: True)
        patch.setattr(common, "is_terminal", lambda _stream: True)
        declined = CliRunner().invoke(
            app, ["rm", "\u202eevil", "--url", url], input="n\n", env={common.URL_VARIABLE: None}
        )
    assert declined.exit_code == common.ExitCode.NOT_CONFIRMED
    assert "Delete session '\\u202eevil' and everything in it?" in declined.stderr
    assert "\u202e" not in declined.stderr
    deleted = invoke("rm", " lead", "--url", url, "--yes")
    assert deleted.exit_code == 0, deleted.stderr
    assert deleted.stdout.startswith("deleted session ' lead' (")
    # Only the session with the leading space went; "lead" never existed.
    left = json.loads(invoke("sessions", "--url", url, "--json").stdout)["sessions"]
    assert sorted(s["session_id"] for s in left) == sorted(set(IDS) - {" lead"})
    missing = invoke("rm", "trail", "--url", url, "--yes")
    assert missing.exit_code == common.ExitCode.NOT_FOUND
    assert missing.stderr == "turnstore rm: error: No session 'trail' in this database\n"
    spaced = invoke("show", "two  spaces", "--url", url, "--turn", "9")
    assert spaced.exit_code == common.ExitCode.NOT_FOUND
    assert "'two  spaces'" in spaced.stderr  # one_line keeps the spaces inside an id


def test_a_real_process_lists_ids_unambiguously(url: str) -> None:
    listed = run_cli(["sessions", "--url", url])
    assert listed.returncode == 0, listed.stderr
    assert "  'trail '  " in listed.stdout
    assert "  '\\u202eevil'  " in listed.stdout
    assert "\u202e" not in listed.stdout
