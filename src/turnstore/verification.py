"""Every read method's answers for a session, to prove a copy answers like its source.

``turnstore copy --verify`` and the tests compare, session by session, what each read method
of :class:`~turnstore.AdvancedSession` answers on the source and on the target: items,
turns, branches, usage per turn with token details, tool usage and search, on every branch.
"""

from __future__ import annotations

from typing import Any

from turnstore.session import AdvancedSession


def _search_terms(turns: list[dict[str, Any]]) -> list[str]:
    """Terms that find something: the start of the first user turn's text, and one letter."""
    terms = ["e"]
    for turn in turns:
        content = turn.get("content")
        if isinstance(content, str) and content.strip():
            terms.append(content.strip()[:4])
            break
    return terms


async def session_answers(session: AdvancedSession) -> dict[str, Any]:
    """What every read method answers for ``session``, keyed by method and branch.

    Reads every branch (so the session's current branch does not matter) and the whole
    session; ``is_current`` in ``list_branches`` is left out for the same reason.
    """
    answers: dict[str, Any] = {}
    branches = await session.list_branches()
    answers["list_branches"] = [
        {key: value for key, value in branch.items() if key != "is_current"} for branch in branches
    ]
    answers["get_session_usage"] = await session.get_session_usage()
    for branch in branches:
        name = branch["branch_id"]
        turns = await session.get_conversation_turns(branch_id=name)
        answers[f"get_items[{name}]"] = await session.get_items(branch_id=name)
        answers[f"get_conversation_turns[{name}]"] = turns
        answers[f"get_conversation_by_turns[{name}]"] = await session.get_conversation_by_turns(
            branch_id=name
        )
        answers[f"get_tool_usage[{name}]"] = await session.get_tool_usage(branch_id=name)
        answers[f"get_turn_usage[{name}]"] = await session.get_turn_usage(branch_id=name)
        answers[f"get_session_usage[{name}]"] = await session.get_session_usage(branch_id=name)
        # Keyed by position: a term is message content, which reports must not show.
        for number, term in enumerate(_search_terms(turns), start=1):
            answers[
                f"find_turns_by_content[{name}, term {number}]"
            ] = await session.find_turns_by_content(term, branch_id=name)
    return answers


def differences(source: dict[str, Any], target: dict[str, Any]) -> list[str]:
    """The read methods (with branch) whose answers differ; empty when the two agree."""
    return sorted(
        key
        for key in source.keys() | target.keys()
        if key not in source or key not in target or source[key] != target[key]
    )


async def compare_sessions(source: AdvancedSession, target: AdvancedSession) -> list[str]:
    """The read methods whose answers differ between two sessions (empty: they agree)."""
    return differences(await session_answers(source), await session_answers(target))
