"""Backends for the test suite: every test that takes ``backend`` runs on each database.

A backend's URL comes from an environment variable first (``TURNSTORE_TEST_POSTGRES_URL``,
``TURNSTORE_TEST_MYSQL_URL``, ``TURNSTORE_TEST_CITUS_URL``), then from a testcontainers
container when a Docker engine answers; otherwise its tests are skipped with the reason.
Backends named in ``TURNSTORE_REQUIRE_BACKENDS`` (all of them when ``CI`` is set) must be
available: a skip becomes a failure.

``citus`` is a Citus coordinator (distributed Postgres): each test gets a schema of its own
there, and the tables turnstore creates in it are distributed by ``session_id``, as on any
coordinator. Tests that differ by server kind ask :attr:`Backend.family` (``postgres`` for
Citus too).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import turnstore
from turnstore import AdvancedSession

ALL_BACKENDS = ("sqlite", "postgres", "mysql", "citus")

# Property-based tests talk to real databases on shared machines: no deadline, and no health
# check that fails a test for being slow. "default" (active unless told otherwise; registering
# it replaces Hypothesis's own) keeps a run short; `pytest --hypothesis-profile=long` searches
# deeper.
_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile(
    "default",
    max_examples=15,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=_SLOW_IS_FINE,
)
# Hypothesis switches to its own "ci" profile (100 examples) when CI is set, which made this
# suite's CI run ten minutes longer; CI gets the default budget, derandomized so a red run
# replays exactly.
settings.register_profile(
    "ci",
    parent=settings.get_profile("default"),
    derandomize=True,
    database=None,
    print_blob=True,
)
settings.register_profile(
    "long",
    max_examples=500,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=_SLOW_IS_FINE,
)
POSTGRES_URL_VARIABLE = "TURNSTORE_TEST_POSTGRES_URL"
MYSQL_URL_VARIABLE = "TURNSTORE_TEST_MYSQL_URL"
CITUS_URL_VARIABLE = "TURNSTORE_TEST_CITUS_URL"
# Shards per distributed table in tests: Citus's default of 32 makes each test's DDL create
# 200 shards; 4 still spreads every table over both workers.
CITUS_TEST_SHARD_COUNT = "4"


def required_backends() -> set[str]:
    """Backends that must not be skipped in this run."""
    named = os.environ.get("TURNSTORE_REQUIRE_BACKENDS", "")
    required = {name.strip() for name in named.split(",") if name.strip()}
    if not required and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        required = set(ALL_BACKENDS)
    return required


def unavailable(backend: str, reason: str) -> None:
    """Skip a test for a missing backend, or fail it when the backend is required."""
    if backend in required_backends():
        pytest.fail(f"{backend} backend is required but unavailable: {reason}", pytrace=False)
    pytest.skip(f"{backend} backend unavailable: {reason}")


def _docker_answers(variable: str) -> str | None:
    """``None`` if a Docker engine answers, else why not (``variable`` was not set either)."""
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception as exc:
        return f"no {variable} set and no Docker engine for testcontainers ({exc})"
    return None


def _server_url(
    backend: str, variable: str, container: Callable[[], AbstractContextManager[str]]
) -> Iterator[str]:
    """The URL in ``variable``, else that of a ``container`` if Docker answers, else unavailable."""
    url = os.environ.get(variable)
    if url:
        yield url
        return
    reason = _docker_answers(variable)
    if reason is not None:
        unavailable(backend, reason)
    with container() as container_url:
        yield container_url


# The container factories import testcontainers only once a Docker engine has answered: runs
# against servers named in the environment need neither.
@contextmanager
def _postgres_container() -> Iterator[str]:
    from testcontainers.postgres import PostgresContainer

    with PostgresContainer("postgres:16-alpine", driver="asyncpg") as container:
        yield container.get_connection_url()


@contextmanager
def _mysql_container() -> Iterator[str]:
    from testcontainers.mysql import MySqlContainer

    with MySqlContainer("mysql:8.4", dialect="asyncmy") as container:
        # The container's own user may not create databases; root may.
        yield str(make_url(container.get_connection_url()).set(username="root"))


@contextmanager
def _citus_container() -> Iterator[str]:
    from testcontainers.postgres import PostgresContainer

    # A single-node Citus (the coordinator holds the shards); the image creates the
    # extension in its database.
    with PostgresContainer("citusdata/citus:13.0", driver="asyncpg") as container:
        yield container.get_connection_url()


@pytest.fixture(scope="session")
def citus_url() -> Iterator[str]:
    """An asyncpg URL of a Citus coordinator's database (with the extension) for the run."""
    yield from _server_url("citus", CITUS_URL_VARIABLE, _citus_container)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """An asyncpg URL of a Postgres server for the whole run."""
    yield from _server_url("postgres", POSTGRES_URL_VARIABLE, _postgres_container)


@pytest.fixture(scope="session")
def mysql_url() -> Iterator[str]:
    """An asyncmy URL of a MySQL or MariaDB server for the whole run."""
    yield from _server_url("mysql", MYSQL_URL_VARIABLE, _mysql_container)


