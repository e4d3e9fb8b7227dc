"""Backends for the test suite: every test that takes ``backend`` runs on each database.

A server backend's URL comes from, in order:

1. an environment variable (``TURNSTORE_TEST_POSTGRES_URL``, ``TURNSTORE_TEST_MYSQL_URL``,
   ``TURNSTORE_TEST_CITUS_URL``);
2. a server on its default local port with its default administrator
   (``postgres@127.0.0.1:5432``, ``root@127.0.0.1:3306`` without password; not for Citus):
   the run creates a database of its own there (``turnstore_test_<random>``) and drops it at
   the end, never touching any other;
3. a testcontainers container, when a Docker engine answers;

otherwise its tests are skipped, and the end of the run says so in one line per backend (and
which backends were tested). Backends named in ``TURNSTORE_REQUIRE_BACKENDS`` (all of them
when ``CI`` is set) must be available: a skip becomes a failure.

``citus`` is a Citus coordinator (distributed Postgres): each test gets a schema of its own
there, and the tables turnstore creates in it are distributed by ``session_id``, as on any
coordinator. Tests that differ by server kind ask :attr:`Backend.family` (``postgres`` for
Citus too).
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
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


# Backends that at least one test ran on, and why the others were skipped (for the summary).
TESTED: set[str] = set()
UNAVAILABLE: dict[str, str] = {}

DEFAULT_SERVERS = {
    "postgres": "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres",
    "mysql": "mysql+asyncmy://root@127.0.0.1:3306/",
}


def _in_thread(work: Callable[[], Awaitable[Any]]) -> Any:
    """Run a coroutine function to completion on a loop of its own, in a thread.

    Session fixtures are first requested from inside a test's running event loop, where
    ``asyncio.run`` cannot be called.
    """
    outcome: dict[str, Any] = {}

    async def main() -> Any:
        return await work()

    def run() -> None:
        try:
            outcome["value"] = asyncio.run(main())
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="turnstore-test-setup")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _docker_answers() -> str | None:
    """``None`` if a Docker engine answers ``GET /_ping``, else why not.

    Probed with a plain socket closed by ``with``: the Docker client library leaves its
    socket open (a ``ResourceWarning``, an error under ``filterwarnings = error``) when the
    engine is absent.
    """
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    request = b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n"
    try:
        if host.startswith("unix://"):
            path = host.removeprefix("unix://")
            if not os.path.exists(path):
                return f"no Docker engine ({path} does not exist)"
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(3)
                sock.connect(path)
                sock.sendall(request)
                answer = sock.recv(64)
        elif host.startswith("tcp://"):
            address, _, port = host.removeprefix("tcp://").partition(":")
            with socket.create_connection((address, int(port or 2375)), timeout=3) as sock:
                sock.sendall(request)
                answer = sock.recv(64)
        else:
            return f"DOCKER_HOST={host} is not a unix:// or tcp:// address"
    except OSError as exc:
        return f"no Docker engine at {host} ({exc})"
    if b" 200 " not in answer:
        return f"the Docker engine at {host} answered {answer[:40]!r}"
    return None


# Give up on a server that does not answer within 3 s (each driver spells it its own way).
_CONNECT_TIMEOUT: dict[str, dict[str, Any]] = {
    "postgres": {"timeout": 3},
    "mysql": {"connect_timeout": 3},
}
# How each server drops a database that sessions may still be connected to.
_DROP_DATABASE = {
    "postgres": "DROP DATABASE IF EXISTS {name} WITH (FORCE)",
    "mysql": "DROP DATABASE IF EXISTS {name}",
}


def _throwaway_database(backend: str) -> Iterator[str] | str:
    """A database of the run's own on the default local server, or why there is none."""
    admin_url = DEFAULT_SERVERS[backend]
    name = f"turnstore_test_{uuid.uuid4().hex[:10]}"

    async def execute(statement: str) -> None:
        engine = create_async_engine(
            admin_url, isolation_level="AUTOCOMMIT", connect_args=_CONNECT_TIMEOUT[backend]
        )
        try:
            async with engine.connect() as conn:
                await conn.exec_driver_sql(statement)
        finally:
            await engine.dispose()

    try:
        _in_thread(lambda: execute(f"CREATE DATABASE {name}"))
    except Exception as exc:
        where = make_url(admin_url).render_as_string(hide_password=True)
        cause = getattr(exc, "orig", None) or exc  # the driver's error, without SQLAlchemy's
        return f"nothing usable at {where} ({type(cause).__name__}: {' '.join(str(cause).split())})"

    def database() -> Iterator[str]:
        try:
            yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            _in_thread(lambda: execute(_DROP_DATABASE[backend].format(name=name)))

    return database()


