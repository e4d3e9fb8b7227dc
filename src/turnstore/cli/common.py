"""Plumbing every ``turnstore`` command uses, so the commands behave alike.

The rules, for anyone adding a command module (``cli/<topic>.py`` with ``register(app)``):

- **Database URL.** Commands that open a database take :data:`UrlOption`. The URL is the
  ``--url`` value if given, else ``$TURNSTORE_DATABASE_URL``, else the command fails with exit
  code 2 (:func:`resolve_url`). There is no other default.
- **Errors.** Raise a :class:`turnstore.TurnstoreError` (or let one through). The app turns it
  into ONE line on stderr, ``turnstore <command>: error: <message>``, followed by the command
  that fixes it when the exception carries one (``TurnstoreError.fix``), and exits with the
  :class:`ExitCode` of its class. Nothing goes to stdout on failure.
- **Output.** One success line per command on stdout, or with ``--json`` (:data:`JsonOption`)
  exactly one JSON document whose shape each command documents (:func:`emit`). Colour and
  symbols only on a terminal; ``NO_COLOR`` turns colour off.
- **Destructive commands** call :func:`confirm` first: ``--yes`` (:data:`YesOption`) goes ahead,
  a terminal is asked, anything else is refused with exit code 6.
- **Progress bars** (:func:`progress`) are drawn on stderr when it is a terminal, never
  otherwise.
- **Ids** (session, user, branch) are printed through :func:`shown_id`, so none can hide a
  space or a control character; text printed with rich is escaped (ids are not markup).
- **Warnings** turnstore logs become ``turnstore <command>: warning: ...`` lines on stderr,
  printed once the command succeeded.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Annotated, Any, NoReturn, TextIO

import typer
import typer.core

from turnstore.errors import (
    BranchNotFoundError,
    ConfirmationRequiredError,
    DatabaseUnavailableError,
    DistributionError,
    ExportFileError,
    ForeignDatabaseError,
    InvalidArgumentError,
    MigrationError,
    MissingExtraError,
    SchemaMissingError,
    SessionNotFoundError,
    TurnNotFoundError,
    TurnstoreError,
    UnknownRevisionError,
)

URL_VARIABLE = "TURNSTORE_DATABASE_URL"
# Set to 1 to let unexpected exceptions through with their traceback (for bug reports).
TRACEBACK_VARIABLE = "TURNSTORE_TRACEBACK"


class ExitCode(enum.IntEnum):
    """What the ``turnstore`` command's exit status means (the same for every command)."""

    OK = 0
    """The command did what it was asked."""
    FAILED = 1
    """The operation failed (a migration error, an unexpected error)."""
    USAGE = 2
    """Bad usage: unknown option, missing or malformed URL, missing driver extra."""
    UNAVAILABLE = 3
    """The database cannot be reached (server down, file or folder missing)."""
    UNKNOWN_REVISION = 4
    """A revision, asked for or recorded in the database, is not one of turnstore's."""
    REFUSED = 5
    """The database is not in a state the command accepts; the message says what to run."""
    NOT_CONFIRMED = 6
    """A destructive command was not confirmed (pass ``--yes``)."""
    NOT_FOUND = 7
    """A named session, branch or turn does not exist."""
    BAD_FILE = 8
    """An input file is not a valid turnstore export (corrupt, truncated, items that are not
    JSON objects); nothing of it was written."""
    INTERRUPTED = 130
    """Interrupted (Ctrl-C)."""
    BROKEN_PIPE = 141
    """The reader of the output went away (``turnstore sessions | head -1``), as for any
    command a shell's pipe stops (128 + SIGPIPE); nothing is printed."""


EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 operation failed; 2 bad usage, URL or missing extra; "
    "3 database unreachable; 4 unknown revision; 5 database refused (the error names the "
    "command that fixes it); 6 not confirmed (pass --yes); 7 not found; 8 invalid export "
    "file (nothing imported); 130 interrupted; 141 output pipe closed."
)

