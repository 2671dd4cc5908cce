"""The SpamAssassin milter through the real Postfix, chained after the ClamAV milter, with the real clamd and
the real spamd (per-user preferences and Bayes): per-recipient verdicts, the sender lists and levels of
the preferences store, aliases judged as their mailbox, forged X-Spam-* headers removed, a large spam
sampled rather than skipped, spamd stopped costing a retry, not a message, and tagged mail delivered and
recorded in the store (record_tagged), the store failing costing the record, not the message."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from email.message import EmailMessage

from conftest import mailwarden, milter_settings, text_message

from milters.spam_learning import learn_held
from milters.spamassassin import SpamAssassinSettings
from milters.spamd_client import SpamdClient
from quarantine.preferences import SpamPreferences
from quarantine.store import QuarantineSettings, QuarantineStore

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
CHAIN = ("clamav", "spamassassin")


def spam_settings(clamd, spamd, **spam: object) -> dict:
    settings = milter_settings(clamd)
    settings["milters"]["spamassassin"] = {"spamd": {"address": spamd.tcp_address, "timeout": "20s"},
                                           "retry_pause": "200ms", **spam}
    return settings


def gtube(subject: str, sender: str = "sender@example.org") -> EmailMessage:
    return text_message(subject, f"Hello,\n{GTUBE}\n", sender=sender)


def held_rows(stack) -> list[dict]:
    """The rows in state held (tagged mail delivered is recorded beside them, in state delivered)."""
    return store_rows(stack, "--state", "held")


def store_rows(stack, *filters: str) -> list[dict]:
    listed = json.loads(mailwarden(stack.milter, "quarantine", "list", "--json", *filters).stdout)
    return listed if isinstance(listed, list) else listed["messages"]


def test_gtube_is_held_for_its_recipient_and_released_once(milter_stack, clamd, spamd):
    stack = milter_stack(spam_settings(clamd, spamd, reject_level=5000), milters=CHAIN)
    assert stack.send(gtube("gtube held"), rcpts=("alice@example.test",)) is None
    log = stack.milters["spamassassin"].wait_log("action=quarantine")
    assert "kind=spam" in log and "score=100" in log and "held_id=" in log
    stack.marker()
    assert stack.sink.with_subject("gtube held") == []
    [row] = held_rows(stack)
    assert row["recipient"] == "alice@example.test" and row["kind"] == "spam" and row["state"] == "held"

    released_out = mailwarden(stack.milter, "quarantine", "release", row["public_id"]).stdout
    assert "learned as ham for alice@example.test" in released_out
    assert spamd.bayes_counts("alice@example.test") == (0, 1), "the rescued message did not teach Bayes"
    stack.sink.wait_for_subjects("gtube held", timeout=30)
    again = subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(stack.milter.config_path),
                            "quarantine", "release", row["public_id"]], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1
    stack.marker("after the release")
    [released] = stack.sink.with_subject("gtube held")
    assert released.rcpt_tos == ("alice@example.test",)
    assert released.message["X-Spam-Flag"] == "YES", "the held copy says why it was held"

    assert stack.send(gtube("gtube deleted"), rcpts=("bob@example.test",)) is None
    stack.milters["spamassassin"].wait_log("recipient=bob@example.test")
    [bobs] = [r for r in held_rows(stack) if r["recipient"] == "bob@example.test"]
    mailwarden(stack.milter, "quarantine", "delete", bobs["public_id"])
    assert spamd.bayes_counts("bob@example.test") == (1, 0), "the confirmed spam did not teach Bayes"


def test_a_clean_message_says_no_with_a_score_and_forged_verdicts_are_removed(milter_stack, clamd, spamd):
    stack = milter_stack(spam_settings(clamd, spamd), milters=CHAIN)
    forged = text_message("forged verdict")
    forged["X-Spam-Flag"] = "NO"
    forged["X-Spam-Status"] = "No, score=-100.0 required=5.0 tests=ALL_TRUSTED"
    forged["X-Spam-Checker-Version"] = "SpamAssassin 9.9"
    assert stack.send(forged) is None
    stack.sink.wait_for_subjects("forged verdict")
    [arrived] = stack.sink.with_subject("forged verdict")
    message = arrived.message
    assert message.get_all("X-Spam-Flag") is None and message.get_all("X-Spam-Checker-Version") is None
    [status] = message.get_all("X-Spam-Status")
    assert status.startswith("No, score=") and "-100.0" not in status
    assert "RCVD_ILLEGAL_IP" in status and "NO_RELAYS" not in status and "NO_RECEIVED" not in status, \
        "spamd did not see the hop from the client (XCLIENT ADDR=192.0.2.10, a documentation address)"
    assert float(message["X-Spam-Score"]) < 5
    assert message["X-Virus-Status"] == "Clean", "the ClamAV milter ahead of it did not see the message"

    spam = gtube("forged no on spam")
    spam["X-Spam-Flag"] = "NO"
    assert stack.send(spam) == (550, "5.7.1 Message content rejected")


def test_two_recipients_one_whitelisting_the_sender(milter_stack, clamd, spamd):
    stack = milter_stack(spam_settings(clamd, spamd, reject_level=5000), milters=CHAIN)
    mailwarden(stack.milter, "spam", "senders", "add", "--for", "carol@example.test", "--white", "sender@example.org")
    assert stack.send(gtube("whitelisted by one"), rcpts=("carol@example.test", "dave@example.test")) is None
    stack.sink.wait_for_subjects("whitelisted by one")
    stack.marker()
    [delivered] = stack.sink.with_subject("whitelisted by one")
    assert delivered.rcpt_tos == ("carol@example.test",)
    assert [(row["recipient"], row["kind"]) for row in held_rows(stack)] == [("dave@example.test", "spam")]


def test_an_alias_is_judged_with_its_mailboxs_levels(milter_stack, clamd, spamd, tmp_path):
    recipients = tmp_path / "recipients.map"
    recipients.write_text("carol@example.test\nsales@example.test: carol@example.test\nerin@example.test\n")
    settings = spam_settings(clamd, spamd, reject_level=5000)
    settings["policyd"] = {"recipients": {"sources": ["file"], "file": {"paths": [str(recipients)]}}}
    stack = milter_stack(settings, milters=CHAIN)
    mailwarden(stack.milter, "spam", "levels", "set", "--for", "carol@example.test", "--tag", "5", "--hold", "2000",
               "--reject", "3000")
    assert stack.send(gtube("to the alias"), rcpts=("sales@example.test", "erin@example.test")) is None
    stack.sink.wait_for_subjects("to the alias")
    stack.marker()
    [delivered] = stack.sink.with_subject("to the alias")
    assert delivered.rcpt_tos == ("sales@example.test",) and delivered.message["X-Spam-Flag"] == "YES"
    assert [(row["recipient"], row["mailbox"]) for row in held_rows(stack)] == [
        ("erin@example.test", "erin@example.test")]


def test_a_3mb_spam_with_its_pitch_after_2mb_of_text_is_caught(milter_stack, clamd, spamd):
    stack = milter_stack(spam_settings(clamd, spamd), milters=CHAIN)
    big = text_message("large spam", "lorem ipsum dolor sit amet, consectetur adipiscing elit\n" * 40_000)
    big.add_attachment(f"Hello,\n{GTUBE}\n" + "tail line of the pitch\n" * 50_000, subtype="plain")
    raw = big.as_bytes()
    assert len(raw) > 3 << 20
    assert stack.send(raw) == (550, "5.7.1 Message content rejected")
    log = stack.milters["spamassassin"].log_text()
    assert "action=reject" in log and "kind=spam" in log


def test_spamd_stopped_gives_451_and_the_retry_delivers(milter_stack, clamd, spamd):
    stack = milter_stack(spam_settings(clamd, spamd), front=True, milters=CHAIN)
    assert stack.front is not None
    spamd.stop()
    try:
        stack.send_via_front(text_message("while spamd was down"))
        stack.milters["spamassassin"].wait_log("action=defer", timeout=30)
        assert stack.sink.with_subject("while spamd was down") == []
    finally:
        spamd.start()
    stack.front.flush()
    stack.sink.wait_for_subjects("while spamd was down", timeout=60)
    [arrived] = stack.sink.with_subject("while spamd was down")
    assert arrived.message["X-Spam-Status"].startswith("No, score=")


TINA, HANK, CLEO = "tina@example.test", "hank@example.test", "cleo@example.test"


def test_tagged_mail_is_delivered_and_recorded_and_a_failing_store_costs_only_the_record(milter_stack, clamd,
                                                                                         spamd, tmp_path):
    """One GTUBE message to three recipients: tina's levels put it between her tag and hold levels
    (delivered, tagged, and recorded as delivered with its bytes, which Bayes learns as spam from the store as
    the digest's REPORT will), hank's defaults hold it (held, as before), cleo's tag level is above its score
    (delivered, no row). Then, with the SQLite catalogue write-locked by another writer past db_timeout, a
    tagged message is delivered all the same, with a warning and no row; and with record_tagged = false
    (the milter restarted, Postfix kept) no row either. The CLI is run where it is what is shown (each run
    costs seconds); the rest reads the store in this process."""
    database = tmp_path / "tagged.sqlite"
    settings = spam_settings(clamd, spamd, reject_level=5000)
    settings["quarantine"] = {"database_url": f"sqlite:///{database}", "message_dir": str(tmp_path / "tagged-held"),
                              "db_timeout": "1s"}
    stack = milter_stack(settings, milters=CHAIN)
    store = QuarantineStore(QuarantineSettings.model_validate(settings["quarantine"]))
    preferences = SpamPreferences(store)
    preferences.set_levels(TINA, tag=5, hold=2000, reject=3000, by="test")
    preferences.set_levels(CLEO, tag=1500, hold=2000, reject=3000, by="test")
    try:
        between_the_levels(stack, spamd, store, settings)
        locked_store(stack, store, database)
        record_tagged_off(stack, store)
    finally:
        store.close()


def between_the_levels(stack, spamd, store: QuarantineStore, settings: dict) -> None:
    assert stack.send(gtube("between the levels"), rcpts=(TINA, HANK, CLEO)) is None
    stack.sink.wait_for_subjects("between the levels")
    stack.marker()
    copies = stack.sink.with_subject("between the levels")
    assert sorted(rcpt for copy in copies for rcpt in copy.rcpt_tos) == [CLEO, TINA]
    for copy in copies:  # the delivered copy as without the record: flagged, the subject left alone
        assert copy.message["X-Spam-Flag"] == "YES" and copy.message["Subject"] == "between the levels"
    rows = {row["recipient"]: row for row in store_rows(stack)}  # the CLI's default listing: every state
    assert {rcpt: row["state"] for rcpt, row in rows.items()} == {TINA: "delivered", HANK: "held"}
    tina = rows[TINA]
    assert (tina["check"], tina["kind"], tina["mailbox"]) == ("spamassassin", "spam", TINA)
    assert re.fullmatch(r"score [\d.]+ >= tag level 5", tina["reason"]), tina["reason"]
    log = stack.milters["spamassassin"].log_text()
    assert f"recorded_id={tina['public_id']}" in log and f"held_id={rows[HANK]['public_id']}" in log
    raw = store.raw(tina["public_id"])
    assert GTUBE.encode() in raw and raw.startswith(b"X-Spam-Flag: YES\r\n")

    shown = mailwarden(stack.milter, "quarantine", "show", tina["public_id"]).stdout
    assert "delivered by spamassassin" in shown
    refused = subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(stack.milter.config_path),
                              "quarantine", "release", tina["public_id"]], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "not held: it was delivered" in refused.stderr

    # what REPORT does with the record: learn its bytes, read from the store, as spam in tina's Bayes
    spam = SpamAssassinSettings.model_validate(settings["milters"]["spamassassin"])
    client = SpamdClient(spam.spamd)
    try:
        record = store.get(tina["public_id"])
        assert record is not None
        assert learn_held(client, spam, store, record, "spam") == f"learned as spam for {TINA}"
    finally:
        client.close()
    assert spamd.bayes_counts(TINA) == (1, 0), "the recorded message did not teach Bayes"


def locked_store(stack, store: QuarantineStore, database) -> None:
    """Another writer holds the catalogue's write lock past db_timeout: delivered all the same, a warning, no
    row (as root a directory cannot be made unwritable, so the lock is how this store fails)."""
    lock = sqlite3.connect(database, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        assert stack.send(gtube("while the store was locked"), rcpts=(TINA,)) is None
        stack.sink.wait_for_subjects("while the store was locked")
    finally:
        lock.close()
    log = stack.milters["spamassassin"].wait_log("record of delivered mail skipped")
    assert "recorded_id=skipped" in log
    assert "while the store was locked" not in {record.subject for record in store.find()}


def record_tagged_off(stack, store: QuarantineStore) -> None:
    """The same milter restarted with record_tagged = false (Postfix keeps calling the same address)."""
    milter = stack.milters["spamassassin"]
    milter.kill()
    milter.settings["milters"]["spamassassin"]["record_tagged"] = False
    milter.start()
    assert stack.send(gtube("record_tagged off"), rcpts=(TINA,)) is None
    stack.sink.wait_for_subjects("record_tagged off")
    [copy] = stack.sink.with_subject("record_tagged off")
    assert copy.message["X-Spam-Flag"] == "YES"
    assert {record.subject for record in store.find()} == {"between the levels"}
