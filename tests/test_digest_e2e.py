"""``mailwarden digest send`` end to end: held rows in the real store (SQLite and MariaDB), the CLI as a
subprocess, the digests sent through the real Postfix's milter-skipping listener (the README's master.cf
lines) into the sink. One digest per mailbox, a rerun sends nothing, an ``immediate`` mailbox gets the next
one, ``off`` none; a run killed between the listener's 250 and the mark sends nobody a second digest."""

from __future__ import annotations

import datetime
import io
import json
import re
import shutil
import smtplib
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import need_postfix
from harness.net import free_port, wait_port
from harness.policyd_proc import render_toml
from harness.postfix import PostfixInstance
from harness.sink import Received, Sink

from quarantine.digest import reply_parse
from quarantine.digest.outbox import Outbox
from quarantine.digest.send import send_digests
from quarantine.digest.settings import Interval
from quarantine.digest.subscribers import set_interval
from quarantine.models import DigestRun, DigestSubscriber
from quarantine.store import HeldEnvelope, Hold, QuarantineSettings, QuarantineStore

pytestmark = pytest.mark.e2e

SECRET = "q8Vv1yX0mJ3kZ7pR2sT5uW9bC4dE6fG8hI0jK2lM4nO6"
YESTERDAY = datetime.timedelta(days=1)
SEND_AT = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)).strftime("%H:%M")
"""Today's daily send time an hour ago, whenever the tests run: mail held a day ago is due, mail held now
waits for tomorrow's (a fixed time would flip near midnight)."""


@pytest.fixture
def postfix(sink: Sink) -> Iterator[PostfixInstance]:
    """A private Postfix with the documented re-injection listener (digests go out through it, as they
    list spam and must skip the milters); its main smtpd is not used."""
    need_postfix()
    directory = Path(tempfile.mkdtemp(prefix="mw-postfix-"))
    directory.chmod(0o755)
    instance = PostfixInstance(directory, free_port(), sink.port, None, reinject_port=free_port())
    instance.start()
    try:
        wait_port(instance.reinject_port)
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(params=["sqlite", "mariadb"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'quarantine.sqlite'}"
    return request.getfixturevalue("mariadb").create_database("digest_e2e", drop=True)


@dataclass
class Site:
    settings: QuarantineSettings
    config: Path
    postfix: PostfixInstance
    sink: Sink
    stderr: str = ""
    """Of the last command: its log lines."""

    def store(self, shift: datetime.timedelta = datetime.timedelta(0)) -> QuarantineStore:
        """The store, its clock ``shift`` away from now (holds in the past, runs in the future)."""
        return QuarantineStore(self.settings, now=lambda: datetime.datetime.now(datetime.UTC) + shift)

    def cli(self, *args: str, expect: int = 0) -> dict:
        done = subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(self.config), "digest", *args,
                               "--json"], capture_output=True, text=True, timeout=120)
        assert done.returncode == expect, (args, done.returncode, done.stdout, done.stderr)
        self.stderr = done.stderr
        return json.loads(done.stdout)

    def marker(self, subject: str) -> None:
        """A mail sent through the listener after the runs under test, and waited for: once it arrived,
        every digest those runs sent has arrived (a positive signal instead of a pause)."""
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = "marker@example.test", "marker@example.test", subject
        message.set_content("marker\n")
        with smtplib.SMTP("127.0.0.1", self.postfix.reinject_port, timeout=30) as client:
            client.send_message(message)
        self.sink.wait_for_subjects(subject, timeout=30)

    def digests(self) -> dict[str, list[Received]]:
        found: dict[str, list[Received]] = {}
        for received in self.sink.messages:
            if str(received.message["Subject"]).startswith("Quarantine digest"):
                found.setdefault(received.rcpt_tos[0], []).append(received)
        return found


