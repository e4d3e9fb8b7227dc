"""Usage rollups with their cost: what ``Store.usage`` returns.

The database sums tokens per requested group, per model and per UTC day
(:mod:`turnstore.persistence.rollups`); each of those sums is priced here
(:mod:`turnstore.cost`) and folded into its group. A group's cost is ``None``, with the
reasons, as soon as any of its turns cannot be priced: a partial sum would read as the whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from turnstore import cost
from turnstore.errors import InvalidArgumentError
from turnstore.persistence.engines import EngineHandle
from turnstore.persistence.models import StoreTables
from turnstore.persistence.rollups import (
    GROUP_KEYS,
    PERIODS,
    Owners,
    RollupFilter,
    RollupRow,
    usage_rows,
)

Moment = datetime | date | timedelta


@dataclass(frozen=True)
class UsageRow:
    """One group of a usage rollup.

    Attributes:
        period: First day of the group's day, week (Monday) or month, when grouped by one.
        model: The model, when grouped by model (``None`` there: unknown).
        user: The sessions' owner, when grouped by user (``None``: no owner).
        session: The session, when grouped by session.
        branch: The branch, when grouped by branch.
        turns: User turns with stored usage (by model: turns the model served).
        requests: Model requests.
        input_tokens: Input tokens, cached ones included.
        cached_tokens: Cached input tokens.
        output_tokens: Output tokens, reasoning ones included.
        reasoning_tokens: Reasoning tokens.
        total_tokens: Total tokens.
        cost: US dollars, or ``None`` when any of the group's turns cannot be priced.
        cost_reason: Why ``cost`` is ``None``.
    """

    period: date | None
    model: str | None
    user: str | None
    session: str | None
    branch: str | None
    turns: int
    requests: int
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    reasoning_tokens: int
    total_tokens: int
    cost: Decimal | None
    cost_reason: str | None

    def to_dict(self) -> dict[str, Any]:
        """The row as JSON-ready data (the shape of ``turnstore usage --json``)."""
        return {
            "period": None if self.period is None else self.period.isoformat(),
            "model": self.model,
            "user": self.user,
            "session": self.session,
            "branch": self.branch,
            "turns": self.turns,
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "cached_tokens": self.cached_tokens,
            "output_tokens": self.output_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "total_tokens": self.total_tokens,
            "cost_usd": None if self.cost is None else float(self.cost),
            "cost_reason": self.cost_reason,
        }


def check_group_by(group_by: object) -> tuple[str, ...]:
    """The grouping keys, validated.

    Raises:
        InvalidArgumentError: An unknown or repeated key, or more than one period.
    """
    keys: tuple[object, ...]
    if isinstance(group_by, str):
        keys = tuple(part.strip() for part in group_by.split(",") if part.strip())
    elif isinstance(group_by, Sequence):
        keys = tuple(group_by)
    else:
        raise InvalidArgumentError(
            f"group_by must be a sequence of {', '.join(GROUP_KEYS)}; got {type(group_by).__name__}"
        )
    for key in keys:
        if not isinstance(key, str) or key not in GROUP_KEYS:
            raise InvalidArgumentError(f"group_by keys are {', '.join(GROUP_KEYS)}; got {key!r}")
    if len(set(keys)) != len(keys):
        raise InvalidArgumentError(f"group_by names a key twice: {list(keys)!r}")
    if sum(key in PERIODS for key in keys) > 1:
        raise InvalidArgumentError("group_by takes at most one of day, week and month")
    return tuple(str(key) for key in keys)


def check_zone(tz: object) -> tzinfo:
    """The time zone of period buckets (UTC when ``None``).

    Raises:
        InvalidArgumentError: Not a ``tzinfo`` or the name of a known IANA zone.
    """
    if tz is None:
        return UTC
    if isinstance(tz, tzinfo):
        return tz
    if isinstance(tz, str):
        try:
            return ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    raise InvalidArgumentError(
        f"tz must be a tzinfo or an IANA time zone name such as 'Europe/Paris'; got {tz!r}"
    )


def to_instant(value: object, zone: tzinfo, argument: str, now: datetime) -> datetime | None:
    """A bound of the time range as an aware instant.

    A ``datetime`` without a zone is read in ``zone``; a ``date`` is its midnight in ``zone``;
    a ``timedelta`` is that long before ``now``.

    Raises:
        InvalidArgumentError: ``value`` is none of those.
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=zone)
    if isinstance(value, date):
        return datetime.combine(value, time(), tzinfo=zone)
    if isinstance(value, timedelta):
        return now - value
    raise InvalidArgumentError(
        f"{argument} must be a datetime, a date or a timedelta (that long ago); got {value!r}"
    )


