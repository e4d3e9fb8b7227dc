"""Migration 0006 on MariaDB/MySQL: identifier columns become binary NO PAD, with a guard.

Before 0006 identifiers were ``utf8mb4_bin``, which ignores trailing spaces. The migration
converts every identifier column it finds (tables added by other revisions too) and refuses,
listing them, ids stored in forms the old collation took for one. Other backends compare text
exactly already; the isolation itself is tested on all of them in ``test_hostile_ids.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text

from tests.conftest import Backend, fresh_mysql_backend
from tests.helpers import turn
from turnstore import AdvancedSession
from turnstore.errors import MigrationError
from turnstore.persistence.types import exact_identifier_collation
from turnstore.schema import migrate


@pytest.fixture
async def mysql(mysql_url: str) -> AsyncIterator[Backend]:
    async for ready in fresh_mysql_backend(mysql_url):
        yield ready


async def collations(backend: Backend) -> dict[str, str]:
    async with backend.engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT CONCAT(TABLE_NAME, '.', COLUMN_NAME), COLLATION_NAME "
                "FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() "
                "AND DATA_TYPE = 'varchar' AND TABLE_NAME <> 'turnstore_alembic_version'"
            )
        )
        return {str(name): str(collation) for name, collation in rows.all()}


async def execute(backend: Backend, *statements: str) -> None:
    async with backend.engine.begin() as conn:
        for statement in statements:
            await conn.exec_driver_sql(statement)


async def before_0006_with_another_table(backend: Backend) -> None:
    """The schema before 0006, plus a table another revision (say 0005) added meanwhile."""
    await migrate.upgrade(backend.engine, "0005")
    await execute(
        backend,
        "CREATE TABLE session_info (session_id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE "
        "utf8mb4_bin NOT NULL PRIMARY KEY, user_id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE "
        "utf8mb4_bin NULL) DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
    )


async def test_upgrade_makes_every_identifier_column_exact(mysql: Backend) -> None:
    await before_0006_with_another_table(mysql)
    session = AdvancedSession(session_id="user-42", engine=mysql.engine)
    await session.add_items(turn("before the upgrade"))
    before = await collations(mysql)
    assert set(before.values()) == {"utf8mb4_bin"}
    await migrate.upgrade(mysql.engine)
    async with mysql.engine.connect() as conn:
        exact = await conn.run_sync(lambda sync: exact_identifier_collation(sync.dialect))
    after = await collations(mysql)
    assert set(before) <= set(after)
    assert set(after.values()) == {exact}
    assert "session_info.user_id" in after
    # Foreign keys came back: deleting the session cascades.
    assert await session.get_items() == turn("before the upgrade")
    assert await AdvancedSession(session_id="user-42 ", engine=mysql.engine).get_items() == []
    await execute(mysql, "DELETE FROM agent_sessions WHERE session_id = 'user-42'")
    assert await session.get_items() == []


async def test_upgrade_refuses_ids_that_would_split(mysql: Backend) -> None:
    await before_0006_with_another_table(mysql)
    owner = AdvancedSession(session_id="user-42", engine=mysql.engine)
    await owner.add_items(turn("owner"))
    await owner.add_items(turn("owner again"))
    # What the padded collation let a look-alike do: append under its own spelling.
    await AdvancedSession(session_id="user-42 ", engine=mysql.engine).add_items(turn("intruder"))
    await AdvancedSession(session_id="user-42", engine=mysql.engine).create_branch_from_turn(
        2, "b2"
    )
    await execute(mysql, "UPDATE message_structure SET branch_id = 'b2 ' WHERE branch_id = 'b2'")
    before = await collations(mysql)
    with pytest.raises(MigrationError) as refused:
        await migrate.upgrade(mysql.engine)
    message = str(refused.value)
    assert "session_id 'user-42' / 'user-42 '" in message or "'user-42 ' / 'user-42'" in message
    assert "branch_id 'b2' / 'b2 ' in session 'user-42'" in message
    assert "Rename or delete" in message
    assert await collations(mysql) == before
    assert await migrate.current(mysql.engine) == ("0005",)
    # Once the ids are one way each, it goes through.
    await execute(
        mysql,
        "UPDATE agent_messages SET session_id = 'user-42' WHERE session_id = 'user-42 '",
        "UPDATE message_structure SET session_id = 'user-42' WHERE session_id = 'user-42 '",
        "UPDATE message_structure SET branch_id = 'b2' WHERE branch_id = 'b2 '",
    )
    await migrate.upgrade(mysql.engine)
    assert await migrate.current(mysql.engine) == (migrate.head(),)


async def test_downgrade_refuses_ids_that_would_merge(mysql: Backend) -> None:
    await migrate.upgrade(mysql.engine)
    await AdvancedSession(session_id="a", engine=mysql.engine).add_items(turn("a"))
    await AdvancedSession(session_id="a ", engine=mysql.engine).add_items(turn("a space"))
    # Later revisions' downgrades run first (MySQL DDL does not roll back): start from 0006.
    await migrate.downgrade(mysql.engine, "0006")
    before = await collations(mysql)
    with pytest.raises(MigrationError, match="would merge"):
        await migrate.downgrade(mysql.engine, "0005")
    assert await collations(mysql) == before
    await execute(
        mysql,
        *(
            f"DELETE FROM {table} WHERE session_id = 'a '"
            for table in (
                "message_structure",
                "turn_usage",
                "agent_messages",
                "agent_sessions",
                "session_clear_generations",
                "branch_reservations",
                "turnstore_session_info",
                "turnstore_append_keys",
            )
        ),
    )
    await migrate.downgrade(mysql.engine, "0005")
    assert set((await collations(mysql)).values()) == {"utf8mb4_bin"}
    await migrate.upgrade(mysql.engine)
    assert await AdvancedSession(session_id="a", engine=mysql.engine).get_items() == turn("a")


async def test_adopting_an_unversioned_database_makes_ids_exact(mysql: Backend) -> None:
    # Tables from a turnstore without migrations: no version table, padded identifiers.
    await before_0006_with_another_table(mysql)
    await execute(mysql, "DROP TABLE turnstore_alembic_version")
    session = AdvancedSession(session_id="user-42", engine=mysql.engine, create_tables=True)
    await session.add_items(turn("adopted"))
    async with mysql.engine.connect() as conn:
        exact = await conn.run_sync(lambda sync: exact_identifier_collation(sync.dialect))
    assert set((await collations(mysql)).values()) == {exact}
    assert await migrate.current(mysql.engine) == (migrate.head(),)
    assert await AdvancedSession(session_id="user-42 ", engine=mysql.engine).get_items() == []
