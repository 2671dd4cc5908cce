"""End to end, the quarantine store failing while a message is being held: a sending MTA (a second Postfix)
-> our Postfix -> the ClamAV milter with ``virus = "quarantine"`` -> clamd; the store is a private MariaDB
(stopped, then started again) or SQLite (locked by another writer, then released).

What is shown: while the store cannot commit, the infected message gets 451 4.3.0 (the milter's
``action=defer`` line, and the sending MTA keeps it queued with that reply); it is never delivered; once
the store is back, the sending MTA's retry lands it in the store, held once for its recipient.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import MilterStack, mailwarden, milter_settings, text_message
from harness.clamd import ClamdInstance
from harness.mariadb import MariaDbInstance
from harness.net import wait_for

pytestmark = pytest.mark.e2e

from test_clamav import EICAR  # noqa: E402  (kept encoded there, so no file of the tree is flagged)

RCPT = "user@example.test"
SENDER = "sender@example.org"
DEFERRED_BY_STORE = "451 4.3.0"
"""TEMPFAIL_STORE (milters/verdict.py) as the sending MTA records it."""


def held_settings(clamd: ClamdInstance, database_url: str, tmp_path: Path) -> dict:
    return {**milter_settings(clamd, virus="quarantine"),
            "quarantine": {"database_url": database_url, "message_dir": str(tmp_path / "held"), "db_timeout": "1s"}}


def send_infected_through_the_front(stack: MilterStack, subject: str) -> None:
    msg = text_message(subject, to=RCPT)
    msg.add_attachment(EICAR, maintype="application", subtype="octet-stream", filename="eicar.txt")
    stack.send_via_front(msg, SENDER, (RCPT,))


def wait_deferred_by_the_store(stack: MilterStack) -> None:
    """The milter's decision line says defer, and the sending MTA holds the message with our 451 4.3.0."""
    log = stack.milter.wait_log("action=defer", timeout=30)
    assert "the quarantine store could not keep the message" in log
    front = stack.front
    assert front is not None

    def queued_with_our_reply() -> bool:
        return any(DEFERRED_BY_STORE in rcpt.get("delay_reason", "")
                   for entry in front.queue() for rcpt in entry.get("recipients", []))

    wait_for(queued_with_our_reply, 30, what="the sending MTA to queue the message with 451 4.3.0")


def held_rows(stack: MilterStack) -> list[dict]:
    listed = json.loads(mailwarden(stack.milter, "quarantine", "list", "--json").stdout)
    return listed if isinstance(listed, list) else listed["messages"]


def wait_held_after_the_retry(stack: MilterStack, subject: str) -> None:
    """The sending MTA retries now; the message is held once for its recipient, and never delivered."""
    assert stack.front is not None
    stack.front.flush()
    wait_for(lambda: bool(held_rows(stack)), 60, what="the retried message in the quarantine store")
    [row] = held_rows(stack)
    assert row["recipient"] == RCPT and row["state"] == "held" and row["kind"] == "virus", row
    assert "Eicar" in row["reason"], row
    wait_for(lambda: not stack.front.queue(), 30, what="the sending MTA's queue to empty")  # type: ignore[union-attr]
    stack.milter.wait_log("action=quarantine")
    stack.marker()
    assert stack.sink.with_subject(subject) == []
    assert len(held_rows(stack)) == 1


def test_mariadb_stopped_while_holding_gives_451_and_the_retry_is_held(milter_stack, clamd, mariadb: MariaDbInstance,
                                                                        tmp_path):
    url = mariadb.create_database("e2e_milter_store", drop=True)
    stack = milter_stack(held_settings(clamd, url, tmp_path), front=True)  # migrated while MariaDB runs
    subject = "virus while mariadb was down"
    mariadb.stop()
    try:
        send_infected_through_the_front(stack, subject)
        wait_deferred_by_the_store(stack)
        assert stack.sink.with_subject(subject) == []
    finally:
        mariadb.start()
    wait_held_after_the_retry(stack, subject)


@contextmanager
def write_locked(database: Path) -> Iterator[None]:
    """Another writer holds the SQLite database's write lock (a long transaction, a backup tool)."""
    conn = sqlite3.connect(database, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        yield
    finally:
        conn.close()  # rolls back, and the lock goes


def test_sqlite_locked_while_holding_gives_451_and_the_retry_is_held(milter_stack, clamd, tmp_path):
    """As root a directory cannot be made unwritable (root ignores its mode), so the SQLite store is made
    unavailable by the lock of another writer, which the milter waits ``db_timeout`` for."""
    database = tmp_path / "quarantine.sqlite"
    stack = milter_stack(held_settings(clamd, f"sqlite:///{database}", tmp_path), front=True)
    subject = "virus while sqlite was locked"
    with write_locked(database):
        send_infected_through_the_front(stack, subject)
        wait_deferred_by_the_store(stack)
        assert stack.sink.with_subject(subject) == []
    wait_held_after_the_retry(stack, subject)
