"""A branching conversation played by a scripted model, with nothing but a local SQLite file.

It runs the real Agents SDK ``Runner`` against :class:`turnstore.AdvancedSQLiteSession`, with
the SDK's ``ScriptedModel`` standing in for an LLM (no network, no API key): the branch workflow
of the SDK's documentation, with a function tool, usage stored after every run.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

from turnstore.session import AdvancedSQLiteSession

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


async def run_demo(db_path: Path, out: Callable[[str], None] = print) -> None:
    """Play the workflow on ``db_path`` (replacing it) and print branches and usage."""
    try:
        from agents import Agent, Runner, function_tool
        from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call
        from agents.usage import Usage
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise SystemExit("The demo needs the Agents SDK: pip install 'turnstore[agents]'") from exc

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
        await session.store_run_usage(result)
        out(f"  user: {step[0]}\n  assistant: {result.final_output}")

    async with AdvancedSQLiteSession(
        session_id="demo", db_path=db_path, create_tables=True
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
