"""A streaming walk over the MIME tree of a raw message, in bounded memory and time.

The message is read from a file (the milter's spool) 64 KB at a time; nothing holds the whole message,
a whole part, or a whole header field. Header blocks and bodies are read in blocks up to the next line
that matters (a boundary, the end of the header), found by regular expressions, so that the time a
message costs grows with its size, not with its number of lines: a Python loop turns per part, per
kept header field and per line of a uuencoded file, never per line of a body. Each search starts with
literal text (``\\n--`` for a boundary line, ``begin`` for a uuencoded file) that the engine scans for at
C speed, and a body outside any multipart is not searched for boundaries at all: a large body costs
about 1 ms of CPU per MB (bench/banned_cpu.py), most of it those scans.

Each leaf part is handed to the caller (``on_part``) with what a content check needs: its path
(IMAP-style numbers, ``1``, ``2.1``), its declared type and transfer encoding, its file names
(Content-Disposition ``filename`` and Content-Type ``name``, RFC 2231 and RFC 2047 decoded), the first
``SNIFF`` decoded bytes (for magic-byte detection), and, for parts that may be archives or encoded
messages, a decoded copy up to ``max_decoded`` bytes in a temporary file (RAM up to ``SPOOL_MEMORY``,
then an unlinked file).

How it reads hostile input, so that every consumer (banned attachments, SpamAssassin, phish) sees the
same tree:

- a boundary line is ``--boundary`` with optional ``--`` and trailing white space, at the start of a
  line; a boundary of any enclosing multipart closes every multipart inside it (a missing close
  delimiter costs nothing), and end of file closes everything;
- a multipart without a boundary parameter is a leaf; one whose first boundary never comes has no parts;
- a boundary line after the close delimiter starts another part: some clients read on, so what any of
  them might show is inspected;
- message/rfc822 (and message/global) in 7bit/8bit/binary is walked in place; base64 or
  quoted-printable encoded ones are decoded into the bounded copy and walked from there;
- the children of multipart/digest default to message/rfc822;
- only Content-Type, -Disposition and -Transfer-Encoding are kept (each cut at ``MAX_FIELD`` bytes, which
  is recorded as a limit): a 2 MB ``To:`` line or ten thousand ``Received:`` lines cost the time to
  read them, not the memory; file names are taken from every Content-Disposition and Content-Type
  field of a part (clients differ in which of two they believe), the type from the first;
- a line longer than ``2 * CHUNK`` with no boundary in it is read in pieces;
- header bytes are decoded as UTF-8 (RFC 6532) when they are valid UTF-8, else as Latin-1: 8-bit names
  come out readable, never as an exception;
- base64 is decoded leniently, and the same wherever the reads end: bytes outside the alphabet are
  dropped, a padded group (``xy==``, ``xyz=``) ends its group and decoding goes on after it (binascii and
  the email package stop there, a client may not), any other ``=`` is skipped as binascii skips it, and
  a last group left unpadded is decoded; past ``BASE64_BLOCKS`` padded groups in one part the rest of it
  is not decoded, and the walk records a limit.

Bounds (``Limits``): parts, nesting depth (multipart and message/rfc822 together), decoded bytes kept per
part. Past a bound the walk goes on reading (to find the boundaries that follow) without descending or
decoding, and records what it skipped in ``Walk.limits``: the caller decides what an incompletely
inspected message means.
"""

from __future__ import annotations

import binascii
import contextlib
import email.utils
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message as EmailMessage
from email.parser import HeaderParser
from email.policy import compat32
from typing import IO, BinaryIO, NamedTuple

MAX_LINE = 1 << 16
"""Bytes read as one line; a longer line comes in pieces."""
CHUNK = 1 << 16
"""Bytes read from the file at a time."""
MAX_FIELD = 1 << 16
"""Bytes kept of one Content-* header field (with its continuation lines)."""
MAX_FIELDS = 16
"""Such fields kept per part (repeated ones included)."""
SNIFF = 40 * 1024
"""Decoded bytes kept at the start of every leaf part for type detection (an ISO 9660 image shows its
signature at 32769)."""
SPOOL_MEMORY = 1 << 20
"""Bytes of a decoded copy kept in RAM before it moves to a temporary file."""
UU_FILES = 16
UU_READ = 4 << 20
"""uuencoded files looked for in one text part, and bytes of them read (line by line, so bounded):
past either, the rest of the part is read as text and the walk records a limit."""

