"""Human-friendly units in the config file ("300s", "5m", "35d", "10MB") converted once, at load time."""

from __future__ import annotations

import datetime
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


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB|K|M|G)?\s*$", re.IGNORECASE)
_BYTES = {"b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, None: 1}


def parse_size(value: object) -> int:
    """Return bytes for 1048576, "512KB", "10MB", "1.5GB" (powers of 1024, as Postfix and clamd count).

    Raises ValueError with the accepted forms, which pydantic turns into an error naming the key.
    """
    if isinstance(value, bool):
        raise ValueError("expected a size such as 1048576, '512KB', '10MB'")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        unit = match.group(2).lower() if match.group(2) else None
        size = int(float(match.group(1)) * _BYTES[unit])
    else:
        raise ValueError(f"{value!r} is not a size: use a number of bytes or '512KB', '10MB', '1GB'")
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


Size = Annotated[int, BeforeValidator(parse_size)]


_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def format_duration(seconds: float) -> str:
    """Render seconds the way people read them: ``35d``, ``4h 12m``, ``5m 3s``, ``500ms``, never ``3.02e+06s``.

    At most two units, the second rounded ("34d 23h 59m 10s" is "35d"); the one formatter for the CLI, the
    logs and reply texts, and the output parses back with parse_duration when it has a single unit.
    """
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 10 and seconds != int(seconds):
        return f"{seconds:.1f}".rstrip("0").rstrip(".") + "s"

    def largest(total: float) -> int:
        return next(i for i, (_unit, size) in enumerate(_UNITS) if total >= size)

    small = _UNITS[min(largest(round(seconds)) + 1, len(_UNITS) - 1)][1]
    total = round(seconds / small) * small  # rounding may carry into the next unit (86390s is 1d)
    big = largest(total)
    (unit, size), (small_unit, small_size) = _UNITS[big], _UNITS[min(big + 1, len(_UNITS) - 1)]
    count, rest = divmod(total, size)
    text = f"{count}{unit}"
    if big + 1 < len(_UNITS) and rest:
        text += f" {rest // small_size}{small_unit}"
    return text


def format_time(epoch: float) -> str:
    """A moment for people, in the local zone and naming it: ``2026-12-01 15:30:00 UTC``."""
    moment = datetime.datetime.fromtimestamp(epoch).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S ") + (moment.strftime("%Z") or moment.strftime("%z"))