@pytest.fixture
def site(db_url: str, tmp_path: Path, postfix: PostfixInstance, sink: Sink) -> Iterator[Site]:
    quarantine = {"database_url": db_url, "message_dir": str(tmp_path / "held"),
                  "reinject": f"127.0.0.1:{postfix.reinject_port}",
                  "digest": {"from_address": "postmaster@example.test", "reply_mailbox": "quarantine@example.test",
                             "send_at": SEND_AT, "immediate_every": "5m", "metrics_file": str(tmp_path / "digest.prom"),
                             "token_keys": [{"id": "a", "secret": SECRET}]}}
    config = tmp_path / "mailwarden.toml"
    config.write_text(render_toml({"quarantine": quarantine}))
    settings = QuarantineSettings.model_validate(quarantine)
    store = QuarantineStore(settings)
    store.migrate()
    store.close()
    yield Site(settings, config, postfix, sink)


def hold(store: QuarantineStore, subject: str, *mailboxes: str) -> list[str]:
    raw = f"From: spammer@bad.example\r\nSubject: {subject}\r\n\r\nbuy\r\n".encode()
    envelope = HeldEnvelope("4ZbQ000", "spammer@bad.example", "192.0.2.10", "", "spammer@bad.example", subject, "",
                            store.now())
    return store.hold(io.BytesIO(raw), len(raw), envelope, [
        Hold(mailbox, mailbox, "spamassassin", "spam", "score 12.5 >= hold level 6") for mailbox in mailboxes])


def listed(received: Received) -> list[str]:
    """The digest lines of the held section of a digest's text part."""
    text = received.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    lines = text.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("==== mailwarden held"))
    return [line for line in lines[start + 1:] if line.startswith("[")]


def test_digest_send_through_postfix(site: Site) -> None:
    past = site.store(-YESTERDAY)
    try:
        hold(past, "Cheap watches", "alice@example.test", "bob@example.test", "carol@example.test",
             "dave@example.test")
        hold(past, "Locked account", "alice@example.test")
        set_interval(past, "carol@example.test", Interval.IMMEDIATE, "test")
        set_interval(past, "dave@example.test", Interval.OFF, "test")
    finally:
        past.close()

    first = site.cli("send", expect=0)
    assert (first["sent"], first["failed"], first["skipped"]) == (3, 0, 1)
    sent_lines = [line for line in site.stderr.splitlines() if 'msg="digest sent"' in line]
    assert sorted(line.split("owner=")[1].split()[0] for line in sent_lines) == [
        "alice@example.test", "bob@example.test", "carol@example.test"]
    assert all(re.search(r" queue_id=[0-9A-Za-z]+ ", line) for line in sent_lines)  # Postfix's queue ids
    [run_line] = [line for line in site.stderr.splitlines() if 'msg="digest run"' in line]
    assert " sent=3 failed=0 skipped=1 " in run_line
    rerun = site.cli("send")
    assert (rerun["sent"], rerun["failed"]) == (0, 0)
    site.marker("after the rerun")
    digests = site.digests()
    assert sorted(digests) == ["alice@example.test", "bob@example.test", "carol@example.test"]  # dave: off
    assert all(len(each) == 1 for each in digests.values())  # one each, the rerun sent nothing
    alice = digests["alice@example.test"][0]
    assert alice.mail_from == "<>" and alice.message.get_content_type() == "multipart/alternative"
    assert [part.get_content_type() for part in alice.message.iter_parts()] == ["text/plain", "text/html"]
    assert [line.split('"')[1] for line in listed(alice)] == ["Cheap\u00a0watches", "Locked\u00a0account"]
    html = alice.message.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert reply_parse.section_marker("held", 2) in html
    assert "Received: from" in alice.data.decode(errors="replace")  # it went through Postfix

    # new mail: carol (immediate) gets it in the next digest once immediate_every has passed; alice (daily)
    # waits for tomorrow's; dave (off) never
    now = site.store()
    try:
        hold(now, "Second wave", "alice@example.test", "carol@example.test", "dave@example.test")
    finally:
        now.close()
    later = site.store(datetime.timedelta(minutes=6))
    try:
        with Outbox(site.settings) as outbox:
            result = send_digests(later, site.settings, outbox)
    finally:
        later.close()
    assert (result.sent, result.failed, result.skipped, result.waiting) == (1, 0, 1, 1)
    site.marker("after the immediate run")
    digests = site.digests()
    assert {owner: len(each) for owner, each in digests.items()} == {
        "alice@example.test": 1, "bob@example.test": 1, "carol@example.test": 2}
    assert [line.split('"')[1] for line in listed(digests["carol@example.test"][1])] == ["Second\u00a0wave"]

    status = site.cli("status")
    assert status["last_run"]["sent"] == 1 and status["totals"]["sent"] == 4 and status["stale"] is None
    metrics = (Path(str(site.settings.digest.metrics_file))).read_text()  # type: ignore[union-attr]
    assert "mailwarden_digest_sent_total 4\n" in metrics and "mailwarden_digest_stale 0\n" in metrics


