"""The quarantine store: held messages in SQL (SQLite by default, MariaDB/MySQL for a site with several
hosts), their raw bytes once per message, one held row per recipient; and, beside them, records of tagged
spam that was delivered (rows in state ``delivered``: kept like held ones, never released).

Called from libmilter worker threads, several at once: every method is synchronous and thread-safe (one
Engine, one connection per call from its pool). ``hold`` has committed when it returns, so the milter may
then discard the message or remove the recipient. On SQLite the catalogue runs in WAL mode with a busy
timeout, and every write transaction takes the write lock at its start (BEGIN IMMEDIATE), so concurrent
holds and a purge wait for each other instead of failing. On MariaDB transactions run at READ COMMITTED,
so a purge's range update locks no gap that holds insert into.

Raw bytes up to ``inline_max_size`` are kept zlib-compressed in the catalogue; larger ones as a file under
``message_dir`` (written and fsynced before the rows are committed, removed again if the commit fails). A
file left by a crash between the two is removed by ``purge`` once it is an hour old and still unreferenced.

Every failure of the database or the message directory is a ``StoreError`` saying what failed and what to
do; the store never leaves a row without its bytes or a file without its row behind.
"""

from __future__ import annotations

import base64
import datetime
import io
import logging
import os
import re
import secrets
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import sqlalchemy as sa
from pydantic import field_validator
from sqlalchemy.orm import Session

from mailwarden.logs import get_logger, log_kv
from mailwarden.paths import QUARANTINE_DATABASE, QUARANTINE_MESSAGES, system_path
from mailwarden.section import Section
from mailwarden.units import Duration, Size
from quarantine import schema
from quarantine.digest.settings import DigestSettings
from quarantine.models import ADDRESS, LIVE_STATES, RETAINED_STATES, Held, Message, State, Storage

log = get_logger("quarantine")
T = TypeVar("T")


