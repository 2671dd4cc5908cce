"""The commands in a reply to a quarantine digest, read as real mail clients write replies.

Pure logic: bytes in, a ``Reply`` out (the commands, where each came from, notes for the confirmation).
Nothing here verifies a token, looks up a message or checks the sender: the reply handler does that with
``tokens.Tokens.verify``, the store and the envelope. No network, no file.

**What the digest looks like** (the digest module writes it; this module reads it back)::

    ==== begin mailwarden instructions ====
    Reply to this mail. Keep the lines of the messages you want, or write one command a line above
    the quote: RELEASE ab23cd, DELETE ab23cd, WHITELIST ab23cd, BLOCK ab23cd, PREVIEW ab23cd,
    RELEASE ALL, DIGEST DAILY|WEEKLY|IMMEDIATE|OFF ...
    ==== end mailwarden instructions ====

    ==== mailwarden held 3 ====
    [ab23cd] 2026-12-01 09:14 bank@example.net "Locked" mailto:quarantine+<token>@example.org?subject=RELEASE%20ab23cd
    ...
    ==== mailwarden delivered 1 ====
    [ef34gh] 2026-12-01 10:02 news@example.com "Offer" mailto:quarantine+<token>@example.org?subject=REPORT%20ef34gh

- a *digest line* starts with a *short id* in brackets: the first 6 characters of the held message's public
  id (more when two of the owner's messages share them; 6 to 16 are read), then date, sender, subject and
  why, and ends with the ``mailto:`` link of its section's action, whose address carries the action token
  (``tokens``, 41 characters). The short id is for people to type; the token is the credential.
- a *section marker* ``==== mailwarden held N ====`` (or ``delivered N``) says what its lines are for (a
  kept line under ``held`` releases, under ``delivered`` reports) and how many lines it has.
- the *instructions* sit between ``==== begin mailwarden instructions ====`` and ``==== end ... ====``.
- the HTML part has the same markers and lines (as table rows: ``[ab23cd]`` in the first cell, one
  ``mailto:`` button a cell), so an HTML-only reply that quotes it reads the same.
- the digest's Reply-To is ``quarantine+<REPLY token>@...``: a plain "Reply" carries it back.

**Commands.** One a line, case-insensitive, nothing else on the line but targets: ``RELEASE``, ``DELETE``,
``WHITELIST``, ``BLOCK``, ``REPORT``, ``PREVIEW`` followed by one or more short ids (``ab23cd`` or
``[ab23cd]``), full public ids or action tokens (``RELEASE ab23cd <token>`` pairs them); ``RELEASE ALL``
and ``DIGEST DAILY|WEEKLY|IMMEDIATE|OFF``, optionally followed by a token. The command line therefore
carries either the short id (typed by people: the REPLY token of the address and the sender check
authorise it) or the full token (the digest's ``mailto:`` subjects: ``RELEASE ab23cd``, with the token in
the address), or both. A command with no token gets the matching token (same action, same message) found
anywhere else in the reply, when there is one.

**Where commands are read**

1. the subject, after any number of ``Re:``/``RE:``/``AW:``/``SV:``/``VS:``/``Fwd:``/``WG:``/``TR:``... prefixes;
2. the reply's own text: lines that are not quoted (``>``), not in an attribution ("On ... wrote:", "Am ...
   schrieb ...:", "Le ... a écrit :"...), not after an Outlook separator ("-----Original Message-----" and
   its German, French, Spanish, Italian, Portuguese, Dutch, Swedish, Norwegian, Danish, Finnish, Polish
   forms; a ``From:``/``Von:``/``De:``... line followed by ``Sent:``/``Gesendet:``/``Envoyé:``/``Date:``...),
   and not in a signature (from a ``-- `` line to the next quoted line);
3. the recipient address: a ``+<token>`` of an action (the digest's ``mailto:`` buttons) is a command.

**Rules** (the digest repeats them to its readers)

- Commands in the subject, the own text and the address are *explicit*; they all count.
- Kept digest lines (quoted or not) count only when there is no explicit command. A kept line whose
  section marker was cut away counts as a release.
- When the reply trims a section (keeps some of its lines, not all), the sections it keeps whole do
  nothing: left as they were, they are not a decision (trimming the held lines must not also report every
  delivered one). A section kept whole counts when the others were emptied (all the held lines deleted,
  the delivered one kept: report it). A reply with no explicit command that keeps every section whole
  does nothing at all: ``help`` is set (a plain "Reply" and "Send" is not a decision). So a digest of one
  message is released by its button or a ``RELEASE`` line, not by keeping its line.
- Nothing between the instruction markers ever counts, quoted or not; a missing end marker runs to the
  end of the text. Nothing in quoted text counts as an explicit command.
- The same command twice counts once. ``RELEASE`` with ``WHITELIST`` on one message is ``WHITELIST``,
  ``DELETE`` with ``BLOCK`` is ``BLOCK``, ``PREVIEW`` goes with anything; any other two actions on one
  message cancel each other (neither is done, a note says so), as do two different ``DIGEST`` intervals.
- A line of the subject or the own text that starts with a command word but is not a command is not
  guessed at: a note quotes it back, and the kept lines do not count either (the reply meant to command
  something; releasing what it happened to quote would be a guess).

**Hostile input.** At most ``MAX_MESSAGE`` bytes are parsed, ``MAX_PARTS`` MIME parts looked at,
``MAX_TEXT`` characters of text and ``MAX_LINES`` lines read, ``MAX_COMMANDS`` commands kept (each cut says
so in a note); NUL and other control characters are dropped; a message the ``email`` package cannot make
sense of gives what could be read, or nothing, never an exception.
"""