_B64_JUNK = bytes(c for c in range(256) if not (chr(c).isascii() and (chr(c).isalnum() or chr(c) in "+/=")))
"""Bytes outside the base64 alphabet (and ``=``), which lenient decoders drop."""
_UU_BEGIN = re.compile(rb"^begin(?:-base64)? +[0-7]{3,4} +(.+?)[ \t]*\r?\n?$")
_UU_LINE = re.compile(rb"begin(?:-base64)? +[0-7]{3,4} +[^\r\n]")
_UU_AFTER_NEWLINE = re.compile(rb"\nbegin(?:-base64)? +[0-7]{3,4} +[^\r\n]")
MESSAGE_TYPES = ("message/rfc822", "message/global")
ARCHIVE_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
"""Decoded parts starting so are kept whole (up to the bound) for the archive reader."""


@dataclass(frozen=True)
class Limits:
    max_parts: int = 1000
    max_depth: int = 20
    max_decoded: int = 25 << 20
    """Decoded bytes of one part kept for archive listing and encoded messages; beyond it the copy is
    ``truncated``."""


@dataclass
class Part:
    """One leaf part, as handed to ``on_part``; ``decoded`` is closed when ``on_part`` returns."""

    path: str
    content_type: str
    """Lower-case ``type/subtype`` as declared (``text/plain`` when absent or unparseable)."""
    encoding: str
    """Lower-case Content-Transfer-Encoding (``7bit`` when absent)."""
    names: list[str]
    """File names as declared and decoded (``filename`` first, then ``name``), duplicates removed."""
    head: bytes = b""
    """The first SNIFF decoded bytes."""
    size: int = 0
    """Decoded bytes seen (counting stops once decoding is no longer needed)."""
    decoded: IO[bytes] | None = None
    """The decoded body, when kept (archive magic in the head, or an encoded message)."""
    truncated: bool = False
    """The decoded copy stopped at ``Limits.max_decoded``."""
    embedded: bool = False
    """A uuencoded file found inside a text part (``names`` from its ``begin`` line)."""
    depth: int = 0
    """Nesting of multiparts and messages above it (for ``Walker.nested``)."""


@dataclass
class Walk:
    parts: int = 0
    limits: list[str] = field(default_factory=list)
    """What was not inspected and why (``depth>20 at 1.2.1``, ``parts>1000``...)."""
    stopped: bool = False
    """``on_part`` asked to stop (a finding)."""

    def limit(self, what: str) -> None:
        if len(self.limits) < 10:
            self.limits.append(what if len(what) <= 200 else what[:120] + "..." + what[-60:])


OnPart = Callable[[Part, "Walker"], bool]
"""Called for each leaf part (and each uuencoded file); returns True to stop the walk."""


def _join(path: str, number: int) -> str:
    return f"{path}.{number}" if path else str(number)


class _Stop(Exception):
    """``on_part`` asked to stop: unwinds the walk."""


class _Stops(NamedTuple):
    """The lines that end a block (boundary lines, the empty line after a header), as two patterns:
    ``here`` matches such a line at a line start, ``ahead`` a newline followed by one. Every boundary
    alternative shares the literal start ``--``, so ``ahead`` starts with the literal ``\\n--`` (or ``\\n``
    in a header) and the regular-expression engine scans for that text at C speed instead of trying the
    pattern at every byte, which cost about 8 ms of CPU per MB of body."""

    here: re.Pattern[bytes]
    ahead: re.Pattern[bytes]
    markers: tuple[bytes, ...] = ()
    """``\\n--boundary`` of every open multipart, when they are few and long (``FIND_BOUNDARIES``): every
    line ``ahead`` matches starts with one, and ``bytes.find`` skips through a body to the first of them
    several times faster than the engine's scan for ``\\n--`` (which stops at every newline)."""


FIND_BOUNDARIES = (3, 16)
"""``_Stops.markers`` are searched for while at most 3 multiparts are open and each boundary has at least
16 bytes (mail clients make them 28 to 70): a ``find`` for each of many markers, or for a short one,
costs more than one scan of the pattern."""


