"""Whether message content and tool data may appear in log records and exception text.

turnstore follows the Agents SDK's model-data logging policy: content stays out of logs unless
the user opts in, with ``OPENAI_AGENTS_DONT_LOG_MODEL_DATA=0`` (and, for tool arguments and
outputs, ``OPENAI_AGENTS_DONT_LOG_TOOL_DATA=0``). When the SDK is imported, its module-level
flags (``agents._debug.DONT_LOG_MODEL_DATA``/``DONT_LOG_TOOL_DATA``) decide, so a program that
changes them at run time is followed; otherwise the same variables are read the way the SDK
reads them, without importing the SDK (which takes seconds). This module imports nothing of
turnstore, so every layer may ask it.

Session and branch ids are treated as model data: they are chosen by the application and often
name a user, so they appear in log records only where message content may.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Literal

REDACTED = "<redacted>"

#: The ``extra`` key under which a failure record carries its session's identifiers, when the
#: policy allows them (``record.turnstore``).
CONTEXT_FIELD = "turnstore"


def _flag(variable: str, attribute: str) -> bool:
    debug = sys.modules.get("agents._debug")
    if debug is not None and hasattr(debug, attribute):
        return bool(getattr(debug, attribute))
    value = os.getenv(variable)
    if value is None:
        return True
    return value == "1" or value.lower() == "true"


def dont_log_model_data() -> bool:
    """True unless the user opted in to message content in logs and errors."""
    return _flag("OPENAI_AGENTS_DONT_LOG_MODEL_DATA", "DONT_LOG_MODEL_DATA")


def dont_log_tool_data() -> bool:
    """True unless the user opted in to tool arguments and outputs in logs and errors."""
    return _flag("OPENAI_AGENTS_DONT_LOG_TOOL_DATA", "DONT_LOG_TOOL_DATA")


def model_data(value: object) -> object:
    """``value`` where the policy allows message content in logs, else a placeholder."""
    return REDACTED if dont_log_model_data() else value


def tool_data(value: object) -> object:
    """``value`` where the policy allows tool data in logs, else a placeholder."""
    return REDACTED if dont_log_tool_data() else value


def identifier(value: object) -> object:
    """A session or branch id where the policy allows model data in logs, else a placeholder."""
    return model_data(value)


DataKind = Literal["model", "model_and_tool"]


def _redacts(kind: DataKind) -> bool:
    if kind == "model":
        return dont_log_model_data()
    return dont_log_model_data() or dont_log_tool_data()


def log_failure(
    logger: logging.Logger,
    message: str,
    exc: BaseException,
    *,
    kind: DataKind = "model",
    level: int = logging.ERROR,
    context: Callable[[], Mapping[str, object]] | None = None,
) -> None:
    """Log a caught failure as the SDK's ``log_model_action_error`` family does.

    The record always names the exception's type. Its message, traceback and ``context`` (the
    session's identifiers, under ``record.turnstore``) are added only where the policy allows
    the kind of data the failed operation handled: driver errors quote statements and their
    parameters, which hold message content.

    Args:
        logger: Where to log.
        message: What failed, without content ("Failed to store session usage").
        exc: The exception caught.
        kind: ``"model"`` for message content; ``"model_and_tool"`` for items that may carry
            tool arguments and outputs too (both policies must allow it).
        level: The record's level.
        context: Builds identifiers to attach; called only when the policy allows them.
    """
    name = type(exc).__qualname__
    if _redacts(kind):
        logger.log(level, "%s (%s)", message, name, stacklevel=2)
        return
    extra = None
    if context is not None:
        try:
            extra = {CONTEXT_FIELD: dict(context())}
        except Exception:
            extra = None
    logger.log(
        level,
        "%s (%s): %s",
        message,
        name,
        exc,
        exc_info=(type(exc), exc, exc.__traceback__),
        extra=extra,
        stacklevel=2,
    )