from __future__ import annotations

import codecs
import email
import email.message
import email.policy
import functools
import re
from dataclasses import dataclass, field, replace
from enum import StrEnum
from html.parser import HTMLParser

from quarantine.digest.tokens import MESSAGE_ACTIONS, Action, Decoded, TokenRefused, decode, find_tokens

MAX_MESSAGE = 4 << 20
"""Bytes of the reply parsed (a reply with large attachments is cut; its text comes first)."""
MAX_PARTS = 100
MAX_HEADER = 2000
"""Characters of a header field's value parsed: policy.default's header parser takes quadratic time and
memory on thousands of encoded-words (8000 in a Subject: 480 MB), and a reply needs only the Subject."""
MAX_TEXT = 128 * 1024
"""Characters of text read (the own text and the quote)."""
MAX_LINES = 5000
MAX_COMMANDS = 200
MAX_HTML = 512 * 1024
"""Characters of an HTML part rendered (its markup takes room the text would not)."""
MAX_NOTE_TEXT = 120
"""Characters of a line quoted back in a note."""
SHORT_ID_LENGTH = 6

INSTRUCTIONS_BEGIN = "==== begin mailwarden instructions ===="
INSTRUCTIONS_END = "==== end mailwarden instructions ===="


def section_marker(section: str, count: int) -> str:
    """The marker line above a digest section ("held" or "delivered") of ``count`` lines."""
    return f"==== mailwarden {section} {count} ===="


class Source(StrEnum):
    ADDRESS = "address"
    SUBJECT = "subject"
    OWN_TEXT = "own text"
    KEPT_LINE = "kept line"


class Zone(StrEnum):
    OWN = "own"
    QUOTED = "quoted"
    ATTRIBUTION = "attribution"
    SIGNATURE = "signature"
    INSTRUCTIONS = "instructions"


@dataclass(frozen=True)
class Command:
    action: Action
    target: str | None
    """Message actions: a short id (6-16 characters) or a full public id as written, lower case; else None.
    When ``token`` is set and verifies, the token's public id is the one to act on (it starts with this)."""
    token: str | None
    """A token that came with it (same action, same message), to be verified; None: none found."""
    source: Source
    text: str
    """The line (or subject, or address) it was read from, clipped, for the confirmation."""


@dataclass(frozen=True)
class Reply:
    commands: tuple[Command, ...]
    help: bool
    """Nothing to do: answer with the help text."""
    reply_token: str | None
    """The REPLY token of the recipient address, if any (not verified)."""
    subject: str
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Line:
    text: str
    """Without its quote markers."""
    depth: int
    zone: Zone


