"""``turnstore sessions``, ``rm``, ``prune`` and ``erase-user`` on a SQLite file."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.helpers import turn
from tests.migration_helpers import run_cli
from turnstore import Store
from turnstore.cli import common
from turnstore.cli.main import app
from turnstore.cli.sessions import parse_duration


def invoke(args: list[str]) -> Any:
    return CliRunner().invoke(app, args, env={common.URL_VARIABLE: None})


@pytest.fixture
async def url(sqlite_path: Path) -> str:
    """A file with three sessions of alice, two of bob and one without an owner."""
    address = f"sqlite+aiosqlite:///{sqlite_path}"
    async with Store(url=address, create_tables=True) as store:
        for owner, count in (("alice", 3), ("bob", 2), (None, 1)):
            for n in range(count):
                session = store.session(f"{owner}-{n}", user_id=owner, title=f"chat {n}")
                await session.add_items(turn(f"question {n} of {owner}"))
                await session.aclose()
    return address


def test_sessions_lists_pages_and_json(url: str) -> None:
    first = invoke(["sessions", "--url", url, "--limit", "4"])
    assert first.exit_code == 0, first.stderr
    lines = first.stdout.splitlines()
    assert len(lines) == 5
    assert lines[-1].startswith("more: --cursor ")
    cursor = lines[-1].removeprefix("more: --cursor ")
    rest = invoke(["sessions", "--url", url, "--limit", "4", "--cursor", cursor, "--json"])
    assert rest.exit_code == 0, rest.stderr
    data = json.loads(rest.stdout)
    assert data["next_cursor"] is None
    assert len(data["sessions"]) == 2
    assert set(data["sessions"][0]) == {
        "session_id",
        "user_id",
        "title",
        "metadata",
        "created_at",
        "last_activity",
        "items",
        "user_turns",
        "branches",
        "total_tokens",
        "preview",
    }
    alice = json.loads(invoke(["sessions", "--url", url, "--user", "alice", "--json"]).stdout)
    assert sorted(s["session_id"] for s in alice["sessions"]) == ["alice-0", "alice-1", "alice-2"]
    assert alice["sessions"][0]["preview"].startswith("question")
    recent = invoke(["sessions", "--url", url, "--active-after", "2100-01-01", "--json"])
    assert json.loads(recent.stdout)["sessions"] == []


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["sessions", "--active-after", "yesterday"], 2, "ISO 8601"),
        (["sessions", "--limit", "0"], 2, "Invalid value for '--limit'"),
        (["sessions", "--cursor", "forged"], 2, "not a cursor of this store"),
        (["prune"], 2, "exactly one of --inactive-for or --before"),
        (["prune", "--inactive-for", "3 fortnights"], 2, "duration like 30d"),
        (["prune", "--inactive-for", "0d"], 6, "pass --yes"),
        (["erase-user", "alice"], 6, "pass --yes"),
        (["rm", "alice-0"], 6, "pass --yes"),
        (["rm", "nobody", "--yes"], 7, "No session 'nobody'"),
    ],
)
def test_bad_or_unconfirmed_commands_change_nothing(
    url: str, args: list[str], code: int, message: str
) -> None:
    result = invoke([*args, "--url", url])
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert message in result.stderr
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    listed = json.loads(invoke(["sessions", "--url", url, "--json"]).stdout)
    assert len(listed["sessions"]) == 6


def test_rm_prune_and_erase_user(url: str) -> None:
    removed = invoke(["rm", "bob-0", "--url", url, "--yes", "--json"])
    assert removed.exit_code == 0, removed.stderr
    assert json.loads(removed.stdout) == {
        "sessions": 1,
        "items": 2,
        "usage_rows": 0,
        "dry_run": False,
    }
    dry = invoke(["erase-user", "alice", "--url", url, "--dry-run"])
    assert dry.exit_code == 0
    assert dry.stdout.startswith("would remove 3 session(s), 6 item(s)")
    erased = invoke(["erase-user", "alice", "--url", url, "--yes", "--batch-size", "2"])
    assert erased.exit_code == 0, erased.stderr
    assert erased.stdout.startswith("removed 3 session(s)")
    kept = invoke(["prune", "--url", url, "--before", "2000-01-01", "--yes"])
    assert kept.stdout.startswith("removed 0 session(s)")
    gone = invoke(["prune", "--url", url, "--inactive-for", "0s", "--yes", "--json"])
    assert json.loads(gone.stdout)["sessions"] == 2
    left = json.loads(invoke(["sessions", "--url", url, "--json"]).stdout)
    assert left["sessions"] == []


def test_as_a_real_subprocess(url: str) -> None:
    listed = run_cli(["sessions", "--url", url, "--user", "bob", "--json"])
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)["sessions"]) == 2
    refused = run_cli(["erase-user", "bob", "--url", url])
    assert refused.returncode == 6
    assert "pass --yes" in refused.stderr
    erased = run_cli(["erase-user", "bob", "--url", url, "--yes"])
    assert erased.returncode == 0, erased.stderr
    assert erased.stdout.strip() == "removed 2 session(s), 4 item(s): every session of user bob"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", timedelta(days=30)),
        ("12h", timedelta(hours=12)),
        ("2w3d", timedelta(weeks=2, days=3)),
        ("90m", timedelta(minutes=90)),
        ("45s", timedelta(seconds=45)),
        # Past what a timedelta holds: was an "unexpected OverflowError", exit code 1.
        ("99999999999d", timedelta.max),
        ("99999999999w99999999999d", timedelta.max),
    ],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "args",
    [
        ["sessions"],
        ["prune", "--inactive-for", "1d", "--yes"],
        ["erase-user", "bob", "--yes"],
        ["rm", "x", "--yes"],
    ],
)
def test_a_missing_file_is_not_created(tmp_path: Path, args: list[str]) -> None:
    # These commands used to open the store on a mistyped path, creating an empty file
    # and then failing with "lacks turnstore's tables" (exit code 5).
    missing = tmp_path / "typo.db"
    result = invoke([*args, "--url", f"sqlite+aiosqlite:///{missing}"])
    assert result.exit_code == 3, result.stderr
    assert "does not exist" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not missing.exists()


def test_an_unreachable_database_is_exit_code_3(tmp_path: Path) -> None:
    # A driver error used to come out as "unexpected OperationalError" with exit code 1.
    url = f"sqlite+aiosqlite:///{tmp_path}/no-such-dir/x.db"
    result = invoke(["sessions", "--url", url])
    assert result.exit_code == 3, result.stderr
    assert "unexpected" not in result.stderr


def test_an_endless_duration_prunes_nothing(url: str) -> None:
    result = invoke(["prune", "--url", url, "--inactive-for", "99999999999d", "--yes", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["sessions"] == 0
