"""What the conversation repository reads: history, usage and structure.

Each read is one statement on a read connection (or on the driver itself, where the handle
can), scoped by ``session_id``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import and_, case, exists, func, select, union_all
from sqlalchemy.sql import Select

from turnstore.persistence.jsoncodec import loads_or_none
from turnstore.persistence.prepared import PreparedStatement
from turnstore.persistence.records import (
    ModelShare,
    StoredTurnModel,
    StoredTurnUsage,
    ToolCountRule,
    UserTurn,
    escaped_for_like,
    format_timestamp,
)
from turnstore.persistence.repository_core import RepositoryCore, all_rows
from turnstore.persistence.statements import as_stored
from turnstore.persistence.types import INTEGER_MAX
from turnstore.persistence.validation import fits_integer_column


class ConversationReads(RepositoryCore):
    """A branch's history, usage, turn models and structure, as the faces read them."""

    async def fetch_items(self, session_id: str, branch_id: str, limit: int | None) -> list[str]:
        """Stored item texts of a branch, oldest first.

        Args:
            session_id: The session.
            branch_id: The branch.
            limit: ``None`` or a negative number for all items, otherwise the newest
                ``limit`` items (``0`` gives none).
        """
        if limit == 0:
            return []
        params: dict[str, Any] = {"sid": session_id, "bid": branch_id}
        # No branch holds more items than an INTEGER column counts: a larger limit is "all".
        if limit is None or limit < 0 or not fits_integer_column(limit):
            return await self._scalars(self._q.history, params)
        params["limit"] = limit
        newest_first = await self._scalars(self._q.latest, params)
        newest_first.reverse()
        return newest_first

    async def _scalars(self, statement: PreparedStatement, params: Mapping[str, Any]) -> list[Any]:
        """The first column of a read's rows, on the driver itself where the handle can."""
        calls = self._handle.driver_calls
        plan = None if calls is None else statement.driver_plan(self._handle.dialect)
        if calls is None or plan is None:
            return await self._handle.read(statement.scalars, params)
        rows = await calls.fetch(plan.sql, plan.positional(params), writes=False)
        return [row[0] for row in rows]

    async def fetch_page(
        self, session_id: str, branch_id: str, after_sequence: int, limit: int
    ) -> list[tuple[str, int]]:
        """Up to ``limit`` ``(item text, sequence number)`` of a branch after a sequence number.

        Pages follow one another by sequence number (keyset pagination), so each costs the
        same however deep into the history it starts.
        """
        limit = min(limit, INTEGER_MAX)
        params = {"sid": session_id, "bid": branch_id, "after": after_sequence, "limit": limit}
        rows = await self._handle.read(self._q.page.rows, params)
        return [(data, int(sequence)) for data, sequence in rows]

    # -- usage ---------------------------------------------------------------------------

    async def session_usage(
        self, session_id: str, branch_id: str | None
    ) -> tuple[int, int, int, int, int] | None:
        """Summed (requests, input, output, total tokens, turns); ``None`` without usage rows."""
        if branch_id is None:
            statement, params = self._q.session_usage, {"sid": session_id}
        else:
            statement, params = self._q.branch_usage, {"sid": session_id, "bid": branch_id}
        row = (await self._handle.read(statement.rows, params))[0]
        if row[0] is None:
            return None
        requests, input_tokens, output_tokens, total_tokens, turns = (int(v or 0) for v in row)
        return requests, input_tokens, output_tokens, total_tokens, turns

    async def turn_usage(
        self, session_id: str, branch_id: str, user_turn_number: int | None
    ) -> list[StoredTurnUsage]:
        """Stored usage rows of a branch (of one turn, if given), by turn."""
        params: dict[str, Any] = {"sid": session_id, "bid": branch_id}
        if user_turn_number is None:
            rows = await self._handle.read(self._q.turn_usage.rows, params)
        elif not fits_integer_column(user_turn_number):
            return []  # beyond what the turn column holds: a turn that does not exist
        else:
            params["turn"] = user_turn_number
            rows = await self._handle.read(self._q.one_turn_usage.rows, params)
        return [
            StoredTurnUsage(
                turn,
                requests,
                input_tokens,
                output_tokens,
                total_tokens,
                loads_or_none(input_details, "token-details"),
                loads_or_none(output_details, "token-details"),
            )
            for (
                turn,
                requests,
                input_tokens,
                output_tokens,
                total_tokens,
                input_details,
                output_details,
            ) in rows
        ]

    # -- structure queries ---------------------------------------------------------------

    async def turn_models(self, session_id: str) -> list[StoredTurnModel]:
        """Every turn-models row of a session, by branch, turn and position."""
        if not self._has(self._t.turn_models):
            return []
        rows = await self._handle.read(self._q.turn_models.rows, {"sid": session_id})
        return [
            StoredTurnModel(branch, int(turn), ModelShare(model, *(int(v or 0) for v in counts)))
            for branch, turn, _position, model, *counts in rows
        ]

    async def turn_items(self, session_id: str, branch_id: str) -> list[tuple[int | None, str]]:
        """``(user_turn_number, item text)`` of a branch's items, in order."""
        s, m = self._t.structure, self._t.messages
        stmt = (
            select(s.c.user_turn_number, m.c.message_data)
            .join_from(s, m, and_(m.c.id == s.c.message_id, m.c.session_id == s.c.session_id))
            .where(s.c.session_id == session_id, s.c.branch_id == branch_id)
            .order_by(s.c.sequence_number)
        )
        return [(turn, data) for turn, data in await self._handle.read(all_rows, stmt)]

    async def usage_times(self, session_id: str, branch_id: str) -> dict[int, str | None]:
        """When each turn's usage of a branch was stored (UTC text), by turn."""
        u = self._t.usage
        stmt = select(u.c.user_turn_number, as_stored(u.c.created_at)).where(
            u.c.session_id == session_id, u.c.branch_id == branch_id
        )
        rows = await self._handle.read(all_rows, stmt)
        return {int(turn): format_timestamp(created) for turn, created in rows}

    async def user_turns(
        self, session_id: str, branch_id: str, containing: str | None = None
    ) -> list[UserTurn]:
        """The user messages of a branch by turn, optionally only texts containing a string.

        ``containing`` is matched case-insensitively as a literal (``%`` and ``_`` included)
        against the stored text; callers refine the match on the decoded content.
        """
        params = {"sid": session_id, "bid": branch_id}
        if containing is None:
            rows = await self._handle.read(self._q.user_turns.rows, params)
        else:
            pattern = f"%{escaped_for_like(containing)}%"
            rows = await self._handle.read(
                self._q.user_turns_containing.rows, {**params, "pattern": pattern}
            )
        return [UserTurn(turn, data, format_timestamp(created)) for turn, data, created in rows]

    async def structure(
        self, session_id: str, branch_id: str
    ) -> list[tuple[int | None, str, str | None]]:
        """``(user_turn_number, message_type, tool_name)`` of a branch's items, in order."""
        params = {"sid": session_id, "bid": branch_id}
        return [
            tuple(row) for row in await self._handle.read(self._q.branch_structure.rows, params)
        ]

    async def tool_usage(
        self, session_id: str, branch_id: str, rule: ToolCountRule
    ) -> list[tuple[str, int, int]]:
        """``(tool_name, invocations, user_turn_number)`` of a branch, by turn then tool."""
        s = self._t.structure
        on_branch = (s.c.session_id == session_id, s.c.branch_id == branch_id)
        label = func.coalesce(
            s.c.tool_name,
            case((s.c.message_type.in_(sorted(rule.named_by_type)), s.c.message_type)),
        )
        parts: list[Select[Any]] = [
            select(label.label("tool_name"), s.c.user_turn_number.label("turn")).where(
                *on_branch, s.c.message_type.in_(sorted(rule.call_types))
            )
        ]
        if rule.unpaired_outputs is not None:
            output_type, call_type = rule.unpaired_outputs
            calls = s.alias("calls")
            parts.append(
                select(s.c.tool_name, s.c.user_turn_number).where(
                    *on_branch,
                    s.c.message_type == output_type,
                    ~exists().where(
                        calls.c.session_id == s.c.session_id,
                        calls.c.branch_id == s.c.branch_id,
                        calls.c.user_turn_number == s.c.user_turn_number,
                        calls.c.tool_name == s.c.tool_name,
                        calls.c.message_type == call_type,
                    ),
                )
            )
        invocations = union_all(*parts).subquery()
        stmt = (
            select(invocations.c.tool_name, func.count(), invocations.c.turn)
            .group_by(invocations.c.tool_name, invocations.c.turn)
            .order_by(invocations.c.turn, invocations.c.tool_name)
        )
        rows = await self._handle.read(all_rows, stmt)
        return [(name, int(count), turn) for name, count, turn in rows]
