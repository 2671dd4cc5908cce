"""Records of delivered tagged mail, through the milter base and the real quarantine store (SQLite), without
Postfix: pymilter's TestCtx drives MessageMilter, a check of pure logic names the verdicts, StoreHolder
writes to a real catalogue. A tagged recipient keeps getting the message as before and gets a row in state
delivered with the bytes; a store that cannot keep the record costs the record, never the message. End to
end through the real Postfix and spamd: test_e2e_spam.py."""

from __future__ import annotations

import io
import logging
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import Milter
import pytest
from harness.milter_ctx import drive_milter

from mailwarden.logs import DecisionLog
from milters.base import MilterApp
from milters.check import Message
from milters.holding import StoreHolder
from milters.verdict import Fate, Verdict
from quarantine.models import State
from quarantine.store import QuarantineSettings, QuarantineStore

MESSAGE = (b"From: News <news@example.com>\r\nTo: alice@example.test\r\nSubject: offer\r\n\r\n"
           b"Cheap things.\r\n")
SPAM_HEADERS = (("X-Spam-Flag", "YES"), ("X-Spam-Status", "Yes, score=6.2 required=5.0"))
TAGGED = Verdict(Fate.TAG, "spamassassin", "score 6.2 >= tag level 5", kind="spam", headers=SPAM_HEADERS,
                 held_headers=SPAM_HEADERS, log_fields=(("score", "6.2"),), record=True)
HELD = Verdict(Fate.QUARANTINE, "spamassassin", "score 6.2 >= hold level 6", kind="spam",
               held_headers=SPAM_HEADERS)
CLEAN = Verdict(Fate.ACCEPT, "spamassassin", "score 6.2 below tag level 7", headers=SPAM_HEADERS)
PREFIX = b"X-Spam-Flag: YES\r\nX-Spam-Status: Yes, score=6.2 required=5.0\r\n"


def is_the_message(raw: bytes) -> bool:
    """The stored copy: the held-only headers in front of the message as received (TestCtx feeds the body
    with its own line ends)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n" == PREFIX + MESSAGE.partition(b"\r\n\r\n")[0] + b"\r\n\r\n" \
        and body.rstrip() == b"Cheap things."


@dataclass
class Verdicts:
    """The ``spamassassin`` check as a table: each recipient's verdict."""

    table: dict[str, Verdict]
    name: str = "spamassassin"

    def check(self, message: Message) -> dict[str, Verdict]:
        return self.table

    def close(self) -> None:
        pass


@pytest.fixture
def store(tmp_path: Path) -> Iterator[QuarantineStore]:
    settings = QuarantineSettings(database_url=f"sqlite:///{tmp_path / 'q.sqlite'}", message_dir=tmp_path / "m",
                                  db_timeout="200ms")
    quarantine = QuarantineStore(settings)
    quarantine.migrate()
    yield quarantine
    quarantine.close()


def run(store: QuarantineStore, monkeypatch: pytest.MonkeyPatch, table: dict[str, Verdict]):
    out = io.StringIO()
    app = MilterApp("spamassassin", [Verdicts(table)], DecisionLog(stream=out), holder=StoreHolder(store))
    rc, ctx = drive_milter(app, monkeypatch, MESSAGE, "news@example.com", tuple(table))
    return rc, ctx, out.getvalue()


def test_a_tagged_recipient_gets_the_message_as_before_and_a_delivered_row_with_the_bytes(store, monkeypatch):
    rc, ctx, lines = run(store, monkeypatch, {"alice@example.test": TAGGED})
    assert rc == Milter.ACCEPT and ctx._delrcpt == []
    assert ctx.added == list(SPAM_HEADERS)
    [row] = store.find()
    assert (row.recipient, row.state, row.check, row.kind, row.reason) == (
        "alice@example.test", State.DELIVERED, "spamassassin", "spam", "score 6.2 >= tag level 5")
    assert row.queue_id == "4XyZ12AB" and row.sender == "news@example.com" and row.subject == "offer"
    assert is_the_message(store.raw(row.public_id))
    assert "action=tag" in lines and f"recorded_id={row.public_id}" in lines


