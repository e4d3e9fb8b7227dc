"""Store-wide usage rollups, grouped by the database.

One statement reads the turns of a time range through ``idx_turn_usage_created_at`` (or of
one session through its usage index), joins each turn's model rows (a turn stored without them
counts once, model unknown) and, for owners, the table that holds each session's user, and
sums requests and tokens with ``GROUP BY``: no turn is loaded into Python. Rows come back per
requested group and, beneath it, per model and UTC day, the finest grain prices depend on; the
caller prices those and folds them into the groups.

Time buckets are computed by the database from the stored UTC timestamps, shifted by the
offset of the requested time zone at that instant: the zone's offsets over the range (its
daylight-saving transitions) are worked out here and handed to the statement as a ``CASE``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from sqlalchemy import (
    Integer,
    and_,
    case,
    func,
    literal,
    null,
    or_,
    select,
)
from sqlalchemy.engine import Connection
from sqlalchemy.sql import ColumnElement, Select

from turnstore.persistence.dialects.base import DialectProfile
from turnstore.persistence.engines import EngineHandle
from turnstore.persistence.models import StoreTables

PERIODS = ("day", "week", "month")
GROUP_KEYS = (*PERIODS, "model", "user", "session", "branch")


@dataclass(frozen=True)
class Owners:
    """Where a session's owner is stored: a table keyed by ``session_id`` and its user column."""

    table: Any
    user_column: str


@dataclass(frozen=True)
class RollupFilter:
    """Which turns a rollup counts.

    Attributes:
        since: First instant counted (aware), or ``None``.
        until: First instant no longer counted (aware), or ``None``.
        user_id: Only sessions of this owner.
        session_id: Only this session.
    """

    since: datetime | None = None
    until: datetime | None = None
    user_id: str | None = None
    session_id: str | None = None


@dataclass(frozen=True)
class RollupRow:
    """Sums of one group, for one model on one UTC day.

    Attributes:
        keys: The group's values by key (periods as ``YYYY-MM-DD`` of their first day).
        model: The model of these turns (``None``: unknown).
        utc_day: The UTC day of these turns, ``YYYY-MM-DD`` (the grain of prices).
        turns: Turns counted: each turn once; grouped by model, once per model it used.
        requests: Model requests.
        input_tokens: Input tokens, cached ones included.
        cached_tokens: Cached input tokens.
        output_tokens: Output tokens, reasoning ones included.
        reasoning_tokens: Reasoning tokens.
        total_tokens: Total tokens.
    """

    keys: dict[str, Any]
    model: str | None
    utc_day: str
    turns: int
    requests: int
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    reasoning_tokens: int
    total_tokens: int


async def usage_rows(
    handle: EngineHandle,
    tables: StoreTables,
    *,
    group_by: Sequence[str],
    where: RollupFilter,
    zone: tzinfo,
    owners: Owners | None,
    models_recorded: bool = True,
) -> list[RollupRow]:
    """Sum usage by ``group_by`` (plus model and UTC day), in the database.

    Args:
        handle: The engine.
        tables: The store's tables.
        group_by: Keys of :data:`GROUP_KEYS`, checked by the caller.
        where: Which turns to count.
        zone: The time zone of the period buckets.
        owners: Where owners live; needed for ``user`` grouping and the user filter.
        models_recorded: Whether the turn-models table exists (migrated to 0007).
    """
    profile = handle.profile
    shifts: list[tuple[datetime, int]] = []
    if any(key in PERIODS for key in group_by) and zone is not UTC:
        low, high = where.since, where.until
        if low is None or high is None:
            first, last = await handle.read(_time_range, tables, profile)
            if first is None or last is None:
                return []
            low = low or first
            high = high or last + timedelta(seconds=1)
        shifts = offset_periods(zone, low, high)
    statement = _statement(tables, profile, group_by, where, shifts, owners, models_recorded)
    rows = await handle.read(_fetch, statement)
    return [_row(row, group_by) for row in rows]


def _fetch(conn: Connection, statement: Select[Any]) -> list[Any]:
    return list(conn.execute(statement).all())


def _time_range(
    conn: Connection, tables: StoreTables, profile: DialectProfile
) -> tuple[datetime | None, datetime | None]:
    """The first and last usage times of the store (two index lookups)."""
    u = tables.usage
    first = conn.execute(select(func.min(u.c.created_at))).scalar()
    last = conn.execute(select(func.max(u.c.created_at))).scalar()
    return _aware(first), _aware(last)


