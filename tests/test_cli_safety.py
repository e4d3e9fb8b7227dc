"""The CLI at its edges: one-line errors with the fixing command, refusals without --yes,
no files created by read-only commands, missing extras named, one success line.

Each edge runs through Typer's ``CliRunner`` and once as a real subprocess.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.migration_helpers import child_env, run_cli
from tests.test_adopt import build_sdk_database, row_counts
from turnstore.cli import common
from turnstore.cli.main import app
from turnstore.schema import migrate

NO_URL = {common.URL_VARIABLE: None}


def invoke(*args: str, **kwargs: Any) -> Any:
    kwargs.setdefault("env", NO_URL)
    return CliRunner().invoke(app, list(args), **kwargs)


def current(url: str) -> tuple[str, ...]:
    return asyncio.run(migrate.current(url))


def url_of(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def one_error_line(stderr: str, fragment: str) -> None:
    assert stderr.count("\n") == 1, stderr
    assert fragment in stderr, stderr


def test_upgrade_of_an_sdk_file_points_at_adopt(tmp_path: Path) -> None:
    # Sync tests: the CLI runs its own event loop, as it does in a shell.
    sqlite_path = tmp_path / "conversations.db"
    asyncio.run(build_sdk_database(sqlite_path))
    before = row_counts(sqlite_path)
    url = url_of(sqlite_path)
    result = invoke("db", "upgrade", "--url", url)
    assert result.exit_code == common.ExitCode.REFUSED
    assert result.stdout == ""
    one_error_line(result.stderr, f"run `turnstore db adopt --url {url}`")
    shell = run_cli(["db", "upgrade", "--url", url])
    assert shell.returncode == 5
    assert shell.stderr == result.stderr
    assert row_counts(sqlite_path) == before
    assert current(url) == ()
    # The fix works: adopt, then upgrade has nothing left to do.
    assert run_cli(["db", "adopt", "--url", url]).returncode == 0
    again = invoke("db", "upgrade", "--url", url)
    assert again.exit_code == 0
    assert again.stdout.endswith("; nothing to do\n")


def test_failing_downgrade_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.db"
    url = url_of(path)
    assert invoke("db", "upgrade", "--url", url).exit_code == 0
    with sqlite3.connect(path) as conn:
        # Someone dropped a table by hand: the initial migration's downgrade cannot drop it.
        conn.execute("DROP TABLE branch_reservations")
    result = invoke("db", "downgrade", "--revision", "base", "--yes", "--url", url)
    assert result.exit_code == common.ExitCode.FAILED
    assert result.stdout == ""
    one_error_line(result.stderr, "Downgrade to base failed")
    assert "branch_reservations" in result.stderr
    shell = run_cli(["db", "downgrade", "--revision", "base", "--yes", "--url", url])
    assert shell.returncode == 1
    one_error_line(shell.stderr, "Downgrade to base failed")
    assert "Traceback" not in shell.stderr


def test_downgrade_that_drops_data_needs_yes(tmp_path: Path) -> None:
    path = tmp_path / "data.db"
    url = url_of(path)
    assert invoke("db", "upgrade", "--url", url).exit_code == 0
    refused = invoke("db", "downgrade", "--revision", "base", "--url", url)
    assert refused.exit_code == common.ExitCode.NOT_CONFIRMED
    one_error_line(refused.stderr, "pass --yes")
    assert "0001" in refused.stderr
    shell = run_cli(["db", "downgrade", "--revision", "base", "--url", url])
    assert shell.returncode == 6
    assert shell.stderr == refused.stderr
    assert current(url) == (migrate.head(),)
    # A step that drops no table or column (0004 adds functions on Postgres only) needs none.
    assert migrate.data_dropping_steps(("0004",), "0003") == []
    assert invoke("db", "downgrade", "-r", "0004", "-y", "--url", url).exit_code == 0
    previous = "0003"
    stepped = invoke("db", "downgrade", "--revision", previous, "--url", url)
    assert stepped.exit_code == 0, stepped.stderr
    assert stepped.stdout.count("\n") == 1
    # A person on a terminal is asked; "n" changes nothing, "y" goes ahead.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "stdin_is_terminal", lambda: True)
        patch.setattr(common, "is_terminal", lambda stream: True)
        declined = invoke("db", "downgrade", "--revision", "base", "--url", url, input="n\n")
        assert declined.exit_code == common.ExitCode.NOT_CONFIRMED
        assert current(url) == (previous,)
        accepted = invoke("db", "downgrade", "--revision", "base", "--url", url, input="y\n")
        assert accepted.exit_code == 0, accepted.stderr
    assert current(url) == ()
    with_yes = invoke("db", "upgrade", "--url", url)
    assert with_yes.exit_code == 0
    assert invoke("db", "downgrade", "-r", "base", "-y", "--url", url).exit_code == 0


@pytest.mark.parametrize(
    "command",
    [["current"], ["stamp"], ["adopt"], ["downgrade", "--revision", "base", "--yes"]],
    ids=lambda command: command[0],
)
def test_commands_that_only_read_or_adopt_never_create_a_file(
    tmp_path: Path, command: list[str]
) -> None:
    path = tmp_path / "typo.db"
    result = invoke("db", *command, "--url", url_of(path))
    assert result.exit_code == common.ExitCode.UNAVAILABLE
    one_error_line(result.stderr, "does not exist")
    assert not path.exists()
    shell = run_cli(["db", *command, "--url", url_of(path)])
    assert shell.returncode == 3
    assert not path.exists()
    assert not list(tmp_path.iterdir())


def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncmy", None)  # importing it now raises ImportError
    result = invoke("db", "current", "--url", "mysql+asyncmy://u@127.0.0.1:1/db")
    assert result.exit_code == common.ExitCode.USAGE
    one_error_line(result.stderr, "pip install 'turnstore[mysql]'")
    code = (
        "import sys; sys.modules['asyncpg'] = None\n"
        "from turnstore.cli.main import main\n"
        "sys.exit(main(['db', 'current', '--url', 'postgresql+asyncpg://u@127.0.0.1:1/db']))\n"
    )
    shell = subprocess.run(
        [sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, check=False
    )
    assert shell.returncode == 2
    one_error_line(shell.stderr, "pip install 'turnstore[postgres]'")
    sync = invoke("db", "current", "--url", "postgresql+psycopg2://u@127.0.0.1:1/db")
    assert sync.exit_code == common.ExitCode.USAGE
    assert "postgresql+asyncpg://" in sync.stderr


async def test_missing_driver_from_a_session_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from turnstore import AdvancedSession
    from turnstore.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "asyncmy", None)
    session = AdvancedSession.from_url(session_id="s", url="mysql+asyncmy://u@127.0.0.1:1/db")
    with pytest.raises(MissingExtraError, match=r"pip install 'turnstore\[mysql\]'"):
        await session.get_items()


def test_every_db_command_ends_with_one_success_line(tmp_path: Path) -> None:
    path = tmp_path / "ok.db"
    url = url_of(path)
    lines = {
        "upgrade": invoke("db", "upgrade", "--url", url).stdout,
        "stamp": invoke("db", "stamp", "--url", url, "--revision", "head").stdout,
        "current": invoke("db", "current", "--url", url).stdout,
        "adopt": invoke("db", "adopt", "--url", url).stdout,
        "downgrade": invoke("db", "downgrade", "-r", "base", "-y", "--url", url).stdout,
    }
    for command, out in lines.items():
        assert out.count("\n") == 1, (command, out)
    assert lines["upgrade"].startswith(f"upgraded {url} from <none> to {migrate.head()} (head)")
    assert lines["stamp"] == f"stamped {url} at {migrate.head()} (head)\n"
    assert lines["adopt"] == f"adopted a turnstore database; now at {migrate.head()} (head)\n"
    shell = run_cli(["db", "upgrade", "--url", url])
    assert shell.stdout == f"upgraded {url} from <none> to {migrate.head()} (head)\n"


def test_adopting_an_empty_database_reads_well(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.touch()
    result = invoke("db", "adopt", "--url", url_of(path))
    assert result.stdout == f"adopted an empty database; now at {migrate.head()} (head)\n"


def demo_args(path: Path, *more: str) -> list[str]:
    return ["demo", "--db", str(path), *more]


def test_demo_refuses_to_replace_someone_elses_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")
    path = tmp_path / "conversations.db"

    asyncio.run(build_sdk_database(path))
    before = row_counts(path)
    result = invoke(*demo_args(path))
    assert result.exit_code == common.ExitCode.NOT_CONFIRMED
    assert result.stdout == ""
    one_error_line(result.stderr, "holds 2 conversation(s) other than the demo's")
    shell = run_cli(demo_args(path))
    assert shell.returncode == 6
    assert row_counts(path) == before
    # Not a database at all: refused too.
    other = tmp_path / "notes.db"
    other.write_text("my notes\n")
    refused = invoke(*demo_args(other))
    assert refused.exit_code == common.ExitCode.NOT_CONFIRMED
    assert other.read_text() == "my notes\n"
    # With --yes it is replaced, and an earlier demo is replaced without asking.
    assert invoke(*demo_args(path, "--yes")).exit_code == 0
    again = invoke(*demo_args(path))
    assert again.exit_code == 0, again.stderr
    assert f"demo written to {path}" in again.stdout


def test_demo_into_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "nodir" / "x.db"
    result = invoke(*demo_args(path))
    assert result.exit_code == common.ExitCode.UNAVAILABLE
    one_error_line(result.stderr, f"run `mkdir -p {path.parent}`")
    shell = run_cli(demo_args(path))
    assert shell.returncode == 3
    one_error_line(shell.stderr, "does not exist")
    assert not path.parent.exists()


# Every command that opens the store, with arguments that need no particular session.
STORE_COMMANDS = (
    ["sessions"],
    ["show", "s1"],
    ["tree", "s1"],
    ["search", "hi"],
    ["usage"],
    ["rm", "s1", "--yes"],
    ["prune", "--inactive-for", "1d", "--yes"],
    ["erase-user", "bob", "--yes"],
)
# Those that need the session info table (migration 0005), which an SDK file and a database
# upgraded before 0005 lack; the others read such databases as they are. (`usage --by user`
# and `search --user` there are still usage errors, exit code 2, naming no command: the
# session layer raises InvalidArgumentError for them.)
INFO_COMMANDS = (
    ["sessions"],
    ["rm", "s1", "--yes"],
    ["prune", "--inactive-for", "1d", "--yes"],
    ["erase-user", "bob", "--yes"],
)


def test_a_database_without_the_schema_names_the_exact_fix(tmp_path: Path) -> None:
    # These said "Pass create_tables=True to create them, or run the migrations first":
    # advice for Python code, naming no command.
    never = tmp_path / "never upgraded.db"
    with sqlite3.connect(never) as connection:
        connection.execute("CREATE TABLE other_app (x INTEGER)")
    behind = tmp_path / "behind.db"
    asyncio.run(migrate.upgrade(url_of(behind), "0004"))
    sdk = tmp_path / "sdk.db"
    asyncio.run(build_sdk_database(sdk))
    # The path with a space is quoted, so that the command pastes into a shell.
    cases = (
        (never, STORE_COMMANDS, "has no turnstore schema", f"upgrade --url '{url_of(never)}'"),
        (behind, INFO_COMMANDS, "is at revision 0004, behind", f"upgrade --url {url_of(behind)}"),
        (sdk, INFO_COMMANDS, "not adopted", f"adopt --url {url_of(sdk)}"),
    )
    for path, commands, why, fix in cases:
        for args in commands:
            result = invoke(*args, "--url", url_of(path))
            assert result.exit_code == common.ExitCode.REFUSED, (path, args, result.stderr)
            assert result.stdout == ""
            one_error_line(result.stderr, why)
            assert result.stderr.endswith(f"; run `turnstore db {fix}`\n"), result.stderr
    # The fix works.
    shell = run_cli(["sessions", "--url", url_of(never)])
    assert shell.returncode == common.ExitCode.REFUSED
    assert "turnstore db upgrade --url" in shell.stderr
    assert run_cli(["db", "upgrade", "--url", url_of(never)]).returncode == 0
    assert invoke("sessions", "--url", url_of(never)).exit_code == 0


async def test_the_fix_for_a_server_database_masks_its_password(
    postgres_url: str,
) -> None:
    from sqlalchemy.engine import make_url

    from tests.migration_helpers import fresh_postgres_database

    async with fresh_postgres_database(postgres_url) as plain:
        parsed = make_url(plain)
        password = parsed.password or "s3cret-pw"  # a server trusting local logins ignores it
        url = parsed.set(password=password).render_as_string(hide_password=False)
        result = await asyncio.to_thread(invoke, "sessions", "--url", url)
        assert result.exit_code == common.ExitCode.REFUSED, result.stderr
        masked = make_url(url).render_as_string(hide_password=True)
        assert ":***@" in masked
        one_error_line(result.stderr, f"; run `turnstore db upgrade --url '{masked}'`")
        assert str(password) not in result.stderr


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgres://app@db/app", "does not support the 'postgres' dialect"),
        ("http://example.com/x", "does not support the 'http' dialect"),
        ("not a url", "Not a database URL"),
        ("sqlite+aiosqlite://", "An in-memory SQLite database starts empty in every command"),
        ("sqlite+aiosqlite:///:memory:", "An in-memory SQLite database starts empty"),
        ("sqlite+aiosqlite:///file:x?mode=memory&uri=true", "An in-memory SQLite database"),
    ],
)
def test_urls_no_command_can_use_are_usage_errors(url: str, message: str) -> None:
    # postgres:// was "unexpected NotImplementedError" (exit code 1); an in-memory database
    # was "no turnstore schema; run `turnstore db upgrade --url sqlite+aiosqlite://`", a fix
    # that cannot work for a database gone when the command ends.
    for args in (["sessions"], ["show", "x"], ["db", "current"], ["rm", "x", "--yes"]):
        result = invoke(*args, "--url", url)
        assert result.exit_code == common.ExitCode.USAGE, (args, result.stderr)
        one_error_line(result.stderr, message)


def test_a_file_that_is_no_database_is_one_clean_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_text("not a database, not at all")
    result = invoke("sessions", "--url", url_of(junk))
    assert result.exit_code == common.ExitCode.UNAVAILABLE
    one_error_line(result.stderr, "file is not a database")
    assert "Background on this error" not in result.stderr  # SQLAlchemy's link: noise


def test_a_closed_output_pipe_ends_quietly(tmp_path: Path) -> None:
    # `turnstore show demo | head -1` printed "unexpected BrokenPipeError" (exit code 1)
    # once the reader had gone.
    path = tmp_path / "demo.db"
    assert run_cli(["demo", "--db", str(path)]).returncode == 0
    child = subprocess.Popen(
        [sys.executable, "-m", "turnstore.cli", "show", "demo", "--url", url_of(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
    )
    assert child.stdout is not None
    child.stdout.close()  # long before the child has started up and written anything
    _, stderr = child.communicate()
    assert child.returncode == common.ExitCode.BROKEN_PIPE
    assert stderr == b""


def test_library_warnings_are_named_lines_after_success_only(tmp_path: Path) -> None:
    # A file of the SDK's class lacks migration 0007's tables: the session layer logs a
    # warning, which Python printed bare (in a real process), with no command named.
    sdk = tmp_path / "sdk.db"
    asyncio.run(build_sdk_database(sdk))
    shell = run_cli(["search", "a", "--url", url_of(sdk)])
    assert shell.returncode == 0, shell.stderr
    assert shell.stderr.splitlines() == [
        "turnstore search: warning: The database lacks turnstore's tables "
        "turnstore_branch_lineage, turnstore_turn_models: the models of each turn and branch "
        "lineage are not recorded. Run the migrations to add them: turnstore db upgrade, or "
        "turnstore db adopt for a file the SDK's class wrote."
    ]
    # A command that fails prints its error line only.
    refused = run_cli(["sessions", "--url", url_of(sdk)])
    assert refused.returncode == common.ExitCode.REFUSED
    assert refused.stderr.count("\n") == 1
    assert refused.stderr.startswith("turnstore sessions: error: ")


def test_a_malformed_url_never_shows_its_password() -> None:
    # copy echoed the URL it could not parse, password and all, into CI logs.
    bad = "postgresql+asyncpg://app:hunter2@db:notaport/app"
    for args in (["copy", "--from", bad, "--to", "sqlite+aiosqlite:///x.db"], ["sessions"]):
        result = invoke(*args, *([] if args[0] == "copy" else ["--url", bad]))
        assert result.exit_code == common.ExitCode.USAGE, result.stderr
        assert "hunter2" not in result.stderr
        assert result.stderr.count("\n") == 1
    assert common.hidden_url(bad) == "postgresql+asyncpg://app:***@db:notaport/app"