class _Lines:
    """A binary file read in chunks: line by line (``next``, pieces of at most MAX_LINE, ``at_start`` saying
    whether a piece begins a line) where the walk needs lines (boundary lines, uuencode), and in blocks
    up to the next line that matters (``block``) where it does not (header blocks, bodies), so that a
    body of fifty million empty lines costs a regular-expression search per 64 KB, not fifty million
    turns of a Python loop."""

    def __init__(self, reader: BinaryIO) -> None:
        self._reader = reader
        self._buf = b""
        self._pos = 0
        self._eof = False
        self.at_start = True
        """The next byte begins a line."""

    def _more(self) -> bool:
        if self._eof:
            return False
        chunk = self._reader.read(CHUNK)
        if not chunk:
            self._eof = True
            return False
        self._buf = self._buf[self._pos:] + chunk
        self._pos = 0
        return True

    def next(self) -> tuple[bytes, bool] | None:
        while True:
            buf, pos = self._buf, self._pos
            end = buf.find(b"\n", pos, pos + MAX_LINE)
            if end >= 0:
                line = buf[pos:end + 1]
                break
            if len(buf) - pos >= MAX_LINE:
                line = buf[pos:pos + MAX_LINE]
                break
            if not self._more():
                if pos >= len(buf):
                    return None
                line = buf[pos:]
                break
        self._pos += len(line)
        at_start, self.at_start = self.at_start, line.endswith(b"\n")
        return line, at_start

    def block(self, stops: _Stops | None) -> bytes | None:
        """Bytes up to the next line that ``stops`` names (see ``_Stops``; None: no line stops a block):
        b"" when that line is next, None at end of file. Never consumes part of such a line, so ``next``
        reads it whole."""
        while True:
            buf, pos = self._buf, self._pos
            if pos >= len(buf) and not self._more():
                return None
            buf, pos = self._buf, self._pos
            if stops is not None:
                here = stops.here
                if self.at_start and (here.match(buf, pos) or (self._eof and here.fullmatch(buf + b"\n", pos))):
                    return b""
                start = pos
                if stops.markers:  # no match can start before the first marker
                    start = min((at for at in (buf.find(m, pos) for m in stops.markers) if at >= 0), default=-1)
                found = stops.ahead.search(buf, start) if start >= 0 else None
                if found is not None:
                    return self._take(found.start() + 1)
            last = buf.rfind(b"\n", pos)
            if last >= 0:  # whole lines only: the last, unfinished one may turn out to be a boundary
                return self._take(last + 1)
            if self._eof or len(buf) - pos >= 2 * CHUNK:  # the last line, or a long one with no end in sight
                return self._take(len(buf))
            self._more()

    def _take(self, end: int) -> bytes:
        data = self._buf[self._pos:end]
        self._pos = end
        if data:
            self.at_start = data.endswith(b"\n")
        return data

    def unread(self, count: int) -> None:
        """Give back the last ``count`` bytes of the last block (they start a line)."""
        self._pos -= count
        self.at_start = True


def _uu_begin(data: bytes) -> int:
    """Where the first uuencode ``begin`` line starts in ``data`` (at its start or after a newline), or -1.
    A plain ``find`` rules out a block with no ``begin`` in it (most text); the pattern then searches from
    the first one. (A pattern anchored with ``(?m)^`` has no literal prefix to scan for: it is tried at
    every byte, about 4 ms of CPU per MB of text.)"""
    first = data.find(b"begin")
    if first < 0:
        return -1
    if first == 0 and _UU_LINE.match(data):
        return 0
    found = _UU_AFTER_NEWLINE.search(data, max(first - 1, 0))
    return found.start() + 1 if found is not None else -1


class _Terminator:
    """Where an entity ended: a boundary of the multipart at stack index ``level`` (``close`` for the
    ``--`` form), or end of file (``level`` -1)."""

    __slots__ = ("close", "level")

    def __init__(self, level: int, close: bool) -> None:
        self.level, self.close = level, close


_EOF = _Terminator(-1, False)


def decode_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")


def decode_words(value: str) -> str:
    """RFC 2047 encoded words decoded (also where they do not belong, inside a quoted parameter, as
    Outlook and others send them), each on its own: a broken word stays as it is and does not stop the
    others being decoded (the stdlib gives up on the whole value); white space between two words goes;
    an unknown charset falls back to Latin-1, bad bytes are replaced."""
    if "=?" not in value:
        return value
    out: list[str] = []
    pos, after_word = 0, False
    for match in _ENCODED_WORD.finditer(value):
        between = value[pos:match.start()]
        if not (after_word and not between.strip()):
            out.append(between)
        word = _decode_word(match.group(1), match.group(2), match.group(3))
        out.append(match.group(0) if word is None else word)
        pos, after_word = match.end(), word is not None
    out.append(value[pos:])
    return "".join(out)


def _decode_word(charset: str, encoding: str, text: str) -> str | None:
    data = text.encode("utf-8", "replace")
    try:
        if encoding in "bB":
            raw = binascii.a2b_base64(data + b"=" * (-len(data) % 4))
        else:
            raw = binascii.a2b_qp(data, header=True)
    except (binascii.Error, ValueError):
        return None
    try:
        return raw.decode(charset.partition("*")[0], "replace")  # charset*language (RFC 2231)
    except (LookupError, ValueError, TypeError):  # unknown, not a text codec, a NUL in the name...
        return raw.decode("latin-1")


