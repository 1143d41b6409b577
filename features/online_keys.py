"""The online store's Redis key layout (features/online.py's docstring draws it) and the two text decoders
every reader of those keys uses."""
from __future__ import annotations

from typing import Any


PREFIX = "kairos:fs"
CURRENT_KEY = f"{PREFIX}:current"
VERSIONS_KEY = f"{PREFIX}:versions"
SESSION_PREFIX = "kairos:session"
SESSION_TTL_S = 30 * 60


def _s(value: Any) -> str | None:
    """A Redis reply that may be missing (nil) as text, or None."""
    return None if value is None else _str(value)


def _str(value: Any) -> str:
    """A Redis reply that is never nil (a key, a member, a field, a value checked present) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def user_key(version: str, user_id: str) -> str:
    return f"{PREFIX}:{version}:user:{user_id}"


def items_key(version: str) -> str:
    return f"{PREFIX}:{version}:items"


def published_key(version: str) -> str:
    return f"{PREFIX}:{version}:published"


def rev_key(version: str) -> str:
    return f"{PREFIX}:{version}:rev"


def changes_key(version: str) -> str:
    return f"{PREFIX}:{version}:changes"


def text_key(version: str, column: str) -> str:
    return f"{PREFIX}:{version}:text:{column}"


def session_owner_key(session_id: str) -> str:
    """Who a session belongs to (the first user seen in it, set by the streaming job); expires with the session."""
    return f"kairos:session_owner:{session_id}"


def popular_key(version: str) -> str:
    return f"{PREFIX}:{version}:popular"


def meta_key(version: str) -> str:
    return f"{PREFIX}:{version}:meta"


def session_key(session_id: str) -> str:
    return f"{SESSION_PREFIX}:{session_id}"
