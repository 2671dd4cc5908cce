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

from mailwarden.logs import get_logger, log_kv
from mailwarden.units import format_duration
from policyd import metrics
from policyd.request import PolicyRequest
from policyd.settings import NotifySettings, RateLimit

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
