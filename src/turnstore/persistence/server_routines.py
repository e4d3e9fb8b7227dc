"""PostgreSQL functions that run a whole append or usage write in one round trip.

An append is "lock the session, read its counters, insert the messages and their structure
rows"; storing usage is "lock, read the latest turn, upsert". As separate statements that is
five or six round trips inside a transaction (BEGIN and COMMIT included). One statement with
CTEs cannot replace them: every part of a statement reads with the snapshot the statement
took before it waited for the session's row lock, so it would miss what the lock holder just
committed. Inside a PL/pgSQL function each statement takes a fresh snapshot under READ
COMMITTED, so lock-then-read stays exact, and the call is one autocommit statement: atomic,
one round trip.

The function bodies are versioned (``_v1``, ``_v2``). A released version is never edited: a
change gets a new version, created by a new migration, so processes of the old release keep
calling the functions they know during a rolling upgrade, and a new release finds the newest
version the database has. Migration 0003 creates version 1 for the default tables with
:func:`routine_ddl`, migration 0004 version 2; stores with their own table names get every
version under names of their own when ``create_tables=True`` creates their tables.

Version 2 reads the session's latest sequence and turn numbers as "the first row of the
index, newest first" instead of ``max()``. Both read one index entry when the planner has
statistics; on a table it has not analyzed yet (a new database, or one autovacuum has not
reached), Postgres may plan ``max()`` as an aggregate over every row of the branch, which made
each append and usage write cost more as the history grew.

Version 5 (migration 0008) is version 4 with upserts that set only the new row's values
(``SET updated_at = EXCLUDED.updated_at``) instead of calling ``CURRENT_TIMESTAMP``: Citus
refuses non-immutable functions in ``DO UPDATE SET`` on distributed tables. It is the first
version that runs on Citus (:data:`FIRST_DISTRIBUTABLE_VERSION`), where it is distributed by its
session argument so that a call runs on the worker holding the session.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

VERSION = 5
#: Every released version, newest first.
VERSIONS = (5, 4, 3, 2, 1)
#: The oldest version whose bodies run on Citus's distributed tables.
FIRST_DISTRIBUTABLE_VERSION = 5
#: The argument the functions are distributed by on Citus (the session id).
DISTRIBUTION_ARGUMENT = "p_session"

# Argument types, in order; also the signature ``to_regprocedure`` looks up. Version 3 adds
# the session info a write creates when the session has none: owner, title, metadata.
_APPEND_ARGUMENTS = "text, text, integer, text[], text[], boolean[], text[]"
_USAGE_ARGUMENTS = "text, text, integer, integer, integer, integer, integer, text, text"
_INFO_ARGUMENTS = ", text, text, text"
#: The first version that maintains ``turnstore_session_info``.
INFO_VERSION = 3
# Version 4's usage function also takes the turn's models, one array element per model:
# names, then requests and input, cached, output, reasoning and total tokens.
_MODEL_ARGUMENTS = ", text[]" + ", integer[]" * 6
#: The first version whose usage function records the models of the turn.
MODELS_VERSION = 4


@dataclass(frozen=True)
class ServerRoutines:
    """The names of one table set's functions and the SQL that calls them.

    Attributes:
        append_name: Function appending messages to a branch.
        usage_name: Function storing a turn's usage.
        version: Which version of the function bodies these names hold.
    """

    append_name: str
    usage_name: str
    version: int

    @property
    def maintains_info(self) -> bool:
        """Whether the functions keep ``turnstore_session_info`` (and take its arguments)."""
        return self.version >= INFO_VERSION

    @property
    def records_models(self) -> bool:
        """Whether the usage function records the turn's models (and takes their arrays)."""
        return self.version >= MODELS_VERSION

    @property
    def append_call(self) -> str:
        """SQL calling the append function; one row ``(branch_id, generation)``.

        The user-message flags travel as ``text[]`` (``t``/``f``): asyncpg has no built-in
        codec for ``boolean[]`` and looks its type up on every new connection, a catalog query
        that takes over a second on a Citus coordinator.
        """
        arguments = _placeholders(10 if self.maintains_info else 7)
        flags = arguments.replace("$6,", "$6::text[]::boolean[],", 1)
        return f"SELECT * FROM {self.append_name}({flags})"

    @property
    def usage_call(self) -> str:
        """SQL calling the usage function; one value, the turn written or NULL.

        The models' six count arrays travel as ``text[]`` (see :func:`count_array`), for the
        reason the append's flags do: asyncpg would look ``integer[]`` up on every new
        connection, about a second on a Citus coordinator.
        """
        count = 9 + (3 if self.maintains_info else 0)
        arguments = _placeholders(count)
        if self.records_models:
            names, first = count + 1, count + 2
            counts = ", ".join(f"${n}::text[]::integer[]" for n in range(first, first + 6))
            arguments += f", ${names}, {counts}"
        return f"SELECT {self.usage_name}({arguments})"

    @property
    def signatures(self) -> tuple[str, str]:
        """``name(argument types)`` of both functions, as ``regprocedure`` reads them."""
        append, usage = _signatures(self.version)
        return f"{self.append_name}({append})", f"{self.usage_name}({usage})"

    @property
    def distributable(self) -> bool:
        """Whether this version's bodies run on Citus's distributed tables."""
        return self.version >= FIRST_DISTRIBUTABLE_VERSION

    @property
    def presence_query(self) -> str:
        """SQL returning whether both functions exist with the expected signatures."""
        append, usage = _signatures(self.version)
        return (
            f"SELECT to_regprocedure('{self.append_name}({append})') IS NOT NULL "
            f"AND to_regprocedure('{self.usage_name}({usage})') IS NOT NULL"
        )