# Most specific first: the first matching class decides the exit code.
_EXIT_CODES: tuple[tuple[type[TurnstoreError], ExitCode], ...] = (
    (ConfirmationRequiredError, ExitCode.NOT_CONFIRMED),
    (ExportFileError, ExitCode.BAD_FILE),
    (InvalidArgumentError, ExitCode.USAGE),
    (MissingExtraError, ExitCode.USAGE),
    (DatabaseUnavailableError, ExitCode.UNAVAILABLE),
    (UnknownRevisionError, ExitCode.UNKNOWN_REVISION),
    (ForeignDatabaseError, ExitCode.REFUSED),
    (DistributionError, ExitCode.REFUSED),
    (SchemaMissingError, ExitCode.REFUSED),
    (BranchNotFoundError, ExitCode.NOT_FOUND),
    (SessionNotFoundError, ExitCode.NOT_FOUND),
    (TurnNotFoundError, ExitCode.NOT_FOUND),
    (MigrationError, ExitCode.FAILED),
)

# -- shared options ------------------------------------------------------------------------

UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar=URL_VARIABLE,
        show_envvar=True,
        help=(
            "SQLAlchemy async database URL; defaults to $TURNSTORE_DATABASE_URL. "
            "Example: --url sqlite+aiosqlite:///conversations.db or "
            "--url postgresql+asyncpg://app@db/app"
        ),
    ),
]
JsonOption = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print the result as one JSON document instead of text. Example: --json",
    ),
]
YesOption = Annotated[
    bool,
    typer.Option(
        "--yes",
        "-y",
        help=(
            "Go ahead without asking, for scripts; without it a terminal is asked and "
            "anything else refuses. Example: --yes"
        ),
    ),
]


def resolve_url(url: str | None) -> str:
    """The database URL a command uses: ``--url``, else ``$TURNSTORE_DATABASE_URL``.

    Typer already falls back to the variable for :data:`UrlOption`; this refuses the case
    where neither is set, and a URL that is malformed or names a database turnstore does not
    support (``postgres://`` was an "unexpected NotImplementedError", exit code 1).

    Raises:
        InvalidArgumentError: Neither is set, or the URL is not one turnstore can use.
    """
    if not url:
        raise InvalidArgumentError(
            f"No database URL: pass --url or set {URL_VARIABLE} "
            "(e.g. --url sqlite+aiosqlite:///conversations.db)"
        )
    check_url(url)
    return url


def check_url(url: str) -> None:
    """Refuse a URL that is malformed or names a database turnstore does not support.

    Raises:
        InvalidArgumentError: It is one; the message says what a URL looks like.
    """
    from sqlalchemy.engine import make_url

    from turnstore.persistence.dialects import profile_for

    example = "e.g. sqlite+aiosqlite:///conversations.db or postgresql+asyncpg://app@db/app"
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise InvalidArgumentError(
            f"Not a database URL ({one_line(exc)}); expected {example}"
        ) from None
    try:
        profile_for(parsed.get_backend_name())
    except NotImplementedError as exc:
        raise InvalidArgumentError(f"{one_line(exc)}; {example}") from None


# -- terminals -----------------------------------------------------------------------------


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is an interactive terminal (decoration is allowed only there)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def stdin_is_terminal() -> bool:
    """Whether a person can answer a question (separate so tests can pretend)."""
    return is_terminal(sys.stdin)


def _colour(stream: TextIO) -> bool:
    return (
        is_terminal(stream) and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
    )


def _style(text: str, stream: TextIO, **style: Any) -> str:
    return typer.style(text, **style) if _colour(stream) else text


# -- output --------------------------------------------------------------------------------

# Item content may hold unpaired surrogates (they round-trip in the JSON of an item), which
# no UTF-8 stream can carry: writing one raised UnicodeEncodeError mid-output. Content and
# ids are other people's text: a raw ESC in them would drive the reader's terminal.
_SURROGATE = re.compile("[\ud800-\udfff]")
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def _shown(found: re.Match[str]) -> str:
    char = found.group()
    return "\ufffd" if "\ud800" <= char <= "\udfff" else f"\\x{ord(char):02x}"


