"""An SMTP sink the test controls (aiosmtpd): Postfix relays everything here; tests read what arrived."""

from __future__ import annotations

import email
import email.message
import email.policy
import threading
from dataclasses import dataclass

from aiosmtpd.controller import Controller

from harness.net import free_port


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes

    @property
    def message(self) -> email.message.EmailMessage:
        return email.message_from_bytes(self.data, policy=email.policy.default)  # type: ignore[return-value]


class _Handler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_DATA(self, server, session, envelope) -> str:
        with self.sink.cond:
            self.sink.messages.append(Received(envelope.mail_from, tuple(envelope.rcpt_tos), envelope.content))
            self.sink.cond.notify_all()
        return "250 2.0.0 Ok: stored"


class Sink:
    def __init__(self) -> None:
        self.messages: list[Received] = []
        self.cond = threading.Condition()
        self.port = free_port()
        self.controller = Controller(_Handler(self), hostname="127.0.0.1", port=self.port)

    def start(self) -> Sink:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def wait_for(self, count: int, timeout: float = 15.0) -> list[Received]:
        """Wait until at least ``count`` messages arrived; return them all."""
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.messages) >= count, timeout):
                raise TimeoutError(f"sink got {len(self.messages)} message(s), expected {count}")
            return list(self.messages)

    def wait_for_subjects(self, *subjects: str, timeout: float = 15.0) -> list[Received]:
        """Wait until a message with each of ``subjects`` arrived; return every message so far. To show that
        something did not arrive, send a marker after it, wait for the marker, then assert: a positive
        signal instead of a pause."""
        def arrived() -> bool:
            return set(subjects) <= {m.message["Subject"] for m in self.messages}

        with self.cond:
            if not self.cond.wait_for(arrived, timeout):
                got = sorted(str(m.message["Subject"]) for m in self.messages)
                raise TimeoutError(f"sink got {got}, not all of {sorted(subjects)}, in {timeout}s")
            return list(self.messages)

    def with_subject(self, subject: str) -> list[Received]:
        with self.cond:
            return [m for m in self.messages if m.message["Subject"] == subject]
