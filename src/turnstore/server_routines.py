"""PostgreSQL functions that run a whole append or usage write in one round trip.

An append is "lock the session, read its counters, insert the messages and their structure
rows"; storing usage is "lock, read the latest turn, upsert". As separate statements that is
five or six round trips inside a transaction (BEGIN and COMMIT included). One statement with
CTEs cannot replace them: every part of a statement reads with the snapshot the statement
took before it waited for the session's row lock, so it would miss what the lock holder just
committed. Inside a PL/pgSQL function each statement takes a fresh snapshot under READ
COMMITTED, so lock-then-read stays exact, and the call is one autocommit statement: atomic,
one round trip.

The function bodies are versioned (``_v1``). A released version is never edited: a change
gets a new version, created by a new migration, so processes of the old release keep
calling the functions they know during a rolling upgrade. Migration 0003 creates version 1
for the default tables with :func:`routine_ddl`; stores with their own table names get the
same functions under names of their own when ``create_tables=True`` creates their tables.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

VERSION = 1

# Argument types, in order; also the signature ``to_regprocedure`` looks up.
_APPEND_ARGUMENTS = "text, text, integer, text[], text[], boolean[], text[]"
_USAGE_ARGUMENTS = "text, text, integer, integer, integer, integer, integer, text, text"


@dataclass(frozen=True)
class ServerRoutines:
    """The names of one table set's functions and the SQL that calls them.

    Attributes:
        append_name: Function appending messages to a branch.
        usage_name: Function storing a turn's usage.
    """

    append_name: str
    usage_name: str

    @property
    def append_call(self) -> str:
        """SQL calling the append function; one row ``(branch_id, generation)``."""
        return f"SELECT * FROM {self.append_name}($1, $2, $3, $4, $5, $6, $7)"

    @property
    def usage_call(self) -> str:
        """SQL calling the usage function; one value, the turn written or NULL."""
        return f"SELECT {self.usage_name}($1, $2, $3, $4, $5, $6, $7, $8, $9)"

    @property
    def presence_query(self) -> str:
        """SQL returning whether both functions exist with the expected signatures."""
        return (
            f"SELECT to_regprocedure('{self.append_name}({_APPEND_ARGUMENTS})') IS NOT NULL "
            f"AND to_regprocedure('{self.usage_name}({_USAGE_ARGUMENTS})') IS NOT NULL"
        )


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
    return ServerRoutines(f"turnstore_append{suffix}", f"turnstore_record_usage{suffix}")


def routine_ddl(
    routines: ServerRoutines,
    *,
    sessions_table: str,
    messages_table: str,
    structure_table: str,
    usage_table: str,
    generations_table: str,
) -> list[str]:
    """``CREATE OR REPLACE FUNCTION`` statements for version 1 of the functions.

    Version 1 is the current version; when a later one exists, this keeps building version 1
    (migration 0003 creates it) and a function of its own builds the new one.
    """
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


def drop_ddl(routines: ServerRoutines) -> list[str]:
    """``DROP FUNCTION`` statements for both functions."""
    return [
        f"DROP FUNCTION IF EXISTS {routines.append_name}({_APPEND_ARGUMENTS})",
        f"DROP FUNCTION IF EXISTS {routines.usage_name}({_USAGE_ARGUMENTS})",
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
        [is_user for _, _, is_user, _ in messages],
        [tool for _, _, _, tool in messages],
    )


def json_argument(value: dict[str, Any] | None) -> str | None:
    """A JSONB argument as text, serialized as SQLAlchemy serializes JSONB binds."""
    return None if value is None else json.dumps(value)
