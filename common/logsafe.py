"""Strings from the other side, made safe to log: control characters escaped, length capped.

A device name, a tensor name or a refusal message can carry newlines (forged log lines),
terminal escapes or a megabyte of text; `clip` keeps a log line one line, printable and short.
"""

from __future__ import annotations

DEFAULT_LIMIT = 200


def clip(value: object, limit: int = DEFAULT_LIMIT) -> str:
    """`value` as text with non-printable characters escaped (\\n, \\x1b, ...) and at most `limit`
    characters of it kept, the rest counted: 'abc…(+1234 chars)'."""
    text = value if isinstance(value, str) else str(value)
    head = text[:limit]
    safe = head if head.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in head)
    rest = len(text) - len(head)
    return f"{safe}…(+{rest} chars)" if rest > 0 else safe