def _placeholders(count: int) -> str:
    return ", ".join(f"${number}" for number in range(1, count + 1))


def _signatures(version: int) -> tuple[str, str]:
    """The argument types of a version's append and usage functions."""
    extra = _INFO_ARGUMENTS if version >= INFO_VERSION else ""
    models = _MODEL_ARGUMENTS if version >= MODELS_VERSION else ""
    return _APPEND_ARGUMENTS + extra, _USAGE_ARGUMENTS + extra + models


def routines_for(
    sessions_table: str, messages_table: str, *, default: bool, version: int = VERSION
) -> ServerRoutines:
    """The function names for a table set.

    Args:
        sessions_table: The sessions table's name.
        messages_table: The messages table's name.
        default: Whether this is the default table set (plain names, created by migrations).
        version: The functions' version (migrations name the one they create).
    """
    suffix = f"_v{version}"
    if not default:
        # Table names may use all 63 characters Postgres allows; a digest keeps the
        # function names short and distinct per table set.
        digest = hashlib.sha256(f"{sessions_table}\0{messages_table}".encode()).hexdigest()
        suffix += f"_{digest[:10]}"
    return ServerRoutines(f"turnstore_append{suffix}", f"turnstore_record_usage{suffix}", version)


def released_routines(
    sessions_table: str, messages_table: str, *, default: bool
) -> tuple[ServerRoutines, ...]:
    """The names of every released version of the functions for a table set, newest first."""
    return tuple(
        routines_for(sessions_table, messages_table, default=default, version=version)
        for version in VERSIONS
    )


def routine_ddl(
    routines: ServerRoutines,
    *,
    sessions_table: str,
    messages_table: str,
    structure_table: str,
    usage_table: str,
    generations_table: str,
    info_table: str = "turnstore_session_info",
    turn_models_table: str = "turnstore_turn_models",
) -> list[str]:
    """``CREATE OR REPLACE FUNCTION`` statements for the functions, in their version.

    ``info_table`` is used from version 3 on, ``turn_models_table`` from version 4 on
    (earlier versions predate them).
    """
    tables = {
        "sessions_table": sessions_table,
        "messages_table": messages_table,
        "structure_table": structure_table,
        "usage_table": usage_table,
        "generations_table": generations_table,
    }
    if routines.version == 1:
        return _version_1_ddl(routines, **tables)
    if routines.version == 2:
        return _version_2_ddl(routines, **tables)
    if routines.version == 3:
        return _version_3_ddl(routines, **tables, info_table=info_table)
    if routines.version == 4:
        return _version_4_ddl(
            routines, **tables, info_table=info_table, turn_models_table=turn_models_table
        )
    return _version_5_ddl(
        routines, **tables, info_table=info_table, turn_models_table=turn_models_table
    )


