"""logfmt rendering (key=value, quoted where needed), shared by decision events and daemon messages."""

from __future__ import annotations

import re
from collections.abc import Iterable

_NEEDS_QUOTES = re.compile(r'[\x00-\x20="\\\x7f]')
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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


def logfmt_pairs(pairs: Iterable[tuple[str, object]]) -> str:
    return " ".join(f"{key}={logfmt_value(value)}" for key, value in pairs if value is not None and value != "")
