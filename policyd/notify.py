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
            asyncio.get_running_loop().run_in_executor(None, self._send, messages, limit.name, key_value)

    def _message(self, to: str, subject: str, text: str, fields: dict[str, object]) -> EmailMessage:
        message = EmailMessage()
        message["From"] = self.settings.sender
        message["To"] = to
        message["Subject"] = subject.format(**fields)
        message["Date"] = format_datetime(datetime.datetime.now().astimezone())
        message["Message-ID"] = make_msgid(domain=self.settings.sender.rpartition("@")[2] or None)
        message["Auto-Submitted"] = "auto-generated"
        message.set_content(text.format(**fields))
        return message

    def _send(self, messages: list[EmailMessage], limit: str, key_value: str) -> None:
        assert self.settings.relay
        host, _, port = self.settings.relay.rpartition(":")
        try:
            with smtplib.SMTP(host.strip("[]"), int(port), timeout=30) as smtp:
                for message in messages:
                    smtp.send_message(message)
            log_kv(log, logging.INFO, "rate-limit notification sent", limit=limit, key=key_value,
                   to=",".join(str(m["To"]) for m in messages))
            metrics.NOTIFICATIONS.labels("sent").inc()
        except (OSError, smtplib.SMTPException) as exc:
            metrics.NOTIFICATIONS.labels("failed").inc()
            log_kv(log, logging.ERROR, "rate-limit notification failed", limit=limit, key=key_value,
                   relay=self.settings.relay, error=str(exc))
