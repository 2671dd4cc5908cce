"""The SpamAssassin check: one spamd call per message, a verdict per recipient from the score.

**Whose settings.** spamd is asked as a user (its ``user_prefs`` and Bayes database): the recipients'
mailbox (milters/mailbox.py, so an alias is judged as its mailbox) when every recipient still to be scored
has the same one, otherwise ``shared_user``. One call per message, not one per mailbox: a message to 40
people would otherwise cost 40 scans; the per-recipient part that matters most (the thresholds and the
sender lists) is ours and applies to each recipient whatever user spamd scored as. With ``per_user =
false`` every message is scored as ``shared_user``.

**Per recipient.** Each recipient's levels are their mailbox's, else their domain's, else the config's
(quarantine/preferences.py), and their sender lists decide before the score: a whitelisted sender is
delivered to that recipient whatever the score, a blacklisted one held. Otherwise the score against the
levels: below ``tag``, pass; at ``tag``, tagged; at ``hold``, quarantined for that recipient (the others
still get it); at ``reject``, rejected with 550 5.7.1, but only when every recipient rejects: SMTP has
one answer per message after DATA, so otherwise those recipients are quarantined (milters/verdict.py).
When every recipient's lists decide, spamd is not asked at all.

**Tagged mail is recorded** (``record_tagged``): a recipient it is delivered to with a score at or above
their tag level (and below their hold level) gets a row in the quarantine store in state ``delivered``,
with the message's bytes, so the digest lists it and a REPORT learns it as spam. The delivered copy is not
changed by it; a store that cannot keep the record costs the record, never the message
(milters/base.py).

**One copy, one set of headers.** The delivered copy is the same for every recipient it goes to, so the
``X-Spam-*`` headers describe the message, not one recipient: ``X-Spam-Score`` and ``X-Spam-Level`` the
score; ``X-Spam-Flag: YES`` and ``X-Spam-Status: Yes`` when the score reaches the tag level of any
recipient it is delivered to (a recipient with a higher level still sees the score, and a Sieve rule on
``X-Spam-Score`` can apply their own); ``required=`` the lowest such level. The Subject is tagged only
when every delivered recipient is at their tag level: a visible change nobody gets unasked. Rule names
(``tests=``) are listed for inbound mail only: the recipients are ours; a submission's recipients are not.

**Size.** A message larger than spamd's ``max_size`` is scored on a sample, never skipped: its header,
its structure and the first ``part_size`` bytes of every part (milters/spam_sample.py: the pitch after a
large harmless attachment is sent), and ``X-Spam-Scan: partial`` says so. **Faults**: spamd unreachable (retried once
after ``retry_pause``: a restarting spamd), timing out or refusing: ``on_error_inbound`` (451 by default)
or ``on_error_submission`` (accept, ``X-Spam-Status: Unscanned``). Authenticated submissions are not
scored unless ``scan_submission`` (the virus scan still applies).

Every incoming ``X-Spam-*`` header is removed before delivery, so a sender cannot forge a verdict.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
import io
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from pydantic import Field, field_validator, model_validator

from mailwarden.logs import Throttled, get_logger
from mailwarden.units import Duration, Size
from milters.base import PrefixedReader
from milters.check import Message
from milters.mailbox import MailboxResolver
from milters.metrics import SCANNER_ERRORS
from milters.settings import ErrorFate, MilterSettings
from milters.spam_sample import sample
from milters.spamd_client import Failure, SpamdClient, SpamdError, SpamdSettings, SpamReport, check_user
from milters.verdict import REJECT_SPAM, TEMPFAIL_SCANNER, CheckResult, Fate, Verdict
from quarantine.preferences import Kind, Levels, SpamPreferences
from quarantine.store import StoreError

log = get_logger("milter")

X_SPAM_FLAG = "X-Spam-Flag"
X_SPAM_STATUS = "X-Spam-Status"
X_SPAM_SCORE = "X-Spam-Score"
X_SPAM_LEVEL = "X-Spam-Level"
X_SPAM_SCAN = "X-Spam-Scan"
MAX_STARS = 50


class SpamAssassinSettings(MilterSettings):
    """``[milters.spamassassin]``: the SpamAssassin milter process (``mailwarden milter spamassassin``)."""

    listen: str = "inet:127.0.0.1:10031"
    checks: list[str] = ["spamassassin"]
    spamd: SpamdSettings = Field(default_factory=SpamdSettings)
    part_size: Size = 64 << 10
    """For a message above spamd's max_size: bytes of each part's body sent (SpamAssassin's body rules
    read the first 50,000 of each part)."""
    tag_level: float = 5.0
    """At this score the delivered copy is tagged (X-Spam-Flag: YES, the subject tag)."""
    hold_level: float = 8.0
    """At this score the message is quarantined for the recipient."""
    reject_level: float = 15.0
    """At this score the message is refused (550 5.7.1) when every recipient is at their reject level;
    held for those who are, otherwise."""
    subject_tag: str = ""
    """Put in front of the Subject of tagged mail (e.g. "[SPAM]"); empty: the Subject is left alone."""
    per_user: bool = True
    """Ask spamd as the recipients' mailbox (its user_prefs and Bayes) when they share one."""
    shared_user: str = "mailwarden"
    """spamd's user for mail to several mailboxes (and all mail without per_user): the shared Bayes."""
    scan_submission: bool = False
    """Score mail from SASL-authenticated clients too (by default they get the virus scan only)."""
    retry_pause: Duration = 1
    """After spamd could not be reached, wait this long and try once more (a restarting spamd)."""
    on_error_inbound: ErrorFate = "tempfail"
    """When spamd cannot answer, for mail from unauthenticated clients."""
    on_error_submission: ErrorFate = "accept"
    """The same for authenticated submissions (with scan_submission); accepted mail says Unscanned."""
    record_tagged: bool = True
    """Keep a record (state ``delivered``, with the bytes) in the quarantine store of each tagged message
    delivered, per recipient, for the digest's second section and its REPORT. Fail-open: a store that
    cannot keep it skips the record, with a warning, and the message is delivered all the same."""
    preferences_cache: Duration = 60
    """Seconds a recipient's levels and sender lists are kept in memory before the store is asked again."""

    @field_validator("shared_user")
    @classmethod
    def _user(cls, user: str) -> str:
        return check_user(user)

    @model_validator(mode="after")
    def _ordered(self) -> SpamAssassinSettings:
        if not self.tag_level <= self.hold_level <= self.reject_level:
            raise ValueError(f"levels must rise: tag_level ({self.tag_level:g}) <= hold_level "
                             f"({self.hold_level:g}) <= reject_level ({self.reject_level:g})")
        return self


