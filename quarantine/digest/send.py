"""``mailwarden digest send``: one digest per mailbox that has mail held since its last digest and is due.

**Who is due.** A mailbox's interval is its own choice (``digest_subscriber.digest_interval``, set by a reply
``DIGEST ...``), else ``[quarantine.digest] interval``:

- ``daily``: once a day, from ``send_at`` (local time, ``timezone``): due when its last digest was sent
  before today's ``send_at`` and some of its new mail was held before then (mail held after 06:00 waits for
  tomorrow's, unless the digest goes out anyway for earlier mail: it lists everything new up to the run);
- ``weekly``: the same, from ``send_at`` on ``weekly_day``;
- ``immediate``: when its last digest is ``immediate_every`` old (less IMMEDIATE_SLACK, the timer's jitter);
- ``off``: never (counted as *skipped* while it has new mail).

A digest lists the mailbox's messages held (state ``held``) after its previous digest's cut-off and up to
this run's start (``covered_until`` < held_at <= cut-off), at most ``max_listed`` a section, and, with
``list_tagged``, the rows in state ``delivered`` of the same span (mail delivered with a score between the
tag and hold levels). Only held mail makes a digest due.

**Resumable, never twice.** Each mailbox is *claimed* before its digest is sent (``sending_cutoff``,
``sending_since``: a conditional update, so of two runs one wins), and marked after the listener's 250
(``last_sent_at`` and ``covered_until`` = the cut-off, the claim cleared). A send that fails releases the
claim (*failed*; the next run tries again). A claim still there after ``abandoned_after`` (a run killed
between the send and the mark) may have been sent: it is logged ``outcome unknown``, counted as sent and
marked, never sent again. A run that dies part-way is finished by the next one.

**Memory does not grow with the number of mailboxes**: mailboxes are read BATCH at a time in order
(keyset pagination: ``mailbox > the last one``), each digest is rendered, sent and forgotten; one SMTP
connection serves the whole run.

**What a run leaves**: a ``digest_run`` row (sent, failed, skipped), one logfmt line per digest and one per
run, the metrics textfile (``metrics_file``, replaced atomically), and a warning when no digest went out
for ``stale_after`` while mail waits for one (``stale``). With ``admin_copy``, once a day after ``send_at``,
a summary per domain (messages held, digests sent since the previous summary) to that address.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa

from mailwarden.logs import get_logger, log_kv
from quarantine.digest.outbox import OutboxError
from quarantine.digest.render import Entry, Renderer, Section
from quarantine.digest.settings import WEEKDAYS, DigestSettings, Interval
from quarantine.digest.subscribers import event_counts
from quarantine.digest.tokens import Tokens
from quarantine.models import DigestRun, DigestSubscriber, Held, Message, State
from quarantine.release import SECURITY_KINDS
from quarantine.store import QuarantineSettings, QuarantineStore, clip

log = get_logger("quarantine.digest")

BATCH = 500
"""Mailboxes read per query."""
IMMEDIATE_SLACK = datetime.timedelta(seconds=30)
"""An ``immediate`` mailbox is due this much before ``immediate_every`` has passed: the timer's runs are
not exactly ``immediate_every`` apart, and a digest must not wait a whole extra run for a second."""
MAX_CONSECUTIVE_FAILURES = 20
"""Sends failing in a row (the listener down) stop the run: the rest would fail alike."""
ADMIN_COPY_OWNER = "(admin copy)"
"""The ``digest_subscriber`` row that keeps when the admin copy was last sent (no mailbox has this form)."""
BY = "digest send"
Rows = sa.Select[*tuple[Any, ...]]
"""A query of digest rows (columns of several types)."""


class Sender(Protocol):
    """What sends a digest (``outbox.Outbox``): returns the queue id, raises OutboxError."""

    def send(self, message: EmailMessage, recipient: str, sender: str = "") -> str: ...


@dataclass
class RunResult:
    started_at: datetime.datetime
    run_id: int | None = None
    sent: int = 0
    """Digests the listener accepted, plus claims of crashed runs whose outcome is unknown."""
    failed: int = 0
    skipped: int = 0
    """Mailboxes with new held mail and digests off."""
    waiting: int = 0
    """Mailboxes with new held mail that are not due yet."""
    unknown: int = 0
    """Claims left by a run that died between sending and marking (counted in sent)."""
    stopped: str = ""
    """Why the run stopped early ("" if it did not)."""
    admin_copy: str = ""
    """The admin copy's outcome: "sent", "failed: ..." or "" (none due)."""
    stale: Stale | None = None
    would_send: list[dict[str, Any]] = field(default_factory=list)
    """--dry-run: the mailboxes a run would send to, with their counts."""

    def as_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "started_at": self.started_at.isoformat(), "sent": self.sent,
                "failed": self.failed, "skipped": self.skipped, "waiting": self.waiting, "unknown": self.unknown,
                "stopped": self.stopped, "admin_copy": self.admin_copy,
                "stale": self.stale.as_dict() if self.stale else None}


