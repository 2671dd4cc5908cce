"""The reply handler: a reply to a digest in, its commands carried out for its owner only, one confirmation out.

``ReplyHandler.handle(raw, envelope)`` decides, in this order:

1. **Loops.** A null envelope sender, ``Auto-Submitted`` other than ``no``, or ``Precedence: bulk|junk|list``:
   ignored with a log line, nothing answered (an auto-reply to our own confirmation must not start a loop).
2. **Whose reply.** The owner is the mailbox the *envelope* sender resolves to through the recipient sources
   (``[policyd.recipients]``: the address itself, or an alias of exactly one mailbox); with no sources
   configured, the address itself. The header From and its display name are never believed. A sender no
   source knows (an outside address) is refused: ``not-an-owner``.
3. **Authenticated.** With ``require_authentication`` (the default) the reply must come through
   authenticated submission as that owner (the SASL login is the owner, ``login@login_domain``, or a login
   the recipient sources resolve to the owner) or from ``trusted_networks``; else ``forged-sender`` (logged in
   as someone else) or ``not-authenticated`` (no login, untrusted client). Refused here, nothing is sent to
   anyone: no backscatter to a forged sender.
4. **Tokens and ids.** The address's REPLY token and each command's token are verified for that owner and
   action (``tokens.Tokens.verify``): a token of another mailbox (``wrong-owner``), tampered (``bad-mac``),
   ``expired``, of a retired key (``key-retired``) ... refuses that command. A token's message must start with
   the short id written beside it (``id-mismatch``). A short id without a token of its own needs a valid
   REPLY token and is looked up among the owner's own rows only; an id of someone else's message is
   ``foreign-id``. Of a message held because of a virus the owner may only DELETE it or BLOCK its sender
   (harmless); RELEASE, WHITELIST and PREVIEW of it are for admins only (``admin-only``).
5. **Actions** (``actions.py``), each at most once through the store's state transitions: a replayed reply
   says "already done" and is not a security event.
6. **One confirmation** to the owner (never to the envelope sender as such, never when step 2 or 3 refused):
   what was done, what was refused and why in plain words, the preview's text; the help text when the reply
   asked nothing.

Every refusal of steps 2 to 4 is a security event (``subscribers.record_event``: a log line on
``mailwarden.quarantine.digest.security`` and a ``digest_event`` row, which ``digest events`` lists).
``Unavailable`` (the store, the recipient sources or the listener): the caller tempfails, Postfix retries.
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import ipaddress
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import sqlalchemy as sa

from mailwarden.backend import BackendError
from mailwarden.directory import Directory, DirectorySettings, Status, lookup_key
from mailwarden.logs import get_logger, log_kv
from quarantine.digest.actions import USER_ACTIONS_ON_ADMIN_ONLY, Actions, Outcome, Teach, Unavailable, describe
from quarantine.digest.outbox import Outbox, OutboxError
from quarantine.digest.preview import clean
from quarantine.digest.reply_parse import Command, Reply, parse_reply, strip_subject
from quarantine.digest.settings import DigestSettings
from quarantine.digest.subscribers import SecurityEvent, record_event
from quarantine.digest.tokens import Action, Reason, TokenRefused, Tokens
from quarantine.models import Held
from quarantine.preferences import SpamPreferences
from quarantine.release import ADMIN_ONLY_KINDS
from quarantine.store import HeldRecord, QuarantineStore, StoreError

log = get_logger("quarantine.digest.reply")

TEMPLATES = Path(__file__).parent / "templates"
MAX_HEAD = 64 * 1024
"""Bytes of the reply read for the loop guard's headers."""
MAX_MATCHES = 20
"""Rows of the owner a short id is compared with (more than one: "write more of the id")."""