def _params(headers: EmailMessage, name: str, header: str) -> list[str]:
    """Every value of parameter ``name`` in the first ``header`` field, decoded: a field may carry a
    parameter twice (``filename="a.txt"; filename*=UTF-8''a.exe``), and clients differ in which they use."""
    try:
        params = headers.get_params(None, header=header) or []
    except (ValueError, TypeError, IndexError, AttributeError, UnicodeError, LookupError):
        return []
    values = []
    for key, value in params:
        if key != name or not value:
            continue
        try:
            text = email.utils.collapse_rfc2231_value(value)
        except (ValueError, TypeError, UnicodeError, LookupError):
            text = value[2] if isinstance(value, tuple) else str(value)
        values.append(decode_words(str(text)))
    return values


def _param(headers: EmailMessage, name: str, header: str) -> str | None:
    """The first value of parameter ``name`` (the boundary)."""
    values = _params(headers, name, header)
    return values[0] if values else None


def file_names(headers: EmailMessage) -> list[str]:
    """``filename`` of every Content-Disposition field, then ``name`` of every Content-Type field, every
    value of each."""
    names: list[str] = []
    for name, header in (("filename", "content-disposition"), ("name", "content-type")):
        for field_value in headers.get_all(header) or ():
            single = EmailMessage()
            try:
                single[header] = field_value
            except (ValueError, TypeError):
                continue
            for value in _params(single, name, header):
                if value not in names:
                    names.append(value)
    return names


