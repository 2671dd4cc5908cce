"""One owner's digest as a mail: ``multipart/alternative``, a plain-text and an HTML part from Jinja2 templates
(``templates/digest.txt.j2``, ``digest.html.j2``; a site's ``[quarantine.digest] templates`` directory
overrides either), with the action tokens of every listed message.

The text part is exactly what ``reply_parse`` reads back (its docstring has the format): a section marker
(``==== mailwarden held N ====``, ``delivered N``) above N *digest lines*, each starting with ``[shortid]``
and ending with the ``mailto:`` link of its section's action (RELEASE under held, REPORT under delivered);
the instructions (the rules of reply_parse in words) and the owner's links (RELEASE ALL, DIGEST ...) between
the instruction markers, where nothing counts. The HTML part has the same markers and one table row a
message, whose cells are the short id, the message and one ``mailto:`` button each; no remote content (no
image, no font, no stylesheet link), so it looks the same offline and tells no tracker anything.

**Hostile text.** Senders, subjects and reasons (an attachment's or a virus's name) come from strangers;
``neutral`` makes each one a single unbreakable field: control characters and line breaks removed, clipped,
``[``/``]`` and ``"`` replaced (no fake ``[shortid]`` line, no early end of the quoted subject), the word
``mailwarden`` split (no section or instruction marker); in the text part its spaces are no-break
(``nobreak``), so that a client that wraps a quoted line never starts a new line inside it, and the field
starts with ``<``, ``"`` or ``(``, never with a command word. The HTML part is autoescaped.

Virus-held messages (``release.ADMIN_ONLY_KINDS``) are listed with DELETE and BLOCK only (harmless: nothing
of the message reaches the user): no release, whitelist or preview link, "ask your postmaster" instead. The
reply handler follows the same rule (``actions.USER_ACTIONS_ON_ADMIN_ONLY``).
"""

from __future__ import annotations

import datetime
import email.policy
import email.utils
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from pathlib import Path

import jinja2

from quarantine.digest.actions import USER_ACTIONS_ON_ADMIN_ONLY
from quarantine.digest.reply_parse import INSTRUCTIONS_BEGIN, INSTRUCTIONS_END, section_marker
from quarantine.digest.settings import DigestSettings
from quarantine.digest.tokens import Action, Tokens, reply_address
from quarantine.release import ADMIN_ONLY_KINDS

TEMPLATES = Path(__file__).parent / "templates"
TEXT_TEMPLATE = "digest.txt.j2"
HTML_TEMPLATE = "digest.html.j2"
SHORT_MIN, SHORT_MAX = 6, 16
"""A short id is the shortest prefix of the public id, at least SHORT_MIN characters, that no other message
of the digest shares (reply_parse reads 6 to 16)."""
FIELD_MAX = 80
"""Characters of a sender, subject or reason shown (clipped with an ellipsis)."""
HELD_ACTIONS = (Action.RELEASE, Action.DELETE, Action.WHITELIST, Action.BLOCK, Action.PREVIEW)
ADMIN_ONLY_ACTIONS = tuple(action for action in HELD_ACTIONS if action in USER_ACTIONS_ON_ADMIN_ONLY)
"""The buttons of a virus-held message: only what the reply handler lets its owner do to it."""
DELIVERED_ACTIONS = (Action.REPORT, Action.BLOCK)
OWNER_ACTIONS = (Action.RELEASE_ALL, Action.DIGEST_DAILY, Action.DIGEST_WEEKLY, Action.DIGEST_IMMEDIATE,
                 Action.DIGEST_OFF)
LABELS = {Action.RELEASE: "Release", Action.DELETE: "Delete", Action.WHITELIST: "Always allow",
          Action.BLOCK: "Block sender", Action.PREVIEW: "Preview", Action.REPORT: "Report spam",
          Action.RELEASE_ALL: "Release all", Action.DIGEST_DAILY: "Daily", Action.DIGEST_WEEKLY: "Weekly",
          Action.DIGEST_IMMEDIATE: "Immediately", Action.DIGEST_OFF: "Stop digests"}
"""The button texts of the HTML part (the mailto subjects carry the commands themselves)."""


@dataclass(frozen=True)
class Entry:
    """One message to list: a held row (state held or delivered) with its message's envelope."""

    public_id: str
    held_at: datetime.datetime
    sender: str
    header_from: str
    subject: str
    check: str
    kind: str
    reason: str


