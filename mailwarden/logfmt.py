"""logfmt rendering (key=value, quoted where needed), shared by decision events and daemon messages."""

from __future__ import annotations

from collections.abc import Iterable

_NEEDS_QUOTES = frozenset(' ="\\\t\r\n')


def logfmt_value(value: object) -> str:
    text = str(value)
    if text == "":
        return '""'
    if not any(ch in _NEEDS_QUOTES or ch < " " for ch in text):
        return text
    escaped = (
        text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    )
    escaped = "".join(ch if ch >= " " else f"\\x{ord(ch):02x}" for ch in escaped)
    return f'"{escaped}"'


def logfmt_pairs(pairs: Iterable[tuple[str, object]]) -> str:
    return " ".join(f"{key}={logfmt_value(value)}" for key, value in pairs if value is not None and value != "")