@dataclass(frozen=True)
class Stale:
    """No digest went out for ``stale_after`` while mail has waited for one that long."""

    last_digest_at: datetime.datetime | None
    oldest_waiting: datetime.datetime

    def as_dict(self) -> dict[str, Any]:
        return {"last_digest_at": self.last_digest_at.isoformat() if self.last_digest_at else None,
                "oldest_waiting": self.oldest_waiting.isoformat()}

    def message(self, now: datetime.datetime) -> str:
        since = "no digest was ever sent" if self.last_digest_at is None else \
            f"the last digest went out {_ago(now, self.last_digest_at)} ago"
        return (f"digests are stale: {since}, and mail held {_ago(now, self.oldest_waiting)} ago is still waiting "
                "for one (is the mailwarden-digest.timer running? see 'mailwarden digest status')")


def _ago(now: datetime.datetime, then: datetime.datetime) -> str:
    seconds = max(0, int((now - then).total_seconds()))
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h" if seconds >= 86400 else \
        f"{seconds // 3600}h {seconds % 3600 // 60}m"


# -- schedules ---------------------------------------------------------------------------------------------

def last_slot(settings: DigestSettings, interval: Interval, now: datetime.datetime) -> datetime.datetime:
    """The latest daily (or weekly) send time at or before ``now``, aware."""
    zone = settings.zone
    local = now.astimezone(zone)
    at = datetime.time.fromisoformat(settings.send_at)
    day = local.date()
    step = 1
    if interval is Interval.WEEKLY:
        day -= datetime.timedelta(days=(local.weekday() - WEEKDAYS.index(settings.weekly_day)) % 7)
        step = 7
    slot = datetime.datetime.combine(day, at, tzinfo=zone)
    if slot > local:
        slot = datetime.datetime.combine(day - datetime.timedelta(days=step), at, tzinfo=zone)
    return slot


def is_due(settings: DigestSettings, interval: Interval, last_sent_at: datetime.datetime | None,
           first_new_at: datetime.datetime, now: datetime.datetime) -> bool:
    """Whether a mailbox whose oldest undigested held message is ``first_new_at`` gets its digest now."""
    if interval is Interval.OFF:
        return False
    if interval is Interval.IMMEDIATE:
        every = datetime.timedelta(seconds=settings.immediate_every)
        return last_sent_at is None or now - last_sent_at >= every - IMMEDIATE_SLACK
    slot = last_slot(settings, interval, now)
    return (last_sent_at is None or last_sent_at < slot) and first_new_at < slot


# -- the store ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    owner: str
    new: int
    """Held messages after covered_until, up to the cut-off."""
    first_new_at: datetime.datetime
    interval: Interval | None
    """Its own choice; None: the site's."""
    last_sent_at: datetime.datetime | None
    covered_until: datetime.datetime | None
    claimed: bool
    has_row: bool


def _new_rows(cutoff: datetime.datetime, by_mailbox: bool = False) -> sa.ColumnElement[bool]:
    """Held rows up to ``cutoff`` that no digest covered (the query joins DigestSubscriber by owner)."""
    return sa.and_(_state(State.HELD.value, by_mailbox), Held.held_at <= cutoff,
                   sa.or_(DigestSubscriber.covered_until.is_(None), Held.held_at > DigestSubscriber.covered_until))


def _state(state: str, by_mailbox: bool) -> sa.ColumnElement[bool]:
    """``Held.state == state``; ``by_mailbox``: written so that no index serves it (``state || ''``), for the
    queries that go by mailbox. SQLite has no statistics unless ANALYZE ran, and then takes the (state,
    held_at) index for them: every held row of every mailbox read, 0.13 s per digest with 200,000 held rows,
    where the (mailbox, held_at) index reads the mailbox's own. Rows held for the security team
    (``release.SECURITY_KINDS``) are never a digest's."""
    matches = (Held.state + "" if by_mailbox else Held.state) == state
    return sa.and_(matches, Held.kind.notin_(sorted(SECURITY_KINDS)))


def candidates(store: QuarantineStore, cutoff: datetime.datetime, owner: str | None = None) -> Iterator[Candidate]:
    """Every mailbox with held mail no digest covered yet, in order, BATCH per query."""
    after = ""
    while True:
        with store.reading("find the mailboxes with new held mail") as conn:
            rows = conn.execute(candidates_query(cutoff, after, owner)).all()
        for mailbox, new, first, interval, last_sent, covered, claim, has_row in rows:
            yield Candidate(mailbox, new, _aware(first), Interval(interval) if interval else None, _aware(last_sent),
                            _aware(covered), claim is not None, bool(has_row))
        if len(rows) < BATCH:
            return
        after = rows[-1][0]


def candidates_query(cutoff: datetime.datetime, after: str, owner: str | None = None) -> Rows:
    """The next BATCH mailboxes after ``after`` with held mail no digest covered, with their digest rows."""
    query = (sa.select(Held.mailbox, sa.func.count(), sa.func.min(Held.held_at),
                       sa.func.max(DigestSubscriber.interval), sa.func.max(DigestSubscriber.last_sent_at),
                       sa.func.max(DigestSubscriber.covered_until), sa.func.max(DigestSubscriber.sending_cutoff),
                       sa.func.count(DigestSubscriber.id))
             .select_from(Held).outerjoin(DigestSubscriber, DigestSubscriber.owner == Held.mailbox)
             .where(_new_rows(cutoff, by_mailbox=True), Held.mailbox > after)
             .group_by(Held.mailbox).order_by(Held.mailbox).limit(BATCH))
    return query if owner is None else query.where(Held.mailbox == owner.lower())


def _aware(value: Any) -> Any:
    """MIN/MAX of a UtcDateTime column comes back as the driver gives it (naive on MariaDB, a string on
    SQLite): as an aware UTC datetime, or None."""
    if value is None or (isinstance(value, datetime.datetime) and value.tzinfo is not None):
        return value
    if isinstance(value, str):
        value = datetime.datetime.fromisoformat(value)
    return value.replace(tzinfo=datetime.UTC)


def claim(store: QuarantineStore, candidate: Candidate, cutoff: datetime.datetime) -> bool:
    """Claim the mailbox's digest for this run (True), unless another run has it or sent it meanwhile."""
    now = store.now()

    def work(conn: sa.Connection) -> bool:
        if not candidate.has_row:
            try:
                with conn.begin_nested():
                    conn.execute(sa.insert(DigestSubscriber).values(
                        owner=candidate.owner, interval=None, changed_at=now, changed_by=BY,
                        sending_cutoff=cutoff, sending_since=now))
                return True
            except sa.exc.IntegrityError:  # created meanwhile (a reply, another run): not ours this time
                return False
        covered = DigestSubscriber.covered_until.is_(None) if candidate.covered_until is None \
            else DigestSubscriber.covered_until == candidate.covered_until
        result = conn.execute(sa.update(DigestSubscriber)
                              .where(DigestSubscriber.owner == candidate.owner,
                                     DigestSubscriber.sending_cutoff.is_(None), covered)
                              .values(sending_cutoff=cutoff, sending_since=now))
        return result.rowcount == 1

    return store.write_transaction("claim a digest", work)


def mark_sent(store: QuarantineStore, owner: str, cutoff: datetime.datetime) -> None:
    store.write_transaction("mark a digest sent", lambda conn: conn.execute(
        sa.update(DigestSubscriber).where(DigestSubscriber.owner == owner, DigestSubscriber.sending_cutoff == cutoff)
        .values(last_sent_at=cutoff, covered_until=cutoff, sending_cutoff=None, sending_since=None)))


def release_claim(store: QuarantineStore, owner: str, cutoff: datetime.datetime) -> None:
    store.write_transaction("release a digest claim", lambda conn: conn.execute(
        sa.update(DigestSubscriber).where(DigestSubscriber.owner == owner, DigestSubscriber.sending_cutoff == cutoff)
        .values(sending_cutoff=None, sending_since=None)))


def abandoned_after(settings: QuarantineSettings) -> datetime.timedelta:
    """How old a claim is when its run is surely gone: a send waits at most reinject_timeout for each of the
    listener's replies (connect, MAIL, RCPT, DATA, the end of data), plus a minute for the database."""
    return datetime.timedelta(seconds=5 * settings.reinject_timeout + 60)


def settle_abandoned(store: QuarantineStore, now: datetime.datetime, older_than: datetime.timedelta,
                     owner: str | None = None) -> int:
    """Mark as sent the claims of runs that died (outcome unknown: sent perhaps, so never sent again)."""
    settled = 0
    limit = now - older_than
    while True:
        query = (sa.select(DigestSubscriber.owner, DigestSubscriber.sending_cutoff, DigestSubscriber.sending_since)
                 .where(DigestSubscriber.sending_cutoff.is_not(None), DigestSubscriber.sending_since < limit)
                 .order_by(DigestSubscriber.owner).limit(BATCH))
        if owner is not None:
            query = query.where(DigestSubscriber.owner == owner.lower())
        with store.reading("find abandoned digest claims") as conn:
            rows = conn.execute(query).all()
        for mailbox, cutoff, since in rows:
            assert cutoff is not None and since is not None
            mark_sent(store, mailbox, cutoff)
            settled += 1
            log_kv(log, logging.WARNING, "digest outcome unknown: a run died between sending and marking it; "
                   "counted as sent, not sent again", owner=mailbox, cutoff=cutoff.isoformat(),
                   claimed_at=since.isoformat())
        if len(rows) < BATCH:
            return settled


def _entries_where(owner: str, state: str, since: datetime.datetime | None,
                   cutoff: datetime.datetime) -> list[sa.ColumnElement[bool]]:
    where = [Held.mailbox == owner, _state(state, by_mailbox=True), Held.held_at <= cutoff]
    return where if since is None else [*where, Held.held_at > since]


def entries_query(owner: str, state: str, since: datetime.datetime | None, cutoff: datetime.datetime,
                  limit: int) -> Rows:
    return (sa.select(Held.public_id, Held.held_at, Message.sender, Message.header_from, Message.subject, Held.check,
                      Held.kind, Held.reason).join(Message, Held.message_id == Message.id)
            .where(*_entries_where(owner, state, since, cutoff)).order_by(Held.held_at, Held.id).limit(limit))


def entries(store: QuarantineStore, owner: str, state: str, since: datetime.datetime | None,
            cutoff: datetime.datetime, limit: int) -> Section:
    """The owner's rows in ``state`` held after ``since`` up to ``cutoff``: the first ``limit``, oldest first,
    and how many there are."""
    where = _entries_where(owner, state, since, cutoff)
    with store.reading("read the messages of a digest") as conn:
        rows = conn.execute(entries_query(owner, state, since, cutoff, limit)).all()
        total = len(rows) if len(rows) < limit else \
            conn.execute(sa.select(sa.func.count()).select_from(Held).where(*where)).scalar_one()
    return Section([Entry(row[0], _aware(row[1]), *row[2:]) for row in rows], total)


# -- the run -----------------------------------------------------------------------------------------------

def send_digests(store: QuarantineStore, settings: QuarantineSettings, outbox: Sender, *,
                 owner: str | None = None, dry_run: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> RunResult:
    """One run (module docstring). ``owner``: that mailbox only, whatever its interval (an admin's request).
    Raises StoreError when the store fails; a listener that fails is counted (``failed``)."""
    digest = settings.digest
    assert digest is not None
    started = clock()
    now = store.now()
    cutoff = now
    result = RunResult(started_at=now)
    renderer = Renderer(digest, Tokens(digest, now=store.now))
    if not dry_run:
        result.run_id = _start_run(store, now)
        settled = settle_abandoned(store, now, abandoned_after(settings), owner)
        result.sent += settled
        result.unknown += settled
    failures_in_a_row = 0
    for candidate in candidates(store, cutoff, owner):
        interval = candidate.interval or digest.interval
        if candidate.claimed:
            result.waiting += 1  # another run's, or a crashed one's not yet abandoned
            continue
        if owner is None and interval is Interval.OFF:
            result.skipped += 1
            continue
        if owner is None and not is_due(digest, interval, candidate.last_sent_at, candidate.first_new_at, now):
            result.waiting += 1
            continue
        if dry_run:
            result.would_send.append({"owner": candidate.owner, "held": candidate.new, "interval": str(interval)})
            continue
        if not claim(store, candidate, cutoff):
            result.waiting += 1
            continue
        outcome = _send_one(store, digest, renderer, outbox, candidate, cutoff, now)
        if outcome == "sent":
            result.sent += 1
            failures_in_a_row = 0
        elif outcome == "failed":
            result.failed += 1
            failures_in_a_row += 1
            if failures_in_a_row >= MAX_CONSECUTIVE_FAILURES:
                result.stopped = f"{failures_in_a_row} sends failed in a row: the listener is failing"
                break
    if not dry_run and owner is None and digest.admin_copy and not result.stopped:
        result.admin_copy = _admin_copy(store, digest, outbox, now)
    result.stale = stale(store, digest, store.now())
    if not dry_run:
        _finish_run(store, result)
    seconds = round(clock() - started, 3)
    log_kv(log, logging.WARNING if result.failed or result.stopped else logging.INFO, "digest run",
           run_id=result.run_id or "", dry_run="yes" if dry_run else "no", sent=result.sent, failed=result.failed,
           skipped=result.skipped, waiting=result.waiting, unknown=result.unknown, seconds=seconds,
           **({"stopped": result.stopped} if result.stopped else {}),
           **({"admin_copy": result.admin_copy} if result.admin_copy else {}),
           **({"would_send": len(result.would_send)} if dry_run else {}))
    if result.stale is not None:
        log_kv(log, logging.WARNING, result.stale.message(now), stale="yes")
    if digest.metrics_file is not None and not dry_run:
        write_metrics(store, digest, digest.metrics_file, result)
    return result


def _send_one(store: QuarantineStore, digest: DigestSettings, renderer: Renderer, outbox: Sender,
              candidate: Candidate, cutoff: datetime.datetime, now: datetime.datetime) -> str:
    """Render and send one claimed digest: "sent", "failed" or "empty" (released meanwhile)."""
    try:
        held = entries(store, candidate.owner, State.HELD.value, candidate.covered_until, cutoff, digest.max_listed)
        delivered = entries(store, candidate.owner, State.DELIVERED.value, candidate.covered_until, cutoff,
                            digest.max_listed) if digest.list_tagged else Section([], 0)
        if not held.total:
            release_claim(store, candidate.owner, cutoff)
            return "empty"
        message = renderer.render(candidate.owner, held, delivered, now)
    except BaseException:
        release_claim(store, candidate.owner, cutoff)
        raise
    try:
        queue_id = outbox.send(message, candidate.owner)
    except OutboxError as exc:
        release_claim(store, candidate.owner, cutoff)
        log_kv(log, logging.WARNING, "digest not sent", owner=candidate.owner, held=held.total, error=str(exc))
        return "failed"
    mark_sent(store, candidate.owner, cutoff)
    log_kv(log, logging.INFO, "digest sent", owner=candidate.owner, held=held.total, delivered=delivered.total,
           listed=len(held.entries) + len(delivered.entries), queue_id=queue_id,
           message_id=str(message["Message-ID"]))
    return "sent"


def _start_run(store: QuarantineStore, now: datetime.datetime) -> int:
    def work(conn: sa.Connection) -> int:
        inserted = conn.execute(sa.insert(DigestRun).values(started_at=now, host=clip(socket.gethostname(), 255),
                                                            sent=0, failed=0, skipped=0)).inserted_primary_key
        assert inserted is not None
        return int(inserted[0])

    return store.write_transaction("record the digest run", work)


def _finish_run(store: QuarantineStore, result: RunResult) -> None:
    store.write_transaction("record the digest run", lambda conn: conn.execute(
        sa.update(DigestRun).where(DigestRun.id == result.run_id).values(
            finished_at=store.now(), sent=result.sent, failed=result.failed, skipped=result.skipped)))


# -- staleness, status, metrics ----------------------------------------------------------------------------

def last_digest_at(store: QuarantineStore) -> datetime.datetime | None:
    with store.reading("read when the last digest went out") as conn:
        return _aware(conn.execute(sa.select(sa.func.max(DigestSubscriber.last_sent_at))
                                   .where(DigestSubscriber.owner != ADMIN_COPY_OWNER)).scalar())


def stale(store: QuarantineStore, digest: DigestSettings, now: datetime.datetime) -> Stale | None:
    """Stale when no digest went out for ``stale_after`` and a mailbox that gets digests has had held mail
    waiting for one that long."""
    limit = now - datetime.timedelta(seconds=digest.stale_after)
    last = last_digest_at(store)
    if last is not None and last >= limit:
        return None
    wants = sa.or_(DigestSubscriber.interval != Interval.OFF.value, DigestSubscriber.interval.is_(None)) \
        if digest.interval is not Interval.OFF else DigestSubscriber.interval.in_(
            [str(interval) for interval in Interval if interval is not Interval.OFF])
    query = (sa.select(sa.func.min(Held.held_at)).select_from(Held)
             .outerjoin(DigestSubscriber, DigestSubscriber.owner == Held.mailbox)
             .where(_new_rows(limit), wants))
    with store.reading("look for mail waiting for a digest") as conn:
        oldest = _aware(conn.execute(query).scalar())
    return None if oldest is None else Stale(last, oldest)


@dataclass(frozen=True)
class Status:
    last_run: dict[str, Any] | None
    last_digest_at: datetime.datetime | None
    intervals: dict[str, int]
    """Mailboxes with a row, by interval ("default": the site's)."""
    claims: int
    """Digests being sent now, or left by a run that died."""
    totals: dict[str, int]
    stale: Stale | None

    def as_dict(self) -> dict[str, Any]:
        return {"last_run": self.last_run, "last_digest_at": self.last_digest_at.isoformat()
                if self.last_digest_at else None, "intervals": self.intervals, "claims": self.claims,
                "totals": self.totals, "stale": self.stale.as_dict() if self.stale else None}


def status(store: QuarantineStore, digest: DigestSettings) -> Status:
    last_run = None
    with store.reading_session("read the last digest run") as session:
        row = session.scalars(sa.select(DigestRun).order_by(DigestRun.started_at.desc(), DigestRun.id.desc())
                              .limit(1)).first()
        if row is not None:
            last_run = {"id": row.id, "started_at": row.started_at.isoformat(), "host": row.host,
                        "finished_at": row.finished_at.isoformat() if row.finished_at else None,
                        "sent": row.sent, "failed": row.failed, "skipped": row.skipped}
    with store.reading("read the digest status") as conn:
        intervals = conn.execute(sa.select(DigestSubscriber.interval, sa.func.count())
                                 .where(DigestSubscriber.owner != ADMIN_COPY_OWNER)
                                 .group_by(DigestSubscriber.interval)).all()
        claims = conn.execute(sa.select(sa.func.count()).select_from(DigestSubscriber)
                              .where(DigestSubscriber.sending_cutoff.is_not(None))).scalar_one()
    return Status(last_run=last_run, last_digest_at=last_digest_at(store),
                  intervals={str(interval or "default"): count for interval, count in intervals}, claims=claims,
                  totals=totals(store), stale=stale(store, digest, store.now()))


def totals(store: QuarantineStore) -> dict[str, int]:
    """Sent, failed and skipped over every run recorded (the metrics' counters)."""
    with store.reading("count the digest runs") as conn:
        row = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(DigestRun.sent), 0),
                                     sa.func.coalesce(sa.func.sum(DigestRun.failed), 0),
                                     sa.func.coalesce(sa.func.sum(DigestRun.skipped), 0),
                                     sa.func.count())).one()
    return {"sent": int(row[0]), "failed": int(row[1]), "skipped": int(row[2]), "runs": int(row[3])}


