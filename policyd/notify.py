"""Telling the user and the admin that a rate limit was reached, once per key and window.

The ratelimit script marks the first refusal of a window; this module then sends one short message to
the user and one to the admin through the configured SMTP relay. Sending happens in a worker thread and
never delays or changes a policy answer; a failure is logged and counted.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import smtplib
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import TYPE_CHECKING

from pydantic import field_validator

from mailwarden.logs import get_logger, log_kv
from mailwarden.section import Section
from mailwarden.units import format_duration
from policyd import metrics
from policyd.request import PolicyRequest
from policyd.settings_types import check_template, listen_entry

if TYPE_CHECKING:  # ratelimit.py imports this module
    from policyd.ratelimit import RateLimit


class NotifySettings(Section):
    """One message to the user and one to the admin at a key's first refusal in a window (never one per
    message), sent through an SMTP relay (normally the local Postfix)."""

    relay: str | None = None
    """HOST:PORT of the SMTP server to send through, e.g. "127.0.0.1:25"; unset: no notifications."""
    sender: str = "postmaster@localhost"
    admin: str | None = None
    """Address of the postmaster or security team; unset: only the user is told."""
    user_domain: str | None = None
    """Domain for SASL user names that are not addresses (alice -> alice@user_domain); unset: the
    envelope sender of the message that hit the limit is told."""
    user_subject: str = "Your outgoing mail has been held back"
    user_text: str = (
        "You have sent more mail in a short time than this server allows ({max} {count} per {window}).\n"
        "Further mail is being {done} for now. If you did not send this mail, your password may be known "
        "to someone else: change it and contact the help desk.\n"
    )
    admin_subject: str = "Rate limit {name} reached by {key}"
    admin_text: str = "{key} reached the rate limit {name} ({max} {count} per {window}); its mail is being {done}.\n"
    """Subjects and texts are templates; placeholders: {name} (the limit), {key} (who reached it), {max},
    {count} (messages or recipients), {window}, {done} (deferred, refused, held for review)."""

    _fields = {"name", "key", "max", "count", "window", "done"}

    @field_validator("user_subject", "admin_subject")
    @classmethod
    def _subjects(cls, text: str) -> str:
        return check_template(text, cls._fields.default)  # type: ignore[attr-defined]

    @field_validator("user_text", "admin_text")
    @classmethod
    def _texts(cls, text: str) -> str:
        return check_template(text, cls._fields.default, one_line=False)  # type: ignore[attr-defined]

    @field_validator("relay")
    @classmethod
    def _relay(cls, relay: str | None) -> str | None:
        return relay if relay is None else listen_entry(relay)


log = get_logger("policyd.notify")


def compose(sender: str, to: str, subject: str, text: str) -> EmailMessage:
    """A short, plain notice marked Auto-Submitted, so that vacation responders leave it alone."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = format_datetime(datetime.datetime.now().astimezone())
    message["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(text)
    return message


def send_later(relay: str, messages: list[EmailMessage], what: str, **context: object) -> None:
    """Send through the relay in a worker thread: never on the request path; failures are logged."""
    asyncio.get_running_loop().run_in_executor(None, _send, relay, messages, what, context)


def _send(relay: str, messages: list[EmailMessage], what: str, context: dict[str, object]) -> None:
    host, _, port = relay.rpartition(":")
    try:
        with smtplib.SMTP(host.strip("[]"), int(port), timeout=30) as smtp:
            for message in messages:
                smtp.send_message(message)
        log_kv(log, logging.INFO, f"{what} sent", to=",".join(str(m["To"]) for m in messages), **context)
        metrics.NOTIFICATIONS.labels("sent").inc()
    except (OSError, smtplib.SMTPException) as exc:
        metrics.NOTIFICATIONS.labels("failed").inc()
        log_kv(log, logging.ERROR, f"{what} failed", relay=relay, error=str(exc), **context)


class LimitNotifier:
    def __init__(self, settings: NotifySettings) -> None:
        self.settings = settings

    def user_address(self, limit: RateLimit, key_value: str, request: PolicyRequest) -> str | None:
        user = request.sasl_username
        if user and "@" in user:
            return user
        if user and self.settings.user_domain:
            return f"{user}@{self.settings.user_domain}"
        return request.sender or None

    def limit_reached(self, limit: RateLimit, key_value: str, request: PolicyRequest, cap: int) -> None:
        if not self.settings.relay:
            return
        window = "message" if limit.window == "message" else format_duration(float(limit.window))
        done = {"hold": "held for review", "reject": "refused"}.get(limit.action, "deferred")
        fields = {"name": limit.name, "key": key_value, "max": cap, "count": limit.count, "window": window,
                  "done": done}
        messages = []
        if (user := self.user_address(limit, key_value, request)) is not None:
            messages.append(self._message(user, self.settings.user_subject, self.settings.user_text, fields))
        if self.settings.admin:
            messages.append(self._message(self.settings.admin, self.settings.admin_subject, self.settings.admin_text,
                                          fields))
        if messages:
            assert self.settings.relay
            send_later(self.settings.relay, messages, "rate-limit notification", limit=limit.name, key=key_value)

    def _message(self, to: str, subject: str, text: str, fields: dict[str, object]) -> EmailMessage:
        return compose(self.settings.sender, to, subject.format(**fields), text.format(**fields))
