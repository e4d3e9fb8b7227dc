"""The ``turnstore`` command line's shared behaviour: help, version, errors, JSON, confirmation.

Commands run through Typer's ``CliRunner`` (in process) and, for the promises a shell sees
(exit status, stderr), once as a real subprocess.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from tests.migration_helpers import run_cli
from turnstore.cli import common
from turnstore.cli.main import app, main
from turnstore.errors import ConfirmationRequiredError, ForeignDatabaseError, MigrationError
from turnstore.schema import migrate

NO_URL = {common.URL_VARIABLE: None}


def invoke(args: list[str], **kwargs: Any) -> Any:
    kwargs.setdefault("env", NO_URL)
    return CliRunner().invoke(app, args, **kwargs)


def test_version() -> None:
    result = invoke(["--version"])
    assert result.exit_code == 0
    assert re.fullmatch(r"turnstore \S+.*\n", result.stdout)
    assert run_cli(["--version"]).stdout == result.stdout


def every_command(group: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    found = [(path, group)]
    for name, command in getattr(group, "commands", {}).items():
        found += every_command(command, (*path, name))
    return found


def test_help_documents_every_option_with_an_example_and_the_exit_codes() -> None:
    root = typer.main.get_command(app)
    commands = every_command(root)
    assert {"demo", "db"} <= set(getattr(root, "commands", {}))
    for path, command in commands:
        for param in command.params:
            if param.name == "help":
                continue
            assert param.help, (path, param.name)
            assert "Example" in param.help, (path, param.name)
        result = invoke([*path, "--help"])
        assert result.exit_code == 0, path
        if hasattr(command, "commands"):  # the app and every command group
            assert "Exit codes:" in result.stdout, path
    top = invoke(["--help"]).stdout
    for code in common.ExitCode:
        assert f"{code.value} " in top.replace("\n", " "), code
    # Plain text when not on a terminal: no box drawing, no escape sequences.
    assert "\x1b[" not in top
    assert "─" not in top
    assert "``" not in top


def test_usage_errors_are_one_line_with_code_2() -> None:
    for args in (["db", "downgrade"], ["db", "nosuch"], ["--nosuch"], ["db", "upgrade"]):
        result = invoke(args)
        assert result.exit_code == common.ExitCode.USAGE, args
        assert result.stdout == ""
        assert result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("turnstore"), result.stderr
    shell = run_cli(["db", "downgrade"])
    assert shell.returncode == 2
    assert shell.stderr == (
        "turnstore db downgrade: error: Missing option '--revision' / '-r'. "
        "(see `turnstore db downgrade --help`)\n"
    )


def test_url_comes_from_the_option_then_the_variable(tmp_path: Path) -> None:
    from_option = f"sqlite+aiosqlite:///{tmp_path / 'a.db'}"
    from_variable = f"sqlite+aiosqlite:///{tmp_path / 'b.db'}"
    env = {common.URL_VARIABLE: from_variable}
    assert invoke(["db", "upgrade", "--url", from_option], env=env).exit_code == 0
    assert (tmp_path / "a.db").exists()
    assert not (tmp_path / "b.db").exists()
    assert invoke(["db", "upgrade"], env=env).exit_code == 0
    assert (tmp_path / "b.db").exists()


def test_json_output_has_stable_shapes(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'j.db'}"
    up = invoke(["db", "upgrade", "--url", url, "--json"])
    assert up.exit_code == 0, up.stderr
    assert json.loads(up.stdout) == {
        "before": [],
        "after": [migrate.head()],
        "head": migrate.head(),
        "changed": True,
    }
    current = json.loads(invoke(["db", "current", "--url", url, "--json"]).stdout)
    assert current == {"revisions": [migrate.head()], "head": migrate.head(), "at_head": True}
    history = json.loads(invoke(["db", "history", "--json"]).stdout)
    assert [entry["revision"] for entry in history] == [i.revision for i in migrate.history()]
    assert set(history[0]) == {"revision", "down_revision", "description", "is_head"}
    adopted = json.loads(invoke(["db", "adopt", "--url", url, "--json"]).stdout)
    assert adopted == {
        "found": "turnstore",
        "other_tables": [],
        "after": [migrate.head()],
        "head": migrate.head(),
    }


def test_error_line_carries_the_fixing_command() -> None:
    error = ForeignDatabaseError("The database is not adopted.", fix="turnstore db adopt --url X")
    assert common.error_line("turnstore db upgrade", error) == (
        "turnstore db upgrade: error: The database is not adopted; run `turnstore db adopt --url X`"
    )
    assert common.exit_code_for(error) == common.ExitCode.REFUSED
    assert common.exit_code_for(MigrationError("x")) == common.ExitCode.FAILED
    multi = common.error_line("turnstore", MigrationError("a\nb\n  c"))
    assert multi == "turnstore: error: a b c"


def test_unexpected_errors_are_one_line_too(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> list[migrate.MigrationInfo]:
        raise KeyError("surprise")

    monkeypatch.setattr(migrate, "history", boom)
    monkeypatch.delenv(common.TRACEBACK_VARIABLE, raising=False)
    result = invoke(["db", "history"])
    assert result.exit_code == common.ExitCode.FAILED
    assert result.stderr.count("\n") == 1
    assert "unexpected KeyError" in result.stderr
    assert common.TRACEBACK_VARIABLE in result.stderr


def test_confirmation(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    common.confirm("Go?", yes=True, refusal="it drops data")  # --yes: no question
    with pytest.raises(ConfirmationRequiredError, match="it drops data; pass --yes"):
        common.confirm("Go?", yes=False, refusal="it drops data")  # nobody to ask
    monkeypatch.setattr(common, "stdin_is_terminal", lambda: True)
    monkeypatch.setattr(common, "is_terminal", lambda stream: True)
    monkeypatch.setattr(typer, "confirm", lambda question, **kw: question == "Go?")
    common.confirm("Go?", yes=False, refusal="x")
    with pytest.raises(ConfirmationRequiredError, match="Not confirmed"):
        common.confirm("Really?", yes=False, refusal="x")


def test_decoration_only_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    common.success("done")
    assert capsys.readouterr().out == "done\n"
    with common.progress(3, "working") as advance:
        advance(3)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(common, "is_terminal", lambda stream: True)
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    common.success("done")
    assert "✓" in capsys.readouterr().out
    monkeypatch.setenv("NO_COLOR", "1")
    common.success("done")
    out = capsys.readouterr().out
    assert "\x1b[" not in out
    assert out.endswith("done\n")


def test_main_returns_the_exit_code() -> None:
    assert main(["db", "history"]) == 0
    assert main(["db", "current", "--url", "not a url"]) == common.ExitCode.USAGE