def write_metrics(store: QuarantineStore, digest: DigestSettings, path: Path, result: RunResult) -> None:
    """The Prometheus textfile for node_exporter, written beside and renamed over the old one (a scrape never
    sees half a file). A failure to write is logged, not raised: the digests went out all the same."""
    now = store.now()
    counts = totals(store)
    last = last_digest_at(store)
    lines = [
        "# HELP mailwarden_digest_sent_total Digests sent (the listener's 250, or a crashed run's unknown outcome).",
        "# TYPE mailwarden_digest_sent_total counter", f"mailwarden_digest_sent_total {counts['sent']}",
        "# HELP mailwarden_digest_failed_total Digests the listener could not take (tried again next run).",
        "# TYPE mailwarden_digest_failed_total counter", f"mailwarden_digest_failed_total {counts['failed']}",
        "# HELP mailwarden_digest_skipped_total Mailboxes with new held mail and digests off, per run.",
        "# TYPE mailwarden_digest_skipped_total counter", f"mailwarden_digest_skipped_total {counts['skipped']}",
        "# HELP mailwarden_digest_runs_total Runs of digest send.",
        "# TYPE mailwarden_digest_runs_total counter", f"mailwarden_digest_runs_total {counts['runs']}",
        "# HELP mailwarden_digest_run_sent Digests sent by the last run.",
        "# TYPE mailwarden_digest_run_sent gauge", f"mailwarden_digest_run_sent {result.sent}",
        "# HELP mailwarden_digest_run_failed Digests the last run could not send.",
        "# TYPE mailwarden_digest_run_failed gauge", f"mailwarden_digest_run_failed {result.failed}",
        "# HELP mailwarden_digest_run_skipped Mailboxes the last run skipped (digests off).",
        "# TYPE mailwarden_digest_run_skipped gauge", f"mailwarden_digest_run_skipped {result.skipped}",
        "# HELP mailwarden_digest_last_run_timestamp_seconds When the last run finished.",
        "# TYPE mailwarden_digest_last_run_timestamp_seconds gauge",
        f"mailwarden_digest_last_run_timestamp_seconds {now.timestamp():.3f}",
        "# HELP mailwarden_digest_seconds_since_last_digest At the last run: seconds since a digest last went out"
        " (-1: never).",
        "# TYPE mailwarden_digest_seconds_since_last_digest gauge",
        f"mailwarden_digest_seconds_since_last_digest {(now - last).total_seconds() if last else -1:.0f}",
        "# HELP mailwarden_digest_last_sent_timestamp_seconds When a digest last went out (0: never).",
        "# TYPE mailwarden_digest_last_sent_timestamp_seconds gauge",
        f"mailwarden_digest_last_sent_timestamp_seconds {last.timestamp() if last else 0:.3f}",
        "# HELP mailwarden_digest_stale 1 when no digest went out for stale_after while mail waits for one.",
        "# TYPE mailwarden_digest_stale gauge", f"mailwarden_digest_stale {1 if result.stale else 0}",
        "# HELP mailwarden_digest_refused_replies_total Replies to digests refused as security events "
        "(digest events), by reason.",
        "# TYPE mailwarden_digest_refused_replies_total counter",
        *(f'mailwarden_digest_refused_replies_total{{reason="{reason}"}} {count}'
          for reason, count in sorted(event_counts(store).items())),
    ]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as out:
                out.write("\n".join(lines) + "\n")
            os.chmod(temp, 0o644)
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        log_kv(log, logging.WARNING, "cannot write the digest metrics file", path=str(path),
               error=exc.strerror or str(exc))


