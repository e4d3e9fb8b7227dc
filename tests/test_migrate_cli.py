"""``turnstore db``: exit codes and one-line errors, URL from the environment."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.migration_helpers import fresh_postgres_database, run_cli
from turnstore.schema import migrate


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def assert_one_line_error(
    result: subprocess.CompletedProcess[str], code: int, fragment: str
) -> None:
    assert result.returncode == code, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.endswith("\n")
    assert fragment in result.stderr
    assert result.stdout == ""


def test_upgrade_current_downgrade_on_sqlite(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "cli.db")
    up = run_cli(["db", "upgrade"], TURNSTORE_DATABASE_URL=url)
    assert up.returncode == 0, up.stderr
    assert up.stdout.count("\n") == 1
    assert f"to {migrate.head()} (head)" in up.stdout
    assert run_cli(["db", "current", "--url", url]).stdout == f"{migrate.head()} (head)\n"
    down = run_cli(["db", "downgrade", "--url", url, "--revision", "base", "--yes"])
    assert down.returncode == 0, down.stderr
    assert run_cli(["db", "current", "--url", url]).stdout == "<none>\n"
    stamped = run_cli(["db", "stamp", "--url", url])
    assert stamped.returncode == 0, stamped.stderr
    assert run_cli(["db", "current", "--url", url]).stdout == f"{migrate.head()} (head)\n"


def test_history_needs_no_database() -> None:
    result = run_cli(["db", "history"])
    assert result.returncode == 0
    assert f"-> {migrate.head()} (head)" in result.stdout


def test_missing_url_is_a_usage_error() -> None:
    assert_one_line_error(run_cli(["db", "upgrade"]), 2, "TURNSTORE_DATABASE_URL")


def test_bad_url_is_a_usage_error() -> None:
    assert_one_line_error(run_cli(["db", "upgrade", "--url", "not a url"]), 2, "Not a database URL")
    assert_one_line_error(
        run_cli(["db", "current", "--url", "oracle+oracledb://u@h/db"]), 2, "oracle"
    )


def test_unreachable_sqlite_file(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "no" / "such" / "dir" / "x.db")
    assert_one_line_error(run_cli(["db", "upgrade", "--url", url]), 3, "does not exist")


async def test_unreachable_postgres_server(postgres_url: str) -> None:
    # A port nothing listens on (the server's own port minus one is as good as any).
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url).set(port=1).render_as_string(hide_password=False)
    assert_one_line_error(run_cli(["db", "current", "--url", url]), 3, "Cannot connect")


def test_unknown_requested_revision(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "cli.db")
    result = run_cli(["db", "upgrade", "--url", url, "--revision", "cafe0000"])
    assert_one_line_error(result, 4, "cafe0000")


async def test_database_at_unknown_revision_on_postgres(postgres_url: str) -> None:
    async with fresh_postgres_database(postgres_url) as url:
        assert run_cli(["db", "upgrade", "--url", url]).returncode == 0
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(url)
        try:
            async with engine.begin() as conn:
                await conn.exec_driver_sql(
                    f"UPDATE {migrate.VERSION_TABLE} SET version_num = 'beef1234'"
                )
        finally:
            await engine.dispose()
        for command in (["current"], ["upgrade"], ["downgrade", "--revision", "base"]):
            result = run_cli(["db", *command, "--url", url])
            assert_one_line_error(result, 4, "beef1234")
