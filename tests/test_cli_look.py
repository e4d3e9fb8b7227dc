"""``turnstore show``, ``tree``, ``search`` and ``usage`` on the demo's file.

Through Typer's CliRunner (output, exit codes, ``--json`` parsed), and once each as a real
subprocess.
"""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.helpers import run_result, turn
from tests.migration_helpers import run_cli
from turnstore import AdvancedSQLiteSession, dispose_engines
from turnstore.cli import common
from turnstore.cli.demo import run_demo
from turnstore.cli.main import app

# The demo's turns, priced as gpt-4o-mini ($0.15 input, $0.60 output per million tokens).
MINI_IN, MINI_OUT = Decimal("0.15"), Decimal("0.60")


def mini(input_tokens: int, output_tokens: int) -> float:
    return float((input_tokens * MINI_IN + output_tokens * MINI_OUT) / 1_000_000)


@pytest.fixture
async def demo_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")
    path = tmp_path / "demo.db"
    await run_demo(path, out=lambda _line: None)
    # A second conversation, for search across sessions.
    async with AdvancedSQLiteSession(session_id="other", db_path=path) as other:
        await other.add_items(turn("Is the weather in Lyon as nice?"))
        await other.add_items(turn("And the weather in Nice?"))
    return f"sqlite+aiosqlite:///{path}"


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), env={common.URL_VARIABLE: None})


def as_json(*args: str) -> Any:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_show_renders_turns_with_tools_tokens_and_cost(demo_url: str) -> None:
    result = invoke("show", "demo", "--url", demo_url)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == [
        "== turn 1 · 27 tokens · gpt-4o-mini · $0.000005",
        "user: What's the capital of France?",
        "assistant: Paris.",
    ]
    assert 'tool call: get_weather({"city":"Paris"})' in lines
    assert "tool output: Sunny and 21°C in Paris" in lines

    data = as_json("show", "demo", "--url", demo_url)
    assert (data["session_id"], data["branch"]) == ("demo", "main")
    assert [t["turn"] for t in data["turns"]] == [1, 2, 3]
    first = data["turns"][0]
    assert first["usage"] == {
        "requests": 1,
        "input_tokens": 24,
        "output_tokens": 3,
        "total_tokens": 27,
    }
    assert [m["model"] for m in first["models"]] == ["gpt-4o-mini"]
    assert first["cost_usd"] == pytest.approx(mini(24, 3))
    assert len(data["turns"][1]["items"]) == 4  # user, tool call, tool output, answer

    branch = as_json("show", "demo", "--branch", "weather_focus", "--turn", "2", "--url", demo_url)
    assert [t["turn"] for t in branch["turns"]] == [2]
    assert branch["turns"][0]["items"][0]["content"].startswith("What are the main tourist")


@pytest.mark.parametrize(
    "args",
    [
        ["show", "nosuch"],
        ["show", "demo", "--branch", "nosuch"],
        ["show", "demo", "--turn", "9"],
        ["tree", "nosuch"],
    ],
)
def test_what_does_not_exist_is_exit_code_7(demo_url: str, args: list[str]) -> None:
    result = invoke(*args, "--url", demo_url)
    assert result.exit_code == common.ExitCode.NOT_FOUND
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"turnstore {args[0]}: error:")


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["show", "demo", "--turn", "-1"], "'--turn'"),
        (["show", "demo", "-t", "0"], "'--turn'"),
        (["show", "demo", "--turn", "two"], "'--turn'"),
        (["search", "weather", "--limit", "0"], "'--limit'"),
        (["search", "weather", "-n", "1001"], "'--limit'"),
        (["sessions", "--limit", "-5"], "'--limit'"),
        (["prune", "--inactive-for", "1d", "--batch-size", "0"], "'--batch-size'"),
    ],
)
def test_bad_option_values_are_usage_errors_naming_the_option(
    demo_url: str, args: list[str], option: str
) -> None:
    # `show --turn -1` was "no turn -1" with exit code 7, as if the value were a fine one
    # that happened to be missing; --limit 0 named the Python argument, not the option.
    result = invoke(*args, "--url", demo_url)
    assert result.exit_code == common.ExitCode.USAGE, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"turnstore {args[0]}: error: Invalid value for {option}")
    assert result.stderr.endswith(f"(see `turnstore {args[0]} --help`)\n")


def test_tree_draws_the_branches(demo_url: str) -> None:
    result = invoke("tree", "demo", "--url", demo_url)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        "demo",
        "  - main · 8 items, 3 turns, 182 tokens · (current)",
        '    - weather_focus · forked before turn 2 "What\'s the weather like there?" · '
        "4 items, 2 turns, 72 tokens",
    ]
    data = as_json("tree", "demo", "--url", demo_url)
    assert data["current_branch"] == "main"
    (main,) = data["branches"]
    (child,) = main["children"]
    assert (child["branch_id"], child["parent_branch_id"], child["fork_turn"]) == (
        "weather_focus",
        "main",
        2,
    )
    assert (child["origin"], child["total_tokens"]) == ("recorded", 72)


