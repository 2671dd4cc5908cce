"""Banned attachments: refuse or hold a message carrying a file type a site does not take by mail
(executables, scripts, shortcuts, disk images), however it is named, encoded or wrapped.

The whole MIME tree is walked in bounded memory (milters/mime_walk.py): nested messages, encoded
messages and zip archives (member names only, nested zips to a bound; milters/archives.py) included.
Every leaf part is judged on

- its file names (Content-Disposition ``filename``, Content-Type ``name``, a uuencode ``begin`` line,
  archive member names), RFC 2231 and RFC 2047 decoded, normalised (bidi and zero-width characters
  removed, NFKC, case folded, trailing dots and spaces dropped as Windows drops them, a NUL cutting the
  name as C code cuts it): ``bidi-override`` (a right-to-left or other override character in the name
  at all: ``report<RLO>exe.pdf`` shows as ``reportfdp.exe``), ``double-extension:pdf.exe`` (a
  document-like extension before a banned one), ``extension:exe``;
- its declared type: ``type:application/x-msdownload``;
- its first bytes: ``detected:executable`` (a PE image, whatever its name), ``detected:elf`` ...;
- ``encrypted-archive`` (off by default; a site may ban password-protected zips, which nothing scans).

The first finding decides: ``fate`` (reject or quarantine), with a reason naming the part, the name as
decoded and the rule (``part 2/invoice.zip:payload.exe name="payload.exe" rule=extension:exe``); the
client gets the generic content reply, never the rule.

What the bounds leave uninspected (parts past ``max_parts``, nesting past ``max_depth``, an archive
larger than ``max_archive_size``, damaged, or past the member budget) is a fate of its own,
``on_limits``: accept by default, with the reason logged; a site that would rather hold such mail says
``on_limits = "quarantine"``. An error inside the walk is treated the same way (and logged with its
traceback): a verdict always comes back.

Rules files (rules/banned.toml is the shipped set and documents the format) are read in order and
merged: every list adds, every ``allow_*`` list takes away, the last file that sets a switch wins. A
site adds its own file after the shipped one, or replaces the set by listing only its own files (or by a
copy at /etc/mailwarden/rules/banned.toml, which is found before the shipped one). A changed file is
re-read within ``check_interval``; a broken one keeps the rules in use, with a log line.
"""

from __future__ import annotations

import logging
import re
import struct
import threading
import time
import tomllib
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated, Literal

from pydantic import AfterValidator, Field, ValidationError

from mailwarden.config import ConfigError, format_errors
from mailwarden.filewatch import FileWatch
from mailwarden.logs import get_logger, log_kv
from mailwarden.rules_files import shipped_rules_file
from mailwarden.section import Section
from mailwarden.units import Duration, Size
from milters.archives import Member, extract, list_zip
from milters.check import Message
from milters.mime_walk import ARCHIVE_MAGIC, Limits, Part, Walker, walk
from milters.verdict import REJECT_CONTENT, Fate, Verdict


class BannedSettings(Section):
    """The ``[milters.banned]`` section."""

    files: list[Path] = Field(default_factory=lambda: [shipped_rules_file("banned.toml")])
    """Rules files, merged in order (lists add, ``allow_*`` lists take away); default the shipped set."""
    check_interval: Duration = 5
    """How often, at most, the files are checked for changes (on the next message after that)."""
    fate: Literal["reject", "quarantine"] = "reject"
    """What a banned attachment costs the message."""
    on_limits: Literal["accept", "quarantine", "reject"] = "accept"
    """What a message gets when a bound below left part of it uninspected and nothing banned was found in
    the rest (the reason lists what was skipped)."""
    max_parts: Annotated[int, Field(ge=1)] = 1000
    """MIME parts inspected per message (nested messages' parts included)."""
    max_depth: Annotated[int, Field(ge=1, le=200)] = 20
    """Nesting of multiparts and messages inside messages followed."""
    max_archive_size: Size = 25 << 20
    """Decoded bytes of one part (or of an archive inside an archive) kept to list an archive's members or
    to walk an encoded message; larger ones are not listed."""
    max_archive_members: Annotated[int, Field(ge=1)] = 1000
    """Archive member names looked at per message, all archives together."""
    max_archives: Annotated[int, Field(ge=1)] = 20
    """Archives opened per message, nested ones included."""
    max_archive_depth: Annotated[int, Field(ge=0, le=10)] = 2
    """Archives inside archives opened (0: none; members' names of the outer archive are still read)."""


log = get_logger("milters.banned")