def printable(text: str) -> str:
    """``text`` safe for any UTF-8 terminal (tabs and newlines stay).

    Control characters become a visible backslash-x escape, unpaired surrogates U+FFFD.
    """
    return _UNPRINTABLE.sub(_shown, text)


# An id is shown bare only when nothing about it can be misread: no whitespace (which would
# vanish at either end, or blur into the columns around it), nothing unprintable (control
# characters, bidirectional overrides, unpaired surrogates), not empty, and not starting with
# a quote (which would pass for the quoting below).
def shown_id(value: str) -> str:
    r"""A session, user or branch id as the command line prints it: unambiguous.

    Ids are identities, stored exactly and never trimmed, so ``" chat"`` and ``"chat"`` are
    different sessions. An id printed bare could hide that; any id with whitespace, a
    character that is not printable, a leading quote, or no characters at all is printed as a
    Python string literal instead (``' chat'``, ``'a\x00b'``, ``'\u202eevil'``, ``''``), whose
    escapes spell out every character that is not printable. Ids are printed as text, never
    as rich markup (``[bold]`` in an id stays as it is).
    """
    if value and value.isprintable() and not _SPACE.search(value) and value[0] not in "'\"":
        return value
    return repr(value)


_SPACE = re.compile(r"\s")


def hidden_url(url: str) -> str:
    """``url`` as messages show it: the password masked (``***``), even in a malformed URL."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # malformed: mask what looks like user:password@
        return _CREDENTIALS.sub(r"\1***@", url)


_CREDENTIALS = re.compile(r"(://[^:/@]*:)[^@]*@")


def db_fix(command: str, url: str) -> str:
    """The ``turnstore db`` command that fixes a database's schema, ready to paste.

    Args:
        command: ``"upgrade"`` or ``"adopt"``.
        url: The URL the user gave (its password is masked; a URL with characters a shell
            would interpret is quoted).
    """
    return f"turnstore db {command} --url {shlex.quote(hidden_url(url))}"


def json_text(data: Any) -> str:
    """``data`` as one JSON document; unpaired surrogates stay exact as JSON escapes."""
    text = json.dumps(data, ensure_ascii=False, sort_keys=True, default=str)
    return _SURROGATE.sub(lambda found: f"\\u{ord(found.group()):04x}", text)


def line(text: str) -> None:
    """Print one line of plain output on stdout."""
    typer.echo(printable(text), color=_colour(sys.stdout))


def success(text: str) -> None:
    """Print a command's success line on stdout (a check mark only on a terminal)."""
    text = printable(text)
    if is_terminal(sys.stdout):
        text = _style("✓ ", sys.stdout, fg="green") + text
    typer.echo(text, color=_colour(sys.stdout))


def emit(
    data: Mapping[str, Any] | list[Any], text: str | Callable[[], None], *, as_json: bool
) -> None:
    """Print a command's result: one JSON document with ``--json``, else the text form.

    Args:
        data: The JSON shape (documented per command; keys are never removed, only added).
        text: The success line, or a function printing the text form.
        as_json: Whether ``--json`` was given.
    """
    if as_json:
        typer.echo(json_text(data))
    elif callable(text):
        text()
    else:
        success(text)


def warn(text: str) -> None:
    """Print a one-line notice on stderr (never on stdout, which scripts read)."""
    typer.echo(_style("warning: ", sys.stderr, fg="yellow") + text, err=True)


# -- errors --------------------------------------------------------------------------------


def exit_code_for(exc: TurnstoreError) -> ExitCode:
    """The exit code documented for ``exc``'s class."""
    return next((code for kind, code in _EXIT_CODES if isinstance(exc, kind)), ExitCode.FAILED)


