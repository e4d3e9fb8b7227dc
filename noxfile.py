"""Developer tasks: ``nox`` runs tests, lint and type checks; ``nox -s demo`` plays the demo."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

PASSED_ENV = (
    "CI",
    "TURNSTORE_TEST_POSTGRES_URL",
    "TURNSTORE_TEST_MYSQL_URL",
    "TURNSTORE_TEST_CITUS_URL",
    "TURNSTORE_CITUS_RESTART_COMMAND",
    "TURNSTORE_REQUIRE_BACKENDS",
    "TURNSTORE_DISRUPTIVE_TESTS",
    "DOCKER_HOST",
)


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite, against every backend the environment provides."""
    session.install(".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff lint and format check."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package, the tests and this file."""
    session.install("-e", ".[test]", "mypy", "nox")
    session.run("mypy")


@nox.session
def demo(session: nox.Session) -> None:
    """Play a branching conversation with a scripted model on a local SQLite file."""
    session.install(".[agents]")
    session.run("turnstore", "demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks (``nox -s bench -- --backend postgres``); see README, Performance."""
    session.install(".[test]")
    session.run("python", "benchmarks/run.py", *session.posargs)