DETECTED_TYPES = ("executable", "elf", "mach-o", "shortcut", "iso", "cab", "ole", "zip", "rar", "7z")
DetectedType = Literal["executable", "elf", "mach-o", "shortcut", "iso", "cab", "ole", "zip", "rar", "7z"]


def _extension(value: str) -> str:
    value = value.strip().lstrip(".").casefold()
    if not re.fullmatch(r"[a-z0-9_$~+-]{1,32}", value):
        raise ValueError(f"{value!r} is not a file extension (letters, digits, _$~+-)")
    return value


def _mime_type(value: str) -> str:
    value = value.strip().lower()
    if not re.fullmatch(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*", value):
        raise ValueError(f"{value!r} is not a MIME type (type/subtype)")
    return value


Extension = Annotated[str, AfterValidator(_extension)]
MimeType = Annotated[str, AfterValidator(_mime_type)]


class BannedRulesFile(Section):
    """One rules file (rules/banned.toml documents every key)."""

    extensions: list[Extension] = []
    allow_extensions: list[Extension] = []
    documents: list[Extension] = []
    allow_documents: list[Extension] = []
    declared_types: list[MimeType] = []
    allow_declared_types: list[MimeType] = []
    detected_types: list[DetectedType] = []
    allow_detected_types: list[DetectedType] = []
    bidi_override: bool | None = None
    encrypted_archives: bool | None = None


@dataclass(frozen=True)
class Rules:
    extensions: frozenset[str] = frozenset()
    documents: frozenset[str] = frozenset()
    declared_types: frozenset[str] = frozenset()
    detected_types: frozenset[str] = frozenset()
    bidi_override: bool = True
    encrypted_archives: bool = False

    @classmethod
    def merge(cls, files: Iterable[BannedRulesFile]) -> Rules:
        add: dict[str, set[str]] = {"extensions": set(), "documents": set(), "declared_types": set(),
                                    "detected_types": set()}
        remove: dict[str, set[str]] = {key: set() for key in add}
        bidi, encrypted = True, False
        for rules in files:
            for key in add:
                add[key] |= set(getattr(rules, key))
                remove[key] |= set(getattr(rules, f"allow_{key}"))
            bidi = rules.bidi_override if rules.bidi_override is not None else bidi
            encrypted = rules.encrypted_archives if rules.encrypted_archives is not None else encrypted
        final = {key: frozenset(add[key] - remove[key]) for key in add}
        return cls(final["extensions"], final["documents"], final["declared_types"], final["detected_types"],
                   bidi, encrypted)


def load_rules_file(path: Path) -> BannedRulesFile:
    """Read and validate one rules file; raises ConfigError naming the file and the key."""
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return BannedRulesFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(str(path), exc, BannedRulesFile)) from None


# -- file names -------------------------------------------------------------------------------------

BIDI_OVERRIDES = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
"""Embeddings, overrides and isolates: characters that reorder what follows them on screen."""


def normalise_name(name: str) -> str:
    """The name as a file system would store it and a user would read its extension: the last path
    component, format (bidi, zero-width, soft hyphen, BOM) and control characters removed, NFKC
    (fullwidth ``\\uff0e\\uff45\\uff58\\uff45`` is ``.exe``), trailing dots and spaces dropped, case folded."""
    base = re.split(r"[/\\]", name)[-1]
    cleaned = "".join(ch for ch in base if unicodedata.category(ch) not in ("Cf", "Cc"))
    return unicodedata.normalize("NFKC", cleaned).rstrip(". ").casefold()


def name_rule(rules: Rules, name: str) -> str | None:
    """The rule a file name breaks, or None."""
    if rules.bidi_override and any(ch in BIDI_OVERRIDES for ch in name):
        return "bidi-override"
    candidates = [name]
    if "\x00" in name:  # C code, and so some unpackers and clients, end the name at the NUL
        candidates.append(name.partition("\x00")[0])
    for candidate in candidates:
        pieces = [piece.strip() for piece in normalise_name(candidate).split(".")]
        if len(pieces) < 2 or pieces[-1] not in rules.extensions:
            continue
        if len(pieces) >= 3 and pieces[-2] in rules.documents:
            return f"double-extension:{pieces[-2]}.{pieces[-1]}"
        return f"extension:{pieces[-1]}"
    return None


# -- content ----------------------------------------------------------------------------------------