def test_search_pages_through_every_session(demo_url: str) -> None:
    first = as_json("search", "WEATHER", "--url", demo_url)
    assert first["next_cursor"] is None
    hits = first["hits"]
    # Newest first: the other session's replies quote the questions.
    assert [(h["session_id"], h["kind"]) for h in hits] == [
        ("other", "assistant"),
        ("other", "user"),
        ("other", "assistant"),
        ("other", "user"),
        ("demo", "function_call"),
        ("demo", "user"),
    ]
    assert hits[1]["snippet"] == "And the weather in Nice?"
    assert hits[5]["branches"] == ["main"]
    assert hits[5]["turn"] == 2

    seen, cursor = [], None
    while True:
        page = as_json(
            "search",
            "weather",
            "--limit",
            "1",
            "--url",
            demo_url,
            *(["--cursor", cursor] if cursor else []),
        )
        seen += [h["message_id"] for h in page["hits"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [h["message_id"] for h in hits]

    text = invoke("search", "weather", "--limit", "2", "--url", demo_url)
    assert text.exit_code == 0
    assert "other main:2  user: And the weather in Nice?" in text.stdout
    assert "other main:2  assistant: reply to And the weather in Nice?" in text.stdout
    assert text.stdout.splitlines()[-1].startswith('more: turnstore search "weather" --cursor ')


def test_search_refuses_bad_cursors_and_limits(demo_url: str) -> None:
    page = as_json("search", "weather", "--limit", "1", "--url", demo_url)
    for args in (
        ["--cursor", "not-a-cursor"],
        ["--cursor", page["next_cursor"].replace("weather", "x")[:-2] + "xx"],
        ["--limit", "0"],
        ["--limit", "5000"],
    ):
        result = invoke("search", "weather", *args, "--url", demo_url)
        assert result.exit_code == common.ExitCode.USAGE, args
    other_term = invoke("search", "Nice", "--cursor", page["next_cursor"], "--url", demo_url)
    assert other_term.exit_code == common.ExitCode.USAGE
    assert "another search" in other_term.stderr


def test_usage_sums_by_day_and_model_with_cost(demo_url: str) -> None:
    data = as_json("usage", "--by", "day,model", "--url", demo_url)
    assert data["group_by"] == ["day", "model"]
    (row,) = data["rows"]
    assert (row["model"], row["turns"], row["requests"]) == ("gpt-4o-mini", 4, 5)
    assert (row["input_tokens"], row["output_tokens"], row["total_tokens"]) == (220, 34, 254)
    assert row["cost_usd"] == pytest.approx(mini(220, 34))
    assert data["totals"]["turns"] == 4
    assert data["totals"]["cost_usd"] == pytest.approx(mini(220, 34))

    branches = as_json("usage", "--by", "branch", "--url", demo_url)["rows"]
    assert [(r["branch"], r["turns"], r["total_tokens"]) for r in branches] == [
        ("main", 3, 182),
        ("weather_focus", 1, 72),
    ]
    assert (
        as_json(
            "usage",
            "--by",
            "model",
            "--since",
            "2000-01-01",
            "--until",
            "2000-02-01",
            "--url",
            demo_url,
        )["rows"]
        == []
    )

    text = invoke("usage", "--by", "model", "--url", demo_url)
    assert text.exit_code == 0
    header, body, totals = text.stdout.splitlines()
    assert header.split() == [
        "model",
        "turns",
        "requests",
        "input",
        "cached",
        "output",
        "reasoning",
        "total",
        "cost",
    ]
    assert body.split()[:8] == ["gpt-4o-mini", "4", "5", "220", "0", "34", "0", "254"]
    assert totals.split()[0] == "total"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--by", "year"], "group_by keys are"),
        (["--by", "day,week"], "at most one"),
        (["--since", "last tuesday"], "--since takes"),
        (["--tz", "Nowhere/Special"], "IANA"),
    ],
)
def test_usage_refuses_bad_options(demo_url: str, args: list[str], message: str) -> None:
    result = invoke("usage", *args, "--url", demo_url)
    assert result.exit_code == common.ExitCode.USAGE
    assert message in result.stderr
    assert result.stderr.count("\n") == 1


def test_no_url_and_a_missing_file(tmp_path: Path) -> None:
    for command in (["show", "demo"], ["tree", "demo"], ["search", "x"], ["usage"]):
        missing_url = invoke(*command)
        assert missing_url.exit_code == common.ExitCode.USAGE
        missing_file = invoke(*command, "--url", f"sqlite+aiosqlite:///{tmp_path / 'no.db'}")
        assert missing_file.exit_code == common.ExitCode.UNAVAILABLE, command
        assert not (tmp_path / "no.db").exists()