@dataclass
class Backend:
    """A database for one test: a URL, an engine on a private schema, and session factory."""

    name: str
    url: str
    engine: AsyncEngine
    engine_options: dict[str, Any]

    @property
    def family(self) -> str:
        """The kind of server: ``citus`` is Postgres with distributed tables."""
        return "postgres" if self.name == "citus" else self.name

    def new_engine(self) -> AsyncEngine:
        """Another engine on the same database (as a separate process would open)."""
        return create_async_engine(self.url, **self.engine_options)

    def session(self, session_id: str | None = None, **options: Any) -> AdvancedSession:
        """A new session on this backend's engine (tables created unless told otherwise)."""
        options.setdefault("create_tables", True)
        return AdvancedSession(
            session_id=session_id or f"s-{uuid.uuid4().hex[:12]}", engine=self.engine, **options
        )


# What creating a namespace raises when the server does not answer: asyncpg lets the socket's
# OSError through, asyncmy's refusal arrives wrapped in SQLAlchemy's OperationalError.
_UNREACHABLE_SERVER_ERRORS: dict[str, tuple[type[Exception], ...]] = {
    "postgres": (OSError,),
    "citus": (OSError,),
    "mysql": (OSError, OperationalError),
}


@asynccontextmanager
async def private_namespace(
    base_url: str, create: str, drop: str, *, backend: str | None = None
) -> AsyncIterator[None]:
    """A schema or database of the test's own on the server of ``base_url``.

    Args:
        base_url: The server, as a URL whose user may create and drop the namespace.
        create: The statement that creates it (``CREATE SCHEMA ...``, ``CREATE DATABASE ...``).
        drop: The statement that drops it again when the block ends.
        backend: When given, a server that does not answer skips the test as
            :func:`unavailable` does (failing it if the backend is required); otherwise the
            connection error propagates.
    """
    admin = create_async_engine(base_url, isolation_level="AUTOCOMMIT")
    try:
        try:
            async with admin.connect() as conn:
                await conn.exec_driver_sql(create)
        except Exception as exc:
            if backend is None or not isinstance(exc, _UNREACHABLE_SERVER_ERRORS[backend]):
                raise
            unavailable(backend, f"cannot connect to {base_url}: {exc}")
        try:
            yield
        finally:
            async with admin.connect() as conn:
                await conn.exec_driver_sql(drop)
    finally:
        await admin.dispose()


async def _postgres_backend(base_url: str, name: str = "postgres") -> AsyncIterator[Backend]:
    """A Postgres (or, with ``name="citus"``, Citus coordinator) schema of the test's own."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    create, drop = f"CREATE SCHEMA {schema}", f"DROP SCHEMA {schema} CASCADE"
    async with private_namespace(base_url, create, drop, backend=name):
        options: dict[str, Any] = {
            "connect_args": {"server_settings": postgres_settings(name, schema)}
        }
        engine = create_async_engine(base_url, **options)
        try:
            yield Backend(name, base_url, engine, options)
        finally:
            await engine.dispose()


def postgres_settings(name: str, schema: str) -> dict[str, str]:
    """Connection settings putting a Postgres or Citus test's tables in its own schema."""
    settings = {"search_path": schema}
    if name == "citus":
        settings["citus.shard_count"] = CITUS_TEST_SHARD_COUNT
    return settings


async def fresh_mysql_backend(base_url: str) -> AsyncIterator[Backend]:
    """A MySQL backend on a database of its own, dropped afterwards."""
    database = f"t_{uuid.uuid4().hex[:12]}"
    # latin1 and a case-insensitive collation, the defaults of older servers, so the tests
    # prove that turnstore's tables carry their own character set and collation.
    create = f"CREATE DATABASE {database} CHARACTER SET latin1 COLLATE latin1_swedish_ci"
    async with private_namespace(base_url, create, f"DROP DATABASE {database}", backend="mysql"):
        url = make_url(base_url).set(database=database).render_as_string(hide_password=False)
        engine = create_async_engine(url)
        try:
            yield Backend("mysql", url, engine, {})
        finally:
            await engine.dispose()


@pytest.fixture(params=ALL_BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """Each supported database in turn, empty at the start of the test."""
    name: str = request.param
    if name == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
        engine = create_async_engine(url)
        try:
            yield Backend(name, url, engine, {})
        finally:
            await engine.dispose()
    elif name in ("postgres", "citus"):
        base_url: str = request.getfixturevalue(f"{name}_url")
        async for ready in _postgres_backend(base_url, name):
            yield ready
    else:
        base_url = request.getfixturevalue("mysql_url")
        async for ready in fresh_mysql_backend(base_url):
            yield ready
    await turnstore.dispose_engines()


@pytest.fixture
async def sqlite_path(tmp_path: Path) -> AsyncIterator[Path]:
    """A fresh SQLite file path; engines turnstore opened are disposed afterwards."""
    yield tmp_path / "conversations.db"
    await turnstore.dispose_engines()