# -- the admin copy ----------------------------------------------------------------------------------------

def _admin_copy(store: QuarantineStore, digest: DigestSettings, outbox: Sender, now: datetime.datetime) -> str:
    """Once a day after send_at: messages held and digests sent (since the previous copy) per domain."""
    assert digest.admin_copy is not None
    with store.reading("read the admin copy's schedule") as conn:
        row = conn.execute(sa.select(DigestSubscriber.last_sent_at, DigestSubscriber.sending_cutoff)
                           .where(DigestSubscriber.owner == ADMIN_COPY_OWNER)).first()
    last = _aware(row[0]) if row else None
    slot = last_slot(digest, Interval.DAILY, now)
    if (last is not None and last >= slot) or (row is not None and row[1] is not None):
        return ""
    candidate = Candidate(ADMIN_COPY_OWNER, 0, now, None, last, last, False, row is not None)
    if not claim(store, candidate, now):
        return ""
    held, sent = _per_domain(store, last)
    message = EmailMessage()
    message["From"] = Address(digest.from_name, addr_spec=digest.from_address)
    message["To"] = digest.admin_copy
    message["Subject"] = f"Quarantine digests: {sum(sent.values())} sent, {sum(held.values())} messages held"
    message["Date"] = format_datetime(now)
    message["Message-ID"] = make_msgid("digest-admin", digest.from_address.rpartition("@")[2])
    message["Auto-Submitted"] = "auto-generated"
    since = f"since {last.astimezone(digest.zone):%Y-%m-%d %H:%M}" if last else "so far"
    rows = [f"{'domain':40} {'held now':>9} {'digests ' + since:>24}"]
    rows += [f"{domain:40} {held.get(domain, 0):>9} {sent.get(domain, 0):>24}"
             for domain in sorted(set(held) | set(sent))]
    message.set_content(f"Quarantine digests of {now.astimezone(digest.zone):%Y-%m-%d %H:%M} ({digest.timezone}):\n\n"
                        + "\n".join(rows) + "\n", charset="utf-8")
    try:
        outbox.send(message, digest.admin_copy)
    except OutboxError as exc:
        release_claim(store, ADMIN_COPY_OWNER, now)
        log_kv(log, logging.WARNING, "digest admin copy not sent", to=digest.admin_copy, error=str(exc))
        return f"failed: {exc}"
    mark_sent(store, ADMIN_COPY_OWNER, now)
    log_kv(log, logging.INFO, "digest admin copy sent", to=digest.admin_copy, domains=len(rows) - 1)
    return "sent"