@dataclass(frozen=True, slots=True)
class Judgement:
    """One recipient's verdict before the message-wide headers are added."""

    fate: Fate
    reason: str
    kind: str
    tag_level: float
    """The recipient's tag level (their required= if the copy is tagged for them)."""


@dataclass(frozen=True)
class Assessment:
    """What the check made of one message."""

    result: CheckResult
    report: SpamReport | None = None
    """spamd's answer; None when it was not asked (a submission, every recipient's lists decided)."""
    user: str = ""
    """Whom spamd was asked as."""
    mailboxes: dict[str, str] = field(default_factory=dict)
    """Each recipient's mailbox."""


class SpamAssassinCheck:
    """The ``spamassassin`` milter check (milters.check.MessageCheck)."""

    name = "spamassassin"
    owned_header_prefixes: ClassVar[tuple[str, ...]] = ("X-Spam-",)

    def __init__(self, settings: SpamAssassinSettings, mailboxes: MailboxResolver,
                 preferences: SpamPreferences | None, *, client: SpamdClient | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.settings = settings
        self.mailboxes = mailboxes
        self.preferences = preferences
        self.client = client or SpamdClient(settings.spamd)
        self._sleep = sleep
        self._log_lock = threading.Lock()
        self._failures = Throttled(log, logging.WARNING, "spamd scan failed", interval=60)
        self._store_failures = Throttled(log, logging.WARNING, "spam preferences unavailable; the config's "
                                         "levels apply and no sender list", interval=60)

    def check(self, message: Message) -> CheckResult:
        try:
            return self.assess(message).result
        except SpamdError as exc:
            return self._unscanned(message, exc)

    def assess(self, message: Message) -> Assessment:
        """The verdicts, with spamd's report and whom it was asked as; raises SpamdError when spamd gave
        no answer (after the retry). ``spam check`` shows this; the milter uses ``check``."""
        if message.authenticated and not self.settings.scan_submission:
            return Assessment(Verdict(Fate.ACCEPT, self.name, "authenticated submission: not scored for spam"))
        mailbox = {rcpt: self.mailboxes(rcpt) for rcpt in message.recipients}
        levels, lists = self._preferences(message, mailbox)
        to_score = [rcpt for rcpt in message.recipients if lists[rcpt] is None]
        report: SpamReport | None = None
        user = ""
        if to_score:
            user = self._spamd_user({mailbox[rcpt] for rcpt in to_score})
            report = self._scan(message, user)
        judged = {rcpt: self._judge(rcpt, report, levels[rcpt], lists[rcpt]) for rcpt in message.recipients}
        return Assessment(self._verdicts(message, report, judged), report, user, mailbox)

    def _preferences(self, message: Message, mailbox: dict[str, str]
                     ) -> tuple[dict[str, Levels], dict[str, Kind | None]]:
        """Each recipient's levels and sender-list verdict; the config's levels and no list when the store
        cannot answer (mail flows; what must be held still needs the store, and gets 451 until it is back)."""
        none = Levels(None, None, None)
        if self.preferences is None:
            return dict.fromkeys(mailbox, none), dict.fromkeys(mailbox)
        senders = [address for address in (message.sender, _address_of(message.header("From"))) if address]
        try:
            levels = {rcpt: self.preferences.levels_for(box) for rcpt, box in mailbox.items()}
            lists = {rcpt: self.preferences.sender_verdict(box, senders) for rcpt, box in mailbox.items()}
        except StoreError as exc:
            with self._log_lock:
                self._store_failures.hit("store", error=str(exc), queue_id=message.queue_id)
            return dict.fromkeys(mailbox, none), dict.fromkeys(mailbox)
        return levels, lists

    def _spamd_user(self, mailboxes: set[str]) -> str:
        """The one mailbox, when spamd can take it as a user name (an internationalised address cannot be
        sent: the shared user scores it rather than the message waiting forever); else the shared user."""
        if self.settings.per_user and len(mailboxes) == 1:
            mailbox = next(iter(mailboxes))
            try:
                return check_user(mailbox)
            except ValueError:
                pass
        return self.settings.shared_user

    def _scan(self, message: Message, user: str) -> SpamReport:
        hop = received_line(message).encode("utf-8", "replace")
        size, limit = message.spool.size, self.settings.spamd.max_size
        sampled = (hop + sample(message.spool.reader(), limit - len(hop), self.settings.part_size)
                   if size + len(hop) > limit else None)
        for attempt in (1, 2):
            try:
                if sampled is None:
                    return self.client.check(io.BufferedReader(PrefixedReader(hop, message.spool.reader())), user)
                report = self.client.check(sampled, user)
                return dataclasses.replace(report, partial=True, bytes_scanned=len(sampled))
            except SpamdError as exc:
                SCANNER_ERRORS.labels(self.name).inc()
                retry = attempt == 1 and exc.reason is Failure.UNREACHABLE
                with self._log_lock:
                    self._failures.hit(self.settings.spamd.address, spamd=self.settings.spamd.address,
                                       error=str(exc), attempt=attempt, queue_id=message.queue_id,
                                       then="retry" if retry else self._fail_mode(message))
                if not retry:
                    raise
                self._sleep(self.settings.retry_pause)
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _judge(self, rcpt: str, report: SpamReport | None, own: Levels, listed: Kind | None) -> Judgement:
        settings = self.settings
        tag = own.tag if own.tag is not None else settings.tag_level
        hold = own.hold if own.hold is not None else settings.hold_level
        reject = own.reject if own.reject is not None else settings.reject_level
        if listed is Kind.WHITE:
            return Judgement(Fate.ACCEPT, "sender whitelisted by the recipient", "", tag)
        if listed is Kind.BLACK:
            return Judgement(Fate.QUARANTINE, "sender blacklisted by the recipient", "blacklisted", tag)
        assert report is not None
        score = tidy(report.score)
        if score >= reject:
            return Judgement(Fate.REJECT, f"score {score:g} >= reject level {reject:g}", "spam", tag)
        if score >= hold:
            return Judgement(Fate.QUARANTINE, f"score {score:g} >= hold level {hold:g}", "spam", tag)
        if score >= tag:
            return Judgement(Fate.TAG, f"score {score:g} >= tag level {tag:g}", "spam", tag)
        return Judgement(Fate.ACCEPT, f"score {score:g} below tag level {tag:g}", "", tag)

    def _verdicts(self, message: Message, report: SpamReport | None, judged: dict[str, Judgement]
                  ) -> dict[str, Verdict]:
        delivered = [j for j in judged.values() if j.fate in (Fate.ACCEPT, Fate.TAG)]
        tagged = [j for j in delivered if j.fate is Fate.TAG]
        headers = self._headers(message, report, tagged)
        held = self._headers(message, report, [j for j in judged.values() if j.kind == "spam"]) if report else ()
        subject = self.settings.subject_tag if delivered and len(tagged) == len(delivered) else ""
        fields = (("score", f"{tidy(report.score):g}"),) if report is not None else ()
        return {rcpt: Verdict(j.fate, self.name, j.reason, kind=j.kind, headers=headers, held_headers=held,
                              reply=REJECT_SPAM if j.fate is Fate.REJECT else None,
                              subject_tag=subject if j.fate is Fate.TAG else "", log_fields=fields,
                              record=j.fate is Fate.TAG and self.settings.record_tagged)
                for rcpt, j in judged.items()}

    def _headers(self, message: Message, report: SpamReport | None, tagged: Sequence[Judgement]
                 ) -> tuple[tuple[str, str], ...]:
        """The X-Spam-* headers of a copy: tagged (YES) when ``tagged`` is not empty."""
        if report is None:
            return ((X_SPAM_STATUS, "No, sender listed by the recipient"),)
        required = min((j.tag_level for j in tagged), default=self.settings.tag_level)
        score = tidy(report.score)
        status = f"{'Yes' if tagged else 'No'}, score={score:.1f} required={required:.1f}"
        if report.rules and not message.authenticated:
            status += " tests=" + ",".join(report.rule_names)
        headers = [(X_SPAM_FLAG, "YES")] if tagged else []
        headers += [(X_SPAM_STATUS, status), (X_SPAM_SCORE, f"{score:.1f}"),
                    (X_SPAM_LEVEL, "*" * max(0, min(MAX_STARS, int(score))))]
        if report.partial:
            headers.append((X_SPAM_SCAN, f"partial, {report.bytes_scanned} of {message.spool.size} bytes "
                                         "(the start of each part)"))
        return tuple(headers)

    def _fail_mode(self, message: Message) -> ErrorFate:
        return self.settings.on_error_submission if message.authenticated else self.settings.on_error_inbound

    def _unscanned(self, message: Message, exc: SpamdError) -> Verdict:
        reason = f"spamd unavailable: {exc}"
        if self._fail_mode(message) == "tempfail":
            return Verdict(Fate.TEMPFAIL, self.name, reason, kind="unscanned", reply=TEMPFAIL_SCANNER)
        return Verdict(Fate.ACCEPT, self.name, reason, kind="unscanned",
                       headers=((X_SPAM_STATUS, f"Unscanned (spamd {exc.reason})"),))

    def close(self) -> None:
        self.client.close()
        with self._log_lock:
            self._failures.flush()
            self._store_failures.flush()


def received_line(message: Message) -> str:
    """The Received header our Postfix will write for the hop it is receiving, in Postfix's own form, put in
    front of what spamd is sent (not of the delivered message). A milter sees the message before Postfix
    adds it, and without it SpamAssassin finds no relay for the connecting client: no rDNS, HELO or
    DNSBL rules on it, and no way to tell authenticated submission (``ESMTPA``) apart. Nothing when the
    client is not known (``spam check`` of a file, the catch-rate bench): no hop is invented."""
    if not message.client_address:
        return ""

    def clean(text: str, default: str) -> str:
        return "".join(c for c in text if c.isprintable() and c not in " ()[]")[:255] or default

    helo = clean(message.helo, clean(message.client_name, "unknown"))
    name = clean(message.client_name, "unknown")
    address = clean(message.client_address, "unknown")
    address = f"IPv6:{address}" if ":" in address else address
    protocol = "ESMTPA" if message.authenticated else "ESMTP"
    queue_id = f" id {clean(message.queue_id, '')}" if message.queue_id else ""
    recipient = f"\r\n\tfor <{clean(message.recipients[0], '')}>" if len(message.recipients) == 1 else ""
    date = email.utils.format_datetime(datetime.datetime.now(datetime.UTC))
    return (f"Received: from {helo} ({name} [{address}])\r\n\tby {clean(message.mta_name, 'localhost')} "
            f"(Postfix) with {protocol}{queue_id}{recipient}; {date}\r\n")


def tidy(score: float) -> float:
    """A score as people read it: one decimal, and no "-0.0" for a score a hair below zero."""
    return round(score, 1) + 0.0


def _address_of(header: str | None) -> str:
    """The address of a From header (the first one), lower case; "" when there is none."""
    if not header:
        return ""
    _name, address = email.utils.parseaddr(" ".join(header.split()))
    return address.lower() if "@" in address else ""
