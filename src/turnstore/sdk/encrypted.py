"""The SDK's ``EncryptedSession``, popping only items that authenticate on any turnstore session.

The SDK's own class (openai-agents 0.24) authenticates an item before removing it only over its
plain ``SQLiteSession``; over every other session, its own ``AdvancedSQLiteSession`` included,
``pop_item`` removes and discards items it cannot decrypt (written with another key, corrupted)
on its way to one it can. This subclass changes only that: over a turnstore session
(through its ``_pop_item_with_validation`` hook), an item that does not
authenticate stays where it is and ``cryptography.fernet.InvalidToken`` propagates. Everything
else is the SDK's class. Requires ``openai-agents[encrypt]``.
"""

from __future__ import annotations

from typing import Any

from agents.extensions.memory.encrypt_session import EncryptedSession as SDKEncryptedSession
from agents.extensions.memory.encrypt_session import _is_encrypted_envelope
from agents.run_context import RunContextWrapper

from turnstore.sdk.wrapper_hooks import WrapperHooks

__all__ = ["EncryptedSession"]


class EncryptedSession(SDKEncryptedSession):
    """The SDK's ``EncryptedSession`` whose pops authenticate before they delete."""

    async def pop_item(self, *, wrapper: RunContextWrapper[Any] | None = None) -> Any | None:
        """Remove and return the newest readable item.

        Authenticated items past their TTL are removed and skipped, as are plaintext items
        (the SDK's behaviour); an item that does not authenticate stops the pop with
        ``InvalidToken`` and stays stored.
        """
        underlying = self.underlying_session
        if not isinstance(underlying, WrapperHooks):
            return await super().pop_item(wrapper=wrapper)
        cipher = self.cipher

        def authenticate(item: Any) -> None:
            if _is_encrypted_envelope(item):
                # Without a TTL, so authenticated expired items still drain.
                cipher.extract_timestamp(item["payload"].encode("utf-8"))

        while True:
            stored = await underlying._pop_item_with_validation(authenticate)
            if not stored:
                return None
            item = self._unwrap(stored)
            if item is not None:
                return item
