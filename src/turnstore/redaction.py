"""Whether message content and tool data may appear in log records and exception text.

turnstore follows the Agents SDK's model-data logging policy: content stays out of logs unless
the user opts in, with ``OPENAI_AGENTS_DONT_LOG_MODEL_DATA=0`` (and, for tool arguments and
outputs, ``OPENAI_AGENTS_DONT_LOG_TOOL_DATA=0``). When the SDK is imported, its module-level
flags (``agents._debug.DONT_LOG_MODEL_DATA``/``DONT_LOG_TOOL_DATA``) decide, so a program that
changes them at run time is followed; otherwise the same variables are read the way the SDK
reads them, without importing the SDK (which takes seconds). This module imports nothing of
turnstore, so every layer may ask it.
"""

from __future__ import annotations

import os
import sys

REDACTED = "<redacted>"


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
