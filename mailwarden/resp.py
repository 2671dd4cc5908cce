"""RESP, Redis's wire format, for our own clients (the pipelined connection, the sentinel lookup)."""

from __future__ import annotations

from collections.abc import Sequence

import hiredis


def pack(command: Sequence[str | bytes | int | float]) -> bytes:
    """One command in RESP. (hiredis's type stub takes the argument tuple for a 1-tuple; any length is fine.)"""
    return hiredis.pack_command(tuple(command))  # type: ignore[arg-type]
