"""Driving a MessageMilter without Postfix: pymilter's TestCtx, as an MTA that offers no no-reply steps
(TestCtx stops feeding a message at the first NOREPLY), recording the headers the milter adds."""

from __future__ import annotations

import io

import Milter
import pytest
from Milter.testctx import TestCtx

from milters.base import MessageMilter, MilterApp

NO_REPLY_BITS = (Milter.P_NR_CONN | Milter.P_NR_HELO | Milter.P_NR_MAIL | Milter.P_NR_RCPT | Milter.P_NR_DATA
                 | Milter.P_NR_UNKN | Milter.P_NR_EOH | Milter.P_NR_BODY | Milter.P_NR_HDR)


class RecordingCtx(TestCtx):
    def __init__(self) -> None:
        super().__init__()
        self.added: list[tuple[str, str]] = []

    def addheader(self, name, value, idx):
        self.added.append((name, value))
        return super().addheader(name, value, idx)


def drive_milter(app: MilterApp, monkeypatch: pytest.MonkeyPatch, raw: bytes, sender: str = "sender@example.org",
                 rcpts: tuple[str, ...] = ("user@example.test",), auth: str | None = None,
                 queue_id: str = "4XyZ12AB", client: str = "192.0.2.7") -> tuple[int, RecordingCtx]:
    """One connection, one message through ``app``'s milter: the answer and the context (``_msg`` is the
    message as delivered, ``_reply`` the SMTP reply, ``_delrcpt`` the removed recipients, ``added`` the
    added headers)."""
    monkeypatch.setattr(Milter, "factory", lambda: MessageMilter(app))
    monkeypatch.setattr(TestCtx, "default_opts", [Milter.CURR_ACTS, 0x1FFFFF & ~NO_REPLY_BITS, 0, 0])
    ctx = RecordingCtx()
    ctx._setsymval("i", queue_id)
    if auth:
        ctx._setsymval("{auth_authen}", auth)
    assert ctx._connect(ip=client) == Milter.CONTINUE
    return ctx._feedFile(io.BytesIO(raw), sender, *rcpts), ctx
