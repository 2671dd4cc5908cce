"""quarantine/digest/send.py against the real store (SQLite and MariaDB) and a real SMTP listener (the sink):
who is due when (the clock injected, hours and days ahead without sleeping), what a failed send leaves,
the stale warning, the metrics textfile, the delivered section, the admin copy, the systemd units, and
memory that does not grow with the number of mailboxes."""

from __future__ import annotations

import datetime
import io
import re
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from harness.net import free_port, wait_port
from harness.policyd_proc import render_toml
from harness.sink import Sink

from quarantine.digest import send
from quarantine.digest.outbox import Outbox
from quarantine.digest.send import RunResult, is_due, send_digests, status
from quarantine.digest.settings import DigestSettings, Interval
from quarantine.digest.subscribers import SecurityEvent, record_event, set_interval
from quarantine.models import DigestSubscriber
from quarantine.store import HeldEnvelope, Hold, QuarantineSettings, QuarantineStore

SECRET = "q8Vv1yX0mJ3kZ7pR2sT5uW9bC4dE6fG8hI0jK2lM4nO6"
T0 = datetime.datetime(2026, 12, 1, 4, 0, tzinfo=datetime.UTC)
"""A Tuesday, 05:00 in Berlin: before the 06:00 send time."""
HOUR = datetime.timedelta(hours=1)
SYSTEMD = Path(__file__).parent.parent / "systemd"


class Clock:
    def __init__(self, moment: datetime.datetime = T0) -> None:
        self.moment = moment

    def __call__(self) -> datetime.datetime:
        return self.moment

    def advance(self, delta: datetime.timedelta) -> None:
        self.moment += delta


def digest_settings(**extra: object) -> dict:
    return {"from_address": "postmaster@example.test", "reply_mailbox": "quarantine@example.test",
            "timezone": "Europe/Berlin", "send_at": "06:00", "token_keys": [{"id": "a", "secret": SECRET}], **extra}


# -- schedules (pure) --------------------------------------------------------------------------------------

BERLIN = DigestSettings.model_validate(digest_settings(weekly_day="friday"))


@pytest.mark.parametrize(("interval", "now", "last_sent", "first_new", "due"), [
    # daily, from 06:00 Berlin (05:00 UTC in winter)
    (Interval.DAILY, T0, None, T0 - 2 * HOUR, False),                          # 05:00: before send_at
    (Interval.DAILY, T0 + 2 * HOUR, None, T0 - 2 * HOUR, True),                # 07:00: due
    (Interval.DAILY, T0 + 2 * HOUR, T0 + HOUR, T0 - 2 * HOUR, False),          # sent at 06:00 already
    (Interval.DAILY, T0 + 2 * HOUR, T0 - 20 * HOUR, T0 - 2 * HOUR, True),      # sent yesterday
    (Interval.DAILY, T0 + 2 * HOUR, None, T0 + 1.5 * HOUR, False),             # held after 06:00: tomorrow
    (Interval.DAILY, T0 + 26 * HOUR, T0 + HOUR, T0 + 1.5 * HOUR, True),        # tomorrow it is
    # weekly on Friday 06:00 (T0 is a Tuesday)
    (Interval.WEEKLY, T0 + 2 * HOUR, T0 - 5 * 24 * HOUR, T0 - 2 * HOUR, False),
    (Interval.WEEKLY, T0 + 74 * HOUR, T0 - 5 * 24 * HOUR, T0 - 2 * HOUR, True),  # Friday 07:00
    (Interval.WEEKLY, T0 + 73.5 * HOUR, T0 - 5 * 24 * HOUR, T0 - 2 * HOUR, True),
    (Interval.WEEKLY, T0 + 72.5 * HOUR, T0 - 5 * 24 * HOUR, T0 - 2 * HOUR, False),  # Friday 05:30
    # immediate, every 15 minutes (less 30 s of slack)
    (Interval.IMMEDIATE, T0, None, T0, True),
    (Interval.IMMEDIATE, T0, T0 - datetime.timedelta(minutes=10), T0, False),
    (Interval.IMMEDIATE, T0, T0 - datetime.timedelta(minutes=14, seconds=40), T0, True),
    (Interval.OFF, T0 + 48 * HOUR, None, T0, False),
])
def test_who_is_due(interval: Interval, now: datetime.datetime, last_sent: datetime.datetime | None,
                    first_new: datetime.datetime, due: bool) -> None:
    assert is_due(BERLIN, interval, last_sent, first_new, now) is due