@dataclass(frozen=True)
class Section:
    """The listed entries of one section (at most max_listed) and how many there are in all."""

    entries: Sequence[Entry]
    total: int


@dataclass(frozen=True)
class Link:
    action: Action
    label: str
    url: str


@dataclass(frozen=True)
class Line:
    """One listed message as the templates show it (every text field neutralised)."""

    short_id: str
    when: str
    sender: str
    subject: str
    why: str
    admin_only: bool
    link: Link | None
    """The plain line's link: RELEASE (held) or REPORT (delivered); None for admin-only messages."""
    buttons: tuple[Link, ...]


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
_MARKER_WORD = re.compile(r"mail(?=warden)", re.IGNORECASE)


def neutral(text: str, limit: int = FIELD_MAX) -> str:
    """``text`` from a stranger as one inert field of a digest line (module docstring, "Hostile text")."""
    text = _CONTROL.sub(" ", text)
    text = " ".join(text.split())
    text = text.replace("[", "(").replace("]", ")").replace('"', "'")
    text = _MARKER_WORD.sub(lambda match: match.group(0) + "-", text)
    if len(text) > limit:
        text = text[:limit - 1].rstrip() + "…"
    return text


def nobreak(text: str) -> str:
    """Spaces made no-break (the text template's filter): a client wrapping a quoted line never breaks a
    field, so no line starts inside one."""
    return text.replace(" ", "\u00a0")


def short_ids(public_ids: Sequence[str]) -> dict[str, str]:
    """Each public id's shortest prefix (SHORT_MIN to SHORT_MAX characters) no other of ``public_ids`` shares."""
    ordered = sorted(set(public_ids))
    result: dict[str, str] = {}
    for index, public_id in enumerate(ordered):
        length = SHORT_MIN
        for other in (ordered[index - 1] if index else None, ordered[index + 1] if index + 1 < len(ordered) else None):
            if other is not None:
                common = next((at for at, (a, b) in enumerate(zip(public_id, other, strict=False)) if a != b),
                              min(len(public_id), len(other)))
                length = max(length, common + 1)
        result[public_id] = public_id[:min(length, SHORT_MAX)]
    return result


def why(entry: Entry) -> str:
    """Why it was held (or tagged), in a few words, from the row's kind and reason."""
    reason = entry.reason
    if entry.kind == "spam":
        score = re.match(r"score (-?[\d.]+)", reason)
        return f"spam score {score.group(1)}" if score else "spam"
    if entry.kind == "blacklisted":
        return "sender on your block list"
    if entry.kind in ADMIN_ONLY_KINDS:
        return f"virus: {reason}" if reason else "virus"
    if entry.kind == "heuristic":
        return f"suspicious content: {reason}" if reason else "suspicious content"
    if entry.kind == "banned":
        name = re.search(r'name="([^"]*)"', reason)
        return f"blocked attachment: {name.group(1)}" if name and name.group(1) else "blocked attachment"
    if entry.kind == "limits":
        return "could not be scanned"
    return f"{entry.kind}: {reason}" if reason else entry.kind