_LNK = b"L\x00\x00\x00\x01\x14\x02\x00\x00\x00\x00\x00\xc0\x00\x00\x00\x00\x00\x00F"
_MACHO = (b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe", b"\xcf\xfa\xed\xfe")
_DOS_STUBS = (b"This program cannot be run in DOS mode", b"This program must be run under Win32")


def _portable_executable(head: bytes) -> bool:
    if len(head) < 64 or not head.startswith(b"MZ"):
        return False
    (offset,) = struct.unpack_from("<L", head, 0x3C)
    if offset >= 64 and offset + 4 <= len(head):
        return head[offset:offset + 4] == b"PE\x00\x00"
    return any(stub in head[:1024] for stub in _DOS_STUBS)


def detect(head: bytes) -> str | None:
    """The kind of file its first bytes say it is (see DETECTED_TYPES), or None."""
    if _portable_executable(head):
        return "executable"
    if head.startswith(b"\x7fELF"):
        return "elf"
    if head[:4] in _MACHO:
        return "mach-o"
    if head.startswith(_LNK):
        return "shortcut"
    if head[0x8001:0x8006] == b"CD001":
        return "iso"
    if head.startswith(b"MSCF\x00\x00\x00\x00"):
        return "cab"
    if head.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"):
        return "ole"
    if head.startswith(ARCHIVE_MAGIC):
        return "zip"
    if head.startswith(b"Rar!\x1a\x07"):
        return "rar"
    if head.startswith(b"7z\xbc\xaf\x27\x1c"):
        return "7z"
    return None


ZIP_TYPES = frozenset({"application/zip", "application/x-zip-compressed", "application/x-zip"})
ZIP_EXTENSIONS = frozenset({"zip"})
"""Parts so declared or named are kept for listing even when junk in front hides the zip magic (mail
clients and Windows open such archives: they read from the end)."""


def _is_zip_name(name: str) -> bool:
    return normalise_name(name).rpartition(".")[2] in ZIP_EXTENSIONS


def _is_message_name(name: str) -> bool:
    return normalise_name(name).rpartition(".")[2] == "eml"


def shown(name: str, limit: int = 120) -> str:
    """A file name safe for a log line: control, format and unassigned characters escaped, quotes
    escaped, cut at ``limit`` characters."""
    out = []
    for ch in name[:limit]:
        if ch in '"\\':
            out.append("\\" + ch)
        elif unicodedata.category(ch)[0] == "C":
            out.append(f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    return "".join(out) + ("..." if len(name) > limit else "")


# -- the check --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    location: str
    """The MIME part path, and the archive chain for a member: ``2``, ``1.2``, ``2/a.zip:payload.exe``."""
    name: str
    rule: str

    def reason(self) -> str:
        return f'part {self.location} name="{shown(self.name)}" rule={self.rule}'


@dataclass
class _Scan:
    """One message's inspection: the rules it started with, its budgets, and what it found."""

    rules: Rules
    settings: BannedSettings
    finding: Finding | None = None
    limits: list[str] = field(default_factory=list)
    members_left: int = 0
    archives_left: int = 0

    def __post_init__(self) -> None:
        self.members_left = self.settings.max_archive_members
        self.archives_left = self.settings.max_archives

    def limit(self, what: str) -> None:
        if len(self.limits) < 10:
            self.limits.append(what)

    def keep(self, _path: str, content_type: str, names: list[str]) -> bool:
        return content_type in ZIP_TYPES or any(_is_zip_name(name) or _is_message_name(name) for name in names)

    def found(self, location: str, name: str, rule: str) -> bool:
        self.finding = Finding(location, name, rule)
        return True

    def on_part(self, part: Part, walker: Walker) -> bool:
        rules = self.rules
        for name in part.names:
            rule = name_rule(rules, name)
            if rule:
                return self.found(part.path, name, rule)
        first = part.names[0] if part.names else ""
        if part.content_type in rules.declared_types:
            return self.found(part.path, first, f"type:{part.content_type}")
        kind = detect(part.head)
        if kind in rules.detected_types:
            return self.found(part.path, first, f"detected:{kind}")
        if part.decoded is None:
            return False
        where = f"{part.path}/{first}" if first else part.path
        if part.truncated:
            self.limit(f"archive {where} over {self.settings.max_archive_size} bytes, not listed")
            return False
        if kind != "zip" and any(_is_message_name(name) for name in part.names):
            # an attached .eml that is not declared message/rfc822: mail clients open it as a message
            walker.nested(part.decoded, part.path, part.depth + 1)  # type: ignore[arg-type]
            return False  # a finding inside has stopped the walk already
        return self.archive(part.decoded, part.size, where, 0)

    def archive(self, data: IO[bytes], size: int, where: str, depth: int) -> bool:
        """Judge the members of the zip archive in ``data``; True on a finding."""
        if self.archives_left <= 0:
            self.limit(f"archive {where} not opened: more than {self.settings.max_archives} archives")
            return False
        self.archives_left -= 1
        listing = list_zip(data, size, self.members_left)
        self.members_left -= len(listing.members)
        if not listing.complete:
            self.limit(f"archive {where}: {listing.problem}")
        nested: list[Member] = []
        for member in listing.members:
            location = f"{where}:{member.name}"
            rule = name_rule(self.rules, member.name)
            if rule:
                return self.found(location, member.name, rule)
            if member.encrypted and self.rules.encrypted_archives:
                return self.found(location, member.name, "encrypted-archive")
            if _is_zip_name(member.name):
                nested.append(member)
        for member in nested:
            location = f"{where}:{member.name}"
            if depth >= self.settings.max_archive_depth:
                self.limit(f"archive {location} not opened: nested deeper than {self.settings.max_archive_depth}")
                continue
            inner, truncated = extract(data, member, self.settings.max_archive_size)
            if inner is None:
                self.limit(f"archive {location} unreadable (encrypted, damaged or an unsupported method)")
                continue
            with inner:
                if truncated:
                    self.limit(f"archive {location} over {self.settings.max_archive_size} bytes, not listed")
                    continue
                kind = detect(inner.read(64 << 10))
                if kind in self.rules.detected_types:
                    return self.found(location, member.name, f"detected:{kind}")
                if self.archive(inner, inner.seek(0, 2), location, depth + 1):
                    return True
        return False


class BannedCheck:
    """The banned-attachments check (``MessageCheck``); safe to share between libmilter's threads."""

    name = "banned"
    owned_headers: tuple[str, ...] = ()

    def __init__(self, settings: BannedSettings, now: Callable[[], float] = time.monotonic) -> None:
        """Reads the rules files: a broken one at start-up raises ConfigError (the service does not start
        on rules it cannot read)."""
        self.settings = settings
        self.limits = Limits(max_parts=settings.max_parts, max_depth=settings.max_depth,
                             max_decoded=settings.max_archive_size)
        self._now = now
        self._watch = FileWatch(settings.files)
        self.rules: Rules = self._watch.read(self._load)
        self._checked = now()
        self._reloading = threading.Lock()

    def _load(self) -> Rules:
        rules = Rules.merge(load_rules_file(path) for path in self.settings.files)
        log_kv(log, logging.INFO, "banned-attachment rules loaded", files=",".join(map(str, self.settings.files)),
               extensions=len(rules.extensions), declared_types=len(rules.declared_types),
               detected_types=len(rules.detected_types))
        return rules

    def reload(self) -> None:
        """SIGHUP, or a changed file: a broken file keeps the rules in use, and the log says where."""
        rules = self._watch.reread(self._load, ConfigError, log,
                                   "banned-attachment rules not reloaded; keeping the rules in use")
        if rules is not None:
            self.rules = rules

    def poll(self) -> None:
        """Re-read the files if ``check_interval`` has passed and one changed; one thread at a time, the
        others go on with the rules in use."""
        now = self._now()
        if now - self._checked < self.settings.check_interval or not self._reloading.acquire(blocking=False):
            return
        try:
            self._checked = now
            if self._watch.changed():
                self.reload()
        finally:
            self._reloading.release()

    def check(self, message: Message) -> Verdict:
        self.poll()
        scan = _Scan(self.rules, self.settings)
        try:
            walked = walk(message.spool.reader(), scan.on_part, self.limits, keep=scan.keep)
            skipped = walked.limits + scan.limits
        except Exception as exc:  # a bug meeting hostile input must cost this message, not the milter
            log.exception("banned-attachment inspection failed", extra={"kv": {"queue_id": message.queue_id}})
            skipped = [f"inspection failed ({type(exc).__name__})"]
        if scan.finding is not None:
            return Verdict(Fate(self.settings.fate), self.name, scan.finding.reason(), kind="banned",
                           reply=REJECT_CONTENT)
        if not skipped:
            return Verdict(Fate.ACCEPT, self.name, "no banned attachment")
        more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        reason = f"no banned attachment in what was inspected; not inspected: {'; '.join(skipped[:3])}{more}"
        fate = Fate(self.settings.on_limits)
        return Verdict(fate, self.name, reason, kind="unscanned", reply=REJECT_CONTENT if fate is Fate.REJECT else None)

    def close(self) -> None:
        """Nothing to release: no connections, no threads."""