def test_held_and_tagged_recipients_of_one_message_share_one_copy(store, monkeypatch):
    table = {"bob@example.test": HELD, "alice@example.test": TAGGED, "carol@example.test": CLEAN}
    rc, ctx, lines = run(store, monkeypatch, table)
    assert rc == Milter.ACCEPT and ctx._delrcpt == ["<bob@example.test>"]
    rows = {row.recipient: row for row in store.find()}
    assert {rcpt: row.state for rcpt, row in rows.items()} == {
        "bob@example.test": State.HELD, "alice@example.test": State.DELIVERED}, "carol (below tag) has no row"
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM quarantine_message").scalar() == 1
    assert is_the_message(store.raw(rows["alice@example.test"].public_id))
    assert f"held_id={rows['bob@example.test'].public_id}" in lines
    assert f"recorded_id={rows['alice@example.test'].public_id}" in lines


def test_no_record_without_the_flag(store, monkeypatch):
    rc, _, lines = run(store, monkeypatch, {"alice@example.test": replace(TAGGED, record=False)})
    assert rc == Milter.ACCEPT and store.find() == [] and "recorded_id" not in lines


def test_a_store_that_cannot_keep_the_record_costs_the_record_not_the_message(store, monkeypatch, caplog):
    """Another writer holds the SQLite catalogue's write lock longer than db_timeout: the tagged message is
    accepted as without a store (same headers, nobody removed), with a warning line, and no row."""
    database = store.url.removeprefix("sqlite:///")
    store.check()  # the store answered once (as at start-up); the lock comes later
    lock = sqlite3.connect(database, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        with caplog.at_level(logging.WARNING, logger="mailwarden.milter"):
            rc, ctx, lines = run(store, monkeypatch, {"alice@example.test": TAGGED})
    finally:
        lock.close()
    assert rc == Milter.ACCEPT and ctx._reply is None and ctx._delrcpt == []
    assert ctx.added == list(SPAM_HEADERS)
    [warning] = [r for r in caplog.records if "record of delivered mail skipped" in r.getMessage()]
    kv = warning.__dict__["kv"]
    assert kv["queue_id"] == "4XyZ12AB" and kv["recipients"] == "alice@example.test" and "locked" in kv["error"]
    assert "action=tag" in lines and "recorded_id=skipped" in lines
    assert store.find() == []
    # the store back: the next one is recorded
    run(store, monkeypatch, {"alice@example.test": TAGGED})
    assert [row.state for row in store.find()] == [State.DELIVERED]


def test_mariadb_stopped_costs_the_record_not_the_message(tmp_path, monkeypatch, caplog, mariadb):
    """The same on MariaDB, stopped after the store answered once: the connection is refused at once."""
    settings = QuarantineSettings(database_url=mariadb.create_database("milter_record", drop=True),
                                  message_dir=tmp_path / "m", db_timeout="1s")
    store = QuarantineStore(settings)
    try:
        store.migrate()
        store.check()
        mariadb.stop()
        try:
            with caplog.at_level(logging.WARNING, logger="mailwarden.milter"):
                rc, ctx, lines = run(store, monkeypatch, {"alice@example.test": TAGGED})
        finally:
            mariadb.start()
        assert rc == Milter.ACCEPT and ctx._reply is None and ctx.added == list(SPAM_HEADERS)
        assert any("record of delivered mail skipped" in r.getMessage() for r in caplog.records)
        assert "recorded_id=skipped" in lines
        run(store, monkeypatch, {"alice@example.test": TAGGED})
        assert [row.state for row in store.find()] == [State.DELIVERED], "not recorded once MariaDB was back"
    finally:
        store.close()


def test_a_held_recipient_still_needs_the_store(store, monkeypatch):
    """With a held recipient beside the tagged one, the one write is a hold: 451 when it fails (nothing
    is lost: the client retries), as for any held mail."""
    database = store.url.removeprefix("sqlite:///")
    store.check()
    lock = sqlite3.connect(database, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        rc, ctx, _ = run(store, monkeypatch, {"bob@example.test": HELD, "alice@example.test": TAGGED})
    finally:
        lock.close()
    assert rc == Milter.TEMPFAIL and ctx._reply[0] == "451"