class Refusal(StrEnum):
    """Why a reply or a command was refused: the security events' reasons (a token's own ``Reason`` too)."""

    NOT_AN_OWNER = "not-an-owner"
    NOT_AUTHENTICATED = "not-authenticated"
    FORGED_SENDER = "forged-sender"
    FOREIGN_ID = "foreign-id"
    ID_MISMATCH = "id-mismatch"
    ADMIN_ONLY = "admin-only"


PLAIN_WORDS: dict[str, str] = {
    Reason.WRONG_OWNER: "the link or code in it was made for another mailbox's digest",
    Reason.BAD_MAC: "the code in it was changed or damaged",
    Reason.MALFORMED: "the code in it was changed or damaged",
    Reason.UNKNOWN_KEY: "the code in it was changed or damaged",
    Reason.EXPIRED: "the link has expired: use your newest digest",
    Reason.KEY_RETIRED: "the link is too old: use your newest digest",
    Reason.WRONG_ACTION: "the link was made for another action",
    Refusal.FOREIGN_ID: "there is no such message in your quarantine",
    Refusal.ID_MISMATCH: "the id and the link beside it do not belong together",
    Refusal.ADMIN_ONLY: "it was held because it carries a virus: only the mail administrators can deliver or "
                        "show it (you may delete it or block its sender)",
}


def plain_words(reason: str) -> str:
    return PLAIN_WORDS.get(reason, "it could not be verified")


class Decision(StrEnum):
    IGNORED = "ignored"
    """Not a reply to act on (a loop guard, or digests not configured): nothing done, nothing sent."""
    REFUSED = "refused"
    """Not from an authenticated owner: nothing done, nothing sent, a security event."""
    ANSWERED = "answered"
    """From its owner: the commands were tried and one confirmation went to the owner."""


@dataclass(frozen=True)
class Envelope:
    """What Postfix's pipe passes: ``${sender}``, ``${recipient}``, ``${sasl_username}``, ``${client_address}``."""

    sender: str
    recipient: str
    sasl_user: str = ""
    client_address: str = ""


@dataclass
class Result:
    decision: Decision
    owner: str = ""
    done: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    """The reasons of the security events recorded."""
    queue_id: str = ""
    """The confirmation's queue id."""
    reason: str = ""
    """Why, in one word: the first security event's reason, the loop guard's, or ``done``/``nothing done``."""


class Owners(Protocol):
    def mailbox_of(self, address: str) -> str | None:
        """The one mailbox ``address`` delivers to; None when no source knows it (or it is a list, or
        disabled). Raises Unavailable when a source cannot answer."""


class DirectoryOwners:
    """``Owners`` through the recipient sources; the address itself when none is configured."""

    def __init__(self, settings: DirectorySettings) -> None:
        self.settings = settings
        self.directory = Directory(settings) if settings.missing() is None else None

    def mailbox_of(self, address: str) -> str | None:
        key = lookup_key(address, self.settings.recipient_delimiter)
        if key is None:
            return None
        if self.directory is None:
            return key
        try:
            found = self.directory.find(key)
        except BackendError as exc:
            raise Unavailable(f"the recipient sources cannot answer: {exc}") from None
        if found.status is not Status.FOUND or len(found.mailboxes) != 1:
            return None
        return found.mailboxes[0].lower()

    def close(self) -> None:
        if self.directory is not None:
            self.directory.close()


# -- pure rules ------------------------------------------------------------------------------------------


def loop_reason(head: bytes, sender: str) -> str | None:
    """Why a message must not be answered (null sender, Auto-Submitted, bulk Precedence); None: it may."""
    if not sender.strip() or sender.strip() in ("<>", "MAILER-DAEMON"):
        return "null sender"
    headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head[:MAX_HEAD])
    auto = str(headers.get("Auto-Submitted", "") or "").strip().lower()
    if auto and auto.split(";")[0].strip() != "no":
        return f"Auto-Submitted: {clean(auto, 40)}"
    precedence = str(headers.get("Precedence", "") or "").strip().lower()
    if precedence in ("bulk", "junk", "list"):
        return f"Precedence: {precedence}"
    return None


