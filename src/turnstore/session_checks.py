"""Checks of the arguments session methods share, raising ``InvalidArgumentError``."""

from __future__ import annotations

from turnstore.errors import InvalidArgumentError
from turnstore.info import check_metadata, check_title, check_user_id
from turnstore.persistence.records import InfoDefaults
from turnstore.persistence.validation import check_identifier, check_int


def check_turn_number(turn_number: object, argument: str = "turn_number") -> int:
    """A turn number argument: an int of 0 or more."""
    # Turns count from 1; 0 and numbers past the stored ones are turns that do not exist.
    return check_int(turn_number, argument, minimum=0)


def check_branch_id(branch_id: str | None) -> str | None:
    """A branch id argument of a read: ``None`` (the current branch) or a valid id."""
    return None if branch_id is None else check_identifier(branch_id, "branch_id")


def check_text(value: object, argument: str) -> str:
    """A text argument: any str."""
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{argument} must be a str; got {type(value).__name__}")
    return value


def check_branch_name(branch_name: object, argument: str = "branch_name") -> str:
    """A branch name (or, with ``argument="branch_id"``, id): a valid id, not blank."""
    name = check_identifier(branch_name, argument)
    if not name.strip():
        raise InvalidArgumentError(
            "Branch name cannot be empty"
            if argument == "branch_name"
            else "Branch ID cannot be empty"
        )
    return name


def info_defaults(user_id: object, title: object, metadata: object) -> InfoDefaults:
    """Checked constructor keywords: what a session's first write stores as its info."""
    return InfoDefaults(check_user_id(user_id), check_title(title), check_metadata(metadata))