# -- the reply's text ------------------------------------------------------------------------------------


def parse_reply(raw: bytes, recipient: str | None = None, delimiter: str = "+") -> Reply:
    """The commands of a reply (its raw bytes); ``recipient`` is the envelope recipient from Postfix (its
    extension after ``delimiter``, Postfix's recipient_delimiter, may be a token)."""
    notes: list[str] = []
    if len(raw) > MAX_MESSAGE:
        raw = raw[:MAX_MESSAGE]
        notes.append(f"your reply was longer than {MAX_MESSAGE >> 20} MB: only its beginning was read")
    raw = _few_parts(raw.replace(b"\0", b""), notes)
    try:
        message = email.message_from_bytes(raw, policy=POLICY)
    except Exception:  # the parser is lenient; this is the last guard of hostile input
        message = email.message.EmailMessage()
        notes.append("your reply could not be read as a mail")
    subject = _header(message, "subject")
    text = body_text(message, notes)
    lines = split_lines(text, notes)
    return commands_of(lines, subject, recipient, notes, delimiter)


class _ClippedPolicy(email.policy.EmailPolicy):
    """policy.default, each header value clipped to MAX_HEADER characters before it is parsed."""

    def header_fetch_parse(self, name: str, value: str) -> str:
        return super().header_fetch_parse(name, value[:MAX_HEADER])


POLICY = _ClippedPolicy()


def _few_parts(raw: bytes, notes: list[str]) -> bytes:
    """The message cut before its (2 x MAX_PARTS)th line that starts with "--" (a boundary or a signature),
    so that the parser never builds thousands of parts (100,000 empty parts in 4 MB: 19 s)."""
    for count, match in enumerate(re.finditer(rb"\n--", raw)):
        if count >= 2 * MAX_PARTS:
            notes.append(f"your reply has more than {MAX_PARTS} MIME parts: the rest were not read")
            return raw[:match.start() + 1]
    return raw


def _header(message: email.message.Message, name: str) -> str:
    try:
        value = message.get(name)
        return _clean(str(value))[:1000] if value is not None else ""
    except Exception:  # policy.default raises on some malformed headers (see corpus/mime-tricky)
        return ""


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _clean(text: str) -> str:
    return _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


def body_text(message: email.message.Message, notes: list[str]) -> str:
    """The text of the reply: its first text/plain part (format=flowed joined), else a rendering of its
    first text/html part; attachments and attached messages are not read."""
    plain: email.message.Message | None = None
    html: email.message.Message | None = None
    for part in leaf_parts(message, notes):
        try:
            disposition = part.get_content_disposition()
            ctype = part.get_content_type()
        except Exception:  # policy.default raises on some malformed headers
            notes.append("a part of your reply could not be read")
            continue
        if disposition == "attachment":
            continue
        if ctype == "text/plain" and plain is None:
            plain = part
        elif ctype == "text/html" and html is None:
            html = part
    if plain is not None:
        text = decoded_text(plain)
        if str(plain.get_param("format", "", header="content-type")).lower() == "flowed":
            text = unflow(text, str(plain.get_param("delsp", "", header="content-type")).lower() == "yes")
    elif html is not None:
        text = html_to_text(decoded_text(html)[:MAX_HTML], notes)
    else:
        return ""
    if len(text) > MAX_TEXT:
        text = text[:MAX_TEXT]
        notes.append(f"only the first {MAX_TEXT // 1024} KB of your reply's text were read")
    return text


def leaf_parts(message: email.message.Message, notes: list[str]) -> list[email.message.Message]:
    """Leaf parts, depth first, at most MAX_PARTS; message/* parts (attached mails) are not entered (the
    preview of a held message walks it the same way)."""
    found: list[email.message.Message] = []
    stack = [message]
    seen = 0
    while stack:
        part = stack.pop()
        seen += 1
        if seen > MAX_PARTS:
            notes.append(f"your reply has more than {MAX_PARTS} MIME parts: the rest were not read")
            break
        payload = part.get_payload() if part.is_multipart() else None
        if isinstance(payload, list):
            if part.get_content_maintype() == "multipart":
                stack.extend(reversed([sub for sub in payload if isinstance(sub, email.message.Message)]))
            continue
        found.append(part)
    return found