class _Decoder:
    """A transfer-encoding decoder fed blocks of whole lines (a block ends inside a line only in a line
    longer than the walk reads at once); ``flush`` gives what the end of the body completes."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._carry = b""
        self._b64_groups = BASE64_BLOCKS
        self.exhausted = False
        """More than BASE64_BLOCKS padded groups: the rest of the part was not decoded."""
        self._uu_started = False

    def feed(self, data: bytes) -> bytes:
        if self.encoding == "base64":
            return self._base64(data)
        if self.encoding == "quoted-printable":
            data = self._carry + data
            cut = data.find(b"=", len(data) - 2)  # an escape cut in two by the block's end waits for the rest
            self._carry, data = (data[cut:], data[:cut]) if cut >= 0 else (b"", data)
            return binascii.a2b_qp(data)
        if self.encoding in ("x-uuencode", "x-uue", "uuencode"):
            return b"".join(self._uu(line) for line in data.splitlines(keepends=True))
        return data

    def flush(self) -> bytes:
        """The end of the body: a last base64 group left unpadded (two or three characters) decoded."""
        if self.encoding != "base64" or self.exhausted:
            return b""
        data, self._carry = self._carry.rstrip(b"="), b""
        return binascii.a2b_base64(data + b"==") if len(data) >= 2 else b""

    def _base64(self, data: bytes) -> bytes:
        """Base64 decoded as lenient decoders do, whatever the reads: characters outside the alphabet
        dropped, a padded group (``xy==``, ``xyz=``) ending its group with decoding going on after it
        (binascii stops there), any other ``=`` skipped (as binascii skips it). Stretches without ``=``
        are decoded by binascii whole; only the groups around an ``=`` are matched by a pattern, and the
        characters of an unfinished group wait in ``_carry`` (at most three, and an ``=`` after two)."""
        if self.exhausted:
            return b""
        text = self._carry + data.translate(None, _B64_JUNK)
        out: list[bytes] = []
        pos = 0
        while True:
            pad = text.find(b"=", pos)
            if pad < 0:
                end = pos + (len(text) - pos) // 4 * 4
                out.append(binascii.a2b_base64(text[pos:end]))
                self._carry = text[end:]
                break
            aligned = pos + (pad - pos) // 4 * 4
            if aligned > pos:
                out.append(binascii.a2b_base64(text[pos:aligned]))
            found = _B64_AROUND_PAD.match(text, aligned)
            if found is None or found.end() == aligned:  # the input ends inside the group: it waits for more
                rest = text[aligned:]
                chars = rest.translate(None, b"=")
                self._carry = chars + b"=" if len(chars) == 2 and rest.endswith(b"=") else chars
                break
            chars = found.group(0).translate(None, b"=")
            if found.group(1) is not None:
                self._b64_groups -= 1
                if self._b64_groups < 0:
                    self.exhausted = True
                    self._carry = b""
                    break
                chars += b"=" * (-len(chars) % 4)
            out.append(binascii.a2b_base64(chars))
            pos = found.end()
        return b"".join(out)

    def _uu(self, line: bytes) -> bytes:
        if not self._uu_started:
            self._uu_started = bool(_UU_BEGIN.match(line))
            return b""
        return uu_line(line)


def _b64_pattern(pattern: bytes) -> re.Pattern[bytes]:
    return re.compile(pattern.replace(b"D", rb"[A-Za-z0-9+/]"))


_B64_AROUND_PAD = _b64_pattern(
    # whole groups with an = that is skipped in them, taken atomically (not `*+`: Python 3.11 before 3.11.5,
    # Debian 12's 3.11.2 among them, matches possessive repeats wrongly and can loop on them, gh-106052)
    rb"(?>(?:(?:=+D=*D|D=+D)(?:=(?=D))?DD|DD=DD)*)"
    rb"(=*D=*D(?:==|(?:=(?=D))?D=))?"  # a padded group, = skipped in it too
)
"""From the start of a group with an ``=`` in it: the groups whose ``=`` are skipped (before the first
character, after the first, or one after the second followed by a third), then a padded group (group 1)
if one comes; empty when the input ends before the group is decided."""
BASE64_BLOCKS = 1024
"""Padded groups (``xy==``, ``xyz=``) decoded per part, each a turn of a Python loop; past that, the rest of
the part is not decoded and the walk records a limit, so that hostile padding costs bounded time."""


def uu_line(line: bytes) -> bytes:
    stripped = line.rstrip(b"\r\n")
    if not stripped or stripped in (b"end", b"`"):
        return b""
    try:
        return binascii.a2b_uu(stripped)
    except binascii.Error:
        try:  # some encoders pad short lines badly: decode what the length byte announces
            return binascii.a2b_uu(stripped[: ((stripped[0] - 32) & 63) * 4 // 3 + 5])
        except (binascii.Error, IndexError):
            return b""


class _Body:
    """Where a leaf's decoded bytes go: the head always, a temporary file while the part may be an
    archive or an encoded message."""

    def __init__(self, part: Part, keep: bool | None, limit: int, sniff_budget: int = 64 * SNIFF) -> None:
        self.part = part
        self.sniff_budget = sniff_budget
        """Body bytes read, at most, to fill the head of a part that is not kept."""
        self.keep = keep
        """True: keep it all (up to limit); None: decide from the head's magic; False: head only."""
        self.limit = limit
        self._head = bytearray()
        self._file: IO[bytes] | None = None
        self.consumed = 0
        """Bytes of the body read so far (decoding work is bounded by them too: a body that decodes to
        nothing, all padding or junk, must not be decoded to its end)."""
        self.done = False
        """Nothing more is needed: the caller may stop decoding."""

    def feed(self, data: bytes, raw_size: int) -> None:
        """``data`` decoded from ``raw_size`` bytes of the body."""
        self.consumed += raw_size
        if self.done:
            return
        if len(self._head) < SNIFF:
            self._head += data[: SNIFF - len(self._head)]
        if self.keep is None and len(self._head) >= 4:
            self.keep = self._head.startswith(ARCHIVE_MAGIC)
        if self.keep is not False:
            if self.part.size + len(data) > self.limit or self.consumed > 3 * self.limit + CHUNK:
                self.part.truncated = True
                data = data[: max(0, self.limit - self.part.size)]
                self.done = True
            if data:
                if self._file is None:
                    self._file = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)  # noqa: SIM115 (the walker closes it)
                self._file.write(data)
        self.part.size += len(data)
        if not self.keep and (len(self._head) >= SNIFF or self.consumed > self.sniff_budget):
            self.done = True  # undecided (no four bytes yet) counts as not kept

    def finish(self) -> Part:
        self.part.head = bytes(self._head)
        if self.keep and self._file is not None:
            self._file.seek(0)
            self.part.decoded = self._file
        elif self._file is not None:
            self._file.close()
        return self.part


_FIELD_START = re.compile(rb"(?mi)^content-(?:type|disposition|transfer-encoding)[ \t]*:")
_FIELD_END = re.compile(rb"\n(?![ \t])")
_CONTINUATION = re.compile(rb"(?:[ \t][^\n]*(?:\n|\Z))*")


