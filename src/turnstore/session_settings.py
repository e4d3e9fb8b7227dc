"""Session settings: turnstore's own class, and the SDK's once the application imports the SDK."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass
class SessionSettings:
    """Session settings used when the Agents SDK is not installed (it has its own class).

    Attributes:
        limit: Default maximum number of items ``get_items`` returns (``None`` for all).
    """

    limit: int | None = None


def sdk_loaded() -> bool:
    """Whether the Agents SDK was imported by the application (turnstore never imports it)."""
    return "agents" in sys.modules


def coerce_settings(value: Any) -> Any:
    """The SDK's ``SessionSettings`` once the SDK is in use (the Runner calls its methods).

    Importing the SDK takes seconds; a program that never imports it gets turnstore's own
    :class:`SessionSettings` instead.
    """
    if not sdk_loaded():
        if value is None:
            return SessionSettings()
        if isinstance(value, Mapping):
            return SessionSettings(**value)
        return value
    try:
        from agents.memory.session_settings import (
            SessionSettings as SDKSessionSettings,
        )
        from agents.memory.session_settings import (
            coerce_session_settings,
        )
    except ImportError:
        if value is None:
            return SessionSettings()
        if isinstance(value, Mapping):
            return SessionSettings(**value)
        return value
    if value is None:
        return SDKSessionSettings()
    if isinstance(value, SessionSettings):
        return SDKSessionSettings(limit=value.limit)
    return coerce_session_settings(value)
