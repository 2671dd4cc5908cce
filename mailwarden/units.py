"""Human-friendly units in the config file ("300s", "5m", "35d", "10MB") converted once, at load time."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(value: object) -> float:
    """Return seconds for 300, 2.5, "300s", "500ms", "5m", "1h", "35d" or "2w".

    Raises ValueError with the accepted forms, which pydantic turns into an error naming the key.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 300, '300s', '5m', '1h', '35d'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _SECONDS[match.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration: use a number of seconds or '500ms', '300s', '5m', '1h', '35d'")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


def format_duration(seconds: float) -> str:
    """Render seconds the way an operator would write them (for logs and reply texts)."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
