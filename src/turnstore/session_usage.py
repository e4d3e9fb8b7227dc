"""Usage of a session: storing a run's usage, and reading usage, models and cost per turn."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any

from turnstore import cost
from turnstore.errors import ConnectionLostError, SchemaLockTimeoutError, StorageError
from turnstore.persistence.records import ModelShare
from turnstore.redaction import identifier, log_failure
from turnstore.sdk.usage import share_record, usage_from_result
from turnstore.session_checks import check_branch_id, check_turn_number
from turnstore.session_core import SessionCore, operation

if TYPE_CHECKING:
    from turnstore.session import AdvancedSession


class SessionUsage(SessionCore):
    """Stores the usage of runs, and reads a session's usage, models and costs per turn."""

    if TYPE_CHECKING:
        # AdvancedSession's: routing checks for that class, so it lives in session.py.
        def _routed(self, wrapper: Any) -> AdvancedSession: ...

    async def store_run_usage(
        self, result: Any, *, model: str | None = None, run_config: Any = None
    ) -> None:
        """Store a run's token usage, and the models that served it, against the latest turn.

        Call it after ``Runner.run``. Storing again for the same turn replaces the earlier
        figures. A write that loses a lock wait or a deadlock is retried, as appends are.
        Failures are never raised, so analytics cannot break a conversation: a write that
        finally fails is logged at WARNING and counted in :attr:`dropped_usage_writes`.

        The model is the one the SDK resolved for each model response of the run (a run that
        handed off between agents records each model with its share of requests and tokens):
        the run configuration's model, else the agent's model name (a ``Model`` object by its
        ``model`` attribute), else the SDK's default model. A ``Model`` object without a name
        is recorded as unknown.

        Args:
            result: The result ``Runner.run`` returned.
            model: The model that served the whole run, recorded instead of working it out.
            run_config: The ``RunConfig`` given to ``Runner.run``, when it sets ``model``
                (the result does not carry it).
        """
        try:
            context = getattr(result, "context_wrapper", None)
            target = self._routed(context)
            if target is not self:
                await target.store_run_usage(result, model=model, run_config=run_config)
                return
            usage = usage_from_result(result, model=model, run_config=run_config)
            if usage is None:
                return
            async with self._ordered():
                with self._failures("store_run_usage"):
                    store = await self._store()
                    turn = await store.record_usage(self.session_id, self._pointer, usage)
            if turn is None:
                self._logger.debug(
                    "No current turn on branch %r; usage not stored",
                    identifier(self._pointer.branch_id),
                )
        except (StorageError, ConnectionLostError, SchemaLockTimeoutError) as exc:
            # The database lost the write (after the retries): usage is analytics, so the
            # conversation goes on; the drop is counted where the caller can read it.
            self.dropped_usage_writes += 1
            log_failure(
                self._logger,
                f"Dropped the usage of a run (dropped so far: {self.dropped_usage_writes})",
                exc,
                level=logging.WARNING,
                context=self._log_context,
            )
        except Exception as exc:
            self.dropped_usage_writes += 1
            log_failure(
                self._logger, "Failed to store session usage", exc, context=self._log_context
            )

    @operation
    async def get_session_usage(self, branch_id: str | None = None) -> dict[str, int] | None:
        """Usage summed over all branches (or one): requests, tokens and turns; ``None`` if none."""
        branch_id = check_branch_id(branch_id)
        store = await self._store()
        totals = await store.session_usage(self.session_id, branch_id or None)
        if totals is None:
            return None
        requests, input_tokens, output_tokens, total_tokens, turns = totals
        return {
            "requests": requests,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": total_tokens,
            "total_turns": turns,
        }

    @operation
    async def get_turn_usage(
        self, user_turn_number: int | None = None, branch_id: str | None = None
    ) -> list[dict[str, Any]] | dict[str, Any]:
        """Per-turn usage of the current (or given) branch, token details parsed.

        Returns:
            A list of dicts (each with ``user_turn_number``) ordered by turn; or, when
            ``user_turn_number`` is given, that turn's dict (``{}`` if it has no usage).
        """
        if user_turn_number is not None:
            check_turn_number(user_turn_number, "user_turn_number")
        branch_id = check_branch_id(branch_id)
        store = await self._store()
        branch = branch_id if branch_id is not None else await self._current_branch(store)
        rows = await store.turn_usage(self.session_id, branch, user_turn_number)
        records = [
            {
                "user_turn_number": row.user_turn_number,
                "requests": row.requests,
                "input_tokens": row.input_tokens,
                "output_tokens": row.output_tokens,
                "total_tokens": row.total_tokens,
                "input_tokens_details": row.input_tokens_details or None,
                "output_tokens_details": row.output_tokens_details or None,
            }
            for row in rows
        ]
        if user_turn_number is None:
            return records
        if not records:
            return {}
        single = records[0]
        del single["user_turn_number"]
        return single

    async def get_turn_models(
        self, branch_id: str | None = None
    ) -> dict[int, list[dict[str, Any]]]:
        """Which models served each turn of the current (or given) branch, with their shares.

        Returns:
            ``{turn: [{"model", "requests", "input_tokens", "cached_tokens", "output_tokens",
            "reasoning_tokens", "total_tokens"}, ...]}``, models in the order they served the
            turn; ``model`` is ``None`` where it is not known. Turns stored before turnstore
            recorded models (or by the SDK's class) are absent.
        """
        store = await self._store()
        branch = branch_id if branch_id is not None else await self._current_branch(store)
        turns: dict[int, list[dict[str, Any]]] = {}
        for row in await store.turn_models(self.session_id):
            if row.branch_id == branch:
                turns.setdefault(row.user_turn_number, []).append(share_record(row.share))
        return turns

    async def get_turn_costs(self, branch_id: str | None = None) -> dict[int, dict[str, Any]]:
        """What each turn of the current (or given) branch cost, priced per model.

        Returns:
            ``{turn: {"models": [...], "cost_usd": Decimal | None, "cost_reason": str | None,
            "recorded_at": str | None}}`` for every turn with stored usage. ``models`` is
            :meth:`get_turn_models`' list for the turn (empty for turns stored without model
            records, whose cost is then ``None``). Prices are those in force when the usage
            was stored; see :mod:`turnstore.cost`.
        """
        store = await self._store()
        branch = branch_id if branch_id is not None else await self._current_branch(store)
        times = await store.usage_times(self.session_id, branch)
        shares: dict[int, list[ModelShare]] = {}
        for row in await store.turn_models(self.session_id):
            if row.branch_id == branch:
                shares.setdefault(row.user_turn_number, []).append(row.share)
        result: dict[int, dict[str, Any]] = {}
        for turn, recorded_at in sorted(times.items()):
            parts = shares.get(turn, [])
            at = None if recorded_at is None else datetime.fromisoformat(recorded_at)
            priced = (
                cost.Cost.total(cost.price(part.model, _counts(part), at) for part in parts)
                if parts
                else cost.Cost(None, cost.UNKNOWN_MODEL)
            )
            result[turn] = {
                "models": [share_record(part) for part in parts],
                "cost_usd": priced.usd,
                "cost_reason": priced.reason,
                "recorded_at": recorded_at,
            }
        return result


def _counts(share: ModelShare) -> cost.TokenCounts:
    return cost.TokenCounts(
        share.requests,
        share.input_tokens,
        share.cached_tokens,
        share.output_tokens,
        share.reasoning_tokens,
    )
