"""Client text echoed in an answer, kept short: an id or a key may be megabytes long, and an
error message must not grow with what the client sent."""

from __future__ import annotations

from typing import Any

ECHO_CHARS = 80  # longer ids (the schema allows 200) are cut, with a note of the length


def clip(text: str, limit: int = ECHO_CHARS) -> str:
    """`text`, or its first `limit` characters and how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


def clip_loc(loc: list[Any]) -> list[Any]:
    """A path whose string parts (dict keys, ids) are clipped."""
    return [clip(part) if isinstance(part, str) else part for part in loc]