def test_each_command_as_a_real_process(demo_url: str) -> None:
    env = {common.URL_VARIABLE: demo_url}
    show = run_cli(["show", "demo", "--json"], **env)
    assert show.returncode == 0, show.stderr
    assert len(json.loads(show.stdout)["turns"]) == 3
    tree = run_cli(["tree", "demo", "--json"], **env)
    assert json.loads(tree.stdout)["branches"][0]["children"][0]["branch_id"] == "weather_focus"
    search = run_cli(["search", "Lyon", "--json"], **env)
    assert [h["kind"] for h in json.loads(search.stdout)["hits"]] == ["assistant", "user"]
    usage = run_cli(["usage", "--by", "day,model"], **env)
    assert usage.returncode == 0, usage.stderr
    assert usage.stdout.splitlines()[-1].startswith("total")
    assert usage.stderr == ""
    missing = run_cli(["show", "nosuch"], **env)
    assert missing.returncode == 7
    assert missing.stderr == "turnstore show: error: No session 'nosuch' in this database\n"


def test_usage_and_search_for_one_user(demo_url: str) -> None:
    path = demo_url.removeprefix("sqlite+aiosqlite:///")

    async def bob_asks() -> None:
        async with AdvancedSQLiteSession(session_id="bobs", db_path=path, user_id="bob") as bob:
            await bob.add_items(turn("Bob asks about the weather"))
            await bob.store_run_usage(run_result(input_tokens=1000, output_tokens=100), model="o3")
        await dispose_engines()

    asyncio.run(bob_asks())
    data = as_json("usage", "--by", "user,model", "--user", "bob", "--url", demo_url)
    assert [(r["user"], r["model"], r["turns"]) for r in data["rows"]] == [("bob", "o3", 1)]
    assert data["totals"]["cost_usd"] == pytest.approx((1000 * 2 + 100 * 8) / 1_000_000)
    everyone = as_json("usage", "--by", "user", "--url", demo_url)["rows"]
    assert [(r["user"], r["turns"]) for r in everyone] == [("bob", 1), (None, 4)]
    hits = as_json("search", "weather", "--user", "bob", "--url", demo_url)["hits"]
    assert {h["session_id"] for h in hits} == {"bobs"}


def test_a_terminal_gets_a_table_with_bars_and_a_drawn_tree(
    demo_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(common, "is_terminal", lambda _stream: True)
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "120")
    usage = invoke("usage", "--by", "branch", "--url", demo_url)
    assert usage.exit_code == 0, usage.stderr
    lines = usage.stdout.splitlines()
    main_row = next(line for line in lines if "main" in line)
    side_row = next(line for line in lines if "weather_focus" in line)
    # Bars scale with total tokens: main 182, weather_focus 72.
    assert main_row.count("█") == 12
    assert side_row.count("█") == round(12 * 72 / 182)
    assert main_row.split()[:2] == ["main", "3"]
    assert any(line.startswith("total") and "$0.000053" in line for line in lines)
    # On 80 columns the bars, then detail columns, give way; keys and cost stay whole.
    monkeypatch.setenv("COLUMNS", "80")
    narrow = invoke("usage", "--by", "session,branch,model", "--url", demo_url).stdout
    assert "█" not in narrow
    assert "demo     weather_focus  gpt-4o-mini" in narrow
    assert "$0.000017" in narrow
    assert max(len(line) for line in narrow.splitlines()) <= 80
    tree = invoke("tree", "demo", "--url", demo_url)
    assert tree.exit_code == 0, tree.stderr
    assert "└── " in tree.stdout
    assert "weather_focus · forked before turn 2" in tree.stdout


async def test_hostile_content_prints_safely(tmp_path: Path) -> None:
    # Item content may hold unpaired surrogates and terminal escapes (both round-trip in an
    # item). sessions/show/search crashed with UnicodeEncodeError on the surrogate (plain
    # and --json), and passed ESC through raw to the reader's terminal.
    path = tmp_path / "hostile.db"
    text = "evil \ud800 \x1b]0;owned\x07 end"
    async with AdvancedSQLiteSession(session_id="h", db_path=path, create_tables=True) as session:
        await session.add_items(turn(text))
    await dispose_engines()
    env = {common.URL_VARIABLE: f"sqlite+aiosqlite:///{path}"}
    for args in (["sessions"], ["show", "h"], ["search", "evil"], ["tree", "h"]):
        plain = run_cli(args, **env)
        assert plain.returncode == 0, plain.stderr
        assert "\x1b" not in plain.stdout
        assert "\x07" not in plain.stdout
        shown = run_cli([*args, "--json"], **env)
        assert shown.returncode == 0, shown.stderr
        json.loads(shown.stdout)
    assert "evil \ufffd \\x1b]0;owned\\x07 end" in run_cli(["show", "h"], **env).stdout
    listed = json.loads(run_cli(["sessions", "--json"], **env).stdout)
    assert listed["sessions"][0]["preview"] == text  # --json keeps the text exact