async def usage(
    handle: EngineHandle,
    tables: StoreTables,
    *,
    group_by: object = ("day",),
    since: object = None,
    until: object = None,
    user_id: object = None,
    session_id: object = None,
    tz: object = None,
    owners: Owners | None = None,
    models_recorded: bool = True,
) -> list[UsageRow]:
    """Usage summed by ``group_by`` over a time range, with cost; see ``Store.usage``.

    Raises:
        InvalidArgumentError: Bad arguments (nothing is read).
    """
    keys = check_group_by(group_by)
    zone = check_zone(tz)
    now = datetime.now(UTC)
    low = to_instant(since, zone, "since", now)
    high = to_instant(until, zone, "until", now)
    if low is not None and high is not None and low >= high:
        raise InvalidArgumentError(
            f"since ({low.isoformat()}) must be before until ({high.isoformat()})"
        )
    for name, value in (("user_id", user_id), ("session_id", session_id)):
        if value is not None and not isinstance(value, str):
            raise InvalidArgumentError(f"{name} must be a str; got {type(value).__name__}")
    if owners is None and ("user" in keys or user_id is not None):
        raise InvalidArgumentError(
            "grouping or filtering by user needs the sessions' owners (the store's session info)"
        )
    rows = await usage_rows(
        handle,
        tables,
        group_by=keys,
        where=RollupFilter(
            since=low,
            until=high,
            user_id=user_id if isinstance(user_id, str) else None,
            session_id=session_id if isinstance(session_id, str) else None,
        ),
        zone=zone,
        owners=owners,
        models_recorded=models_recorded,
    )
    return fold(rows, keys)


def fold(rows: Sequence[RollupRow], keys: Sequence[str]) -> list[UsageRow]:
    """Price each (group, model, UTC day) sum and add them up per group, groups in order."""
    groups: dict[tuple[Any, ...], list[RollupRow]] = {}
    for row in rows:
        groups.setdefault(tuple(row.keys.get(key) for key in keys), []).append(row)
    result = []
    for values, parts in groups.items():
        by_key = dict(zip(keys, values, strict=True))
        priced = cost.Cost.total(
            cost.price(
                part.model,
                cost.TokenCounts(
                    part.requests,
                    part.input_tokens,
                    part.cached_tokens,
                    part.output_tokens,
                    part.reasoning_tokens,
                ),
                # Midday of the UTC day: prices change by date; a time-of-day discount
                # (off-peak hours) is not applied to a day's sum.
                datetime.fromisoformat(part.utc_day).replace(hour=12, tzinfo=UTC),
            )
            for part in parts
        )
        period_key = next((key for key in keys if key in PERIODS), None)
        period = by_key.get(period_key) if period_key else None
        result.append(
            UsageRow(
                period=date.fromisoformat(str(period)[:10]) if period is not None else None,
                model=by_key.get("model"),
                user=by_key.get("user"),
                session=by_key.get("session"),
                branch=by_key.get("branch"),
                turns=sum(part.turns for part in parts),
                requests=sum(part.requests for part in parts),
                input_tokens=sum(part.input_tokens for part in parts),
                cached_tokens=sum(part.cached_tokens for part in parts),
                output_tokens=sum(part.output_tokens for part in parts),
                reasoning_tokens=sum(part.reasoning_tokens for part in parts),
                total_tokens=sum(part.total_tokens for part in parts),
                cost=priced.usd,
                cost_reason=priced.reason,
            )
        )
    result.sort(key=lambda row: tuple(_sort_key(getattr(row, _field(key))) for key in keys))
    return result


def _field(key: str) -> str:
    return "period" if key in PERIODS else key


def _sort_key(value: Any) -> tuple[bool, str]:
    return (value is None, "" if value is None else str(value))