def test_daily_follows_local_time_across_daylight_saving() -> None:
    summer = datetime.datetime(2026, 7, 1, 4, 30, tzinfo=datetime.UTC)  # 06:30 in Berlin (UTC+2)
    assert send.last_slot(BERLIN, Interval.DAILY, summer) == datetime.datetime(2026, 7, 1, 4, 0, tzinfo=datetime.UTC)
    winter = datetime.datetime(2026, 12, 1, 4, 30, tzinfo=datetime.UTC)  # 05:30 in Berlin (UTC+1)
    assert send.last_slot(BERLIN, Interval.DAILY, winter) == datetime.datetime(2026, 11, 30, 5, 0,
                                                                               tzinfo=datetime.UTC)


# -- with the store ----------------------------------------------------------------------------------------

@pytest.fixture(params=["sqlite", "mariadb"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'quarantine.sqlite'}"
    return request.getfixturevalue("mariadb").create_database("digest_send", drop=True)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def settings_data(url: str, tmp_path: Path, port: int, **digest: object) -> dict:
    """``[quarantine]`` as the config file has it."""
    return {"database_url": url, "message_dir": str(tmp_path / "held"), "reinject": f"127.0.0.1:{port}",
            "reinject_timeout": "5s", "digest": digest_settings(metrics_file=str(tmp_path / "m" / "digest.prom"),
                                                                **digest)}


def make_settings(url: str, tmp_path: Path, port: int, **digest: object) -> QuarantineSettings:
    return QuarantineSettings.model_validate(settings_data(url, tmp_path, port, **digest))


@pytest.fixture
def store(db_url: str, tmp_path: Path, sink: Sink, clock: Clock) -> Iterator[QuarantineStore]:
    quarantine = QuarantineStore(make_settings(db_url, tmp_path, sink.port), now=clock)
    quarantine.migrate()
    yield quarantine
    quarantine.close()


def hold(store: QuarantineStore, subject: str, *mailboxes: str, kind: str = "spam") -> list[str]:
    raw = f"From: x@bad.example\r\nSubject: {subject}\r\n\r\nbuy\r\n".encode()
    envelope = HeldEnvelope("Q1", "x@bad.example", "192.0.2.10", "", "x@bad.example", subject, "", store.now())
    return store.hold(io.BytesIO(raw), len(raw), envelope, [
        Hold(mailbox, mailbox, "spamassassin", kind, "score 9 >= hold level 6") for mailbox in mailboxes])


def run(store: QuarantineStore, settings: QuarantineSettings | None = None, **options: object) -> RunResult:
    settings = settings or store.settings
    with Outbox(settings) as outbox:
        return send_digests(store, settings, outbox, **options)  # type: ignore[arg-type]


def digests_to(sink: Sink, owner: str) -> list[str]:
    return [received.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
            for received in sink.messages if received.rcpt_tos == (owner,)]


def test_daily_digests_over_two_days(store: QuarantineStore, sink: Sink, clock: Clock) -> None:
    hold(store, "Night spam", "alice@example.test", "bob@example.test")
    assert (run(store).sent, run(store).waiting) == (0, 2)  # 05:00: not yet
    clock.advance(2 * HOUR)  # 07:00
    first = run(store)
    assert (first.sent, first.failed, first.waiting) == (2, 0, 0)
    clock.advance(datetime.timedelta(minutes=1))
    hold(store, "Morning spam", "alice@example.test")
    assert run(store).sent == 0  # sent today already; held after 06:00
    clock.advance(24 * HOUR)
    assert run(store).sent == 1
    alice = digests_to(sink, "alice@example.test")
    assert len(alice) == 2 and "Night\u00a0spam" in alice[0] and "Night" not in alice[1] and "Morning" in alice[1]
    assert len(digests_to(sink, "bob@example.test")) == 1


def test_mail_held_for_the_security_team_is_in_no_digest(store: QuarantineStore, sink: Sink, clock: Clock) -> None:
    """The message that snagged its sender (phishhook, kind ``phish``) is held for the security team: its
    recipients are not told of it, nor can they release it."""
    hold(store, "Urgent invoice", "alice@example.test", "bob@example.test", kind="phish")
    hold(store, "Cheap pills", "alice@example.test")
    clock.advance(2 * HOUR)
    assert run(store).sent == 1  # alice, for the pills; bob has nothing a digest may show
    [digest] = digests_to(sink, "alice@example.test")
    assert "pills" in digest and "invoice" not in digest
    assert digests_to(sink, "bob@example.test") == []


def test_owner_option_sends_now_whatever_the_interval(store: QuarantineStore, sink: Sink) -> None:
    hold(store, "Spam", "alice@example.test", "bob@example.test")
    set_interval(store, "bob@example.test", Interval.OFF, "test")
    assert run(store, dry_run=True, owner="bob@example.test").would_send == [
        {"owner": "bob@example.test", "held": 1, "interval": "off"}]
    assert not sink.messages  # a dry run sends nothing
    result = run(store, owner="BOB@example.test")
    assert result.sent == 1 and [m.rcpt_tos for m in sink.messages] == [("bob@example.test",)]


def test_a_failed_send_releases_the_claim_and_the_next_run_sends(store: QuarantineStore, sink: Sink,
                                                                 clock: Clock, tmp_path: Path) -> None:
    hold(store, "Spam", "alice@example.test")
    clock.advance(2 * HOUR)
    down = make_settings(store.url, tmp_path, free_port())  # nothing listens there
    failed = run(store, down)
    assert (failed.sent, failed.failed) == (0, 1)
    with store.reading("") as conn:
        assert conn.execute(sa.select(DigestSubscriber.sending_cutoff, DigestSubscriber.last_sent_at)).one() == (
            None, None)
    assert "mailwarden_digest_failed_total 1\n" in Path(str(store.settings.digest.metrics_file)).read_text()  # type: ignore[union-attr]
    assert run(store).sent == 1
    assert len(digests_to(sink, "alice@example.test")) == 1


def test_listener_failing_in_a_row_stops_the_run(store: QuarantineStore, clock: Clock, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(send, "MAX_CONSECUTIVE_FAILURES", 3)
    hold(store, "Spam", *[f"user{index}@example.test" for index in range(6)])
    clock.advance(2 * HOUR)
    result = run(store, make_settings(store.url, tmp_path, free_port()))
    assert result.failed == 3 and "in a row" in result.stopped


def test_stale_warning_and_metrics(store: QuarantineStore, clock: Clock, sink: Sink) -> None:
    hold(store, "Spam", "alice@example.test")
    set_interval(store, "bob@example.test", Interval.OFF, "test")
    hold(store, "Spam", "bob@example.test")
    clock.advance(3 * 24 * HOUR)  # three days without a run: then a run whose listener is down
    assert status(store, store.settings.digest).stale is not None  # type: ignore[arg-type]
    result = run(store, dry_run=True)
    assert result.stale is not None and result.stale.last_digest_at is None
    assert "no digest was ever sent" in result.stale.message(clock())
    record_event(store, SecurityEvent(reason="bad-mac", sender="mallory@example.net"))
    record_event(store, SecurityEvent(reason="bad-mac", sender="mallory@example.net"))
    record_event(store, SecurityEvent(reason="not-authenticated", sender="alice@example.test"))
    done = run(store)
    assert done.sent == 1 and done.skipped == 1 and done.stale is None
    metrics_file = Path(str(store.settings.digest.metrics_file))  # type: ignore[union-attr]
    metrics = metrics_file.read_text()
    assert re.search(r'^mailwarden_digest_refused_replies_total\{reason="bad-mac"\} 2$', metrics, re.MULTILINE)
    assert re.search(r'^mailwarden_digest_refused_replies_total\{reason="not-authenticated"\} 1$', metrics,
                     re.MULTILINE)
    assert re.search(r"^mailwarden_digest_sent_total 1$", metrics, re.MULTILINE)
    assert re.search(r"^mailwarden_digest_seconds_since_last_digest 0$", metrics, re.MULTILINE)
    assert re.search(r"^mailwarden_digest_stale 0$", metrics, re.MULTILINE)
    assert [path.name for path in metrics_file.parent.iterdir()] == ["digest.prom"]  # no temp file left
    clock.advance(3 * 24 * HOUR)  # bob's (off) mail waits for no digest: not stale
    assert status(store, store.settings.digest).stale is None  # type: ignore[arg-type]
    hold(store, "More", "alice@example.test")
    clock.advance(3 * 24 * HOUR)
    later = status(store, store.settings.digest)  # type: ignore[arg-type]
    assert later.stale is not None and later.stale.last_digest_at is not None


def test_delivered_section_and_max_listed(db_url: str, tmp_path: Path, sink: Sink, clock: Clock) -> None:
    store = QuarantineStore(make_settings(db_url, tmp_path, sink.port, max_listed=2), now=clock)
    try:
        store.migrate()
        hold(store, "One", "alice@example.test")
        hold(store, "Two", "alice@example.test")
        hold(store, "Three", "alice@example.test")
        [tagged] = hold(store, "Tagged", "alice@example.test")
        assert store.transition(tagged, ["held"], "delivered", "spamassassin")
        clock.advance(2 * HOUR)
        assert run(store).sent == 1
        [text] = digests_to(sink, "alice@example.test")
        assert "==== mailwarden held 2 ====" in text and "and 1 more held message" in text
        assert "==== mailwarden delivered 1 ====" in text and "subject=REPORT%20" in text
    finally:
        store.close()


def test_admin_copy_once_a_day(db_url: str, tmp_path: Path, sink: Sink, clock: Clock) -> None:
    store = QuarantineStore(make_settings(db_url, tmp_path, sink.port, admin_copy="postmaster@example.test"),
                            now=clock)
    try:
        store.migrate()
        hold(store, "Spam", "alice@example.test", "bob@example.test", "carol@other.test")
        clock.advance(2 * HOUR)
        assert run(store).admin_copy == "sent"
        assert run(store).admin_copy == ""
        [copy] = [m for m in sink.messages if m.rcpt_tos == ("postmaster@example.test",)]
        body = copy.message.get_content().replace("\r\n", "\n")
        assert re.search(r"^example\.test\s+2\s+2$", body, re.MULTILINE)
        assert re.search(r"^other\.test\s+1\s+1$", body, re.MULTILINE)
        clock.advance(24 * HOUR)
        assert run(store).admin_copy == "sent"
    finally:
        store.close()


def test_status_exits_1_and_warns_when_digests_are_stale(db_url: str, tmp_path: Path, sink: Sink) -> None:
    data = settings_data(db_url, tmp_path, sink.port)
    settings = QuarantineSettings.model_validate(data)
    config = tmp_path / "mailwarden.toml"
    config.write_text(render_toml({"quarantine": data}))
    old = QuarantineStore(settings, now=lambda: datetime.datetime.now(datetime.UTC) - 3 * 24 * HOUR)
    try:
        old.migrate()
        assert cli(config, "digest", "status").returncode == 0
        hold(old, "Old spam", "alice@example.test")
    finally:
        old.close()
    done = cli(config, "digest", "status")
    assert done.returncode == 1 and "digests are stale: no digest was ever sent" in done.stderr, done
    done = cli(config, "config", "check")
    assert "stale_after" in done.stdout + done.stderr and "digests are stale" in done.stdout + done.stderr, done
    done = cli(config, "digest", "send", "--dry-run")
    assert done.returncode == 1 and "alice@example.test: 1 held (daily)" in done.stdout
    assert "digests are stale" in done.stderr and not sink.messages
    done = cli(config, "digest", "send")
    assert done.returncode == 0 and done.stdout.startswith("1 digest(s) sent, 0 failed"), done
    assert cli(config, "digest", "status").returncode == 0
    assert "digests are stale" not in cli(config, "config", "check").stdout


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=60)


def test_the_per_mailbox_queries_use_the_mailbox_index(tmp_path: Path, sink: Sink, clock: Clock) -> None:
    """SQLite without statistics (no ANALYZE) reads every held row of every mailbox per digest when it takes
    the (state, held_at) index: each query must go by (mailbox, held_at)."""
    store = QuarantineStore(make_settings(f"sqlite:///{tmp_path / 'q.sqlite'}", tmp_path, sink.port), now=clock)
    try:
        store.migrate()
        hold(store, "Spam", "alice@example.test", "bob@example.test")
        for query in (send.entries_query("alice@example.test", "held", T0 - HOUR, T0, 200),
                      send.entries_query("alice@example.test", "delivered", None, T0, 200),
                      send.candidates_query(T0, "alice@example.test")):
            sql = str(query.compile(store.engine, compile_kwargs={"literal_binds": True}))
            with store.engine.connect() as conn:
                plan = " | ".join(row[3] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))
            assert "USING INDEX ix_quarantine_held_mailbox_held_at" in plan and "state_held_at" not in plan, plan
    finally:
        store.close()


