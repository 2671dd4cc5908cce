"""``PREVIEW``: a held message as sanitised plain text, safe to put in a confirmation mail.

Pure logic: raw bytes in, text out. What the user sees:

- the headers of interest (From, Reply-To, To, Cc, Date, Subject), decoded, control characters dropped;
- the text of the first text/plain part, else a text rendering of the first text/html part (no markup, no
  images, no remote content: ``reply_parse.html_to_text``);
- every link defanged so that no client makes it live again: ``http`` -> ``hxxp``, ``://`` kept,
  dots of host names as ``[.]`` (``hxxps://bank[.]example[.]net/login``), ``mailto:`` -> ``mailto[:]``,
  bare ``www.`` names too;
- the attachments, each by its (sanitised) file name, type and decoded size: never their content.

Bounded on hostile input: at most ``MAX_MESSAGE`` bytes parsed, ``MAX_PARTS`` parts looked at,
``MAX_TEXT`` characters and ``MAX_LINES`` lines of text shown, ``MAX_ATTACHMENTS`` attachments listed;
a message the ``email`` package cannot read gives what could be read, never an exception.
"""

from __future__ import annotations

import email
import email.message
import re
from dataclasses import dataclass

from quarantine.digest.reply_parse import MAX_PARTS, POLICY, decoded_text, html_to_text, leaf_parts

MAX_MESSAGE = 2 << 20
MAX_TEXT = 4000
MAX_LINES = 80
MAX_LINE = 200
MAX_ATTACHMENTS = 20
MAX_HEADER = 300
HEADERS = ("From", "Reply-To", "To", "Cc", "Date", "Subject")

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
_SCHEME = re.compile(r"\b(h)(tt)(ps?)(:)", re.IGNORECASE)
_OTHER_SCHEME = re.compile(r"\b(ftp|file|javascript|data|mailto|tel|sms|callto|news|ssh|smb)(:)", re.IGNORECASE)
_HOST = re.compile(r"\b((?:[a-z0-9-]{1,63}\.)+[a-z]{2,63})\b", re.IGNORECASE)


@dataclass(frozen=True)
class Attachment:
    name: str
    content_type: str
    size: int


@dataclass(frozen=True)
class Preview:
    headers: tuple[tuple[str, str], ...]
    text: str
    attachments: tuple[Attachment, ...]
    notes: tuple[str, ...] = ()

    def render(self) -> str:
        """The preview as lines of plain text."""
        lines = [f"{name}: {value}" for name, value in self.headers]
        lines += ["", self.text.rstrip() or "(no text)"]
        if self.attachments:
            lines += ["", "Attachments (not included):"]
            lines += [f"- {item.name} ({item.content_type}, {_size(item.size)})" for item in self.attachments]
        if self.notes:
            lines += ["", *(f"({note})" for note in self.notes)]
        return "\n".join(lines)


def _size(size: int) -> str:
    if size < 1024:
        return f"{size} bytes"
    if size < 1 << 20:
        return f"{size / 1024:.0f} KB"
    return f"{size / (1 << 20):.1f} MB"


def clean(text: str, limit: int = MAX_LINE) -> str:
    """One line of text: control and direction-changing characters dropped, whitespace folded, clipped."""
    text = re.sub(r"\s+", " ", _CONTROL.sub("", text)).strip()
    return text if len(text) <= limit else text[:limit - 3] + "..."


def defang(text: str) -> str:
    """Every link and host name in ``text`` made inert (``hxxps://bank[.]example``, ``mailto[:]``)."""
    text = _SCHEME.sub(lambda m: f"{m.group(1)}xx{m.group(3)}{m.group(4)}", text)
    text = _OTHER_SCHEME.sub(lambda m: f"{m.group(1)}[:]", text)
    return _HOST.sub(lambda m: m.group(1).replace(".", "[.]"), text)


def preview(raw: bytes) -> Preview:
    """The sanitised preview of a message (its raw bytes)."""
    notes: list[str] = []
    if len(raw) > MAX_MESSAGE:
        raw = raw[:MAX_MESSAGE]
        notes.append("the message is large: only its beginning was read")
    try:
        message = email.message_from_bytes(raw.replace(b"\0", b""), policy=POLICY)
    except Exception:  # the parser is lenient; the last guard of hostile input
        return Preview((), "", (), ("the message could not be read",))
    headers = []
    for name in HEADERS:
        try:
            value = message.get(name)
        except Exception:  # policy.default raises on some malformed headers
            value = None
        if value is not None:
            headers.append((name, defang(clean(str(value), MAX_HEADER))))
    plain: email.message.Message | None = None
    html: email.message.Message | None = None
    attachments: list[Attachment] = []
    walked: list[str] = []
    for part in leaf_parts(message, walked):
        try:
            ctype = part.get_content_type()
            disposition = part.get_content_disposition()
            filename = part.get_filename()
        except Exception:
            notes.append("a part could not be read")
            continue
        if filename or disposition == "attachment" or not ctype.startswith("text/"):
            if len(attachments) < MAX_ATTACHMENTS:
                attachments.append(Attachment(defang(clean(str(filename or "(no name)"), 100)), clean(ctype, 100),
                                              _decoded_size(part)))
            elif len(attachments) == MAX_ATTACHMENTS:
                notes.append(f"more than {MAX_ATTACHMENTS} attachments: the rest are not listed")
            continue
        if ctype == "text/plain" and plain is None:
            plain = part
        elif ctype == "text/html" and html is None:
            html = part
    if walked:
        notes.append(f"more than {MAX_PARTS} parts: the rest were not read")
    if plain is not None:
        text = decoded_text(plain)
    elif html is not None:
        text = html_to_text(decoded_text(html)[:MAX_TEXT * 20])
    else:
        text = ""
    return Preview(tuple(headers), _bounded(defang(text), notes), tuple(attachments), tuple(dict.fromkeys(notes)))


def _payload(part: email.message.Message) -> bytes:
    try:
        data = part.get_payload(decode=True)
    except Exception:
        return b""
    return data if isinstance(data, bytes) else b""


def _decoded_size(part: email.message.Message) -> int:
    return len(_payload(part))


def _bounded(text: str, notes: list[str]) -> str:
    lines = [clean(line, MAX_LINE) for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    out: list[str] = []
    size = 0
    for line in lines:
        if not line and out and not out[-1]:
            continue  # runs of empty lines as one
        if len(out) >= MAX_LINES or size + len(line) > MAX_TEXT:
            notes.append("the text is longer: only its beginning is shown")
            break
        out.append(line)
        size += len(line) + 1
    return "\n".join(out).strip()
