"""The quarantine store's contract, on a real SQLite file and a real MariaDB (the harness's private server):
migrations, hold/find/get/raw for inline and file messages, one copy for several recipients, the
conditional state change, purge while holds run, and an unreachable store."""

from __future__ import annotations

import datetime
import io
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

import phishhook.models  # noqa: F401  (phishhook's tables share the catalogue's Base and migrations)
from mailwarden.config import ENV_VAR
from quarantine import schema
from quarantine.models import Base, State, Storage
from quarantine.store import (
    CHUNK,
    ORPHAN_GRACE,
    HeldEnvelope,
    Hold,
    QuarantineSettings,
    QuarantineStore,
    SchemaBehind,
    StoreError,
    UnknownMessage,
    make_engine,
)

T0 = datetime.datetime(2026, 11, 1, 8, 0, tzinfo=datetime.UTC)
INLINE_MAX = 4096
QUARANTINE_DIR = Path(schema.__file__).parent


class Clock:
    def __init__(self, now: datetime.datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime.datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += datetime.timedelta(**delta)


def envelope(queue_id: str = "4ZbQ3x5yQ7z9", sender: str = "Sender@Example.org",
             received_at: datetime.datetime = T0) -> HeldEnvelope:
    return HeldEnvelope(queue_id=queue_id, sender=sender, client_address="192.0.2.10", auth_user="",
                        header_from="Sender <sender@example.org>", subject="Invoice é", date="Sun, 1 Nov 2026",
                        received_at=received_at)


def hold_for(recipient: str, kind: str = "banned", check: str = "banned", reason: str = "invoice.exe: *.exe",
             mailbox: str | None = None) -> Hold:
    return Hold(recipient=recipient, mailbox=mailbox or recipient, check=check, kind=kind, reason=reason)


def message(size: int, marker: str = "m") -> bytes:
    head = f"From: sender@example.org\r\nSubject: {marker}\r\nMessage-ID: <{marker}@t>\r\n\r\n".encode()
    line = b".dot-stuffed line \xe9 8bit\r\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(head))]
    return head + body


class ReadRecorder(io.BytesIO):
    """Records the size of each read: a hold must stream (bounded reads), never read() the whole file."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.sizes: list[int] = []

    def read(self, size: int | None = -1) -> bytes:
        self.sizes.append(-1 if size is None else size)
        return super().read(size)


# -- backends -------------------------------------------------------------------------------------------

@pytest.fixture(params=["sqlite", "mariadb"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalogue' / 'quarantine.sqlite'}"
    server = request.getfixturevalue("mariadb")
    return server.create_database("quarantine", drop=True)


def settings_for(url: str, tmp_path: Path, **extra: object) -> QuarantineSettings:
    return QuarantineSettings(database_url=url, message_dir=tmp_path / "messages", inline_max_size=INLINE_MAX,
                              **extra)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(db_url: str, tmp_path: Path, clock: Clock) -> Iterator[QuarantineStore]:
    quarantine = QuarantineStore(settings_for(db_url, tmp_path), now=clock)
    quarantine.migrate()
    yield quarantine
    quarantine.close()


def count(store: QuarantineStore, table: str) -> int:
    with store.engine.connect() as conn:
        return int(conn.scalar(sa.text(f"SELECT COUNT(*) FROM {table}")) or 0)


def message_files(store: QuarantineStore) -> list[Path]:
    return sorted(store.message_dir.glob("*/*.eml")) if store.message_dir.exists() else []


# -- migrations -----------------------------------------------------------------------------------------

def schema_differences(engine: sa.Engine) -> list[object]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "version_table": schema.VERSION_TABLE})
        return list(compare_metadata(context, Base.metadata))


def tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def test_migrations_from_empty_and_from_the_previous_revision(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        if engine.dialect.name == "sqlite":
            Path(str(engine.url.database)).parent.mkdir(parents=True)
        schema.upgrade(engine)  # from an empty database
        with engine.connect() as conn:
            assert schema.current_revision(conn) == schema.head_revision()
        assert schema_differences(engine) == []  # the migrations build exactly what the models declare
        # each revision down and up again, from head to the first (whose downgrade leaves nothing); what
        # each upgrade keeps: test_the_first_revision_upgrades_to_head_keeping_its_rows
        script = ScriptDirectory.from_config(schema.alembic_config())
        for revision in [rev.revision for rev in script.walk_revisions()]:  # head first
            below = script.get_revision(revision).down_revision
            assert below is None or isinstance(below, str)
            schema.downgrade(engine, below or "base")
            if below is None:
                assert tables(engine) - {schema.VERSION_TABLE} == set()
            schema.upgrade(engine, revision)
            with engine.connect() as conn:
                assert schema.current_revision(conn) == revision
            schema.downgrade(engine, below or "base")
        schema.upgrade(engine)
        assert schema_differences(engine) == []
        assert {"quarantine_message", "quarantine_held", "spam_levels", "spam_senders"} <= tables(engine)
    finally:
        engine.dispose()


def test_the_first_revision_upgrades_to_head_keeping_its_rows(db_url: str, tmp_path: Path) -> None:
    """A catalogue made by the first release (revision 0001, messages held) upgrades to head: the rows stay,
    the store opens it, and a downgrade to 0001 removes only what came after."""
    engine = make_engine(db_url)
    try:
        if engine.dialect.name == "sqlite":
            Path(str(engine.url.database)).parent.mkdir(parents=True)
        schema.upgrade(engine, "0001")
        assert tables(engine) - {schema.VERSION_TABLE} == {"quarantine_message", "quarantine_held"}
        with engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO quarantine_message (id, received_at, queue_id, sender, client_address, auth_user, "
                "header_from, subject, date, size, storage) VALUES (3, :t, 'Q3', 's@example.org', '', '', '', "
                "'from 0001', '', 1, 'purged')"), {"t": T0.replace(tzinfo=None)})
        behind = QuarantineStore(settings_for(db_url, tmp_path))
        try:
            with pytest.raises(SchemaBehind, match=r"at revision 0001.*run 'mailwarden quarantine migrate'"):
                behind.check()
            assert behind.migrate() == ("0001", schema.head_revision())
            behind.check()
        finally:
            behind.close()
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT id, subject FROM quarantine_message")).all() == [(3, "from 0001")]
        assert schema_differences(engine) == []
        schema.downgrade(engine, "0001")
        assert tables(engine) - {schema.VERSION_TABLE} == {"quarantine_message", "quarantine_held"}
        with engine.connect() as conn:
            assert schema.current_revision(conn) == "0001"
            assert conn.execute(sa.text("SELECT id FROM quarantine_message")).scalars().all() == [3]
    finally:
        engine.dispose()


def test_the_store_refuses_a_database_behind_head(db_url: str, tmp_path: Path) -> None:
    quarantine = QuarantineStore(settings_for(db_url, tmp_path))
    try:
        with pytest.raises(SchemaBehind, match="run 'mailwarden quarantine migrate'"):
            quarantine.find()
        with pytest.raises(SchemaBehind):
            quarantine.hold(io.BytesIO(b"x"), 1, envelope(), [hold_for("a@example.test")])
        before, after = quarantine.migrate()
        assert (before, after) == (None, schema.head_revision())
        assert quarantine.find() == []
        assert quarantine.migrate() == (after, after)  # idempotent
    finally:
        quarantine.close()


def test_the_store_refuses_a_database_of_a_newer_version(db_url: str, tmp_path: Path) -> None:
    quarantine = QuarantineStore(settings_for(db_url, tmp_path))
    try:
        quarantine.migrate()
        with quarantine.engine.begin() as conn:
            conn.execute(sa.text(f"UPDATE {schema.VERSION_TABLE} SET version_num = 'f00dcafe'"))
        with pytest.raises(SchemaBehind, match="does not know"):
            quarantine.find()
        with pytest.raises(SchemaBehind, match="does not know"):
            quarantine.migrate()
    finally:
        quarantine.close()


def test_the_alembic_command_takes_the_url_of_the_mailwarden_config(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'configured.sqlite'}"
    config = tmp_path / "mailwarden.toml"
    config.write_text(f'[quarantine]\ndatabase_url = "{url}"\n')
    result = subprocess.run([sys.executable, "-m", "alembic", "-c", str(QUARANTINE_DIR / "alembic.ini"),
                             "upgrade", "head"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, ENV_VAR: str(config)})
    assert result.returncode == 0, result.stderr
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert schema.current_revision(conn) == schema.head_revision()
    finally:
        engine.dispose()


def test_the_alembic_command_migrates_with_the_shipped_ini(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'admin.sqlite'}"
    result = subprocess.run([sys.executable, "-m", "alembic", "-c", str(QUARANTINE_DIR / "alembic.ini"),
                             "-x", f"url={url}", "upgrade", "head"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert schema.current_revision(conn) == schema.head_revision()
    finally:
        engine.dispose()


# -- hold, find, get, raw -------------------------------------------------------------------------------

def test_small_message_round_trips_inline(store: QuarantineStore) -> None:
    raw = message(1000, "small")
    [public_id] = store.hold(io.BytesIO(raw), len(raw), envelope(), [hold_for("Alice@Example.test",
                                                                              mailbox="alice@example.test")])
    assert len(public_id) >= 16 and public_id.isalnum()
    record = store.get(public_id)
    assert record is not None
    assert (record.recipient, record.mailbox, record.check, record.kind, record.reason) == (
        "Alice@Example.test", "alice@example.test", "banned", "banned", "invoice.exe: *.exe")
    assert (record.sender, record.queue_id, record.subject, record.client_address) == (
        "Sender@Example.org", "4ZbQ3x5yQ7z9", "Invoice é", "192.0.2.10")
    assert record.state is State.HELD and record.held_at == T0 and record.received_at == T0
    assert record.size == len(raw) and record.storage is Storage.INLINE
    assert store.raw(public_id) == raw
    assert message_files(store) == []
    with store.engine.connect() as conn:  # compressed in the database
        stored = conn.scalar(sa.text("SELECT content FROM quarantine_message"))
    assert stored is not None and stored != raw and len(stored) < len(raw)
    assert store.get("nosuchid") is None
    with pytest.raises(UnknownMessage):
        store.raw("nosuchid")


def test_large_message_is_a_file_written_in_bounded_reads(store: QuarantineStore) -> None:
    raw = message(INLINE_MAX * 40, "large")
    source = ReadRecorder(raw)
    [public_id] = store.hold(source, len(raw), envelope(), [hold_for("bob@example.test")])
    assert source.sizes and all(0 < size <= CHUNK for size in source.sizes)  # streamed, never read() whole
    record = store.get(public_id)
    assert record is not None and record.storage is Storage.FILE and record.size == len(raw)
    [path] = message_files(store)
    assert path.read_bytes() == raw
    assert store.raw(public_id) == raw
    with store.open_raw(public_id) as handle:
        assert handle.read(10) == raw[:10]


def test_inline_message_is_compressed_in_bounded_reads(store: QuarantineStore) -> None:
    raw = message(INLINE_MAX, "edge")  # exactly inline_max_size: still inline
    source = ReadRecorder(raw)
    [public_id] = store.hold(source, len(raw), envelope(), [hold_for("bob@example.test")])
    assert all(0 < size <= CHUNK for size in source.sizes)
    assert store.raw(public_id) == raw and message_files(store) == []


def test_oversized_and_undecodable_header_values_are_kept_clipped(store: QuarantineStore) -> None:
    """A 100 KB subject (Postfix lets headers reach header_size_limit), a header with undecodable bytes
    (lone surrogates) and an over-long sender must not make the hold fail at every retry of the sender."""
    subject = "Invoice \udcff " + "x" * 100_000
    sender = "a" * 400 + "@example.org"
    env = HeldEnvelope(queue_id="4ZbQ", sender=sender, client_address="192.0.2.1", auth_user="",
                       header_from="\udce9mile <e@example.org>", subject=subject, date="d", received_at=T0)
    [public_id] = store.hold(io.BytesIO(b"x"), 1, env, [hold_for("a@example.test", reason="r" * 70_000)])
    record = store.get(public_id)
    assert record is not None
    assert record.subject.startswith("Invoice ? xxx") and len(record.subject) == 8000
    assert record.header_from == "?mile <e@example.org>" and len(record.sender) == 320
    assert len(record.reason) == 8000


def test_find_filters(store: QuarantineStore, clock: Clock) -> None:
    raw = message(500)
    virus = store.hold(io.BytesIO(raw), len(raw), envelope(sender="worm@bad.example"),
                       [hold_for("alice@example.test", kind="virus", check="clamav", reason="Eicar-Signature")])[0]
    clock.advance(hours=2)
    banned = store.hold(io.BytesIO(raw), len(raw), envelope(), [hold_for("a.alias@example.test",
                                                                         mailbox="alice@example.test")])[0]
    clock.advance(hours=2)
    other = store.hold(io.BytesIO(raw), len(raw), envelope(), [hold_for("bob@example.test")])[0]

    def ids(**filters: object) -> list[str]:
        return [record.public_id for record in store.find(**filters)]  # type: ignore[arg-type]

    assert ids() == [other, banned, virus]  # newest first
    assert ids(mailbox="ALICE@example.test") == [banned, virus]
    assert ids(recipient="a.alias@EXAMPLE.test") == [banned]
    assert ids(sender="WORM@bad.example") == [virus]
    assert ids(kind="virus") == [virus]
    assert ids(since=T0 + datetime.timedelta(hours=1)) == [other, banned]
    assert ids(until=T0 + datetime.timedelta(hours=2)) == [virus]  # until is excluded
    assert ids(limit=1) == [other]
    assert store.transition(other, [State.HELD], State.DELETED, "admin")
    assert ids(state=State.HELD) == [banned, virus]
    assert ids(state="deleted") == [other]
    assert ids(recipient="nobody@example.test") == []


def test_two_recipients_share_one_copy_and_release_separately(store: QuarantineStore) -> None:
    raw = message(INLINE_MAX * 3, "two")
    first, second = store.hold(io.BytesIO(raw), len(raw), envelope(),
                               [hold_for("alice@example.test"), hold_for("bob@example.test")])
    assert first != second
    assert count(store, "quarantine_message") == 1 and len(message_files(store)) == 1
    assert count(store, "quarantine_held") == 2
    assert store.transition(first, [State.HELD], State.RELEASED, "alice")
    first_record, second_record = store.get(first), store.get(second)
    assert first_record is not None and first_record.state is State.RELEASED and first_record.state_by == "alice"
    assert second_record is not None and second_record.state is State.HELD
    assert store.raw(second) == raw


def test_transition_is_conditional_and_has_one_winner(store: QuarantineStore, clock: Clock) -> None:
    [public_id] = store.hold(io.BytesIO(b"x\r\n"), 3, envelope(), [hold_for("alice@example.test")])
    racers = 6
    barrier = threading.Barrier(racers)
    won: list[bool] = []
    errors: list[BaseException] = []

    def claim(name: str) -> None:
        try:
            barrier.wait(10)
            won.append(store.transition(public_id, [State.HELD], State.RELEASING, name))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(f"admin{i}",)) for i in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert sorted(won) == [False] * (racers - 1) + [True]
    clock.advance(minutes=1)
    assert not store.transition(public_id, [State.HELD], State.DELETED, "late")
    assert store.transition(public_id, [State.RELEASING], State.RELEASED, "admin0", released_queue_id="4Q")
    record = store.get(public_id)
    assert record is not None and record.state is State.RELEASED and record.released_queue_id == "4Q"
    assert record.state_at == T0 + datetime.timedelta(minutes=1)
    assert not store.transition("nosuchid", [State.HELD], State.DELETED, "x")


def test_a_failed_hold_leaves_no_row_and_no_file(store: QuarantineStore) -> None:
    raw = message(INLINE_MAX * 5, "fails")
    broken = Hold(recipient="alice@example.test", mailbox="alice@example.test", check=None,  # type: ignore[arg-type]
                  kind="banned", reason="x")
    with pytest.raises(StoreError, match="cannot hold the message"):
        store.hold(io.BytesIO(raw), len(raw), envelope(), [hold_for("bob@example.test"), broken])
    assert count(store, "quarantine_message") == 0 and count(store, "quarantine_held") == 0
    assert message_files(store) == []  # the file written before the failed commit is gone


def test_a_short_spool_is_refused(store: QuarantineStore) -> None:
    raw = message(INLINE_MAX * 2, "short")
    with pytest.raises(StoreError, match="expected"):
        store.hold(io.BytesIO(raw[:-10]), len(raw), envelope(), [hold_for("bob@example.test")])
    assert message_files(store) == [] and count(store, "quarantine_message") == 0


# -- purge ----------------------------------------------------------------------------------------------

def test_purge_expires_old_holds_and_removes_bytes_nobody_holds(store: QuarantineStore, clock: Clock) -> None:
    big = message(INLINE_MAX * 3, "old")
    [old] = store.hold(io.BytesIO(big), len(big), envelope(), [hold_for("alice@example.test")])
    shared = store.hold(io.BytesIO(big), len(big), envelope(), [hold_for("alice@example.test"),
                                                                 hold_for("bob@example.test")])
    assert store.transition(shared[0], [State.HELD], State.RELEASED, "alice")
    clock.advance(days=20)
    small = message(100, "recent")
    [recent] = store.hold(io.BytesIO(small), len(small), envelope(), [hold_for("carol@example.test")])
    assert len(message_files(store)) == 2
    clock.advance(days=11)

    result = store.purge(clock() - datetime.timedelta(days=30))
    # old and shared[1] (both held since T0) expire; shared[0] was released at T0 and is forgotten
    assert (result.expired, result.forgotten, result.raw_removed) == (2, 1, 2)
    old_record = store.get(old)
    assert old_record is not None and old_record.state is State.EXPIRED and old_record.state_by == "purge"
    assert store.get(shared[0]) is None
    with pytest.raises(UnknownMessage, match="purged"):
        store.raw(old)
    assert message_files(store) == []
    assert store.raw(recent) == small
    recent_record = store.get(recent)
    assert recent_record is not None and recent_record.state is State.HELD

    # the bytes of a message stay while any recipient holds it
    raw = message(200, "kept")
    kept = store.hold(io.BytesIO(raw), len(raw), envelope(), [hold_for("a@example.test"), hold_for("b@example.test")])
    assert store.transition(kept[0], [State.HELD], State.DELETED, "a")
    store.purge(clock() - datetime.timedelta(days=30))
    assert store.raw(kept[1]) == raw
    assert store.transition(kept[1], [State.HELD], State.RELEASED, "b")
    assert store.purge(clock() - datetime.timedelta(days=30)).raw_removed == 1
    with pytest.raises(UnknownMessage):
        store.raw(kept[1])


def delivered_for(recipient: str) -> Hold:
    return Hold(recipient=recipient, mailbox=recipient, check="spamassassin", kind="spam",
                reason="score 6.2 >= tag level 5", state=State.DELIVERED)


def test_delivered_records_keep_their_bytes_until_the_retention_expires_them(store: QuarantineStore,
                                                                             clock: Clock) -> None:
    """Tagged spam the SpamAssassin milter delivered and recorded: stored once with the held copy of the
    same message, found by state, its bytes kept while its row is delivered (after the held row beside it
    is gone), expired by purge after the retention like a held row, and its bytes freed then."""
    big = message(INLINE_MAX * 3, "tagged")
    held, delivered = store.hold(io.BytesIO(big), len(big), envelope(),
                                 [hold_for("bob@example.test", kind="spam", check="spamassassin"),
                                  delivered_for("alice@example.test")])
    assert count(store, "quarantine_message") == 1 and len(message_files(store)) == 1
    record = store.get(delivered)
    assert record is not None and record.state is State.DELIVERED and record.state_by == "spamassassin"
    assert (record.kind, record.reason, record.held_at) == ("spam", "score 6.2 >= tag level 5", T0)
    assert [r.public_id for r in store.find(state=State.DELIVERED)] == [delivered]
    assert [r.public_id for r in store.find(state=State.HELD)] == [held]
    assert {r.public_id for r in store.find()} == {held, delivered}, "the default listing is every state"

    assert store.transition(held, [State.HELD], State.DELETED, "bob")
    clock.advance(days=29)
    result = store.purge(clock() - datetime.timedelta(days=30))
    assert (result.expired, result.raw_removed) == (0, 0)
    assert store.raw(delivered) == big, "a delivered row's bytes went while it can still be reported"

    clock.advance(days=2)
    result = store.purge(clock() - datetime.timedelta(days=30))
    assert (result.expired, result.raw_removed) == (1, 1)
    record = store.get(delivered)
    assert record is not None and record.state is State.EXPIRED and record.state_by == "purge"
    with pytest.raises(UnknownMessage, match="purged"):
        store.raw(delivered)
    assert message_files(store) == []


def test_a_reported_record_frees_its_bytes_and_is_forgotten_after_the_retention(store: QuarantineStore,
                                                                               clock: Clock) -> None:
    raw = message(200, "reported")
    [public_id] = store.hold(io.BytesIO(raw), len(raw), envelope(), [delivered_for("alice@example.test")])
    assert not store.transition(public_id, [State.HELD], State.DELETED, "alice"), "a delivered row was deleted"
    assert store.transition(public_id, [State.DELIVERED], State.REPORTED, "alice")
    result = store.purge(clock() - datetime.timedelta(days=30))
    assert (result.expired, result.forgotten, result.raw_removed) == (0, 0, 1)
    clock.advance(days=31)
    assert store.purge(clock() - datetime.timedelta(days=30)).forgotten == 1
    assert store.get(public_id) is None


def test_a_row_starts_held_or_delivered(store: QuarantineStore) -> None:
    with pytest.raises(ValueError, match="held or delivered"):
        store.hold(io.BytesIO(b"x"), 1, envelope(), [Hold("a@example.test", "a@example.test", "x", "spam", "r",
                                                          state=State.RELEASED)])
    assert count(store, "quarantine_message") == 0


def test_purge_works_in_batches(store: QuarantineStore, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("quarantine.store.BATCH", 3)
    raw = message(INLINE_MAX * 2, "batch")
    ids = [public_id for index in range(5)
           for public_id in store.hold(io.BytesIO(raw), len(raw), envelope(), [hold_for(f"u{index}@example.test"),
                                                                              hold_for(f"v{index}@example.test")])]
    assert store.transition(ids[0], [State.HELD], State.DELETED, "u0")
    clock.advance(days=31)
    result = store.purge(clock() - datetime.timedelta(days=30))
    assert (result.expired, result.forgotten, result.raw_removed) == (9, 1, 5)
    assert [record.state for record in store.find()] == [State.EXPIRED] * 9
    assert message_files(store) == []


def test_purge_puts_a_release_that_never_finished_back_to_held(store: QuarantineStore, clock: Clock) -> None:
    raw = message(100, "stuck")
    stuck, recent = store.hold(io.BytesIO(raw), len(raw), envelope(), [hold_for("a@example.test"),
                                                                       hold_for("b@example.test")])
    assert store.transition(stuck, [State.HELD], State.RELEASING, "killed")
    clock.advance(minutes=50)
    assert store.transition(recent, [State.HELD], State.RELEASING, "running")
    clock.advance(minutes=20)
    assert store.purge(clock() - datetime.timedelta(days=30)).unstuck == 1
    stuck_record, recent_record = store.get(stuck), store.get(recent)
    assert stuck_record is not None and (stuck_record.state, stuck_record.state_by) == (State.HELD, "purge")
    assert recent_record is not None and recent_record.state is State.RELEASING  # may still be sending
    assert store.raw(stuck) == raw


def test_purge_removes_only_old_orphaned_files(store: QuarantineStore) -> None:
    raw = message(INLINE_MAX * 2, "named")
    [public_id] = store.hold(io.BytesIO(raw), len(raw), envelope(), [hold_for("alice@example.test")])
    [named] = message_files(store)
    old_orphan = named.parent / ("0" * 32 + ".eml")
    young_orphan = named.parent / ("1" * 32 + ".eml")  # a hold writing its file right now
    old_orphan.write_bytes(b"left by a crash")
    young_orphan.write_bytes(b"in flight")
    an_hour_ago = time.time() - ORPHAN_GRACE - 60
    os.utime(old_orphan, (an_hour_ago, an_hour_ago))
    os.utime(named, (an_hour_ago, an_hour_ago))
    result = store.purge(T0 - datetime.timedelta(days=30))
    assert result.orphans_removed == 1
    assert not old_orphan.exists() and young_orphan.exists() and named.exists()
    assert store.raw(public_id) == raw


def test_purge_while_holds_run(store: QuarantineStore, clock: Clock, tmp_path: Path) -> None:
    """Milter threads holding while the nightly purge runs: no hold fails, nothing held loses its bytes."""
    old = []
    for index in range(12):
        raw = message(INLINE_MAX * 2 if index % 2 else 300, f"old{index}")
        old += store.hold(io.BytesIO(raw), len(raw), envelope(), [hold_for(f"u{index}@example.test")])
    clock.advance(days=31)  # the old ones are past the retention; the new ones are held "now"
    writers, per_writer = 4, 10
    held: dict[str, bytes] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(writers + 1)

    def writer(number: int) -> None:
        try:
            start.wait(10)
            for index in range(per_writer):
                raw = message(INLINE_MAX * 2 if index % 2 else 300, f"new{number}.{index}")
                ids = store.hold(io.BytesIO(raw), len(raw), envelope(queue_id=f"Q{number}x{index}"),
                                 [hold_for("x@example.test"), hold_for("y@example.test")])
                with lock:
                    held.update(dict.fromkeys(ids, raw))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    start.wait(10)
    purges = 0
    while any(thread.is_alive() for thread in threads) or purges < 2:
        store.purge(clock() - datetime.timedelta(days=30))
        purges += 1
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert len(held) == writers * per_writer * 2
    for public_id, raw in held.items():
        record = store.get(public_id)
        assert record is not None and record.state is State.HELD
        assert store.raw(public_id) == raw
    for public_id in old:
        record = store.get(public_id)
        assert record is not None and record.state is State.EXPIRED
        with pytest.raises(UnknownMessage):
            store.raw(public_id)
    with store.engine.connect() as conn:
        named = set(conn.execute(sa.text("SELECT path FROM quarantine_message WHERE path IS NOT NULL")).scalars())
    assert {str(p.relative_to(store.message_dir)) for p in message_files(store)} == named


# -- an unreachable store -------------------------------------------------------------------------------

def test_unwritable_sqlite_path_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the catalogue's directory should be")
    quarantine = QuarantineStore(settings_for(f"sqlite:///{blocker / 'sub' / 'q.sqlite'}", tmp_path))
    try:
        with pytest.raises(StoreError, match="not-a-directory"):
            quarantine.find()
        with pytest.raises(StoreError, match="not-a-directory"):
            quarantine.hold(io.BytesIO(b"x"), 1, envelope(), [hold_for("a@example.test")])
        with pytest.raises(StoreError):
            quarantine.migrate()
    finally:
        quarantine.close()


def test_unwritable_message_dir_is_a_store_error(db_url: str, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    quarantine = QuarantineStore(QuarantineSettings(database_url=db_url, message_dir=blocker / "messages",
                                                    inline_max_size=10))
    try:
        quarantine.migrate()
        with pytest.raises(StoreError, match="message_dir"):
            quarantine.hold(io.BytesIO(b"x" * 100), 100, envelope(), [hold_for("a@example.test")])
        assert count(quarantine, "quarantine_message") == 0
    finally:
        quarantine.close()


def test_stopped_mariadb_is_a_store_error_and_the_store_recovers(mariadb, tmp_path: Path) -> None:
    url = mariadb.create_database("quarantine_down", drop=True)
    quarantine = QuarantineStore(settings_for(url, tmp_path, db_timeout="2s"))
    try:
        quarantine.migrate()
        raw = message(100)
        [public_id] = quarantine.hold(io.BytesIO(raw), len(raw), envelope(), [hold_for("a@example.test")])
        mariadb.stop()
        try:
            with pytest.raises(StoreError, match="check that it is running"):
                quarantine.hold(io.BytesIO(raw), len(raw), envelope(), [hold_for("a@example.test")])
            with pytest.raises(StoreError):
                quarantine.get(public_id)
            assert message_files(quarantine) == []
        finally:
            mariadb.start()
        assert quarantine.raw(public_id) == raw  # pre-ping replaces the connections from before the outage
        assert len(quarantine.hold(io.BytesIO(raw), len(raw), envelope(), [hold_for("a@example.test")])) == 1
    finally:
        quarantine.close()


def test_streaming_source_is_read_once(store: QuarantineStore) -> None:
    """hold reads a non-seekable stream (a pipe from the spool) once, from where it stands."""
    raw = message(INLINE_MAX * 2, "pipe")
    read_end, write_end = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(write_end, raw), os.close(write_end)))
    writer.start()
    with os.fdopen(read_end, "rb") as pipe:
        source: BinaryIO = pipe
        [public_id] = store.hold(source, len(raw), envelope(), [hold_for("a@example.test")])
    writer.join(10)
    assert store.raw(public_id) == raw


def test_defaults_resolve_under_the_system_root_when_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = QuarantineSettings()  # nothing resolved yet: the root is read when the store needs a path
    monkeypatch.setenv("MAILWARDEN_ROOT", str(tmp_path / "root"))
    assert settings.resolved_database_url() == f"sqlite:///{tmp_path}/root/var/lib/mailwarden/quarantine.sqlite"
    assert settings.resolved_message_dir() == tmp_path / "root" / "var/lib/mailwarden/quarantine"
    quarantine = QuarantineStore(QuarantineSettings(inline_max_size=10))
    try:
        quarantine.migrate()  # creates /var/lib/mailwarden under the root
        raw = message(100)
        [public_id] = quarantine.hold(io.BytesIO(raw), len(raw), envelope(), [hold_for("a@example.test")])
        assert quarantine.raw(public_id) == raw
        assert len(list((tmp_path / "root/var/lib/mailwarden/quarantine").glob("*/*.eml"))) == 1
    finally:
        quarantine.close()


@pytest.mark.parametrize(("value", "ok"), [("127.0.0.1:10026", True), ("[::1]:10026", True),
                                           ("mx.example.org:25", True), ("127.0.0.1", False),
                                           ("127.0.0.1:0", False), ("::1:10026", False)])
def test_reinject_is_host_and_port(value: str, ok: bool) -> None:
    if ok:
        assert QuarantineSettings(reinject=value).reinject == value
    else:
        with pytest.raises(ValueError, match="reinject"):
            QuarantineSettings(reinject=value)


def test_sqlite_writes_take_the_write_lock_at_their_start(tmp_path: Path) -> None:
    """BEGIN IMMEDIATE: a write transaction that reads first (purge's batches) never has to upgrade a read
    snapshot that another writer made stale, which SQLite fails at once instead of waiting."""
    quarantine = QuarantineStore(settings_for(f"sqlite:///{tmp_path / 'q.sqlite'}", tmp_path))
    try:
        quarantine.migrate()
        with quarantine._writer.begin() as conn:
            conn.execute(sa.text("SELECT COUNT(*) FROM quarantine_held"))  # only a read so far
            other = sqlite3.connect(tmp_path / "q.sqlite", timeout=0, isolation_level=None)
            try:
                with pytest.raises(sqlite3.OperationalError, match="locked"):
                    other.execute("BEGIN IMMEDIATE")
            finally:
                other.close()
        with quarantine.engine.connect() as conn:  # reads do not take it
            conn.execute(sa.text("SELECT COUNT(*) FROM quarantine_held"))
            other = sqlite3.connect(tmp_path / "q.sqlite", timeout=0, isolation_level=None)
            try:
                other.execute("BEGIN IMMEDIATE")
                other.execute("ROLLBACK")
            finally:
                other.close()
        with quarantine.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        quarantine.close()


def test_database_url_is_checked_with_the_settings() -> None:
    with pytest.raises(ValueError, match="not an SQLAlchemy URL"):
        QuarantineSettings(database_url="db.example.org/mail")
    assert QuarantineSettings(database_url="mysql+pymysql://u:p@db.example.org/mail").database_url


@pytest.mark.skipif(os.geteuid() != 0, reason="only root creates files for another user")
def test_as_root_files_belong_to_the_directory_owner(tmp_path: Path) -> None:
    """The CLI run by root must not leave the catalogue, its WAL or a message file the milters' user cannot
    write (systemd's StateDirectory gives /var/lib/mailwarden to that user)."""
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)
    (state / "messages").mkdir()
    os.chown(state / "messages", 65534, 65534)
    quarantine = QuarantineStore(QuarantineSettings(database_url=f"sqlite:///{state / 'q.sqlite'}",
                                                    message_dir=state / "messages", inline_max_size=10))
    try:
        quarantine.migrate()
        quarantine.hold(io.BytesIO(b"x" * 100), 100, envelope(), [hold_for("a@example.test")])
        created = [state / "q.sqlite", state / "q.sqlite-wal", state / "q.sqlite-shm", *message_files(quarantine),
                   *[p.parent for p in message_files(quarantine)]]
        assert len(created) == 5
        assert {(p.stat().st_uid, p.stat().st_gid) for p in created} == {(65534, 65534)}
    finally:
        quarantine.close()
