"""The store's export, import and copy methods: filters, targets, conflicts, on every backend."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Backend
from tests.helpers import assistant, user
from tests.moving_helpers import all_answers, empty_store, populate, stored_rows
from turnstore import InvalidArgumentError, Store
from turnstore.errors import SchemaMissingError, SessionExistsError
from turnstore.schema import migrate


async def _info(store: Store, session_ids: list[str]) -> dict[str, Any]:
    return {sid: await store.get_session_info(sid) for sid in session_ids}


async def test_export_records_import_them_elsewhere_and_everything_reads_the_same(
    backend: Backend, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    session_ids = await populate(backend.engine)
    async with (
        empty_store(backend.name, request, tmp_path) as other,
        Store(engine=backend.engine) as source,
        Store(engine=other.engine, create_tables=True) as target,
    ):
        records = [record async for record in source.export()]
        assert records[0]["record"] == "header"
        assert records[-1] == {"record": "end", "sessions": len(session_ids)}
        summary = await target.import_records(source.export())
        assert summary.sessions == len(session_ids)
        assert await all_answers(other.engine, session_ids) == await all_answers(
            backend.engine, session_ids
        )
        # Owner, title, metadata, creation and last activity come along unchanged, so the
        # target lists the sessions in the source's order.
        assert await _info(target, session_ids) == await _info(source, session_ids)
        listed = (await target.list_sessions(limit=100)).sessions
        assert listed == (await source.list_sessions(limit=100)).sessions
        assert len(listed) == len(session_ids)

        buffer = io.BytesIO()
        written = await source.export(buffer, session_ids=["branchy"])
        assert (written.sessions, written.items) == (1, summary.items - _items_but(records))
        buffer.seek(0)
        again = await target.import_file(buffer, on_conflict="replace")
        assert (again.sessions, again.replaced) == (1, 1)
        assert await stored_rows(other.engine, "branchy") == await stored_rows(
            backend.engine, "branchy"
        )


def _items_but(records: list[dict[str, Any]]) -> int:
    """Items (structure records) of every session but ``branchy``."""
    current = None
    items = 0
    for record in records:
        if record["record"] == "session":
            current = record["session_id"]
        elif record["record"] == "structure" and current != "branchy":
            items += 1
    return items


async def test_filters_choose_what_moves(
    backend: Backend, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    await populate(backend.engine)
    async with Store(engine=backend.engine) as store:

        async def exported(**filters: Any) -> list[str]:
            return [
                r["session_id"] async for r in store.export(**filters) if r["record"] == "session"
            ]

        assert sorted(await exported(user_id="user-1")) == ["awkward", "branchy"]
        assert await exported(metadata={"plan": "pro"}) == ["branchy"]
        assert await exported(active_after=datetime.now(UTC) + timedelta(days=1)) == []
        assert len(await exported(active_before=datetime.now(UTC) + timedelta(days=1))) == 6
        assert await exported(session_ids=["info only", "nope"]) == ["info only"]
        with pytest.raises(InvalidArgumentError, match="not both"):
            store.export(session_ids=["branchy"], user_id="user-1")
        with pytest.raises(InvalidArgumentError, match="user_id"):
            store.export(user_id=42)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="on_conflict"):
            await store.import_records([], on_conflict="merge")

        async with empty_store(backend.name, request, tmp_path) as other:
            summary = await store.copy_to(other.engine, user_id="user-1")
            assert summary.sessions == 2
            async with Store(engine=other.engine) as target:
                assert (await target.get_session_info("branchy")) == (
                    await store.get_session_info("branchy")
                )
                assert await target.get_session_info("cleared and rewritten") is None


async def test_copy_to_migrates_an_empty_target_and_refuses_one_behind(
    backend: Backend, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    session = backend.session("only")
    await session.add_items([user("hello"), assistant("hi")])
    async with Store(engine=backend.engine) as store:
        async with empty_store(backend.name, request, tmp_path) as empty:
            assert (await store.copy_to(empty.engine)).sessions == 1
            assert migrate.head() in await migrate.current(empty.engine)
        async with empty_store(backend.name, request, tmp_path) as behind:
            await migrate.upgrade(behind.engine, "0004")
            with pytest.raises(SchemaMissingError, match="behind this turnstore's"):
                await store.copy_to(behind.engine)
            assert await migrate.current(behind.engine) == ("0004",)
            summary = await store.copy_to(behind.engine, migrate_target=True)
            assert summary.sessions == 1
            assert migrate.head() in await migrate.current(behind.engine)


async def test_a_copy_told_to_fail_keeps_the_sessions_before_the_conflict(
    backend: Backend, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    for name in ("a", "b", "c"):
        await backend.session(name).add_items([user(f"{name} question")])
    async with (
        empty_store(backend.name, request, tmp_path) as other,
        Store(engine=backend.engine) as store,
    ):
        await store.copy_to(other.engine, session_ids=["b"])
        with pytest.raises(SessionExistsError, match="'b' already exists"):
            await store.copy_to(other.engine, on_conflict="fail")
        assert (await stored_rows(other.engine, "a"))["messages"] != []
        assert (await stored_rows(other.engine, "c"))["messages"] == []


async def test_an_import_told_to_fail_keeps_the_sessions_before_the_conflict(
    backend: Backend, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    for name in ("a", "b", "c"):
        await backend.session(name).add_items([user(f"{name} question")])
    async with (
        empty_store(backend.name, request, tmp_path) as other,
        Store(engine=backend.engine) as store,
        Store(engine=other.engine, create_tables=True) as target,
    ):
        await target.import_records(store.export(session_ids=["b"]))
        with pytest.raises(SessionExistsError, match="'b' already exists"):
            await target.import_records(store.export(), on_conflict="fail")
        assert (await stored_rows(other.engine, "a"))["messages"] != []
        assert (await stored_rows(other.engine, "c"))["messages"] == []