class Renderer:
    """Renders digests for one run: the templates loaded once, the tokens minted at ``now``."""

    def __init__(self, settings: DigestSettings, tokens: Tokens) -> None:
        self.settings = settings
        self.tokens = tokens
        loaders: list[jinja2.BaseLoader] = []
        if settings.templates is not None:
            loaders.append(jinja2.FileSystemLoader(settings.templates))
        loaders.append(jinja2.FileSystemLoader(TEMPLATES))
        self.environment = jinja2.Environment(
            loader=jinja2.ChoiceLoader(loaders), autoescape=jinja2.select_autoescape(["html.j2"]),
            undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
        self.environment.filters["nobreak"] = nobreak
        self.text_template = self.environment.get_template(TEXT_TEMPLATE)
        self.html_template = self.environment.get_template(HTML_TEMPLATE)
        local, _, self.domain = settings.reply_mailbox.rpartition("@")
        self.local = local

    def mailto(self, action: Action, owner: str, public_id: str | None, short_id: str | None,
               now: datetime.datetime) -> Link:
        token = self.tokens.mint(action, owner, public_id, now=now)
        address = reply_address(self.local, self.domain, token, self.settings.recipient_delimiter)
        subject = f"{action.value} {short_id}" if short_id else action.value
        return Link(action, LABELS[action], f"mailto:{address}?subject={urllib.parse.quote(subject)}")

    def _line(self, entry: Entry, short_id: str, owner: str, delivered: bool, now: datetime.datetime) -> Line:
        admin_only = not delivered and entry.kind in ADMIN_ONLY_KINDS
        actions = DELIVERED_ACTIONS if delivered else ADMIN_ONLY_ACTIONS if admin_only else HELD_ACTIONS
        buttons = tuple(self.mailto(action, owner, entry.public_id, short_id, now) for action in actions)
        link = None if admin_only else buttons[0]
        when = entry.held_at.astimezone(self.settings.zone).strftime("%Y-%m-%d %H:%M")
        sender = entry.sender or entry.header_from or "(no sender)"
        return Line(short_id=short_id, when=when, sender=neutral(sender), subject=neutral(entry.subject),
                    why=neutral(why(entry)), admin_only=admin_only, link=link, buttons=buttons)

    def render(self, owner: str, held: Section, delivered: Section, now: datetime.datetime) -> EmailMessage:
        """The digest of ``owner`` (a mailbox) listing ``held`` and ``delivered`` (empty: no such section)."""
        owner = owner.lower()
        ids = short_ids([entry.public_id for entry in (*held.entries, *delivered.entries)])
        held_lines = [self._line(entry, ids[entry.public_id], owner, False, now) for entry in held.entries]
        delivered_lines = [self._line(entry, ids[entry.public_id], owner, True, now)
                           for entry in delivered.entries]
        owner_links = [self.mailto(action, owner, None, None, now) for action in OWNER_ACTIONS]
        example = held_lines[0].short_id if held_lines else "ab23cd"
        context = {
            "owner": owner, "now": now.astimezone(self.settings.zone).strftime("%Y-%m-%d %H:%M"),
            "timezone": self.settings.timezone,
            "held": held_lines, "held_total": held.total, "held_more": held.total - len(held_lines),
            "held_marker": section_marker("held", len(held_lines)),
            "delivered": delivered_lines, "delivered_total": delivered.total,
            "delivered_more": delivered.total - len(delivered_lines),
            "delivered_marker": section_marker("delivered", len(delivered_lines)),
            "instructions_begin": INSTRUCTIONS_BEGIN, "instructions_end": INSTRUCTIONS_END,
            "release_all": owner_links[0], "intervals": owner_links[1:], "example": example,
            "from_name": self.settings.from_name, "reply_mailbox": self.settings.reply_mailbox,
            "lifetime": lifetime_text(self.settings.token_lifetime),
        }
        message = EmailMessage(policy=email.policy.SMTP)
        message["From"] = Address(self.settings.from_name, addr_spec=self.settings.from_address)
        message["To"] = owner
        message["Subject"] = subject_of(held.total, delivered.total)
        message["Date"] = email.utils.format_datetime(now.astimezone(datetime.UTC))
        message["Message-ID"] = email.utils.make_msgid("digest", self.settings.from_address.rpartition("@")[2])
        message["Reply-To"] = reply_address(self.local, self.domain, self.tokens.mint(Action.REPLY, owner, now=now),
                                            self.settings.recipient_delimiter)
        message["Auto-Submitted"] = "auto-generated"
        message["X-Auto-Response-Suppress"] = "All"
        message.set_content(self.text_template.render(context), subtype="plain", charset="utf-8",
                            cte="quoted-printable")
        message.add_alternative(self.html_template.render(context), subtype="html", charset="utf-8",
                                cte="quoted-printable")
        return message


def lifetime_text(seconds: float) -> str:
    """``14 days``, ``1 day``, ``12 hours``: how long a digest's links work, for its readers."""
    days, hours = int(seconds // 86400), int(seconds // 3600)
    if days >= 1 and seconds % 86400 == 0:
        return f"{days} day{'s' if days != 1 else ''}"
    return f"{hours} hour{'s' if hours != 1 else ''}"


def subject_of(held: int, delivered: int) -> str:
    """The digest's subject: counts only (a subject never starts with a command word)."""
    parts = [f"{held} message{'s' if held != 1 else ''} held"] if held else []
    if delivered:
        parts.append(f"{delivered} delivered as suspected spam")
    return "Quarantine digest: " + ", ".join(parts or ["nothing new"])