_LATIN1 = {"iso8859-1", "latin-1"}


def decoded_text(part: email.message.Message) -> str:
    """The part's text: transfer encoding undone; its charset, ISO-8859-1 read as windows-1252 (as
    browsers do), undeclared or wrong charsets tried as UTF-8 then windows-1252."""
    try:
        data = part.get_payload(decode=True)
    except Exception:
        return ""
    if not isinstance(data, bytes):
        return ""
    data = data[:MAX_TEXT * 8]
    try:
        declared = part.get_content_charset()
    except Exception:
        declared = None
    candidates = ["utf-8", "windows-1252"]
    if declared:
        try:
            name = codecs.lookup(declared).name
        except LookupError:
            name = ""
        if name in _LATIN1:
            candidates = ["windows-1252"]
        elif name and name != "ascii":
            candidates = [name, *candidates]
    for charset in candidates:
        try:
            return _clean(data.decode(charset))
        except (UnicodeDecodeError, LookupError):
            continue
    return _clean(data.decode("latin-1"))


def unflow(text: str, delsp: bool = False) -> str:
    """Join format=flowed lines (RFC 3676): a line ending in a space continues on the next line of the
    same quote depth; space-stuffing removed; "-- " is never flowed."""
    out: list[str] = []
    buffer: list[str] | None = None
    depth_of = 0

    def flush() -> None:
        nonlocal buffer
        if buffer is not None:
            out.append((">" * depth_of + " " if depth_of else "") + "".join(buffer))
            buffer = None

    for line in text.split("\n"):
        depth = len(line) - len(line.lstrip(">"))
        content = line[depth:]
        if content.startswith(" "):
            content = content[1:]
        flowed = content.endswith(" ") and content != "-- "
        if flowed and delsp:
            content = content[:-1]
        if buffer is not None and depth == depth_of:
            buffer.append(content)
        else:
            flush()
            buffer, depth_of = [content], depth
        if not flowed:
            flush()
    flush()
    return "\n".join(out)


# -- HTML ------------------------------------------------------------------------------------------------

_BLOCK = {"p", "div", "li", "tr", "table", "ul", "ol", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "dd", "dt",
          "section", "article", "header", "footer", "center", "address", "form"}
_SKIP = {"script", "style", "head", "title", "template", "noscript", "object", "iframe", "svg"}