class _Fields:
    """The header fields a walk keeps, gathered from blocks of a header by regular expressions (a header
    of ten million lines costs C time): each cut at MAX_FIELD bytes, at most MAX_FIELDS of them."""

    def __init__(self) -> None:
        self.fields: list[bytearray] = []
        self.cut = False
        self._open: bytearray | None = None
        """The last field, when the block ended before it did (its continuation lines come next)."""

    def _append(self, field: bytearray, data: bytes) -> None:
        if len(field) + len(data) > MAX_FIELD:
            self.cut = True
        field += data[: max(0, MAX_FIELD - len(field))]

    def feed(self, data: bytes, at_start: bool) -> None:
        pos = 0
        if not at_start:  # the rest of a long line: the open field's, if any
            end = data.find(b"\n")
            pos = len(data) if end < 0 else end + 1
            if self._open is not None:
                self._append(self._open, data[:pos])
        if self._open is not None and pos < len(data):
            end = _CONTINUATION.match(data, pos).end()  # type: ignore[union-attr]
            self._append(self._open, data[pos:end])
            pos = end
            if pos < len(data):
                self._open = None
        for match in _FIELD_START.finditer(data, pos):
            start = match.start()
            found = _FIELD_END.search(data, start)
            end = found.start() + 1 if found is not None and found.end() < len(data) else len(data)
            if len(self.fields) >= MAX_FIELDS:
                self.cut = True
                continue
            field = bytearray(match.group(0).replace(b" ", b"").replace(b"\t", b""))  # "Name :" is "Name:"
            self._append(field, data[match.end():end])
            self.fields.append(field)
            self._open = field if end == len(data) else None


