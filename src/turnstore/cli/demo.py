"""A branching conversation played by a scripted model, with nothing but a local SQLite file.

It runs the real Agents SDK ``Runner`` against :class:`turnstore.AdvancedSQLiteSession`, with
the SDK's ``ScriptedModel`` standing in for an LLM (no network, no API key): the branch workflow
of the SDK's documentation, with a function tool, usage stored after every run.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from turnstore.cli import common
from turnstore.errors import DatabaseUnavailableError, MissingExtraError
from turnstore.session import AdvancedSQLiteSession

DEMO_SESSION = "demo"
#: The model the demo's usage is recorded (and priced) as; a scripted model has no name.
PRICED_AS = "gpt-4o-mini"
DEFAULT_DB = Path("turnstore-demo.db")

# (user input, tool call or None, final answer, input tokens, output tokens)
_Script = tuple[str, tuple[str, dict[str, str]] | None, str, int, int]

MAIN_TURNS: list[_Script] = [
    ("What's the capital of France?", None, "Paris.", 24, 3),
    ("What's the weather like there?", ("get_weather", {"city": "Paris"}), "Sunny, 21°C.", 61, 9),
]
BRANCH_TURN: _Script = (
    "What are the main tourist attractions in Paris?",
    None,
    "The Eiffel Tower, the Louvre and Notre-Dame.",
    58,
    14,
)
BACK_ON_MAIN: _Script = ("How expensive is it to visit?", None, "Around €150 a day.", 77, 8)


def _fresh_file(db_path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)


def register(app: typer.Typer) -> None:
    """Add the ``demo`` command to ``app``."""
    app.command(name="demo")(demo)


def demo(
    db: Annotated[
        Path,
        typer.Option(
            "--db",
            help=(
                "SQLite file to write; a previous demo file is replaced, any other database "
                "only with --yes. Example: --db /tmp/demo.db"
            ),
        ),
    ] = DEFAULT_DB,
    yes: common.YesOption = False,
) -> None:
    """Play a branching conversation with a scripted model on a local SQLite file.

    The Agents SDK's real Runner with its ScriptedModel (no network, no API key) plays the
    documented branch workflow, then the branches and the usage table are printed.
    """
    check_target(db, yes=yes)
    asyncio.run(run_demo(db, common.line))
    common.success(f"demo written to {db}")
    for step in next_steps(db):
        common.line(step)


def next_steps(db_path: Path) -> list[str]:
    """What to try after the demo, one printed line each (append new commands here)."""
    url = shlex.quote(f"sqlite+aiosqlite:///{db_path}")
    return [
        "Next, look at it:",
        f"  turnstore sessions --url {url}    # the conversations, newest first",
        f"  turnstore tree {DEMO_SESSION} --url {url}    # the branch tree",
        f"  turnstore show {DEMO_SESSION} --url {url}    # the conversation, turn by turn",
        f"  turnstore usage --by day,model --url {url}    # tokens and cost",
        f"  turnstore search weather --url {url}    # across every conversation",
        f"  turnstore db current --url {url}    # the file is under migrations",
        "  README.md, 'Your first conversation': the same with your own agent",
    ]


def _demo_sessions(db_path: Path) -> set[str] | None:
    """The session ids in an existing file, or ``None`` if it is not a session database."""
    try:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
            if "agent_sessions" not in tables:
                return None if tables else set()
            return {row[0] for row in conn.execute("SELECT session_id FROM agent_sessions")}
    except sqlite3.DatabaseError:
        return None


def check_target(db_path: Path, *, yes: bool) -> None:
    """Refuse a path the demo cannot or should not write.

    Raises:
        DatabaseUnavailableError: The folder does not exist.
        ConfirmationRequiredError: The file holds something other than an earlier demo, and
            neither ``--yes`` nor a person on a terminal said to replace it.
    """
    folder = db_path.expanduser().resolve().parent
    if not folder.is_dir():
        raise DatabaseUnavailableError(
            f"Cannot write {db_path}: the folder {folder} does not exist",
            fix=f"mkdir -p {folder}",
        )
    if not db_path.exists() or db_path.stat().st_size == 0:
        return
    sessions = _demo_sessions(db_path)
    if sessions is not None and sessions <= {DEMO_SESSION}:
        return  # an earlier demo: replaced without asking
    what = (
        "is not a conversation database"
        if sessions is None
        else f"holds {len(sessions)} conversation(s) other than the demo's"
    )
    common.confirm(
        f"{db_path} {what}. Replace it with the demo?",
        yes=yes,
        refusal=f"{db_path} {what} and the demo would replace it (or pick another --db)",
    )


async def run_demo(db_path: Path, out: Callable[[str], None] = print) -> None:
    """Play the workflow on ``db_path`` (replacing it) and print branches and usage."""
    try:
        from agents import Agent, Runner, function_tool
        from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call
        from agents.usage import Usage
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise MissingExtraError(
            "The demo needs the Agents SDK: pip install 'turnstore[agents]'"
        ) from exc

    os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")
    await asyncio.to_thread(_fresh_file, db_path)

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather for a city."""
        return f"Sunny and 21°C in {city}"

    model = ScriptedModel()
    agent = Agent(
        name="Travel assistant",
        instructions="Reply very concisely.",
        model=model,
        tools=[get_weather],
    )

    def script(step: _Script) -> None:
        _, tool, answer, input_tokens, output_tokens = step
        usage = Usage(
            requests=1,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            total_tokens=input_tokens + output_tokens,
        )
        if tool is not None:
            name, arguments = tool
            model.enqueue(ModelStep(output=[function_call(name, arguments, call_id="call_1")]))
        model.enqueue(ModelStep(output=[assistant_message(answer)], usage=usage))

    async def ask(session: AdvancedSQLiteSession, step: _Script) -> None:
        script(step)
        result = await Runner.run(agent, step[0], session=session)
        # The scripted model has no name of its own: record the model its tokens are priced as.
        await session.store_run_usage(result, model=PRICED_AS)
        out(f"  user: {step[0]}\n  assistant: {result.final_output}")

    async with AdvancedSQLiteSession(
        session_id=DEMO_SESSION, db_path=db_path, create_tables=True
    ) as session:
        out(f"Conversation on main ({db_path}):")
        for step in MAIN_TURNS:
            await ask(session, step)
        branch = await session.create_branch_from_turn(2, "weather_focus")
        out(f"\nBranched at turn 2 into {branch!r}; asking something else there:")
        await ask(session, BRANCH_TURN)
        await session.switch_to_branch("main")
        out("\nBack on main:")
        await ask(session, BACK_ON_MAIN)

        out("\nBranches:")
        out(f"  {'branch':<16}{'messages':>10}{'user turns':>12}  current")
        for info in await session.list_branches():
            current = "*" if info["is_current"] else ""
            out(
                f"  {info['branch_id']:<16}{info['message_count']:>10}"
                f"{info['user_turns']:>12}  {current}"
            )

        out("\nUsage per turn:")
        out(f"  {'branch':<16}{'turn':>5}{'requests':>10}{'input':>8}{'output':>8}{'total':>8}")
        for info in await session.list_branches():
            turns = await session.get_turn_usage(branch_id=info["branch_id"])
            assert isinstance(turns, list)
            for row in turns:
                out(
                    f"  {info['branch_id']:<16}{row['user_turn_number']:>5}{row['requests']:>10}"
                    f"{row['input_tokens']:>8}{row['output_tokens']:>8}{row['total_tokens']:>8}"
                )
        totals = await session.get_session_usage()
        assert totals is not None
        out(
            f"\nSession total: {totals['total_tokens']} tokens in {totals['requests']} "
            f"requests over {totals['total_turns']} turns"
        )
        tools = await session.get_tool_usage(branch_id="main")
        out("Tools on main: " + ", ".join(f"{name} x{n} (turn {t})" for name, n, t in tools))
    model.assert_complete()