def _version_1_ddl(
    routines: ServerRoutines,
    *,
    sessions_table: str,
    messages_table: str,
    structure_table: str,
    usage_table: str,
    generations_table: str,
) -> list[str]:
    """Version 1, as migration 0003 creates it. Frozen: never edit it."""
    append = f"""
CREATE OR REPLACE FUNCTION {routines.append_name}(
    p_session text, p_branch text, p_generation integer,
    p_data text[], p_types text[], p_user boolean[], p_tools text[])
RETURNS TABLE (written_branch text, current_generation integer)
LANGUAGE plpgsql VOLATILE AS $turnstore$
DECLARE
    v_branch text := p_branch;
    v_generation integer;
    v_sequence integer;
    v_turn integer;
    v_message bigint;
BEGIN
    -- Creating or touching the session row takes its lock: writers of one session queue
    -- here, and every statement below reads what the previous holder committed.
    INSERT INTO {sessions_table} AS s (session_id) VALUES (p_session)
        ON CONFLICT (session_id) DO UPDATE SET updated_at = CURRENT_TIMESTAMP;
    SELECT coalesce(max(g.generation), 0) INTO v_generation
        FROM {generations_table} AS g WHERE g.session_id = p_session;
    -- Cleared since the caller looked: its branch is gone and the messages go to main.
    IF v_generation <> p_generation AND v_branch <> 'main' THEN
        v_branch := 'main';
    END IF;
    SELECT coalesce(max(m.sequence_number), 0) INTO v_sequence
        FROM {structure_table} AS m WHERE m.session_id = p_session;
    SELECT coalesce(max(m.user_turn_number), 0) INTO v_turn
        FROM {structure_table} AS m WHERE m.session_id = p_session AND m.branch_id = v_branch;
    FOR i IN 1 .. coalesce(array_length(p_data, 1), 0) LOOP
        INSERT INTO {messages_table} (session_id, message_data)
            VALUES (p_session, p_data[i]) RETURNING id INTO v_message;
        v_sequence := v_sequence + 1;
        IF p_user[i] THEN
            v_turn := v_turn + 1;
        END IF;
        INSERT INTO {structure_table} (session_id, message_id, branch_id, message_type,
                sequence_number, user_turn_number, branch_turn_number, tool_name)
            VALUES (p_session, v_message, v_branch, p_types[i], v_sequence, v_turn, v_turn,
                p_tools[i]);
    END LOOP;
    written_branch := v_branch;
    current_generation := v_generation;
    RETURN NEXT;
END
$turnstore$"""
    usage = f"""
CREATE OR REPLACE FUNCTION {routines.usage_name}(
    p_session text, p_branch text, p_generation integer, p_requests integer,
    p_input_tokens integer, p_output_tokens integer, p_total_tokens integer,
    p_input_details text, p_output_details text)
RETURNS integer
LANGUAGE plpgsql VOLATILE AS $turnstore$
DECLARE
    v_turn integer;
    v_generation integer;
BEGIN
    PERFORM 1 FROM {sessions_table} AS s WHERE s.session_id = p_session FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT max(m.user_turn_number) INTO v_turn
        FROM {structure_table} AS m WHERE m.session_id = p_session AND m.branch_id = p_branch;
    SELECT coalesce(max(g.generation), 0) INTO v_generation
        FROM {generations_table} AS g WHERE g.session_id = p_session;
    -- No turn yet, or cleared since the caller looked: the usage belongs to nothing stored.
    IF v_turn IS NULL OR v_generation <> p_generation THEN
        RETURN NULL;
    END IF;
    INSERT INTO {usage_table} AS u (session_id, branch_id, user_turn_number, requests,
            input_tokens, output_tokens, total_tokens, input_tokens_details,
            output_tokens_details)
        VALUES (p_session, p_branch, v_turn, p_requests, p_input_tokens, p_output_tokens,
            p_total_tokens, p_input_details::jsonb, p_output_details::jsonb)
        ON CONFLICT (session_id, branch_id, user_turn_number) DO UPDATE SET
            requests = EXCLUDED.requests,
            input_tokens = EXCLUDED.input_tokens,
            output_tokens = EXCLUDED.output_tokens,
            total_tokens = EXCLUDED.total_tokens,
            input_tokens_details = EXCLUDED.input_tokens_details,
            output_tokens_details = EXCLUDED.output_tokens_details,
            created_at = CURRENT_TIMESTAMP;
    RETURN v_turn;
END
$turnstore$"""
    return [append.strip(), usage.strip()]


