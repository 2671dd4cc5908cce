"""What spamd is sent of a message larger than its ``max_size``: the header and the start of every part.

SpamAssassin reads only the first 50,000 bytes of each text part for its body rules (``body_part_scan_size``)
anyway, so a message cut after its first megabyte loses what matters, the later parts, and keeps what
does not, the tail of the first one. A spam with a 2 MB harmless attachment in front of its pitch is
caught only if the pitch is sent. So the sample keeps the structure (every header block and boundary
line) and the first ``part_size`` bytes of every leaf part's body, in order, up to ``max_size`` in all.

One pass over the spool with bounded reads (a 2 MB header line comes in pieces and is kept only in part);
nothing but the sample is held in memory. Broken MIME samples as far as it can be read: a boundary that
never comes leaves the rest of the message one part, sampled like any other.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import BinaryIO

READ_LIMIT = 64 << 10
"""The longest piece of a line read at once."""
HEADER_BLOCK_LIMIT = 64 << 10
"""Bytes of one header block kept in the sample (and parsed for its Content-Type)."""
STRUCTURE_LIMIT = 1 << 10
"""Bytes kept of a multipart's preamble and epilogue (text nobody reads, beyond a line or two)."""

_BOUNDARY = re.compile(rb'boundary\s*=\s*(?:"([^"]{1,200})"|([^\s;"]{1,200}))', re.IGNORECASE)
_CONTENT_TYPE = re.compile(rb"^content-type\s*:\s*([a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+)",
                           re.IGNORECASE | re.MULTILINE)


class _Mode(Enum):
    HEADER = "header"
    LEAF = "leaf"
    STRUCTURE = "structure"


def sample(reader: BinaryIO, max_size: int, part_size: int) -> bytes:
    """At most ``max_size`` bytes: every header block and boundary line, and the first ``part_size`` bytes
    of each part's body, read from ``reader`` (at the start of the message)."""
    out = bytearray()
    boundaries: list[bytes] = []
    """The open multiparts' delimiters (``--`` + boundary), outermost first."""
    mode = _Mode.HEADER
    header = bytearray()
    copied = 0
    """Bytes of the current part's body (or structure text) kept so far."""
    line_start = True
    while len(out) < max_size:
        piece = reader.readline(READ_LIMIT)
        if not piece:
            break
        starts_line, line_start = line_start, piece.endswith(b"\n")
        if starts_line and boundaries and piece.startswith(b"--"):
            found = _delimiter(piece, boundaries)
            if found is not None:
                depth, closing = found
                _append(out, piece, max_size)
                del boundaries[depth + (0 if closing else 1):]
                mode, header, copied = (_Mode.STRUCTURE, header, 0) if closing else (_Mode.HEADER, bytearray(), 0)
                continue
        if mode is _Mode.HEADER:
            if starts_line and piece in (b"\r\n", b"\n"):
                _append(out, piece, max_size)
                mode, copied = _after_header(bytes(header), boundaries), 0
                header = bytearray()
            elif len(header) < HEADER_BLOCK_LIMIT:
                header += _copy(out, piece, HEADER_BLOCK_LIMIT - len(header), max_size)
            continue
        limit = part_size if mode is _Mode.LEAF else STRUCTURE_LIMIT
        if copied < limit:
            copied += len(_copy(out, piece, limit - copied, max_size))
    return bytes(out[:max_size])


def _copy(out: bytearray, piece: bytes, room: int, max_size: int) -> bytes:
    """The first ``room`` bytes of ``piece`` appended to ``out``; a line cut short (here, or because the
    room is used up) is ended with CRLF, so the next boundary line still starts a line."""
    kept = piece[:room]
    _append(out, kept, max_size)
    if not kept.endswith(b"\n") and (len(kept) < len(piece) or len(kept) == room):
        _append(out, b"\r\n", max_size)
    return kept


def _delimiter(line: bytes, boundaries: list[bytes]) -> tuple[int, bool] | None:
    """(depth of the multipart, closing?) when ``line`` is one of the open delimiters, innermost first."""
    text = line.rstrip()
    for depth in range(len(boundaries) - 1, -1, -1):
        delimiter = boundaries[depth]
        if text == delimiter:
            return depth, False
        if text == delimiter + b"--":
            return depth, True
    return None


def _after_header(header: bytes, boundaries: list[bytes]) -> _Mode:
    """What follows a header block: a multipart's structure (its delimiter pushed), a nested message's
    header, or a leaf's body."""
    unfolded = re.sub(rb"\r?\n[ \t]+", b" ", header)
    match = _CONTENT_TYPE.search(unfolded)
    kind = match.group(1).lower() if match else b"text/plain"
    if kind.startswith(b"multipart/"):
        line = unfolded[match.start():].split(b"\n", 1)[0] if match else b""
        boundary = _BOUNDARY.search(line)
        if boundary:
            boundaries.append(b"--" + (boundary.group(1) or boundary.group(2)))
            return _Mode.STRUCTURE
    if kind == b"message/rfc822":
        return _Mode.HEADER
    return _Mode.LEAF


def _append(out: bytearray, data: bytes, max_size: int) -> None:
    out += data[:max_size - len(out)]