def one_line(text: object) -> str:
    """``text`` on one line, surrounding whitespace gone.

    Every run of whitespace holding a line break or another whitespace control character
    folds to one space; runs of plain spaces stay, so an id quoted in a message keeps its
    spaces.
    """
    return _BREAKS.sub(" ", str(text)).strip()


_BREAKS = re.compile(r"[ ]*[^\S ]\s*")


def error_line(command: str, exc: BaseException) -> str:
    """The single stderr line for ``exc`` raised by ``command`` (without colour)."""
    if isinstance(exc, TurnstoreError):
        message = _BACKGROUND.sub("", one_line(exc)) or type(exc).__name__
        fix = getattr(exc, "fix", None)
        if fix and fix not in message:
            message = f"{message.rstrip('.')}; run `{fix}`"
    else:
        message = (
            f"unexpected {type(exc).__name__}: {one_line(exc)} "
            f"(set {TRACEBACK_VARIABLE}=1 to see the traceback)"
        )
    return f"{command}: error: {message}"


# SQLAlchemy ends a driver error's text with a link to its error-code page: noise in a
# one-line error.
_BACKGROUND = re.compile(r" ?\(Background on this error at: [^)]*\)")


def fail(command: str, exc: BaseException) -> ExitCode:
    """Print ``exc`` as one line on stderr; returns the exit code to end with."""
    # Messages may quote a URL, a path or a driver's words: never a raw control character.
    text = printable(error_line(command, exc))
    head, sep, rest = text.partition(": error: ")
    if sep:
        text = head + _style(sep, sys.stderr, fg="red", bold=True) + rest
    typer.echo(text, err=True)
    if isinstance(exc, TurnstoreError):
        return exit_code_for(exc)
    return ExitCode.FAILED


def usage_error(message: str) -> NoReturn:
    """Stop the command with a usage error (exit code 2), e.g. for conflicting options."""
    raise InvalidArgumentError(message)


# -- confirmation --------------------------------------------------------------------------


def confirm(question: str, *, yes: bool, refusal: str) -> None:
    """Go ahead only with ``--yes`` or a person's "y" on a terminal.

    Args:
        question: What a person is asked, e.g. ``"Drop every turnstore table?"``.
        yes: Whether ``--yes`` was given.
        refusal: Why the command stops when nobody can be asked, e.g. ``"downgrading to base
            drops every turnstore table and its data"``; ``"; pass --yes to go ahead"`` is
            appended.

    Raises:
        ConfirmationRequiredError: No ``--yes``, and nobody answered "y" on a terminal.
    """
    if yes:
        return
    if stdin_is_terminal() and is_terminal(sys.stderr):
        if typer.confirm(question, default=False, err=True):
            return
        raise ConfirmationRequiredError("Not confirmed; nothing was changed")
    raise ConfirmationRequiredError(
        f"Refusing: {refusal}; pass --yes to go ahead (nothing was changed)"
    )


# -- progress ------------------------------------------------------------------------------