def _server_url(
    backend: str, variable: str, container: Callable[[], AbstractContextManager[str]]
) -> Iterator[str]:
    """The URL in ``variable``, else a database of the run's own on the local default server,
    else that of a ``container`` if Docker answers, else unavailable."""
    url = os.environ.get(variable)
    if url:
        TESTED.add(backend)
        yield url
        return
    # A database of its own on a Citus coordinator would need the extension and the workers
    # registered in it: Citus comes from its variable or a container only.
    local = (
        _throwaway_database(backend)
        if backend in DEFAULT_SERVERS
        else "no default local server is probed for it"
    )
    if not isinstance(local, str):
        TESTED.add(backend)
        yield from local
        return
    docker = _docker_answers()
    if docker is not None:
        reason = f"no {variable}; {local}; {docker}"
        UNAVAILABLE[backend] = reason
        unavailable(backend, reason)
    with container() as container_url:
        TESTED.add(backend)
        yield container_url


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line per skipped backend with the reason, then the backends that were tested.

    Replaces pytest's list of every skipped test (hundreds of lines when a server is missing).
    """
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = getattr(report, "longrepr", None)
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    write = terminalreporter.write_line
    for backend, reason in sorted(UNAVAILABLE.items()):
        count = sum(n for text, n in reasons.items() if text.startswith(f"{backend} backend"))
        write(f"{backend}: NOT TESTED ({count} test(s) skipped): {reason}")
    for text, n in sorted(reasons.items()):
        if not any(text.startswith(f"{backend} backend") for backend in UNAVAILABLE):
            write(f"skipped {n} test(s): {text}")
    if not TESTED and not UNAVAILABLE:
        return  # no test asked for a backend
    tested = ", ".join(name for name in ALL_BACKENDS if name in TESTED) or "none"
    missing = [name for name in ALL_BACKENDS if name not in TESTED]
    tail = f"; not tested: {', '.join(missing)}" if missing else ""
    write(f"backends tested: {tested}{tail}")


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


@asynccontextmanager
async def role_with_settings(base_url: str, settings: dict[str, str]) -> AsyncIterator[str]:
    """``base_url`` as a new role of the test's own whose sessions start with ``settings``.

    For what only a URL reaches (the command line, child processes) and for settings that
    must hold on every node of a Citus cluster: the connections Citus opens to its workers
    do not carry the client's session settings, but a role's (``ALTER ROLE ... SET``, which
    Citus propagates with the role) apply there too. A superuser, so it may use what the
    test's other connections created; dropped afterwards with whatever it owns.
    """
    url = make_url(base_url)
    role = f"r_{uuid.uuid4().hex[:12]}"
    password = "" if url.password is None else f" PASSWORD '{url.password}'"
    admin = create_async_engine(base_url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN SUPERUSER{password}")
            for name, value in settings.items():
                await conn.exec_driver_sql(f"ALTER ROLE {role} SET {name} = '{value}'")
        try:
            yield url.set(username=role).render_as_string(hide_password=False)
        finally:
            await turnstore.dispose_engines()
            async with admin.connect() as conn:
                await conn.exec_driver_sql(f"DROP OWNED BY {role} CASCADE")
                await conn.exec_driver_sql(f"DROP ROLE {role}")
    finally:
        await admin.dispose()


@asynccontextmanager
async def fresh_citus_schema_url(citus_url: str) -> AsyncIterator[str]:
    """A URL on the Citus coordinator whose default schema is a new, empty one of its own.

    The Citus backend's tests each get a schema in one database (a database on a cluster
    needs the extension and the workers registered anew); a URL reaches the schema through
    its role's ``search_path``.
    """
    schema = f"t_{uuid.uuid4().hex[:12]}"
    create, drop = f"CREATE SCHEMA {schema}", f"DROP SCHEMA {schema} CASCADE"
    async with (
        private_namespace(citus_url, create, drop, backend="citus"),
        role_with_settings(citus_url, postgres_settings("citus", schema)) as url,
    ):
        yield url


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
        TESTED.add("sqlite")
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