class _HtmlText(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[tuple[int, str]] = []
        self.current: list[str] = []
        self.depth = 0
        self.line_depth = 0
        self.skip = 0
        self.pre = 0
        self.href: list[str | None] = []

    def newline(self) -> None:
        text = "".join(self.current).strip()
        if text or (self.lines and self.lines[-1][1]):
            self.lines.append((self.line_depth if text else self.depth, text))
        self.current = []
        self.line_depth = self.depth

    def write(self, text: str) -> None:
        if not "".join(self.current).strip():
            self.line_depth = self.depth
        self.current.append(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            self.skip += 1
        elif tag == "br":
            self.newline()
        elif tag == "hr":
            self.newline()
            self.write("________________________________")
            self.newline()
        elif tag == "blockquote":
            self.newline()
            self.depth += 1
        elif tag in _BLOCK:
            self.newline()
            self.pre += tag == "pre"
        elif tag in ("td", "th"):
            self.write(" ")
        elif tag == "a":
            href = dict(attrs).get("href") or ""
            self.href.append(href if href.lower().startswith("mailto:") else None)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag == "blockquote":
            self.newline()
            self.depth = max(0, self.depth - 1)
        elif tag in _BLOCK:
            self.newline()
            if tag == "pre":
                self.pre = max(0, self.pre - 1)
        elif tag == "a" and self.href:
            href = self.href.pop()
            if href and not self.skip:
                self.write(f" <{href}> ")

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        if self.pre:
            for number, piece in enumerate(data.split("\n")):
                if number:
                    self.newline()
                self.write(piece)
        else:
            self.write(re.sub(r"\s+", " ", data))


_LONE_LT = re.compile(r"<(?=[^<>]*(?:<|\Z))")
"""A ``<`` that no ``>`` closes before the next ``<``: text, not a tag. Escaped before parsing, since
HTMLParser rescans from each such ``<`` to the end of its input (quadratic: 100 KB of them took 20 s)."""


def html_to_text(html: str, notes: list[str] | None = None) -> str:
    """A text rendering of an HTML reply: one line a block, table row or <br>; blockquotes as ``>``
    quotes; scripts, styles and the head dropped; ``mailto:`` links kept after their text (tokens live
    there); entities decoded. No network, no CSS."""
    parser = _HtmlText()
    try:
        parser.feed(_LONE_LT.sub("&lt;", html))
        parser.close()
    except Exception:  # HTMLParser is lenient; a guard for what it is not
        if notes is not None:
            notes.append("the HTML of your reply could not be read to its end")
    parser.newline()
    return "\n".join((("> " * depth) + re.sub(r" {2,}", " ", text)).rstrip() for depth, text in parser.lines)


# -- own text and quotes ---------------------------------------------------------------------------------

_QUOTE = re.compile(r"^[ \t]{0,3}((?:>[ \t]?)+)")
_SEPARATOR = re.compile(
    r"^\s*-{2,}\s*(original message|ursprüngliche nachricht|message d'origine|mensaje original|"
    r"messaggio originale|mensagem original|oorspronkelijk bericht|ursprungligt meddelande|"
    r"opprinnelig melding|oprindelig meddelelse|alkuperäinen viesti|wiadomość oryginalna|"
    r"forwarded message|weitergeleitete nachricht|message transféré)\s*-{2,}\s*$", re.IGNORECASE)
_HEADER_FROM = re.compile(r"^\s*\*?(from|von|de|van|från|fra|da|od|lähettäjä)\s*:\*?\s*\S", re.IGNORECASE)
_HEADER_SENT = re.compile(r"^\s*\*?(sent|gesendet|envoyé|enviado|verzonden|skickat|sendt|inviato|wysłano|"
                          r"lähetetty|date|datum|fecha|data|päivämäärä)\s*:\*?\s*\S", re.IGNORECASE)
_ATTRIBUTION = re.compile(r"\b(wrote|schrieb|a écrit|escribió|escribio|schreef|skrev|ha scritto|escreveu|"
                          r"napisał|kirjoitti)\b[^:]{0,120}:\s*$", re.IGNORECASE)
_ATTRIBUTION_START = re.compile(r"^\s*(on|am|le|el|op|den|il|em|dnia|w dniu|på|la)\s", re.IGNORECASE)
_SIGNATURE = re.compile(r"^-- ?$")
_INSTRUCTIONS = re.compile(r"^\s*=+\s*(begin|end)\s+mailwarden\s+instructions\s*=+\s*$", re.IGNORECASE)
_SECTION = re.compile(r"^\s*=+\s*mailwarden\s+(held|delivered)\s+(\d{1,6})\s*=+\s*$", re.IGNORECASE)
_DIGEST_LINE = re.compile(r"^\s*\[([a-z2-7]{6,16})\](?:\s|$)", re.IGNORECASE)


def split_lines(text: str, notes: list[str] | None = None) -> list[Line]:
    """Each line of the text with its quote depth and zone (own text, quoted, attribution, signature or
    the digest's instructions)."""
    raw = text.split("\n")
    if len(raw) > MAX_LINES:
        raw = raw[:MAX_LINES]
        if notes is not None:
            notes.append(f"only the first {MAX_LINES} lines of your reply were read")
    lines: list[Line] = []
    after_separator = in_signature = in_instructions = False
    for number, line in enumerate(raw):
        match = _QUOTE.match(line)
        depth = match.group(1).count(">") if match else 0
        content = line[match.end():] if match else line
        content = content.rstrip()
        marker = _INSTRUCTIONS.match(content)
        if marker or in_instructions:
            if marker:
                in_instructions = marker.group(1).lower() == "begin"
            zone = Zone.INSTRUCTIONS
        elif depth or after_separator:
            zone = Zone.QUOTED
            in_signature = False
        elif _SEPARATOR.match(content) or (_HEADER_FROM.match(content) and _header_block(raw, number)):
            after_separator = True
            zone = Zone.QUOTED
        elif re.fullmatch(r"\s*_{10,}\s*", content) and _header_block(raw, number + 1):
            zone = Zone.ATTRIBUTION
        elif _ATTRIBUTION.search(content) and len(content) < 300:
            zone = Zone.ATTRIBUTION
            if lines and lines[-1].zone is Zone.OWN and _ATTRIBUTION_START.match(lines[-1].text) \
                    and not _ATTRIBUTION_START.match(content):
                lines[-1] = replace(lines[-1], zone=Zone.ATTRIBUTION)  # wrapped: "On ... <a@b>\nwrote:"
        elif _SIGNATURE.match(content):
            in_signature = True
            zone = Zone.SIGNATURE
        else:
            zone = Zone.SIGNATURE if in_signature else Zone.OWN
        lines.append(Line(content.strip(), depth, zone))
    return lines


def _header_block(lines: list[str], at: int) -> bool:
    """Outlook's quoted header: a From: line at ``at`` and a Sent:/Date: line within the next three."""
    if at >= len(lines) or not _HEADER_FROM.match(lines[at]):
        return False
    return any(_HEADER_SENT.match(line) for line in lines[at + 1:at + 4])


# -- commands --------------------------------------------------------------------------------------------

_PREFIX = re.compile(r"^\s*(?:(?:re|aw|sv|vs|fw|fwd|wg|tr|rv|r|antw|ref|odp|enc|rif)\s*(?:\[\d+\]|\(\d+\))?\s*"
                     r"[:\uff1a]\s*)+", re.IGNORECASE)
_VERBS = {action.value: action for action in MESSAGE_ACTIONS}
_INTERVALS = {"DAILY": Action.DIGEST_DAILY, "WEEKLY": Action.DIGEST_WEEKLY,
              "IMMEDIATE": Action.DIGEST_IMMEDIATE, "OFF": Action.DIGEST_OFF}
_SHORT_ID = re.compile(r"[a-z2-7]{6,16}")


def strip_subject(subject: str) -> str:
    """The subject without its reply and forward prefixes (any number, any case, localised)."""
    return _PREFIX.sub("", subject).strip()


class NotACommand(ValueError):
    """A line that starts with a command word but is not a command."""


def parse_command(text: str) -> list[tuple[Action, str | None, str | None]]:
    """(action, target, token) for each command of one line; [] when the line is no command; NotACommand
    when it starts with a command word and then something this grammar does not know."""
    words = [word.strip(".,;:!") for word in text.replace(",", " ").split()]
    words = [word for word in words if word]
    if not words or words[0].upper() not in (*_VERBS, "DIGEST"):
        return []
    verb = words[0].upper()
    args = [word.strip("[]<>()\"'") for word in words[1:]]
    if verb == "DIGEST" or (verb == "RELEASE" and args and args[0].upper() == "ALL"):
        action = _INTERVALS.get(args[0].upper()) if verb == "DIGEST" and args else \
            Action.RELEASE_ALL if verb == "RELEASE" else None
        rest = args[1:]
        if action is None or len(rest) > 1:
            raise NotACommand(text)
        token = None
        if rest:
            token = _token_for(rest[0], action)
            if token is None:
                raise NotACommand(text)
        return [(action, None, token)]
    action = _VERBS[verb]
    if not args:
        raise NotACommand(text)
    found: list[tuple[Action, str | None, str | None]] = []
    for arg in args:
        token = _token_for(arg, action)
        decoded = _structure(token) if token is not None else None
        if token is not None and decoded is not None:
            public_id = decoded.public_id
            if found and found[-1][2] is None and public_id and found[-1][1] \
                    and public_id.startswith(found[-1][1]):
                found[-1] = (action, found[-1][1], token)  # "RELEASE ab23cd <token>"
            else:
                found.append((action, public_id, token))
        elif _SHORT_ID.fullmatch(arg.lower()):
            found.append((action, arg.lower(), None))
        else:
            raise NotACommand(text)
    return found


@functools.lru_cache(maxsize=4096)
def _structure(word: str) -> Decoded | None:
    """``word`` decoded as a token (structure only, not verified), else None; cached, as a reply repeats
    its tokens (a kept line's, the same one in a command)."""
    try:
        return decode(word)
    except TokenRefused:
        return None


def _token_for(word: str, action: Action | None) -> str | None:
    """``word`` as a token of ``action`` (structure only, not verified), else None."""
    decoded = _structure(word.lower())
    return word.lower() if decoded is not None and (action is None or decoded.action is action) else None


@dataclass
class _Kept:
    short_id: str
    action: Action
    section: int | None
    token: str | None
    text: str


@dataclass
class _Section:
    action: Action
    count: int
    kept: set[str] = field(default_factory=set)


def commands_of(lines: list[Line], subject: str, recipient: str | None, notes: list[str],
                delimiter: str = "+") -> Reply:
    """Apply the rules of the module docstring to the split text, the subject and the recipient."""
    explicit: list[Command] = []
    misunderstood = len(notes)
    reply_token = None
    if recipient:
        local = recipient.rsplit("@", 1)[0]
        if delimiter in local:
            extension = local.split(delimiter, 1)[1]
            decoded = _structure(extension.lower())
            if decoded is None:
                notes.append("the address you replied to carries no valid token")
            else:
                if decoded.action is Action.REPLY:
                    reply_token = extension.lower()
                else:
                    explicit.append(Command(decoded.action, decoded.public_id, extension.lower(), Source.ADDRESS,
                                            _clip(recipient)))
    stripped = strip_subject(subject)
    explicit += _line_commands(stripped, Source.SUBJECT, notes)
    for line in lines:
        if line.zone is Zone.OWN and not _DIGEST_LINE.match(line.text) and not _SECTION.match(line.text):
            explicit += _line_commands(line.text, Source.OWN_TEXT, notes)
        if len(explicit) > MAX_COMMANDS:
            break
    misunderstood = sum(note.startswith(_NOT_UNDERSTOOD) for note in notes[misunderstood:])
    kept, sections = _kept_lines(lines)
    all_tokens = list(dict.fromkeys(token for line in lines if line.zone is not Zone.INSTRUCTIONS
                                    for token in find_tokens(line.text)))
    if explicit or misunderstood:
        commands = explicit
        partly = [section for section in sections if len(section.kept) < section.count]
        if kept and (partly or not sections):
            notes.append("your reply has commands of its own (or lines that look like one), so the digest lines "
                         "you kept were not used")
    elif kept and sections and all(len(section.kept) >= section.count for section in sections):
        notes.append("you kept every line of the digest and added no command, so nothing was done")
        commands = []
    else:
        whole = {index for index, section in enumerate(sections) if len(section.kept) >= section.count}
        trimmed = any(0 < len(section.kept) < section.count for section in sections)
        used = [item for item in kept if item.section is None or not trimmed or item.section not in whole]
        if len(used) < len(kept):
            notes.append("you kept every line of a section unchanged while trimming another, so the unchanged "
                         "section's lines were not used")
        commands = [Command(item.action, item.short_id, item.token, Source.KEPT_LINE, _clip(item.text))
                    for item in used]
    if len(commands) > MAX_COMMANDS:
        notes.append(f"your reply has more than {MAX_COMMANDS} commands: the rest were ignored")
        commands = commands[:MAX_COMMANDS]
    commands = [_with_token(command, all_tokens) for command in commands]
    commands = _resolve(_merge(commands), notes)
    return Reply(commands=tuple(commands), help=not commands, reply_token=reply_token, subject=subject,
                 notes=tuple(dict.fromkeys(notes)))


_NOT_UNDERSTOOD = "not understood, so not done: "


def _line_commands(text: str, source: Source, notes: list[str]) -> list[Command]:
    try:
        parsed = parse_command(text)
    except NotACommand:
        notes.append(f"{_NOT_UNDERSTOOD}{_clip(text)!r}")
        return []
    return [Command(action, target, token, source, _clip(text)) for action, target, token in parsed]


def _kept_lines(lines: list[Line]) -> tuple[list[_Kept], list[_Section]]:
    """The kept digest lines (at most MAX_COMMANDS + 1: more are cut anyway) and the sections, with every
    short id kept in each counted."""
    kept: list[_Kept] = []
    seen: set[tuple[str, Action]] = set()
    sections: list[_Section] = []
    for number, line in enumerate(lines):
        if line.zone in (Zone.INSTRUCTIONS, Zone.SIGNATURE, Zone.ATTRIBUTION):
            continue
        marker = _SECTION.match(line.text)
        if marker:
            action = Action.RELEASE if marker.group(1).lower() == "held" else Action.REPORT
            sections.append(_Section(action, int(marker.group(2))))
            continue
        match = _DIGEST_LINE.match(line.text)
        if not match:
            continue
        short_id = match.group(1).lower()
        section = sections[-1] if sections else None
        action = section.action if section else Action.RELEASE
        if section is not None:
            section.kept.add(short_id)
        if (short_id, action) in seen or len(kept) > MAX_COMMANDS:
            continue
        seen.add((short_id, action))
        block = [line.text]
        for following in lines[number + 1:number + 3]:  # a line wrapped by the client
            if _DIGEST_LINE.match(following.text) or _SECTION.match(following.text) \
                    or following.zone is Zone.INSTRUCTIONS:
                break
            block.append(following.text)
        token = next((token for token in find_tokens(" ".join(block)) if _matches(token, action, short_id)), None)
        kept.append(_Kept(short_id, action, len(sections) - 1 if sections else None, token, line.text))
    return kept, sections


def _matches(token: str, action: Action, target: str | None) -> bool:
    decoded = _structure(token)
    if decoded is None or decoded.action is not action:
        return False
    return target is None or (decoded.public_id or "").startswith(target)


def _with_token(command: Command, tokens: list[str]) -> Command:
    if command.token is not None or (command.action.on_message and not command.target):
        return command
    token = next((token for token in tokens if _matches(token, command.action, command.target)), None)
    return replace(command, token=token) if token else command


def _same_target(one: str | None, other: str | None) -> bool:
    if one is None or other is None:
        return one is other
    return one.startswith(other) or other.startswith(one)


def _merge(commands: list[Command]) -> list[Command]:
    """The same command twice (an address token and its subject, a short id and its full id) once, with
    the longer target and a token if either had one."""
    merged: list[Command] = []
    for command in commands:
        for at, earlier in enumerate(merged):
            if earlier.action is command.action and _same_target(earlier.target, command.target):
                target = max(earlier.target or "", command.target or "", key=len) or None
                merged[at] = replace(earlier, target=target, token=earlier.token or command.token)
                break
        else:
            merged.append(command)
    return merged


_IMPLIES = {Action.WHITELIST: Action.RELEASE, Action.BLOCK: Action.DELETE}


def _resolve(commands: list[Command], notes: list[str]) -> list[Command]:
    """WHITELIST absorbs RELEASE and BLOCK absorbs DELETE on one message; other pairs cancel; so do two
    DIGEST intervals."""
    dropped: set[int] = set()
    for at, command in enumerate(commands):
        for other_at in range(at + 1, len(commands)):
            other = commands[other_at]
            if command.action.on_message and other.action.on_message:
                if not _same_target(command.target, other.target) or Action.PREVIEW in (command.action,
                                                                                         other.action):
                    continue
                if _IMPLIES.get(command.action) is other.action:
                    dropped.add(other_at)
                elif _IMPLIES.get(other.action) is command.action:
                    dropped.add(at)
                else:
                    dropped.update((at, other_at))
                    notes.append(f"{command.action} and {other.action} both asked for {command.target}: "
                                 "neither was done")
            elif command.action.value.startswith("DIGEST ") and other.action.value.startswith("DIGEST "):
                dropped.update((at, other_at))
                notes.append(f"{command.action} and {other.action} both asked: the interval was not changed")
    return [command for at, command in enumerate(commands) if at not in dropped]


def _clip(text: str) -> str:
    return text if len(text) <= MAX_NOTE_TEXT else text[:MAX_NOTE_TEXT - 3] + "..."