class Walker:
    """One walk over one message; ``walk`` (below) is the way in. Archive readers and the caller may call
    ``nested`` to walk a decoded message found inside a part with the same budget."""

    def __init__(self, limits: Limits, on_part: OnPart, keep: Callable[[str, str, list[str]], bool]) -> None:
        self.limits = limits
        self.on_part = on_part
        self.keep = keep
        self.result = Walk()
        self._stack: list[bytes] = []
        self._lines: _Lines
        self._compiled: dict[tuple[tuple[bytes, ...], bool, int], _Stops | None] = {}

    def run(self, reader: BinaryIO, path: str = "", depth: int = 0) -> None:
        saved_stack, saved_lines = self._stack, getattr(self, "_lines", None)
        self._stack, self._lines = [], _Lines(reader)
        try:
            self._entity(path, depth, root=True, default_type="text/plain")
            self._skip_body()  # nothing is open any more: whatever is left is read past at once
        finally:
            self._stack = saved_stack
            if saved_lines is not None:
                self._lines = saved_lines

    # -- the grammar --------------------------------------------------------------------------------

    def _boundary(self, line: bytes, at_start: bool) -> _Terminator | None:
        if not at_start or not line.startswith(b"--") or not self._stack:
            return None
        for level in range(len(self._stack) - 1, -1, -1):
            boundary = self._stack[level]
            if line.startswith(boundary, 2):
                rest = line[2 + len(boundary):].rstrip(b" \t\r\n")
                if rest == b"":
                    return _Terminator(level, False)
                if rest == b"--":
                    return _Terminator(level, True)
        return None

    def _header_block(self) -> tuple[EmailMessage, _Terminator | None, bool]:
        """The Content-Type, -Disposition and -Transfer-Encoding fields of a header block, the terminator if
        a boundary or EOF came first, and whether one of those fields was cut (or dropped) at a bound."""
        fields = _Fields()
        stops = self._patterns(header=True)
        ended: _Terminator | None = None
        while True:
            at_start = self._lines.at_start
            data = self._lines.block(stops)
            if data is None:
                ended = _EOF
                break
            if data:
                fields.feed(data, at_start)
                continue
            item = self._lines.next()  # the empty line, or a boundary
            ended = self._boundary(*item) if item is not None else _EOF
            break
        text = "".join(decode_text(bytes(f)).rstrip("\r\n").replace("\r", "") + "\n" for f in fields.fields)
        try:
            headers = HeaderParser(policy=compat32).parsestr(text + "\n", headersonly=True)
        except Exception:  # the stdlib parser on hostile input: an empty header is the answer
            headers = EmailMessage()
        return headers, ended, fields.cut

    def _patterns(self, header: bool = False, closing: int = -1) -> _Stops | None:
        """The lines a block stops at: the boundary lines of the open multiparts (of level ``closing`` only
        its close delimiter), and with ``header`` the empty line that ends a header block; None when no
        line does (a body outside any multipart is read to the end of the file in whole lines)."""
        key = (tuple(self._stack), header, closing)
        if key in self._compiled:
            return self._compiled[key]
        boundaries = []
        every = [re.escape(b) for level, b in enumerate(self._stack) if level != closing]
        if every:
            boundaries.append(b"(?:" + b"|".join(every) + b")(?:--)?")
        if closing >= 0:
            boundaries.append(re.escape(self._stack[closing]) + b"--")
        lines = [b"--(?:" + b"|".join(boundaries) + rb")[ \t\r]*\n"] if boundaries else []
        if header:
            lines.append(rb"\r?\n")
        line = b"(?:" + b"|".join(lines) + b")"
        markers = tuple(b"\n--" + boundary for boundary in self._stack)
        most, shortest = FIND_BOUNDARIES
        if header or len(markers) > most or min(map(len, markers), default=0) < len(b"\n--") + shortest:
            markers = ()
        stops = _Stops(re.compile(line), re.compile(b"\n" + line), markers) if lines else None
        if len(self._compiled) < 256:
            self._compiled[key] = stops
        return stops

    def _body(self, feed: Callable[[bytes], None], closing: int = -1) -> _Terminator:
        """Read a body to its terminator, handing it to ``feed`` in blocks (whole lines, except in a line
        longer than ``2 * CHUNK``); with ``closing``, the parts of that multipart are read past up to its
        close delimiter."""
        stops = self._patterns(closing=closing)
        while True:
            data = self._lines.block(stops)
            if data is None:
                return _EOF
            if data:
                feed(data)
                continue
            item = self._lines.next()
            if item is None:
                return _EOF
            term = self._boundary(*item)
            if term is not None:
                return term
            feed(item[0])  # cannot happen (block stops only at boundary lines), but never lose bytes

    def _skip_body(self) -> _Terminator:
        return self._body(lambda _data: None)

    def _entity(self, path: str, depth: int, root: bool, default_type: str) -> _Terminator:
        """One entity: a message (``root``: its leaf body is numbered ``path.1``) or a part of a multipart
        (its leaf body is ``path``); a multipart's children are ``path.N`` either way."""
        headers, ended, cut = self._header_block()
        content_type = _content_type(headers, default_type)
        encoding = _encoding(_header(headers, "content-transfer-encoding"))
        own = _join(path, 1) if root else path
        if cut:
            self.result.limit(f"header of part {own} over {MAX_FIELD} bytes")
        if ended is not None:
            self._leaf(own, depth, headers, content_type, encoding, empty=True)
            return ended
        if content_type.startswith("multipart/"):
            boundary = _param(headers, "boundary", "content-type")
            if boundary:
                if depth >= self.limits.max_depth:
                    self.result.limit(f"depth>{self.limits.max_depth} at {own}")
                    return self._skip_body()
                return self._multipart(path, depth, boundary.encode("utf-8", "replace"), content_type)
        if content_type in MESSAGE_TYPES and encoding in ("7bit", "8bit", "binary"):
            if depth >= self.limits.max_depth:
                self.result.limit(f"depth>{self.limits.max_depth} at {own}")
                return self._skip_body()
            return self._entity(own, depth + 1, root=True, default_type="text/plain")
        return self._leaf(own, depth, headers, content_type, encoding, empty=False)

    def _multipart(self, path: str, depth: int, boundary: bytes, content_type: str) -> _Terminator:
        level = len(self._stack)
        self._stack.append(boundary)
        child_type = "message/rfc822" if content_type == "multipart/digest" else "text/plain"
        try:
            term = self._skip_body()  # the preamble
            number = 0
            while term.level == level:
                if term.close:  # the epilogue; a lenient client reads on if our boundary comes again, so do we
                    term = self._skip_body()
                    continue
                number += 1
                self.result.parts += 1
                if self.result.parts > self.limits.max_parts:
                    if self.result.parts == self.limits.max_parts + 1:
                        self.result.limit(f"parts>{self.limits.max_parts}")
                    term = self._body(lambda _data: None, closing=level)  # the rest of this multipart at once
                    continue
                term = self._entity(_join(path, number), depth + 1, root=False, default_type=child_type)
            return term
        finally:
            del self._stack[level:]

    def _leaf(self, path: str, depth: int, headers: EmailMessage, content_type: str, encoding: str,
              empty: bool) -> _Terminator:
        names = file_names(headers)
        message = content_type in MESSAGE_TYPES
        keep: bool | None = True if message or self.keep(path, content_type, names) else None
        part = Part(path, content_type, encoding, names, depth=depth)
        body = _Body(part, keep, self.limits.max_decoded)
        decoder = _Decoder(encoding)
        term = _EOF
        if not empty:
            if encoding in ("7bit", "8bit", "binary", "quoted-printable") and content_type.startswith("text/"):
                term = self._text_body(path, depth, body, decoder)
            else:
                term = self._body(lambda data: body.feed(decoder.feed(data), len(data)) if not body.done else None)
            if not body.done:
                body.feed(decoder.flush(), 0)
            if decoder.exhausted:
                self.result.limit(f"base64 of part {path} past {BASE64_BLOCKS} padded groups, the rest not decoded")
        part = body.finish()
        if message and part.decoded is not None and not part.truncated:
            decoded = part.decoded
            part.decoded = None
            self._deliver(part)
            with decoded:
                self.nested(decoded, path, depth + 1)  # type: ignore[arg-type]
        else:
            if message and part.truncated:
                self.result.limit(f"message in part {path} over {self.limits.max_decoded} bytes")
            self._deliver(part)
        return term

    def _text_body(self, path: str, depth: int, body: _Body, decoder: _Decoder) -> _Terminator:
        """A text body, watching for uuencoded files (``begin 644 name`` ... ``end``) in it: each is a part
        of its own, ``path/uu``."""
        stops = self._patterns()
        files, read = 0, 0
        while True:
            data = self._lines.block(stops)
            if data is None:
                return _EOF
            if not data:
                item = self._lines.next()
                term = self._boundary(*item) if item is not None else _EOF
                if term is not None:
                    return term
                continue
            found = _uu_begin(data) if files <= UU_FILES and read <= UU_READ else -1
            if found >= 0:
                files += 1
                if files > UU_FILES or read > UU_READ:
                    self.result.limit(f"uuencoded files in part {path} past {UU_FILES} or {UU_READ} bytes")
                    found = -1
            if found >= 0:
                self._lines.unread(len(data) - found)
                data = data[:found]
            if data and not body.done:
                body.feed(decoder.feed(data), len(data))
            if found >= 0:
                term, used = self._uu_file(path, depth, UU_READ - read)
                read += used
                if term is not None:
                    return term

    def _uu_file(self, path: str, depth: int, allowance: int) -> tuple[_Terminator | None, int]:
        """A uuencoded file from its ``begin`` line to ``end``, line by line while it is being decoded; the
        terminator if a boundary or the end of the message came first, and the bytes read."""
        item = self._lines.next()
        if item is None:
            return _EOF, 0
        match = _UU_BEGIN.match(item[0])
        name = decode_text(match.group(1)) if match else ""
        part = Part(f"{path}/uu", "application/octet-stream", "x-uuencode", [name], embedded=True, depth=depth)
        body = _Body(part, True if self.keep(path, "", [name]) else None, self.limits.max_decoded, 4 * SNIFF)
        term: _Terminator | None = None
        while not body.done:
            if body.consumed > allowance:
                part.truncated = bool(body.keep)
                break
            item = self._lines.next()
            if item is None:
                term = _EOF
                break
            line, at_start = item
            term = self._boundary(line, at_start)
            if term is not None or (at_start and line.rstrip(b"\r\n") == b"end"):
                break
            body.feed(uu_line(line), len(line))
        self._deliver(body.finish())
        return term, body.consumed

    def _deliver(self, part: Part) -> None:
        try:
            if self.on_part(part, self):
                self.result.stopped = True
                raise _Stop
        finally:
            if part.decoded is not None:
                part.decoded.close()

    def nested(self, reader: BinaryIO, path: str, depth: int) -> bool:
        """Walk a message found inside a part (a decoded message/rfc822, an attached .eml file) with this
        walk's budget and ``on_part``; False (and a limit recorded) when ``depth`` is past the bound."""
        if depth >= self.limits.max_depth:
            self.result.limit(f"depth>{self.limits.max_depth} at {path}")
            return False
        self.run(reader, path, depth)
        return True