def _version_2_ddl(
    routines: ServerRoutines,
    *,
    sessions_table: str,
    messages_table: str,
    structure_table: str,
    usage_table: str,
    generations_table: str,
) -> list[str]:
    """Version 2, as migration 0004 creates it: counters read from one index entry each.

    The newest entry of the turn index answers "the latest turn" without a sort. Without
    statistics, though, the planner costs a sort of the branch's rows found through the
    smaller ``(session_id, branch_id)`` index as cheaper, since it expects one row; sorting
    is switched off inside the functions (none of their statements needs one) so it never
    takes that plan.
    """
    latest_turn = f"""(SELECT m.user_turn_number FROM {structure_table} AS m
            WHERE m.session_id = p_session AND m.branch_id = v_branch
                AND m.user_turn_number IS NOT NULL
            ORDER BY m.user_turn_number DESC LIMIT 1)"""
    generation = f"""coalesce((SELECT g.generation FROM {generations_table} AS g
            WHERE g.session_id = p_session), 0)"""
    append = f"""
CREATE OR REPLACE FUNCTION {routines.append_name}(
    p_session text, p_branch text, p_generation integer,
    p_data text[], p_types text[], p_user boolean[], p_tools text[])
RETURNS TABLE (written_branch text, current_generation integer)
LANGUAGE plpgsql VOLATILE SET enable_sort = off AS $turnstore$
DECLARE
    v_branch text := p_branch;
    v_generation integer;
    v_sequence integer;
    v_turn integer;
    v_message bigint;
BEGIN
    -- Creating or touching the session row takes its lock: writers of one session queue
    -- here, and every statement below reads what the previous holder committed.
    INSERT INTO {sessions_table} AS s (session_id) VALUES (p_session)
        ON CONFLICT (session_id) DO UPDATE SET updated_at = CURRENT_TIMESTAMP;
    SELECT {generation},
        coalesce((SELECT m.sequence_number FROM {structure_table} AS m
            WHERE m.session_id = p_session ORDER BY m.sequence_number DESC LIMIT 1), 0)
        INTO v_generation, v_sequence;
    -- Cleared since the caller looked: its branch is gone and the messages go to main.
    IF v_generation <> p_generation AND v_branch <> 'main' THEN
        v_branch := 'main';
    END IF;
    v_turn := coalesce({latest_turn}, 0);
    FOR i IN 1 .. coalesce(array_length(p_data, 1), 0) LOOP
        INSERT INTO {messages_table} (session_id, message_data)
            VALUES (p_session, p_data[i]) RETURNING id INTO v_message;
        v_sequence := v_sequence + 1;
        IF p_user[i] THEN
            v_turn := v_turn + 1;
        END IF;
        INSERT INTO {structure_table} (session_id, message_id, branch_id, message_type,
                sequence_number, user_turn_number, branch_turn_number, tool_name)
            VALUES (p_session, v_message, v_branch, p_types[i], v_sequence, v_turn, v_turn,
                p_tools[i]);
    END LOOP;
    written_branch := v_branch;
    current_generation := v_generation;
    RETURN NEXT;
END
$turnstore$"""
    usage = f"""
CREATE OR REPLACE FUNCTION {routines.usage_name}(
    p_session text, p_branch text, p_generation integer, p_requests integer,
    p_input_tokens integer, p_output_tokens integer, p_total_tokens integer,
    p_input_details text, p_output_details text)
RETURNS integer
LANGUAGE plpgsql VOLATILE SET enable_sort = off AS $turnstore$
DECLARE
    v_branch text := p_branch;
    v_turn integer;
    v_generation integer;
BEGIN
    PERFORM 1 FROM {sessions_table} AS s WHERE s.session_id = p_session FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT {latest_turn},
        {generation}
        INTO v_turn, v_generation;
    -- No turn yet, or cleared since the caller looked: the usage belongs to nothing stored.
    IF v_turn IS NULL OR v_generation <> p_generation THEN
        RETURN NULL;
    END IF;
    INSERT INTO {usage_table} AS u (session_id, branch_id, user_turn_number, requests,
            input_tokens, output_tokens, total_tokens, input_tokens_details,
            output_tokens_details)
        VALUES (p_session, v_branch, v_turn, p_requests, p_input_tokens, p_output_tokens,
            p_total_tokens, p_input_details::jsonb, p_output_details::jsonb)
        ON CONFLICT (session_id, branch_id, user_turn_number) DO UPDATE SET
            requests = EXCLUDED.requests,
            input_tokens = EXCLUDED.input_tokens,
            output_tokens = EXCLUDED.output_tokens,
            total_tokens = EXCLUDED.total_tokens,
            input_tokens_details = EXCLUDED.input_tokens_details,
            output_tokens_details = EXCLUDED.output_tokens_details,
            created_at = CURRENT_TIMESTAMP;
    RETURN v_turn;
END
$turnstore$"""
    return [append.strip(), usage.strip()]