class QuarantineSettings(Section):
    """The ``[quarantine]`` section."""

    database_url: str | None = None
    """SQLAlchemy URL of the catalogue: ``mysql+pymysql://user:password@db.example.org/mail`` for MariaDB
    or MySQL, ``sqlite:////path/file.sqlite``; unset: SQLite at /var/lib/mailwarden/quarantine.sqlite."""
    message_dir: Path | None = None
    """Where messages above inline_max_size are kept as files; unset: /var/lib/mailwarden/quarantine. With
    several hosts on one MariaDB, a directory every host (and the CLI) reaches, or a large inline_max_size."""
    inline_max_size: Size = 1 << 20
    """Messages up to this size (bytes, "1MB") are kept compressed in the database, larger ones as files."""
    retention: Duration = 30 * 86400
    """Seconds ("30d") a message stays held (or a delivered one recorded) before ``quarantine purge``
    expires it; records of released, deleted, reported and expired messages are kept as long again."""
    reinject: str = "127.0.0.1:10026"
    """host:port of the Postfix listener that released messages are re-injected to (it must skip the
    milters and the policy service: see README, "Quarantine")."""
    reinject_timeout: Duration = 60.0
    """Seconds to wait for each reply of the re-injection listener."""
    db_timeout: Duration = 10.0
    """Seconds to wait for the database: connecting and each reply on MariaDB, the write lock on SQLite."""
    digest: DigestSettings | None = None
    """``[quarantine.digest]``: the users' digests and their replies (``quarantine/digest/settings.py``)."""

    @field_validator("database_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                sa.make_url(value)
            except sa.exc.ArgumentError:
                raise ValueError("not an SQLAlchemy URL: use e.g. 'mysql+pymysql://user:password@host/database' "
                                 "or 'sqlite:////var/lib/mailwarden/quarantine.sqlite'") from None
        return value

    @field_validator("reinject")
    @classmethod
    def _host_port(cls, value: str) -> str:
        split_host_port(value)
        return value

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{system_path(QUARANTINE_DATABASE)}"

    def resolved_message_dir(self) -> Path:
        return self.message_dir or system_path(QUARANTINE_MESSAGES)


def split_host_port(value: str) -> tuple[str, int]:
    """``127.0.0.1:10026``, ``[::1]:10026`` or ``mx.example.org:10026`` as (host, port); ValueError else."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]\s]+):(\d+)", value.strip())
    if not match:
        raise ValueError(f"{value!r} is not host:port (e.g. '127.0.0.1:10026' or '[::1]:10026')")
    host, port = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
    if not 0 < int(port) < 65536:
        raise ValueError(f"{value!r}: port {port} is out of range")
    return host, int(port)


# -- what callers give and get -------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldEnvelope:
    """What is known about a message when it is held (the milter's macros and headers)."""

    queue_id: str
    sender: str
    """Envelope sender as given in MAIL FROM, "" for the null sender; releases use it unchanged."""
    client_address: str
    auth_user: str
    header_from: str
    subject: str
    date: str
    received_at: datetime.datetime
    """Aware, UTC."""


@dataclass(frozen=True)
class Hold:
    """One recipient it is held for, and why."""

    recipient: str
    mailbox: str
    """The mailbox that owns it (the digest goes there): the recipient after alias resolution."""
    check: str
    kind: str
    reason: str
    state: State = State.HELD
    """``held``, or ``delivered`` for a record of a message delivered to this recipient (tagged spam): kept
    like a held one, never released."""


HOLD_STATES = (State.HELD, State.DELIVERED)
"""The states a row starts in."""


@dataclass(frozen=True)
class HeldRecord:
    public_id: str
    recipient: str
    mailbox: str
    check: str
    kind: str
    reason: str
    held_at: datetime.datetime
    state: State
    state_by: str
    state_at: datetime.datetime
    released_queue_id: str
    queue_id: str
    sender: str
    client_address: str
    auth_user: str
    header_from: str
    subject: str
    date: str
    received_at: datetime.datetime
    size: int
    storage: Storage

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, datetime.datetime):
                data[key] = value.isoformat()
        data["state"], data["storage"] = str(self.state), str(self.storage)
        return data


@dataclass(frozen=True)
class Purged:
    expired: int
    """Held rows older than the cut-off, now expired."""
    unstuck: int
    """Rows left releasing for over an hour (a release killed before it finished), held again."""
    forgotten: int
    """Records of released, deleted and expired messages older than the cut-off, removed."""
    raw_removed: int
    """Messages whose bytes were removed (no recipient holds them any more)."""
    orphans_removed: int
    """Files in message_dir that no row names (left by a crash between writing and committing)."""


class StoreError(Exception):
    """The store cannot do what was asked; the message says what failed and what to do."""


class SchemaBehind(StoreError):
    """The database is not at the schema this version needs; ``revision`` is where it is (None: empty)."""

    def __init__(self, message: str, revision: str | None = None) -> None:
        super().__init__(message)
        self.revision = revision


class UnknownMessage(LookupError):
    """No held message has this id (or its bytes are gone)."""


# -- the store -----------------------------------------------------------------------------------------

CHUNK = 1 << 16
STUCK_RELEASE = datetime.timedelta(hours=1)
"""A row releasing for longer (its release was killed mid-way) is put back to held by purge."""
ORPHAN_GRACE = 3600.0
"""Seconds (of real time: file ages) before purge removes a message file that no row names; a hold in
progress writes its file before it commits, never an hour before."""
DEADLOCK = 1213
"""MariaDB's (and MySQL's) ER_LOCK_DEADLOCK: the transaction was rolled back whole."""
BATCH = 500
"""Rows a purge changes per transaction."""
ID_BYTES = 10
"""Public ids: 80 random bits, 16 characters of lower-case base32."""


def new_public_id() -> str:
    return base64.b32encode(secrets.token_bytes(ID_BYTES)).decode("ascii").lower()


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def make_engine(url: str, timeout: float = 10.0) -> sa.Engine:
    """An Engine for the catalogue: pooled, with pre-ping (a restarted MariaDB costs no failed call), and
    on SQLite WAL, a busy timeout and BEGIN IMMEDIATE for the writes (connections of
    ``engine.execution_options(quarantine_write=True)``)."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = sa.create_engine(url, connect_args={"timeout": timeout, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # transactions begun by the "begin" hook below
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            if parsed.database and parsed.database != ":memory:":
                cursor.execute("PRAGMA journal_mode = WAL")
                cursor.execute("PRAGMA synchronous = FULL")  # committed means on disk: the milter drops its copy
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.close()
            if parsed.database and parsed.database != ":memory:":
                for suffix in ("", "-wal", "-shm"):
                    adopt(Path(parsed.database + suffix))

        @sa.event.listens_for(engine, "begin")
        def _sqlite_begin(conn: sa.Connection) -> None:
            write = conn.get_execution_options().get("quarantine_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine
    seconds = max(1, round(timeout))
    connect_args: dict[str, Any] = {}
    if parsed.get_backend_name() in ("mysql", "mariadb"):
        connect_args = {"connect_timeout": seconds, "read_timeout": seconds, "write_timeout": seconds}
        return sa.create_engine(url, pool_pre_ping=True, pool_recycle=3600, connect_args=connect_args,
                                isolation_level="READ COMMITTED")
    return sa.create_engine(url, pool_pre_ping=True, pool_recycle=3600)


TEXT = 8000
"""Characters kept of a header or a reason: MariaDB's TEXT holds 64 KB, 4 bytes a character in utf8mb4."""


def clip(value: str, limit: int) -> str:
    """``value`` as the catalogue can keep it on every backend: at most ``limit`` characters (MariaDB in
    strict mode refuses longer ones, and the hold would fail at every retry of the sender), and lone
    surrogates (undecodable header bytes) replaced, which UTF-8 cannot encode."""
    if not isinstance(value, str):
        return value  # not ours to mend: the insert refuses it with a StoreError
    if not value.isascii():
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value[:limit]


def adopt(path: Path) -> None:
    """As root, give ``path`` (a file the store just created or opened) to the owner of its directory.

    The milters run as the service user (systemd's StateDirectory makes /var/lib/mailwarden theirs); an
    admin running ``mailwarden quarantine migrate`` or ``list`` as root would otherwise leave the SQLite
    catalogue, its -wal and -shm files or a message file owned by root, and every later hold would fail."""
    if os.geteuid() != 0:
        return
    try:
        owner = path.parent.stat()
        mine = path.stat()
        if (mine.st_uid, mine.st_gid) != (owner.st_uid, owner.st_gid):
            os.chown(path, owner.st_uid, owner.st_gid)
    except FileNotFoundError:
        pass


def describe_url(url: str) -> str:
    """The URL with its password hidden, for messages."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(unparsable database_url)"


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def engine_for(settings: QuarantineSettings) -> sa.Engine:
    """``make_engine`` for the settings' database and timeout; a bad URL or a missing driver as StoreError."""
    url = settings.resolved_database_url()
    try:
        return make_engine(url, settings.db_timeout)
    except Exception as exc:  # a bad URL or a missing driver: sa.exc.ArgumentError, ImportError ...
        raise StoreError(f"quarantine database_url {describe_url(url)}: {_first_line(exc)}") from None


@contextmanager
def database_errors(what: str, where: str) -> Iterator[None]:
    """The database's failures as a StoreError saying what failed and what to do (``where``: the database,
    its password hidden); a StoreError raised inside passes unchanged. For every store on the catalogue's
    database (the quarantine's, phishhook's snags)."""
    try:
        yield
    except StoreError:
        raise
    except (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError) as exc:
        raise StoreError(f"cannot {what}: quarantine database {where}: {_first_line(exc)}; check "
                         "that it is running and reachable, and [quarantine] database_url") from None
    except sa.exc.SQLAlchemyError as exc:
        raise StoreError(f"cannot {what}: quarantine database {where}: {_first_line(exc)} (was the "
                         "schema changed by hand? 'mailwarden quarantine migrate' sets it right)") from None


def check_schema(engine: sa.Engine, where: str) -> None:
    """Raise StoreError unless the database answers, SchemaBehind unless it is at the head revision."""
    with database_errors("open the catalogue", where), engine.connect() as conn:
        revision = schema.current_revision(conn)
    head = schema.head_revision()
    if revision is not None and revision != head and not schema.known_revision(revision):
        raise SchemaBehind(f"quarantine database {where} is at revision {revision}, which this version "
                           f"of mailwarden does not know (it needs {head}): was it written by a newer one?",
                           revision)
    if revision != head:
        state = "empty (never migrated)" if revision is None else f"at revision {revision}"
        raise SchemaBehind(f"quarantine database {where} is {state}, this version needs "
                           f"revision {head}: run 'mailwarden quarantine migrate'", revision)


def retry_deadlocks(writer: sa.Engine, what: str, work: Callable[[sa.Connection], T], attempts: int = 3,
                    conflicts: bool = False) -> T:
    """``work`` in a transaction of ``writer`` (an Engine with ``quarantine_write=True``: BEGIN IMMEDIATE on
    SQLite), run again when MariaDB chose it as a deadlock's victim: the server rolled it back whole, so
    running it again is safe. With ``conflicts``, also after an IntegrityError (a unique key another writer
    took meanwhile: the work looks again and finds its row). Other failures propagate as SQLAlchemy raised
    them, and these too after ``attempts`` runs."""
    attempt = 1
    while True:
        try:
            with writer.begin() as conn:
                return work(conn)
        except sa.exc.IntegrityError:
            if not conflicts or attempt >= attempts:
                raise
            log_kv(log, logging.DEBUG, "unique key taken meanwhile: the transaction runs again", what=what,
                   attempt=attempt)
            attempt += 1
        except sa.exc.OperationalError as exc:
            if attempt >= attempts or getattr(exc.orig, "args", (None,))[:1] != (DEADLOCK,):
                raise
            log_kv(log, logging.INFO, "deadlock: the transaction runs again", what=what, attempt=attempt)
            attempt += 1


class QuarantineStore:
    def __init__(self, settings: QuarantineSettings, now: Callable[[], datetime.datetime] = utcnow) -> None:
        self.settings = settings
        self.now = now
        self.url = settings.resolved_database_url()
        self.message_dir = settings.resolved_message_dir()
        self.where = describe_url(self.url)
        self.engine = engine_for(settings)
        self._writer = self.engine.execution_options(quarantine_write=True)
        self._ready = False

    # -- lifecycle ---------------------------------------------------------------------------------------

    def check(self) -> None:
        """Raise StoreError unless the database answers and is at the schema this version needs. Each call
        of the store does this until it succeeds once (without a lock: two threads may both look, which
        is harmless); a service may call it at start-up to fail early."""
        if self._ready:
            return
        with self._errors("open the catalogue"):
            self._sqlite_directory()
        check_schema(self.engine, self.where)
        self._ready = True

    def migrate(self) -> tuple[str | None, str]:
        """Create the catalogue or upgrade it to the head revision; returns (revision before, after)."""
        with self._errors("migrate the catalogue"):
            self._sqlite_directory()
            with self.engine.connect() as conn:
                before = schema.current_revision(conn)
            if before is not None and not schema.known_revision(before):
                raise SchemaBehind(f"quarantine database {self.where} is at revision {before}, which this "
                                   "version of mailwarden does not know: was it written by a newer one? Not "
                                   "migrated", before)
            schema.upgrade(self.engine)
            with self.engine.connect() as conn:
                after = schema.current_revision(conn)
        self._ready = False
        assert after is not None
        return before, after

    def _sqlite_directory(self) -> None:
        """SQLite creates the file, not its directory (/var/lib/mailwarden on a fresh host)."""
        database = self.engine.url.database
        if self.engine.dialect.name == "sqlite" and database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            with database_errors(what, self.where):
                yield
        except (StoreError, UnknownMessage):
            raise
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise StoreError(f"cannot {what}: {where}{exc.strerror or exc}; check [quarantine] message_dir "
                             "and database_url, their space and permissions") from None

    @contextmanager
    def _write(self, what: str) -> Iterator[sa.Connection]:
        self.check()
        with self._errors(what), self._writer.begin() as conn:
            yield conn

    @contextmanager
    def _session(self, what: str) -> Iterator[Session]:
        """For reads that build records from the mapped classes."""
        self.check()
        with self._errors(what), Session(self.engine) as session:
            yield session

    @contextmanager
    def _read(self, what: str) -> Iterator[sa.Connection]:
        self.check()
        with self._errors(what), self.engine.connect() as conn:
            yield conn

    reading, reading_session = _read, _session
    """For the other tables of the catalogue's database (``preferences.py``): a connection (a Session) after
    the schema check, with every failure a StoreError saying what to do; writes: ``write_transaction``."""

    def write_transaction(self, what: str, work: Callable[[sa.Connection], T], attempts: int = 3) -> T:
        """``work`` in a write transaction (for the other tables of the catalogue's database), run again when
        MariaDB chose it as a deadlock's victim: the server rolled it back whole, so running it again is
        safe (two writers inserting the same new unique key at once). Failures as StoreError."""
        self.check()
        with self._errors(what):
            return retry_deadlocks(self._writer, what, work, attempts)

    # -- holding -----------------------------------------------------------------------------------------

    def hold(self, raw: BinaryIO, size: int, envelope: HeldEnvelope, holds: Sequence[Hold]) -> list[str]:
        """Keep the message (``raw``: a readable binary file at position 0, ``size`` bytes) for each of
        ``holds``; returns one public id per Hold, in order, once committed. On failure raises StoreError
        and leaves nothing behind."""
        if not holds:
            raise ValueError("hold needs at least one recipient")
        if any(hold.state not in HOLD_STATES for hold in holds):
            raise ValueError(f"a row starts {' or '.join(HOLD_STATES)}")
        if envelope.received_at.tzinfo is None:
            raise ValueError("HeldEnvelope.received_at must be an aware datetime (UTC)")
        self.check()
        path: Path | None = None
        committing = False
        try:
            with self._errors("hold the message"):
                if size > self.settings.inline_max_size:
                    path, written = self._write_file(raw)
                    content = None
                else:
                    content, written = _compress(raw)
                if written != size:
                    raise StoreError(f"cannot hold the message: read {written} bytes of it, expected {size} "
                                     "(the spool and the size given disagree)")
                now = self.now()
                ids = [new_public_id() for _ in holds]
                relative = str(path.relative_to(self.message_dir)) if path is not None else None
                with self._writer.begin() as conn:
                    inserted = conn.execute(sa.insert(Message).values(
                        received_at=envelope.received_at, queue_id=clip(envelope.queue_id, 64),
                        sender=clip(envelope.sender, ADDRESS), client_address=clip(envelope.client_address, 64),
                        auth_user=clip(envelope.auth_user, ADDRESS), header_from=clip(envelope.header_from, TEXT),
                        subject=clip(envelope.subject, TEXT), date=clip(envelope.date, 255), size=size,
                        storage=(Storage.FILE if path else Storage.INLINE).value, content=content,
                        path=relative)).inserted_primary_key
                    assert inserted is not None
                    message_id = inserted[0]
                    conn.execute(sa.insert(Held), [
                        {"public_id": public_id, "message_id": message_id, "recipient": clip(hold.recipient, ADDRESS),
                         "mailbox": clip(hold.mailbox.lower(), ADDRESS), "check_name": clip(hold.check, 64),
                         "kind": clip(hold.kind, 64), "reason": clip(hold.reason, TEXT), "held_at": now,
                         "state": str(hold.state), "state_by": clip(hold.check, 255), "state_at": now,
                         "released_queue_id": ""}
                        for public_id, hold in zip(ids, holds, strict=True)])
                    committing = True  # leaving the block commits
        except BaseException:
            # A failed COMMIT may have committed all the same (the connection to MariaDB lost after the
            # server got it): the file stays then, and purge removes it later if no row names it.
            if path is not None and not committing:
                _unlink_quietly(path)
            raise
        for state in HOLD_STATES:
            rows = [(public_id, hold) for public_id, hold in zip(ids, holds, strict=True) if hold.state is state]
            if rows:
                log_kv(log, logging.INFO, "held" if state is State.HELD else "recorded delivered",
                       queue_id=envelope.queue_id, ids=",".join(public_id for public_id, _ in rows),
                       recipients=",".join(hold.recipient for _, hold in rows), check=rows[0][1].check,
                       kind=rows[0][1].kind, reason=rows[0][1].reason, size=size,
                       storage="file" if path else "inline")
        return ids

    def _write_file(self, raw: BinaryIO) -> tuple[Path, int]:
        """Stream ``raw`` to a new file under message_dir, fsynced with its directory; (path, bytes)."""
        name = secrets.token_hex(16)
        directory = self.message_dir / name[:2]
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True, mode=0o750)
            adopt(directory)
        path = directory / f"{name}.eml"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        adopt(path)
        written = 0
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := raw.read(CHUNK):
                    out.write(chunk)
                    written += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            _fsync_directory(directory)
        except BaseException:
            _unlink_quietly(path)
            raise
        return path, written

    # -- reading -----------------------------------------------------------------------------------------

    def _select(self) -> sa.Select[Held, Message]:
        return sa.select(Held, Message).join(Message, Held.message_id == Message.id)

    def find(self, *, recipient: str | None = None, mailbox: str | None = None, sender: str | None = None,
             since: datetime.datetime | None = None, until: datetime.datetime | None = None,
             kind: str | None = None, state: State | str | None = None, limit: int | None = None
             ) -> list[HeldRecord]:
        """Held rows matching every filter given (addresses compared case-insensitively; ``since`` and
        ``until`` on the time it was held, until excluded), newest first."""
        query = self._select()
        if recipient is not None:
            query = query.where(sa.func.lower(Held.recipient) == recipient.lower())
        if mailbox is not None:
            query = query.where(Held.mailbox == mailbox.lower())
        if sender is not None:
            query = query.where(sa.func.lower(Message.sender) == sender.lower())
        if since is not None:
            query = query.where(Held.held_at >= since)
        if until is not None:
            query = query.where(Held.held_at < until)
        if kind is not None:
            query = query.where(Held.kind == kind)
        if state is not None:
            query = query.where(Held.state == str(state))
        query = query.order_by(Held.held_at.desc(), Held.id.desc())
        if limit is not None:
            query = query.limit(limit)
        with self._session("search the quarantine") as session:
            return [_record(held, message) for held, message in session.execute(query)]

    def get(self, public_id: str) -> HeldRecord | None:
        with self._session("read the quarantine") as session:
            row = session.execute(self._select().where(Held.public_id == public_id)).first()
            return None if row is None else _record(*row)

    @contextmanager
    def open_raw(self, public_id: str) -> Iterator[BinaryIO]:
        """The original bytes as a binary file (the message file itself, or the decompressed inline copy,
        which is at most inline_max_size); raises UnknownMessage, or StoreError."""
        with self._read("read the message") as conn:
            row = conn.execute(sa.select(Message.storage, Message.content, Message.path)
                               .join(Held, Held.message_id == Message.id)
                               .where(Held.public_id == public_id)).first()
        if row is None:
            raise UnknownMessage(f"no quarantined message {public_id}")
        storage, content, path = row
        if storage == Storage.PURGED:
            raise UnknownMessage(f"quarantined message {public_id} was purged: its bytes are gone")
        handle: BinaryIO
        with self._errors("read the message"):
            if storage == Storage.FILE:
                handle = (self.message_dir / str(path)).open("rb")
            else:
                try:
                    handle = io.BytesIO(zlib.decompress(content or b""))
                except zlib.error as exc:
                    raise StoreError(f"quarantined message {public_id} is corrupt in the database: {exc}") from None
        with handle:
            yield handle

    def raw(self, public_id: str) -> bytes:
        """The original bytes, whole (for small messages and tests; releases stream ``open_raw``)."""
        with self.open_raw(public_id) as handle:
            return handle.read()

    # -- changing ----------------------------------------------------------------------------------------

    def transition(self, public_id: str, from_states: Iterable[State | str], to_state: State | str, by: str,
                   *, released_queue_id: str | None = None) -> bool:
        """Move the row to ``to_state`` if it is in one of ``from_states``, in one conditional UPDATE;
        True if this caller made the change (of two racing callers, exactly one wins)."""
        values: dict[str, Any] = {"state": str(to_state), "state_by": by[:255], "state_at": self.now()}
        if released_queue_id is not None:
            values["released_queue_id"] = released_queue_id[:64]
        with self._write("change the state") as conn:
            result = conn.execute(sa.update(Held).where(Held.public_id == public_id,
                                                       Held.state.in_([str(s) for s in from_states]))
                                  .values(**values))
        won = result.rowcount == 1
        if won:
            log_kv(log, logging.INFO, "state changed", id=public_id, state=str(to_state), by=by,
                   **({"released_queue_id": released_queue_id} if released_queue_id else {}))
        return won

    def purge(self, older_than: datetime.datetime) -> Purged:
        """Expire rows held (or recorded as delivered) since before ``older_than``, forget records of
        finished rows (released, deleted, reported, expired) changed before it, put rows releasing for over
        an hour back to held, remove the bytes of every message no row needs any more (none held, releasing
        or delivered), and files no row names (an hour old at least). Safe while holds run (they wait on
        SQLite's lock, or not at all on MariaDB)."""
        now = self.now()
        live = [str(s) for s in LIVE_STATES]
        done = [str(s) for s in State if s not in LIVE_STATES]
        expired = self._batched("expire held messages", sa.update(Held).values(
            state=State.EXPIRED.value, state_by="purge", state_at=now),
            Held.state.in_([str(s) for s in RETAINED_STATES]), Held.held_at < older_than)
        forgotten = self._batched("forget old records", sa.delete(Held), Held.state.in_(done),
                                  Held.state_at < older_than)
        unstuck = self._batched("hold unfinished releases again", sa.update(Held).values(
            state=State.HELD.value, state_by="purge", state_at=now), Held.state == State.RELEASING.value,
            Held.state_at < now - STUCK_RELEASE)
        if unstuck:
            log_kv(log, logging.WARNING, "releases that never finished are held again: the message may have "
                   "been delivered already (see the log of the re-injection listener)", count=unstuck)
        unheld = sa.not_(sa.exists().where(Held.message_id == Message.id, Held.state.in_(live)))
        with self._read("find unheld messages") as conn:
            candidates = conn.execute(sa.select(Message.id, Message.path)
                                      .where(Message.storage != Storage.PURGED.value, unheld)).all()
        removed = 0
        for start in range(0, len(candidates), BATCH):
            batch = candidates[start:start + BATCH]
            ids = [row[0] for row in batch]
            with self._write("remove unheld messages") as conn:
                # the condition again, in the statement: a row that changed since the SELECT is kept
                gone = set(conn.execute(sa.select(Message.id).where(Message.id.in_(ids), unheld)).scalars())
                if gone:
                    conn.execute(sa.delete(Message).where(
                        Message.id.in_(gone), ~sa.exists().where(Held.message_id == Message.id)))
                    conn.execute(sa.update(Message).where(Message.id.in_(gone))
                                 .values(storage=Storage.PURGED.value, content=None, path=None))
            for message_id, path in batch:
                if message_id in gone and path:
                    _unlink_quietly(self.message_dir / path)
            removed += len(gone)
        orphans = self._remove_orphans()
        result = Purged(expired, unstuck, forgotten, removed, orphans)
        log_kv(log, logging.INFO, "purged", older_than=older_than.isoformat(), **asdict(result))
        return result

    def _batched(self, what: str, statement: sa.Update | sa.Delete, *condition: sa.ColumnElement[bool]) -> int:
        """``statement`` on the rows of ``condition``, BATCH rows per transaction: each statement stays short
        (within db_timeout, holding its locks briefly) however many rows a purge has to change. The
        condition is applied again to each batch, so a row changed meanwhile is left alone."""
        with self._read(what) as conn:
            ids = list(conn.execute(sa.select(Held.id).where(*condition)).scalars())
        changed = 0
        for start in range(0, len(ids), BATCH):
            with self._write(what) as conn:
                changed += conn.execute(statement.where(Held.id.in_(ids[start:start + BATCH]), *condition)).rowcount
        return changed

    def _remove_orphans(self) -> int:
        if not self.message_dir.is_dir():
            return 0
        with self._read("list message files") as conn:
            named = set(conn.execute(sa.select(Message.path).where(Message.path.is_not(None))).scalars())
        cutoff = time.time() - ORPHAN_GRACE
        removed = 0
        with self._errors("remove orphaned message files"):
            for path in self.message_dir.glob("*/*.eml"):
                relative = str(path.relative_to(self.message_dir))
                if relative not in named and path.stat().st_mtime < cutoff:
                    _unlink_quietly(path)
                    removed += 1
        return removed


def _record(held: Held, message: Message) -> HeldRecord:
    return HeldRecord(
        public_id=held.public_id, recipient=held.recipient, mailbox=held.mailbox, check=held.check,
        kind=held.kind, reason=held.reason, held_at=held.held_at, state=State(held.state), state_by=held.state_by,
        state_at=held.state_at, released_queue_id=held.released_queue_id, queue_id=message.queue_id,
        sender=message.sender, client_address=message.client_address, auth_user=message.auth_user,
        header_from=message.header_from, subject=message.subject, date=message.date,
        received_at=message.received_at, size=message.size, storage=Storage(message.storage))


def _compress(raw: BinaryIO) -> tuple[bytes, int]:
    compressor = zlib.compressobj(6)
    parts: list[bytes] = []
    read = 0
    while chunk := raw.read(CHUNK):
        read += len(chunk)
        parts.append(compressor.compress(chunk))
    parts.append(compressor.flush())
    return b"".join(parts), read


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log_kv(log, logging.WARNING, "cannot remove a message file", path=str(path), error=exc.strerror or str(exc))
