"""logfmt rendering (key=value, quoted where needed), shared by decision events and daemon messages."""

from __future__ import annotations

import re
from collections.abc import Iterable

_NEEDS_QUOTES = re.compile(r'[\x00-\x20="\\\x7f]')
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
needs_quotes = _NEEDS_QUOTES.search
"""``needs_quotes(text)`` is None when ``text`` (or several values joined) can go out unquoted."""
_CACHE_SIZE = 256
_cached: dict[str, str] = {}


def logfmt_value(value: object) -> str:
    text = value if type(value) is str else str(value)
    if text == "":
        return '""'
    if _NEEDS_QUOTES.search(text) is None:  # the common case: one C-level scan
        return text
    escaped = (
        text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    )
    escaped = _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", escaped)
    return f'"{escaped}"'


def logfmt_value_cached(text: str) -> str:
    """``logfmt_value`` for the few texts rendered over and over (replies): quoting and escaping once.
    At most _CACHE_SIZE texts are kept; past that the cache starts again, so odd texts cannot grow it."""
    quoted = _cached.get(text)
    if quoted is None:
        if len(_cached) >= _CACHE_SIZE:
            _cached.clear()
        quoted = _cached[text] = logfmt_value(text)
    return quoted


def logfmt_pairs(pairs: Iterable[tuple[str, object]]) -> str:
    return " ".join(f"{key}={logfmt_value(value)}" for key, value in pairs if value is not None and value != "")