def redacted(recipient: str, delimiter: str = "+") -> str:
    """The recipient for a log line: its token (a credential) after the delimiter cut to 4 characters."""
    local, at, domain = recipient.rpartition("@")
    if delimiter in local:
        base, token = local.split(delimiter, 1)
        local = f"{base}{delimiter}{token[:4]}..."
    return f"{local}{at}{domain}"


def trusted(client_address: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        address = ipaddress.ip_address(client_address.strip().strip("[]").removeprefix("IPv6:"))
    except ValueError:
        return False
    return any(address in network for network in networks)


def login_is_owner(login: str, owner: str, login_domain: str | None, owners: Owners) -> bool:
    """Whether the SASL login ``login`` is the mailbox ``owner``: the login itself, ``login@login_domain``
    for a login without a domain, or an address the recipient sources resolve to the owner."""
    login = login.strip().lower()
    if not login:
        return False
    candidates = [login] if "@" in login else ([f"{login}@{login_domain.lower()}"] if login_domain else [])
    return any(candidate == owner or owners.mailbox_of(candidate) == owner for candidate in candidates)


def matching(public_ids: list[str], short_id: str) -> list[str]:
    """The public ids that start with ``short_id`` (written in any case)."""
    short_id = short_id.lower()
    return [public_id for public_id in public_ids if public_id.startswith(short_id)]


# -- the handler -----------------------------------------------------------------------------------------


class ReplyHandler:
    def __init__(self, store: QuarantineStore, settings: DigestSettings | None, tokens: Tokens | None,
                 owners: Owners, outbox: Outbox, teach: Teach,
                 render: Callable[[str, dict[str, object]], str] | None = None) -> None:
        self.store = store
        self.settings = settings
        self.tokens = tokens
        self.owners = owners
        self.outbox = outbox
        self.teach = teach
        self.preferences = SpamPreferences(store, cache_ttl=0)
        self.render = render or Templates(settings.templates if settings else None).render

    def handle(self, raw: bytes, envelope: Envelope) -> Result:
        """Decide one reply; raises Unavailable when it must be tried again later."""
        why = loop_reason(raw, envelope.sender)
        if why is not None:
            log_kv(log, logging.INFO, "digest reply ignored", why=why, sender=envelope.sender,
                   recipient=redacted(envelope.recipient, self.settings.recipient_delimiter if self.settings else "+"))
            return Result(Decision.IGNORED, reason=why)
        if self.settings is None or self.tokens is None:
            log_kv(log, logging.WARNING, "digest reply ignored: [quarantine.digest] is not configured",
                   sender=envelope.sender)
            return Result(Decision.IGNORED, reason="not configured")
        message_id = self._message_id(raw)
        result = Result(Decision.REFUSED)
        owner = self.owners.mailbox_of(envelope.sender)
        if owner is None:
            self._event(result, Refusal.NOT_AN_OWNER, envelope, message_id, "",
                        "the envelope sender is no mailbox of ours")
            return result
        result.owner = owner
        if self.settings.require_authentication and not trusted(envelope.client_address, self.settings.networks()):
            if not envelope.sasl_user.strip():
                self._event(result, Refusal.NOT_AUTHENTICATED, envelope, message_id, owner,
                            "no SASL login and not from trusted_networks")
                return result
            if not login_is_owner(envelope.sasl_user, owner, self.settings.login_domain, self.owners):
                self._event(result, Refusal.FORGED_SENDER, envelope, message_id, owner,
                            f"logged in as {clean(envelope.sasl_user, 100)}, not as the sender's mailbox")
                return result
        result.decision = Decision.ANSWERED
        reply = parse_reply(raw, envelope.recipient, self.settings.recipient_delimiter)
        by = f"{owner} (digest reply)"
        actions = Actions(self.store, self.settings, self.preferences, self.teach, owner, by)
        reply_ok = False
        if reply.reply_token is not None:
            try:
                self.tokens.verify(reply.reply_token, owner, Action.REPLY)
                reply_ok = True
            except TokenRefused as exc:
                self._event(result, exc.reason, envelope, message_id, owner, f"the address's token: {exc}")
                result.refused.append(f"The address you replied to: {plain_words(exc.reason)}.")
        previews: list[tuple[str, str]] = []
        try:
            for command in reply.commands:
                outcomes = self._command(command, reply_ok, owner, envelope, message_id, actions, result)
                for outcome in outcomes:
                    (result.done if outcome.done else result.refused).append(outcome.text)
                    if outcome.preview:
                        previews.append((outcome.text, outcome.preview))
        except StoreError as exc:
            raise Unavailable(str(exc)) from None
        log_kv(log, logging.INFO, "digest reply", owner=owner, sender=envelope.sender, sasl_user=envelope.sasl_user,
               commands=len(reply.commands), done=len(result.done), refused=len(result.refused),
               help="yes" if reply.help else "no", message_id=message_id)
        result.queue_id = self._confirm(owner, reply, result, previews, message_id)
        result.reason = result.events[0] if result.events else "done" if result.done else "nothing done"
        return result

    def _command(self, command: Command, reply_ok: bool, owner: str, envelope: Envelope, message_id: str,
                 actions: Actions, result: Result) -> list[Outcome]:
        assert self.tokens is not None
        named = f"{command.action}" + (f" {command.target}" if command.target else "")
        public_id: str | None = None
        if command.token is not None:
            try:
                claim = self.tokens.verify(command.token, owner, command.action)
            except TokenRefused as exc:
                self._event(result, exc.reason, envelope, message_id, owner, f"{named}: {exc}")
                return [Outcome(False, f"{named}: {plain_words(exc.reason)}.")]
            public_id = claim.public_id
            if public_id is not None and command.target and not public_id.startswith(command.target):
                self._event(result, Refusal.ID_MISMATCH, envelope, message_id, owner,
                            f"{named}: the token is for {public_id[:6]}...")
                return [Outcome(False, f"{named}: {PLAIN_WORDS[Refusal.ID_MISMATCH]}.")]
        elif not reply_ok:
            return [Outcome(False, f"{named}: write commands in a reply to your newest digest (the "
                                   "reply address carries the code that shows it is yours).")]
        if not command.action.on_message:
            if command.action is Action.RELEASE_ALL:
                return actions.release_all()
            if command.action is Action.REPLY:
                return []
            return [actions.interval(command.action)]
        record = self._record(public_id, command.target, owner, named, envelope, message_id, result)
        if isinstance(record, Outcome):
            return [record]
        if record.kind.lower() in ADMIN_ONLY_KINDS and command.action not in USER_ACTIONS_ON_ADMIN_ONLY:
            self._event(result, Refusal.ADMIN_ONLY, envelope, message_id, owner,
                        f"{named}: held as {record.kind}")
            return [Outcome(False, f"{command.action} {describe(record)}: "
                                   f"{PLAIN_WORDS[Refusal.ADMIN_ONLY]}.")]
        return [actions.run(command.action, record)]

    def _record(self, public_id: str | None, target: str | None, owner: str, named: str, envelope: Envelope,
                message_id: str, result: Result) -> HeldRecord | Outcome:
        """The owner's row the command names, or the Outcome that refuses it."""
        if public_id is None:
            if not target:
                return Outcome(False, f"{named}: no message named.")
            candidates, elsewhere = self._ids_of(owner, target)
            mine = matching(candidates, target)
            if len(mine) > 1:
                return Outcome(False, f"{named}: several of your messages start with {target}: "
                                      "write more of the id.")
            if not mine:
                if elsewhere:
                    self._event(result, Refusal.FOREIGN_ID, envelope, message_id, owner,
                                f"{named}: the id is another mailbox's")
                    return Outcome(False, f"{named}: {PLAIN_WORDS[Refusal.FOREIGN_ID]}.")
                return Outcome(False, f"{named}: there is no such message in your quarantine.")
            public_id = mine[0]
        record = self.store.get(public_id)
        if record is None:
            return Outcome(False, f"{named}: the message is no longer in the quarantine (it was kept "
                                  "as long as the quarantine keeps mail).")
        if record.mailbox.lower() != owner:
            self._event(result, Refusal.FOREIGN_ID, envelope, message_id, owner,
                        f"{named}: the row is {record.mailbox}'s")
            return Outcome(False, f"{named}: {PLAIN_WORDS[Refusal.FOREIGN_ID]}.")
        return record

    def _ids_of(self, owner: str, prefix: str) -> tuple[list[str], bool]:
        """The owner's public ids that start with ``prefix``, and whether another mailbox has one."""
        prefix = re.sub(r"[^a-z2-7]", "", prefix.lower())
        starts = Held.public_id.like(f"{prefix}%")
        with self.store.reading("look up a short id") as conn:
            mine = [str(public_id) for public_id in conn.execute(
                sa.select(Held.public_id).where(starts, Held.mailbox == owner).limit(MAX_MATCHES)).scalars()]
            others = conn.execute(sa.select(Held.id).where(starts, Held.mailbox != owner).limit(1)).first()
        return mine, others is not None

    def _event(self, result: Result, reason: str, envelope: Envelope, message_id: str, owner: str,
               detail: str) -> None:
        result.events.append(str(reason))
        result.reason = result.reason or str(reason)
        event = SecurityEvent(reason=str(reason), sender=envelope.sender, owner=owner, sasl_user=envelope.sasl_user,
                              client_address=envelope.client_address, message_id=message_id, detail=detail)
        try:
            record_event(self.store, event)
        except StoreError as exc:  # the log line is written first: the event is not lost
            log_kv(log, logging.WARNING, "security event not stored", reason=str(reason), error=str(exc))

    @staticmethod
    def _message_id(raw: bytes) -> str:
        headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw[:MAX_HEAD])
        return clean(str(headers.get("Message-ID", "") or ""), 200)

    def _confirm(self, owner: str, reply: Reply, result: Result, previews: list[tuple[str, str]],
                 message_id: str) -> str:
        assert self.settings is not None
        context: dict[str, object] = {
            "owner": owner, "done": result.done, "refused": result.refused, "previews": previews,
            "notes": list(reply.notes), "help": reply.help and not result.done and not result.refused,
            "reply_mailbox": self.settings.reply_mailbox,
        }
        body = self.render("help.txt.j2" if context["help"] else "confirm.txt.j2", context)
        message = EmailMessage()
        message["From"] = email.utils.formataddr((self.settings.from_name, self.settings.from_address))
        message["To"] = owner
        subject = clean(strip_subject(reply.subject), 120)
        message["Subject"] = f"Re: {subject}" if subject else "Your reply to the quarantine digest"
        message["Auto-Submitted"] = "auto-replied"
        message["Date"] = email.utils.formatdate(localtime=False)
        message["Message-ID"] = email.utils.make_msgid(domain=self.settings.from_address.rsplit("@", 1)[1])
        if message_id.startswith("<") and message_id.endswith(">") and len(message_id) < 200:
            message["In-Reply-To"] = message_id
        message.set_content(body)
        try:
            return self.outbox.send(message, owner)
        except OutboxError as exc:
            raise Unavailable(str(exc)) from None


class Templates:
    """The confirmation and help texts: a site's ``[quarantine.digest] templates`` directory first, then ours."""

    def __init__(self, directory: Path | None) -> None:
        import jinja2

        paths = [str(directory)] if directory else []
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader([*paths, str(TEMPLATES)]),
                                      autoescape=False, keep_trailing_newline=True,  # noqa: S701 (plain text)
                                      undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)

    def render(self, name: str, context: dict[str, object]) -> str:
        return self.env.get_template(name).render(**context)