def _version_3_ddl(
    routines: ServerRoutines,
    *,
    sessions_table: str,
    messages_table: str,
    structure_table: str,
    usage_table: str,
    generations_table: str,
    info_table: str,
) -> list[str]:
    """Version 3, as migration 0005 creates it: version 2 that also keeps the session info.

    Both functions take the session's owner, title and metadata (JSON text) last, used only
    when the session has no info row yet, and move its last activity forward (never back:
    a writer that waited for the lock may hold an earlier clock reading than the one before
    it) in the same call.
    """
    latest_turn = f"""(SELECT m.user_turn_number FROM {structure_table} AS m
            WHERE m.session_id = p_session AND m.branch_id = v_branch
                AND m.user_turn_number IS NOT NULL
            ORDER BY m.user_turn_number DESC LIMIT 1)"""
    generation = f"""coalesce((SELECT g.generation FROM {generations_table} AS g
            WHERE g.session_id = p_session), 0)"""
    touch_info = f"""v_now := CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS bigint);
    INSERT INTO {info_table} AS i (session_id, user_id, title, metadata, created_at_us,
            last_activity_us)
        VALUES (p_session, p_owner, p_title, p_metadata::jsonb, v_now, v_now)
        ON CONFLICT (session_id) DO UPDATE
            SET last_activity_us = greatest(i.last_activity_us, EXCLUDED.last_activity_us);"""
    append = f"""
CREATE OR REPLACE FUNCTION {routines.append_name}(
    p_session text, p_branch text, p_generation integer,
    p_data text[], p_types text[], p_user boolean[], p_tools text[],
    p_owner text, p_title text, p_metadata text)
RETURNS TABLE (written_branch text, current_generation integer)
LANGUAGE plpgsql VOLATILE SET enable_sort = off AS $turnstore$
DECLARE
    v_branch text := p_branch;
    v_generation integer;
    v_sequence integer;
    v_turn integer;
    v_message bigint;
    v_now bigint;
BEGIN
    -- Creating or touching the session row takes its lock: writers of one session queue
    -- here, and every statement below reads what the previous holder committed.
    INSERT INTO {sessions_table} AS s (session_id) VALUES (p_session)
        ON CONFLICT (session_id) DO UPDATE SET updated_at = CURRENT_TIMESTAMP;
    SELECT {generation},
        coalesce((SELECT m.sequence_number FROM {structure_table} AS m
            WHERE m.session_id = p_session ORDER BY m.sequence_number DESC LIMIT 1), 0)
        INTO v_generation, v_sequence;
    -- Cleared since the caller looked: its branch is gone and the messages go to main.
    IF v_generation <> p_generation AND v_branch <> 'main' THEN
        v_branch := 'main';
    END IF;
    v_turn := coalesce({latest_turn}, 0);
    FOR i IN 1 .. coalesce(array_length(p_data, 1), 0) LOOP
        INSERT INTO {messages_table} (session_id, message_data)
            VALUES (p_session, p_data[i]) RETURNING id INTO v_message;
        v_sequence := v_sequence + 1;
        IF p_user[i] THEN
            v_turn := v_turn + 1;
        END IF;
        INSERT INTO {structure_table} (session_id, message_id, branch_id, message_type,
                sequence_number, user_turn_number, branch_turn_number, tool_name)
            VALUES (p_session, v_message, v_branch, p_types[i], v_sequence, v_turn, v_turn,
                p_tools[i]);
    END LOOP;
    {touch_info}
    written_branch := v_branch;
    current_generation := v_generation;
    RETURN NEXT;
END
$turnstore$"""
    usage = f"""
CREATE OR REPLACE FUNCTION {routines.usage_name}(
    p_session text, p_branch text, p_generation integer, p_requests integer,
    p_input_tokens integer, p_output_tokens integer, p_total_tokens integer,
    p_input_details text, p_output_details text,
    p_owner text, p_title text, p_metadata text)
RETURNS integer
LANGUAGE plpgsql VOLATILE SET enable_sort = off AS $turnstore$
DECLARE
    v_branch text := p_branch;
    v_turn integer;
    v_generation integer;
    v_now bigint;
BEGIN
    PERFORM 1 FROM {sessions_table} AS s WHERE s.session_id = p_session FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT {latest_turn},
        {generation}
        INTO v_turn, v_generation;
    -- No turn yet, or cleared since the caller looked: the usage belongs to nothing stored.
    IF v_turn IS NULL OR v_generation <> p_generation THEN
        RETURN NULL;
    END IF;
    INSERT INTO {usage_table} AS u (session_id, branch_id, user_turn_number, requests,
            input_tokens, output_tokens, total_tokens, input_tokens_details,
            output_tokens_details)
        VALUES (p_session, v_branch, v_turn, p_requests, p_input_tokens, p_output_tokens,
            p_total_tokens, p_input_details::jsonb, p_output_details::jsonb)
        ON CONFLICT (session_id, branch_id, user_turn_number) DO UPDATE SET
            requests = EXCLUDED.requests,
            input_tokens = EXCLUDED.input_tokens,
            output_tokens = EXCLUDED.output_tokens,
            total_tokens = EXCLUDED.total_tokens,
            input_tokens_details = EXCLUDED.input_tokens_details,
            output_tokens_details = EXCLUDED.output_tokens_details,
            created_at = CURRENT_TIMESTAMP;
    {touch_info}
    RETURN v_turn;
END
$turnstore$"""
    return [append.strip(), usage.strip()]