class Crash(BaseException):
    """The run killed right after the listener's 250, before the digest is marked sent."""


class CrashAfterFirst:
    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    def send(self, message: EmailMessage, recipient: str, sender: str = "") -> str:
        self.outbox.send(message, recipient, sender)
        raise Crash(recipient)


def test_a_run_killed_mid_way_sends_nobody_twice(site: Site) -> None:
    past = site.store(-YESTERDAY)
    try:
        hold(past, "Cheap watches", "alice@example.test", "bob@example.test")
    finally:
        past.close()
    store = site.store()
    try:
        with Outbox(site.settings) as outbox, pytest.raises(Crash) as crashed:
            send_digests(store, site.settings, CrashAfterFirst(outbox))
        assert str(crashed.value) == "alice@example.test"
        with store.reading("") as conn:
            claim = conn.execute(sa.select(DigestSubscriber.sending_cutoff)
                                 .where(DigestSubscriber.owner == "alice@example.test")).scalar_one()
            assert claim is not None  # the crash left its claim
    finally:
        store.close()

    rerun = site.cli("send")  # right after: alice's claim is fresh, left alone; bob's digest goes out
    assert (rerun["sent"], rerun["unknown"], rerun["waiting"]) == (1, 0, 1)
    later = site.store(datetime.timedelta(minutes=10))  # the claim is abandoned now: outcome unknown
    try:
        with Outbox(site.settings) as outbox:
            result = send_digests(later, site.settings, outbox)
        assert (result.sent, result.unknown, result.failed) == (1, 1, 0)
        with later.reading("") as conn:
            runs = conn.execute(sa.select(DigestRun.sent).order_by(DigestRun.id)).scalars().all()
            alice = conn.execute(sa.select(DigestSubscriber.sending_cutoff, DigestSubscriber.covered_until)
                                 .where(DigestSubscriber.owner == "alice@example.test")).one()
        assert runs == [0, 1, 1]  # the crashed run never finished its row
        assert alice[0] is None and alice[1] is not None
        with Outbox(site.settings) as outbox:
            assert send_digests(later, site.settings, outbox).sent == 0
    finally:
        later.close()
    site.marker("after the recovery")
    assert {owner: len(each) for owner, each in site.digests().items()} == {
        "alice@example.test": 1, "bob@example.test": 1}


def test_without_a_digest_section_the_commands_name_it(tmp_path: Path) -> None:
    config = tmp_path / "mailwarden.toml"
    config.write_text(render_toml({"quarantine": {"database_url": f"sqlite:///{tmp_path / 'q.sqlite'}"}}))
    for command in ("send", "status"):
        done = subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(config), "digest", command],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 78, done
        assert "[quarantine.digest]" in done.stderr


def test_an_unreachable_database_exits_69(tmp_path: Path) -> None:
    config = tmp_path / "mailwarden.toml"
    config.write_text(render_toml({"quarantine": {
        "database_url": f"mysql+pymysql://nobody@127.0.0.1:{free_port()}/none", "db_timeout": "2s",
        "digest": {"from_address": "postmaster@example.test", "reply_mailbox": "quarantine@example.test",
                   "token_keys": [{"id": "a", "secret": SECRET}]}}}))
    done = subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(config), "digest", "send"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 69, done
    assert "quarantine database" in done.stderr