@contextmanager
def progress(total: int | None, description: str) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr while the block runs, on a terminal only.

    Yields:
        ``advance(n)``: report ``n`` more units done. A no-op when stderr is not a terminal.
    """
    if not is_terminal(sys.stderr):
        yield lambda _n: None
        return
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True, no_color=bool(os.environ.get("NO_COLOR")))
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


# -- the app -------------------------------------------------------------------------------

# Rich help (panels, colours) on a terminal; plain, greppable help in pipes and tests.
_MARKUP: Any = "rich" if is_terminal(sys.stdout) else None


class TurnstoreGroup(typer.core.TyperGroup):
    """A command group whose failures are one line on stderr with a documented exit code.

    Every group of the app uses it (:func:`new_group`), so the command that failed can be named
    in the error line.
    """

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        """Resolve as Typer does, remembering the command's full name for error lines."""
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None:
            ctx.meta["turnstore.command_path"] = f"{ctx.command_path} {command.name}"
        return name, command, rest

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Run the command line; exit (or, with ``standalone_mode=False``, return) its code."""
        code = self._run(args, prog_name, extra)
        if standalone_mode:
            sys.exit(code)
        return code

    def _run(self, args: Sequence[str] | None, prog_name: str | None, extra: dict[str, Any]) -> int:
        meta: dict[str, Any] = {}
        argv = list(sys.argv[1:] if args is None else args)
        logs = _WarningLines(lambda: meta.get("turnstore.command_path", "turnstore"))
        library = logging.getLogger("turnstore")
        library.addHandler(logs)
        try:
            with self.make_context(prog_name or "turnstore", argv, **extra) as ctx:
                meta = ctx.meta
                self.invoke(ctx)
        except typer.Exit as exc:
            return exc.exit_code
        except (typer.Abort, KeyboardInterrupt, EOFError):
            typer.echo("turnstore: interrupted", err=True)
            return int(ExitCode.INTERRUPTED)
        except BrokenPipeError:
            # `turnstore sessions | head -1`: was "unexpected BrokenPipeError", exit code 1.
            _discard_stdout()
            return int(ExitCode.BROKEN_PIPE)
        except Exception as exc:
            if _is_usage_error(exc):
                return _usage_failure(exc)
            if not isinstance(exc, TurnstoreError) and os.environ.get(TRACEBACK_VARIABLE):
                raise
            command = meta.get("turnstore.command_path", "turnstore")
            return int(fail(command, exc))
        finally:
            library.removeHandler(logs)
        logs.flush_lines()
        return int(ExitCode.OK)


class _WarningLines(logging.Handler):
    """turnstore's log warnings as one line each on stderr, named like the command's errors.

    Without a handler, Python printed the bare message (a database without migration 0007's
    tables: "The database lacks turnstore's tables ...") with no sign of who said it. The
    lines are printed once the command succeeded, each once; a failed command prints only its
    error line, which says what to do.
    """

    def __init__(self, command: Callable[[], str]) -> None:
        super().__init__(logging.WARNING)
        self._command = command
        self._lines: dict[str, None] = {}

    def emit(self, record: logging.LogRecord) -> None:
        """Keep the record's message for :meth:`flush_lines`."""
        try:
            self._lines[printable(one_line(record.getMessage()))] = None
        except Exception:  # a log line must never fail the command
            self.handleError(record)

    def flush_lines(self) -> None:
        """Print the kept messages as ``turnstore <command>: warning: <message>``."""
        label = _style("warning: ", sys.stderr, fg="yellow")
        for text in self._lines:
            typer.echo(f"{self._command()}: {label}{text}", err=True)
        self._lines.clear()


def _discard_stdout() -> None:
    """Point stdout at the null device, so the interpreter's final flush stays quiet."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):  # not a real file (a test's capture)
        pass


def _is_usage_error(exc: Exception) -> bool:
    # Typer vendors Click privately; its exceptions are recognised by Click's interface.
    return callable(getattr(exc, "format_message", None)) and isinstance(
        getattr(exc, "exit_code", None), int
    )


def _usage_failure(exc: Any) -> int:
    context = getattr(exc, "ctx", None)
    where = context.command_path if context is not None else "turnstore"
    hint = f" (see `{where} --help`)" if context is not None else ""
    typer.echo(f"{where}: error: {one_line(exc.format_message())}{hint}", err=True)
    return int(exc.exit_code)


def new_group(**options: Any) -> typer.Typer:
    """A Typer app or sub-command group with turnstore's error handling and help style.

    Args:
        options: Passed to :class:`typer.Typer` (``name``, ``help``, ``epilog``...).
    """
    options.setdefault("epilog", EXIT_CODES_HELP)
    return typer.Typer(
        cls=TurnstoreGroup,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=_MARKUP,
        context_settings={"help_option_names": ["-h", "--help"]},
        **options,
    )


# -- running -------------------------------------------------------------------------------


def exit_with(code: ExitCode) -> NoReturn:
    """End the command with ``code``."""
    raise typer.Exit(int(code))