def _version_4_ddl(
    routines: ServerRoutines,
    *,
    sessions_table: str,
    messages_table: str,
    structure_table: str,
    usage_table: str,
    generations_table: str,
    info_table: str,
    turn_models_table: str,
) -> list[str]:
    """Version 4, as migration 0007 creates it: version 3 whose usage write records models.

    The append function is version 3's. The usage function is version 3's with the turn's
    models as seven more arguments (parallel arrays): after the usage upsert it replaces the
    turn's rows in the turn-models table, in the same call. Built from version 3's text, which
    never changes, so version 4 is exactly version 3 plus this.
    """
    append, usage = _version_3_ddl(
        routines,
        sessions_table=sessions_table,
        messages_table=messages_table,
        structure_table=structure_table,
        usage_table=usage_table,
        generations_table=generations_table,
        info_table=info_table,
    )
    arguments = "    p_owner text, p_title text, p_metadata text)\nRETURNS integer"
    ending = "    RETURN v_turn;\nEND"
    assert usage.count(arguments) == 1
    assert usage.count(ending) == 1
    usage = usage.replace(
        arguments,
        """    p_owner text, p_title text, p_metadata text,
    p_models text[], p_model_requests integer[], p_model_input integer[],
    p_model_cached integer[], p_model_output integer[], p_model_reasoning integer[],
    p_model_total integer[])
RETURNS integer""",
    ).replace(
        ending,
        f"""    DELETE FROM {turn_models_table} AS t
        WHERE t.session_id = p_session AND t.branch_id = v_branch AND t.user_turn_number = v_turn;
    INSERT INTO {turn_models_table} (session_id, branch_id, user_turn_number, position, model,
            requests, input_tokens, cached_tokens, output_tokens, reasoning_tokens,
            total_tokens)
        SELECT p_session, v_branch, v_turn, r.i - 1, p_models[r.i], p_model_requests[r.i],
            p_model_input[r.i], p_model_cached[r.i], p_model_output[r.i],
            p_model_reasoning[r.i], p_model_total[r.i]
        FROM generate_subscripts(p_models, 1) AS r(i);
    RETURN v_turn;
END""",
    )
    return [append, usage]


