"""The phish check (``mailwarden milter phish``): SMTP AUTH logins and the outbound anomaly, judged by
phishhook's detector at end of message.

An authenticated message is a login of its SASL user from the client's address (``{auth_authen}`` and the
connect address: with XCLIENT, the address it presented): geo-velocity judges it against the user's other
logins, whatever service they came from. Then the mass-mail rule (``[phishhook.outbound]``). Either finding
snags the account: policyd refuses its next message at RCPT, Dovecot its next login, and this message is held
in the quarantine for the security team (kind ``phish``: never in a recipient's digest, released only by an
admin), unless the snag is alert-only.

Redis or the SQL store failing here costs the judgement, not the mail: ``on_error = "accept"`` (the default)
lets the message through with a warning and a metric; ``"tempfail"`` answers 451.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from mailwarden.logs import Throttled, get_logger
from milters import metrics
from milters.check import Message
from milters.settings import MilterSettings
from milters.verdict import CheckResult, Fate, Verdict
from phishhook.events import BadEvent, LoginEvent, normalise_address, normalise_user
from phishhook.mode import Mode

if TYPE_CHECKING:
    from phishhook.detector import Detector

log = get_logger("milter")
failures = Throttled(log, logging.WARNING, "phish check failed: the message was judged without it")

KIND = "phish"
SNAG = "snag"
"""The verdict's log field naming the snag that held the message (``after_hold`` links them)."""


class PhishMilterSettings(MilterSettings):
    """``[milters.phish]``: the phish milter process. In Postfix, last: ``smtpd_milters = ...,
    inet:127.0.0.1:10032``. Its rules are in ``[phishhook]``."""

    listen: str = "inet:127.0.0.1:10032"
    checks: list[str] = ["phish"]
    on_error: Literal["accept", "tempfail"] = "accept"
    """When Redis or the store fails: let the message through unjudged (logged, counted), or answer 451."""


class PhishCheck:
    name = "phish"

    def __init__(self, detector: Detector, settings: PhishMilterSettings) -> None:
        self.detector = detector
        self.settings = settings

    def check(self, message: Message) -> CheckResult:
        if not message.auth_user:
            return Verdict(Fate.ACCEPT, self.name, "not authenticated")
        try:
            return self._judge(message)
        except Exception as exc:  # a judgement lost is logged and counted; the mail is not
            metrics.SCANNER_ERRORS.labels(self.name).inc()
            failures.hit(type(exc).__name__, queue_id=message.queue_id or "-", error=str(exc))
            if self.settings.on_error == "tempfail":
                return Verdict(Fate.TEMPFAIL, self.name, f"phish check failed: {exc}", kind="unscanned")
            return Verdict(Fate.ACCEPT, self.name, f"phish check failed, accepted unjudged: {exc}")

    def _judge(self, message: Message) -> Verdict:
        reasons = []
        snagged = False
        snag_id = ""
        try:
            event = LoginEvent(user=normalise_user(message.auth_user),
                               address=normalise_address(message.client_address), at=self.detector.now(),
                               success=True, service="smtp", via="milter", session=message.queue_id)
        except BadEvent as exc:
            reasons.append(f"login not judged: {exc}")
        else:
            outcome = self.detector.login(event)
            if outcome.snag is not None:
                snagged = snagged or outcome.snag.mode == Mode.ENFORCE
                snag_id = outcome.snag.public_id
                reasons.append(f"snag {outcome.snag.public_id}: {outcome.snag.kind}")
        found = self.detector.outbound(queue_id=message.queue_id, auth_user=message.auth_user,
                                       client_address=message.client_address, sender=message.sender,
                                       from_header=message.header("From"), recipients=message.recipients,
                                       subject=message.header("Subject") or "")
        if found.snag is not None:
            snagged = snagged or found.snag.mode == Mode.ENFORCE
            snag_id = found.snag.public_id
            reasons.append(f"snag {found.snag.public_id}: {found.finding.reason}")
        elif found.finding.verdict == "exempt":
            reasons.append(f"outbound exempt: {found.finding.reason}")
        if snagged:
            return Verdict(Fate.QUARANTINE, self.name, "; ".join(reasons), kind=KIND, log_fields=((SNAG, snag_id),))
        return Verdict(Fate.ACCEPT, self.name, "; ".join(reasons) or "no finding")

    def after_hold(self, message: Message, held: Mapping[str, str], verdicts: Mapping[str, Verdict | None]) -> None:
        """Link the held copies to the snag that held them (the review page lists them)."""
        by_snag: dict[str, list[str]] = {}
        for rcpt, public_id in held.items():
            verdict = verdicts.get(rcpt)
            snag_id = dict(verdict.log_fields).get(SNAG, "") if verdict is not None else ""
            if snag_id:
                by_snag.setdefault(snag_id, []).append(public_id)
        for snag_id, ids in by_snag.items():
            self.detector.parts.snags.add_messages(snag_id, ids)

    def close(self) -> None:
        self.detector.close()