def _header(headers: EmailMessage, name: str) -> str:
    try:
        value = headers.get(name)
    except Exception:  # a hostile header: as if absent
        return ""
    return str(value) if value is not None else ""


def _encoding(value: str) -> str:
    """The transfer encoding's token, lower case (``"Base64" (x)`` is base64); 7bit when absent."""
    token = re.search(r"[A-Za-z0-9-]+", value)
    return token.group(0).lower() if token else "7bit"


def _content_type(headers: EmailMessage, default: str) -> str:
    if headers.get("content-type") is None:
        return default
    try:
        value = headers.get_content_type()
    except Exception:  # a hostile header: the RFC 2045 default
        return "text/plain"
    return value.lower()


def walk(reader: BinaryIO, on_part: OnPart, limits: Limits | None = None,
         keep: Callable[[str, str, list[str]], bool] | None = None) -> Walk:
    """Walk the message in ``reader`` (rewound), calling ``on_part`` for each leaf part until it returns
    True. ``keep(path, content_type, names)`` says which parts to keep decoded whole (up to the bound)
    whatever their first bytes; parts starting with archive magic and encoded messages always are."""
    walker = Walker(limits or Limits(), on_part, keep or (lambda _path, _type, _names: False))
    with contextlib.suppress(_Stop):
        walker.run(reader)
    return walker.result