# -- memory ------------------------------------------------------------------------------------------------

@pytest.fixture
def discarding_listener() -> Iterator[int]:
    """A real SMTP server in its own process that accepts and forgets (aiosmtpd's Sink handler): the digests
    it takes do not count in this process's memory."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "aiosmtpd", "-n", "-c", "aiosmtpd.handlers.Sink",
                             "-l", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_memory_does_not_grow_with_the_number_of_mailboxes(tmp_path: Path, discarding_listener: int,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(send, "BATCH", 5)
    peaks = []
    for users in (20, 120):
        clock = Clock()
        settings = make_settings(f"sqlite:///{tmp_path / f'q{users}.sqlite'}", tmp_path, discarding_listener)
        store = QuarantineStore(settings, now=clock)
        try:
            store.migrate()
            hold(store, "Spam", *[f"user{index:05d}@example.test" for index in range(users)])
            clock.advance(2 * HOUR)
            run(store)  # warm up: imports, templates, the engine's caches; then a second day, measured
            clock.advance(datetime.timedelta(minutes=1))
            hold(store, "More", *[f"user{index:05d}@example.test" for index in range(users)])
            clock.advance(24 * HOUR)
            tracemalloc.start()
            result = run(store)
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
            assert result.sent == users
        finally:
            store.close()
    assert peaks[1] < peaks[0] * 1.5, peaks  # six times the mailboxes, not more memory


# -- the systemd units -------------------------------------------------------------------------------------

def test_the_timer_runs_digest_send_every_five_minutes() -> None:
    service = (SYSTEMD / "mailwarden-digest.service").read_text()
    timer = (SYSTEMD / "mailwarden-digest.timer").read_text()
    assert "Type=oneshot" in service and re.search(r"^ExecStart=\S+/mailwarden digest send$", service, re.MULTILINE)
    assert "OnCalendar=*:0/5" in timer and "Persistent=true" in timer
    checked = subprocess.run(["systemd-analyze", "calendar", "*:0/5"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