def _aware(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def offset_periods(zone: tzinfo, low: datetime, high: datetime) -> list[tuple[datetime, int]]:
    """The zone's UTC offsets over ``[low, high)``: ``(from_instant, offset_seconds)`` in order.

    The first entry starts at ``low``; each later one at a transition, found to the second.
    """

    def offset(instant: datetime) -> int:
        delta = instant.astimezone(zone).utcoffset()
        return int(delta.total_seconds()) if delta is not None else 0

    low, high = low.astimezone(UTC), high.astimezone(UTC)
    periods = [(low, offset(low))]
    step = timedelta(hours=6)
    cursor = low
    while cursor < high:
        following = min(cursor + step, high)
        if offset(following) != periods[-1][1]:
            # A transition between cursor and following: bisect to the second.
            before, after = cursor, following
            while after - before > timedelta(seconds=1):
                middle = before + (after - before) / 2
                if offset(middle) == periods[-1][1]:
                    before = middle
                else:
                    after = middle
            after = after.replace(microsecond=0)
            if offset(after) == periods[-1][1]:
                after += timedelta(seconds=1)
            periods.append((after, offset(after)))
        cursor = following
    return periods


def _statement(
    tables: StoreTables,
    profile: DialectProfile,
    group_by: Sequence[str],
    where: RollupFilter,
    shifts: list[tuple[datetime, int]],
    owners: Owners | None,
    models_recorded: bool,
) -> Select[Any]:
    u, tm = tables.usage, tables.turn_models
    stamp = profile.timestamp_column(u.c.created_at)
    source: Any = u
    if models_recorded:
        source = source.outerjoin(
            tm,
            and_(
                tm.c.session_id == u.c.session_id,
                tm.c.branch_id == u.c.branch_id,
                tm.c.user_turn_number == u.c.user_turn_number,
            ),
        )
    conditions: list[ColumnElement[bool]] = []
    owner_column: ColumnElement[Any] = null()
    if owners is not None and ("user" in group_by or where.user_id is not None):
        info = owners.table
        joined = info.c.session_id == u.c.session_id
        if where.user_id is not None:
            source = source.join(info, joined)
            conditions.append(info.c[owners.user_column] == where.user_id)
        else:
            source = source.outerjoin(info, joined)
        owner_column = info.c[owners.user_column]
    if where.session_id is not None:
        conditions.append(u.c.session_id == where.session_id)
    if where.since is not None:
        conditions.append(stamp >= profile.timestamp_value(where.since))
    if where.until is not None:
        conditions.append(stamp < profile.timestamp_value(where.until))

    def counted(own: str, fallback: ColumnElement[Any]) -> ColumnElement[Any]:
        if not models_recorded:
            return func.coalesce(fallback, 0)
        return func.coalesce(tm.c[own], fallback, 0)

    cached = profile.json_integer(u.c.input_tokens_details, "cached_tokens")
    reasoning = profile.json_integer(u.c.output_tokens_details, "reasoning_tokens")
    model = tm.c.model if models_recorded else null()
    turns: ColumnElement[Any]
    if "model" in group_by or not models_recorded:
        turns = func.count()
    else:
        # A turn served by several models has a row per model: count its first one.
        first = or_(tm.c.position.is_(None), tm.c.position == 0)
        turns = func.sum(case((first, 1), else_=0))

    keys: list[ColumnElement[Any]] = []
    for key in group_by:
        if key in PERIODS:
            offset = _offset_expression(stamp, profile, shifts)
            wall = (
                profile.shifted(u.c.created_at, offset)
                if offset is not None
                else profile.shifted(u.c.created_at, literal(0, Integer))
            )
            keys.append(profile.period_start(wall, key).label(key))
        elif key == "model":
            continue  # the model is always a grouping column, below
        elif key == "user":
            keys.append(owner_column.label("user"))
        elif key == "session":
            keys.append(u.c.session_id.label("session"))
        else:
            keys.append(u.c.branch_id.label("branch"))
    utc_day = profile.period_start(profile.shifted(u.c.created_at, literal(0, Integer)), "day")
    grouping = [*keys, model.label("price_model"), utc_day.label("utc_day")]
    return (
        select(
            *grouping,
            turns.label("turns"),
            func.sum(counted("requests", u.c.requests)).label("requests"),
            func.sum(counted("input_tokens", u.c.input_tokens)).label("input_tokens"),
            func.sum(counted("cached_tokens", cached)).label("cached_tokens"),
            func.sum(counted("output_tokens", u.c.output_tokens)).label("output_tokens"),
            func.sum(counted("reasoning_tokens", reasoning)).label("reasoning_tokens"),
            func.sum(counted("total_tokens", u.c.total_tokens)).label("total_tokens"),
        )
        .select_from(source)
        .where(*conditions)
        .group_by(*grouping)
    )


def _offset_expression(
    stamp: ColumnElement[Any], profile: DialectProfile, shifts: list[tuple[datetime, int]]
) -> ColumnElement[Any] | None:
    if not shifts:
        return None
    if len(shifts) == 1:
        return literal(shifts[0][1], Integer)
    whens = [
        (stamp < profile.timestamp_value(start), literal(previous, Integer))
        for (start, _), (_, previous) in zip(shifts[1:], shifts[:-1], strict=True)
    ]
    return case(*whens, else_=literal(shifts[-1][1], Integer))


def _row(row: Any, group_by: Sequence[str]) -> RollupRow:
    mapping = row._mapping
    keys = {key: mapping[key] for key in group_by if key != "model"}
    model = mapping["price_model"]
    if "model" in group_by:
        keys["model"] = model
    return RollupRow(
        keys=keys,
        model=model,
        utc_day=str(mapping["utc_day"]),
        turns=int(mapping["turns"] or 0),
        requests=int(mapping["requests"] or 0),
        input_tokens=int(mapping["input_tokens"] or 0),
        cached_tokens=int(mapping["cached_tokens"] or 0),
        output_tokens=int(mapping["output_tokens"] or 0),
        reasoning_tokens=int(mapping["reasoning_tokens"] or 0),
        total_tokens=int(mapping["total_tokens"] or 0),
    )