def _per_domain(store: QuarantineStore, since: datetime.datetime | None) -> tuple[Counter[str], Counter[str]]:
    """(held messages, digests sent after ``since``) per domain, read BATCH mailboxes at a time."""
    held: Counter[str] = Counter()
    sent: Counter[str] = Counter()
    after = ""
    while True:
        with store.reading("count held mail per domain") as conn:
            rows = conn.execute(sa.select(Held.mailbox, sa.func.count()).where(
                _state(State.HELD.value, by_mailbox=False), Held.mailbox > after).group_by(Held.mailbox)
                .order_by(Held.mailbox).limit(BATCH)).all()
        for mailbox, count in rows:
            held[mailbox.rpartition("@")[2]] += count
        if len(rows) < BATCH:
            break
        after = rows[-1][0]
    after = ""
    while True:
        query = (sa.select(DigestSubscriber.owner).where(DigestSubscriber.owner > after,
                                                         DigestSubscriber.owner != ADMIN_COPY_OWNER,
                                                         DigestSubscriber.last_sent_at.is_not(None))
                 .order_by(DigestSubscriber.owner).limit(BATCH))
        if since is not None:
            query = query.where(DigestSubscriber.last_sent_at > since)
        with store.reading("count digests per domain") as conn:
            owners = conn.execute(query).scalars().all()
        for mailbox in owners:
            sent[mailbox.rpartition("@")[2]] += 1
        if len(owners) < BATCH:
            break
        after = owners[-1]
    return held, sent