def _version_5_ddl(
    routines: ServerRoutines,
    *,
    sessions_table: str,
    messages_table: str,
    structure_table: str,
    usage_table: str,
    generations_table: str,
    info_table: str,
    turn_models_table: str,
) -> list[str]:
    """Version 5, as migration 0008 creates it: version 4 with immutable upsert assignments.

    Built from version 4's (frozen) text, so the two differ only where shown; the frozen-digest
    test pins the result like every released version.
    """
    statements = _version_4_ddl(
        routines,
        sessions_table=sessions_table,
        messages_table=messages_table,
        structure_table=structure_table,
        usage_table=usage_table,
        generations_table=generations_table,
        info_table=info_table,
        turn_models_table=turn_models_table,
    )
    changes = (
        (
            "DO UPDATE SET updated_at = CURRENT_TIMESTAMP;",
            "DO UPDATE SET updated_at = EXCLUDED.updated_at;",
        ),
        (
            "            created_at = CURRENT_TIMESTAMP;",
            "            created_at = EXCLUDED.created_at;",
        ),
    )
    changed = []
    for statement, (before, after) in zip(statements, changes, strict=True):
        if statement.count(before) != 1:
            raise RuntimeError("version 4 is frozen; version 5 changes it only as shown")
        changed.append(statement.replace(before, after))
    return changed


def drop_ddl(routines: ServerRoutines) -> list[str]:
    """``DROP FUNCTION`` statements for both functions."""
    append, usage = _signatures(routines.version)
    return [
        f"DROP FUNCTION IF EXISTS {routines.append_name}({append})",
        f"DROP FUNCTION IF EXISTS {routines.usage_name}({usage})",
    ]


def append_arguments(
    session_id: str,
    branch_id: str,
    generation: int,
    messages: Sequence[tuple[str, str, bool, str | None]],
) -> tuple[Any, ...]:
    """Positional arguments of :attr:`ServerRoutines.append_call`.

    Args:
        session_id: The session.
        branch_id: The branch the caller believes it is on.
        generation: The clear generation the caller last saw.
        messages: ``(item text, message type, is a user message, tool name)`` per message.
    """
    return (
        session_id,
        branch_id,
        generation,
        [data for data, _, _, _ in messages],
        [kind for _, kind, _, _ in messages],
        ["t" if is_user else "f" for _, _, is_user, _ in messages],
        [tool for _, _, _, tool in messages],
    )


def count_array(counts: Sequence[int | None]) -> list[str | None]:
    """An ``integer[]`` argument of :attr:`ServerRoutines.usage_call`, as the text it takes."""
    return [None if count is None else str(count) for count in counts]


def json_argument(value: dict[str, Any] | None) -> str | None:
    """A JSONB argument as text, serialized as SQLAlchemy serializes JSONB binds."""
    return None if value is None else json.dumps(value)
