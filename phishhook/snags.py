"""Snags, their action runs, the audit log, travel notices and allow entries, in the quarantine's database.

The detector (``phishhook``'s milter and HTTP service) ``create``s a snag when a rule triggers, runs the
snag actions and ``record_action``s each; the review (CLI and web page) lists them and moves them on with
``transition``; the help desk adds travel notices and allow entries, which the detector looks up (one
indexed query each, only when a rule is about to trigger: not cached) before it snags.

**States** (``SnagState``) and the moves ``transition`` allows (``TRANSITIONS``)::

    open  ──┬──> compromised ──> safe
    alert ──┤
            ├──> safe        (final)
            └──> dismissed   (final)

``open``: the account is blocked, waiting for review; ``alert``: made in alert-only mode, nothing blocked,
waiting for review. ``compromised`` (the account stays blocked) may still become ``safe`` when a later
finding clears it; ``safe`` (a false positive: the caller unblocks) and ``dismissed`` (nothing to do) are
final. A state is never re-entered: confirming twice is refused, so of two reviewers at once exactly one wins
(one conditional UPDATE; the other gets ``SnagStateError`` naming the state the first left it in).

**One undecided snag per user.** ``create`` for a user who has a snag in ``open`` or ``alert`` adds the
finding to it instead (its kind stays the first's, its reason becomes "<first reason> and N more", the
message ids are added) and returns it with ``new=False``, so the caller does not run the actions twice; an
``enforce`` finding added to an ``alert`` snag makes it ``open`` (``escalated=True``: the caller runs the
actions now). The database enforces it (a unique key set only while undecided), so two milter threads, two
hosts and the HTTP service snagging one user at once make one snag. Once a snag is decided, the next
finding makes a new one.

**Findings** are kept in the snag's ``evidence`` as a JSON list: the first always, then the latest up to
``MAX_FINDINGS`` in all (``finding_count`` counts every one). Each finding's evidence is opaque to the store;
one larger than ``MAX_EVIDENCE`` characters as JSON is kept cut (``{"truncated": ...}``), never refused: a
snag must not be lost because its evidence was large.

**Audit.** Every change writes a ``phish_audit`` row in the same transaction: who (``by``, "phishhook" for
the detector), what (``AuditAction``), when (the store's clock) and a detail; ``log_audit`` adds rows for
events outside the store (a failed review login, an unblock done by the caller).

**Login names** are compared exactly, byte for byte, on SQLite and MariaDB alike (``phishhook/models.py``):
give the canonical name (the one the detector keys its logins by).

**Failures.** Every database failure is a ``quarantine.store.StoreError`` saying what failed and what to
do; a database not migrated to this version's schema a ``SchemaBehind`` (run ``mailwarden quarantine
migrate``). Bad arguments are ``ValueError``s saying what is wrong; an unknown snag or entry a
``LookupError`` (``UnknownSnag``, ``UnknownEntry``). Thread-safe: one Engine, a connection per call, every
method one short transaction (a write run again when MariaDB picks it as a deadlock's victim).
"""

from __future__ import annotations

import builtins
import datetime
import hashlib
import ipaddress
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session

from mailwarden.logs import get_logger, log_kv
from phishhook.models import USER, Action, Allow, Audit, SnagMessage, Travel
from phishhook.models import Snag as SnagRow
from quarantine.store import (
    TEXT,
    QuarantineSettings,
    check_schema,
    clip,
    database_errors,
    engine_for,
    new_public_id,
    retry_deadlocks,
    utcnow,
)

log = get_logger("phishhook")
T = TypeVar("T")
E = TypeVar("E")


class SnagState(StrEnum):
    OPEN = "open"
    """Blocked (the actions ran in enforce mode), waiting for review."""
    ALERT = "alert"
    """Made in alert-only mode: nothing blocked, waiting for review."""
    COMPROMISED = "compromised"
    """Confirmed phished: the account stays blocked. A later finding may still clear it (``safe``)."""
    SAFE = "safe"
    """A false positive: the caller unblocks the account and its address. Final."""
    DISMISSED = "dismissed"
    """Looked at, nothing to do. Final."""


UNDECIDED = (SnagState.OPEN, SnagState.ALERT)
"""Waiting for review: a user has at most one snag in these states."""

TRANSITIONS: dict[SnagState, frozenset[SnagState]] = {
    SnagState.OPEN: frozenset({SnagState.COMPROMISED, SnagState.SAFE, SnagState.DISMISSED}),
    SnagState.ALERT: frozenset({SnagState.COMPROMISED, SnagState.SAFE, SnagState.DISMISSED}),
    SnagState.COMPROMISED: frozenset({SnagState.SAFE}),
    SnagState.SAFE: frozenset(),
    SnagState.DISMISSED: frozenset(),
}
"""The states each state may move to (see the module's drawing)."""


class SnagMode(StrEnum):
    ENFORCE = "enforce"
    """The snag's actions block the account: it starts ``open``."""
    ALERT = "alert"
    """Alert only: nothing is blocked, the snag starts ``alert``."""


class AuditAction(StrEnum):
    """The ``action`` of the audit rows the store writes; ``log_audit`` takes these or any other name."""

    CREATED = "created"
    FINDING_ADDED = "finding-added"
    """A finding added to the user's undecided snag."""
    ESCALATED = "escalated"
    """An alert-only snag made ``open`` by an enforce finding."""
    MESSAGES_ADDED = "messages-added"
    CONFIRM_COMPROMISED = "confirm-compromised"
    CONFIRM_SAFE = "confirm-safe"
    DISMISS = "dismiss"
    TRAVEL_NOTICE = "travel-notice"
    TRAVEL_REMOVED = "travel-removed"
    ALLOW = "allow"
    ALLOW_REMOVED = "allow-removed"
    UNBLOCK = "unblock"
    """Written by the caller (``log_audit``) when it unblocked an account or an address."""
    LOGIN_FAILED = "login-failed"
    """Written by the review page (``log_audit``) for a refused login."""


REVIEW_ACTIONS = {SnagState.COMPROMISED: AuditAction.CONFIRM_COMPROMISED, SnagState.SAFE: AuditAction.CONFIRM_SAFE,
                  SnagState.DISMISSED: AuditAction.DISMISS}
"""The audit action of each transition, by the state it goes to."""

DETECTOR = "phishhook"
"""The actor of the rows the detector writes."""
MAX_FINDINGS = 50
"""Findings kept in a snag's evidence: the first and the latest (a user snagged by every message of a spam
run adds one per message)."""
MAX_EVIDENCE = 64 * 1024
"""Characters of one finding's evidence as JSON, kept whole; a larger one is kept cut."""
MAX_TRAVEL = datetime.timedelta(days=366)
"""The longest travel notice (a semester abroad fits; a notice for ever is an allow entry)."""
MAX_COUNTRIES = 60
"""Countries of one travel notice (the column holds 255 characters)."""
ATTEMPTS = 8
"""Runs of a write transaction that lost a race (a deadlock, a unique key taken meanwhile) before failing:
each run some writer wins, so eight writers at once all get through."""

_COUNTRY = re.compile(r"[A-Z]{2}")


class SnagStateError(ValueError):
    """The snag is not in a state the requested one can follow."""

    def __init__(self, public_id: str, current: SnagState, wanted: SnagState) -> None:
        allowed = sorted(TRANSITIONS[current])
        options = f"it can become {', '.join(allowed)}" if allowed else f"{current} is final"
        super().__init__(f"snag {public_id} is {current}: {options}, not {wanted}")
        self.current, self.wanted, self.allowed = current, wanted, tuple(SnagState(s) for s in allowed)


class UnknownSnag(LookupError):
    """No snag has this public id."""


class UnknownEntry(LookupError):
    """No travel notice or allow entry has this id."""


# -- what callers get ----------------------------------------------------------------------------------


def _iso(value: datetime.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _json_safe(data: dict[str, Any]) -> dict[str, Any]:
    """``asdict`` output with datetimes as ISO text, enums as their values, tuples as lists (nested too)."""

    def fix(value: Any) -> Any:
        if isinstance(value, datetime.datetime):
            return value.isoformat()
        if isinstance(value, StrEnum):
            return str(value)
        if isinstance(value, dict):
            return {key: fix(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [fix(item) for item in value]
        return value

    return {key: fix(value) for key, value in data.items()}


@dataclass(frozen=True)
class Finding:
    """One trigger of a rule for the snag's user: what, when, why, from where, and its evidence."""

    at: datetime.datetime
    kind: str
    mode: SnagMode
    reason: str
    source_address: str
    evidence: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return _json_safe(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        return cls(at=datetime.datetime.fromisoformat(data["at"]), kind=data["kind"], mode=SnagMode(data["mode"]),
                   reason=data["reason"], source_address=data["source_address"], evidence=data["evidence"])


@dataclass(frozen=True)
class ActionRecord:
    """One run of a snag action: its name (``block-account``), whether it did its work, what it did or why
    it failed, when it started and how long it took."""

    name: str
    ok: bool
    detail: str
    started_at: datetime.datetime
    seconds: float
    position: int = -1
    """Its place among the snag's runs (0, 1 ...), set by the store."""

    def as_dict(self) -> dict[str, Any]:
        return _json_safe(asdict(self))


@dataclass(frozen=True)
class Snag:
    """A snagged account: its state, its findings, the messages held for it and its action runs."""

    public_id: str
    user: str
    kind: str
    """The first finding's kind."""
    state: SnagState
    mode: SnagMode
    reason: str
    source_address: str
    """The first finding's address ("" for none); ``source_addresses`` has every finding's."""
    created_at: datetime.datetime
    updated_at: datetime.datetime
    state_by: str
    state_at: datetime.datetime
    findings: tuple[Finding, ...]
    finding_count: int
    """Every finding added, also those no longer kept (see MAX_FINDINGS)."""
    message_ids: tuple[str, ...] = ()
    """Quarantine public ids of the messages held for it, in the order they were added."""
    actions: tuple[ActionRecord, ...] = ()
    new: bool = False
    """Set by ``create``: this call made the snag (else it added a finding to the user's undecided one)."""
    escalated: bool = False
    """Set by ``create``: this call's enforce finding turned the user's alert-only snag ``open``."""

    @property
    def evidence(self) -> dict[str, Any]:
        """The first finding's evidence."""
        return self.findings[0].evidence

    @property
    def source_addresses(self) -> tuple[str, ...]:
        """Every finding's source address, once each, in order (what to unblock)."""
        return tuple(dict.fromkeys(f.source_address for f in self.findings if f.source_address))

    @property
    def undecided(self) -> bool:
        return self.state in UNDECIDED

    @property
    def run_actions(self) -> bool:
        """Whether the ``create`` caller runs the snag actions now: a new snag, or one just escalated."""
        return self.new or self.escalated

    def as_dict(self) -> dict[str, Any]:
        data = _json_safe(asdict(self))
        data["source_addresses"] = list(self.source_addresses)
        return data


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: datetime.datetime
    actor: str
    action: str
    detail: str
    user: str
    """The account concerned ("" for none)."""
    snag: str | None
    """The snag's public id, None for an entry made outside a snag."""

    def as_dict(self) -> dict[str, Any]:
        return _json_safe(asdict(self))


@dataclass(frozen=True)
class TravelNotice:
    """The user is expected in ``countries`` or ``places`` from ``starts_at`` until (excluded) ``ends_at``."""

    id: int
    user: str
    countries: tuple[str, ...]
    places: tuple[str, ...]
    starts_at: datetime.datetime
    ends_at: datetime.datetime
    created_by: str
    note: str
    created_at: datetime.datetime

    def covers(self, at: datetime.datetime) -> bool:
        return self.starts_at <= at < self.ends_at

    def matches(self, country: str | None, place: str | None = None) -> bool:
        """Whether a login located in ``country`` (ISO code) or ``place`` (a city, compared case-insensitively)
        is one this notice expects."""
        if country and country.upper() in self.countries:
            return True
        return place is not None and place.casefold() in {p.casefold() for p in self.places}

    def as_dict(self) -> dict[str, Any]:
        return _json_safe(asdict(self))


@dataclass(frozen=True)
class AllowEntry:
    """Logins from ``network`` and/or ``country`` (both must match when both are set) never snag ``user``
    (None: anyone), until ``expires_at`` (None: no end)."""

    id: int
    user: str | None
    network: str | None
    country: str | None
    created_by: str
    note: str
    created_at: datetime.datetime
    expires_at: datetime.datetime | None

    def active(self, at: datetime.datetime) -> bool:
        return self.expires_at is None or at < self.expires_at

    def matches(self, address: str | ipaddress.IPv4Address | ipaddress.IPv6Address | None,
                country: str | None) -> bool:
        """Whether a login from ``address`` located in ``country`` is allowed by this entry."""
        if self.network is not None:
            if address is None:
                return False
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                return False
            if ip not in ipaddress.ip_network(self.network):
                return False
        return self.country is None or (country or "").upper() == self.country

    def as_dict(self) -> dict[str, Any]:
        return _json_safe(asdict(self))


# -- validation ----------------------------------------------------------------------------------------


def user_key(user: str) -> str:
    """The key a login name is looked up by (``phishhook/models.py``); ValueError for an impossible one."""
    return hashlib.sha256(_user(user).encode("utf-8")).hexdigest()


def _user(user: str) -> str:
    if not isinstance(user, str) or not user:
        raise ValueError("a login name is needed (got an empty one)")
    if len(user) > USER:
        raise ValueError(f"login name of {len(user)} characters: at most {USER} are kept")
    try:
        user.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"login name {user!r} is not valid Unicode (a lone surrogate: decode its bytes "
                         "first)") from None
    return user


def _aware(name: str, value: datetime.datetime) -> datetime.datetime:
    if not isinstance(value, datetime.datetime) or value.tzinfo is None:
        raise ValueError(f"{name} must be an aware datetime (with a time zone), got {value!r}")
    return value.astimezone(datetime.UTC)


def _country(value: str) -> str:
    code = value.strip().upper()
    if not _COUNTRY.fullmatch(code):
        raise ValueError(f"country {value!r}: an ISO 3166 code of two letters, like US or CN")
    return code


def _address(value: str) -> str:
    """An IP address as the store keeps it (normalised), "" for none."""
    if not value:
        return ""
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise ValueError(f"source address {value!r} is not an IP address") from None


def _network(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value.strip(), strict=True))
    except ValueError as exc:
        hint = ""
        with suppress(ValueError):
            hint = f" (did you mean {ipaddress.ip_network(value.strip(), strict=False)}?)"
        raise ValueError(f"network {value!r} is not a network in CIDR notation like 192.0.2.0/24 or "
                         f"2001:db8::/32: {exc}{hint}") from None


def _short(name: str, value: str, limit: int) -> str:
    if not value or len(value) > limit:
        raise ValueError(f"{name} {value!r}: 1 to {limit} characters")
    return value


def _message_ids(message_ids: Iterable[str]) -> list[str]:
    ids = list(dict.fromkeys(message_ids))
    for message_id in ids:
        _short("message id", message_id, 32)
    return ids


def _evidence_json(evidence: dict[str, Any]) -> Any:
    """The evidence as it is kept: itself, or a cut copy when its JSON is larger than MAX_EVIDENCE."""
    if not isinstance(evidence, dict):
        raise ValueError(f"evidence must be a dict, got {type(evidence).__name__}")

    def default(value: Any) -> Any:
        if isinstance(value, datetime.datetime | datetime.date):
            return value.isoformat()
        if isinstance(value, set | frozenset):
            return sorted(value, key=str)
        if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address | ipaddress.IPv4Network
                      | ipaddress.IPv6Network):
            return str(value)
        raise TypeError(f"{type(value).__name__} is not JSON")

    try:
        text = json.dumps(evidence, default=default, ensure_ascii=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"evidence is not JSON-serialisable: {exc}") from None
    if len(text) > MAX_EVIDENCE:
        return {"truncated": True, "characters": len(text), "json": text[:MAX_EVIDENCE]}
    return json.loads(text)


# -- the store -----------------------------------------------------------------------------------------


class SnagStore:
    """phishhook's tables in the quarantine's database; thread-safe (see the module)."""

    def __init__(self, engine: sa.Engine, now: Callable[[], datetime.datetime] = utcnow) -> None:
        self.engine = engine
        self.now = now
        self.where = engine.url.render_as_string(hide_password=True)
        self._writer = engine.execution_options(quarantine_write=True)
        self._ready = False

    @classmethod
    def open(cls, settings: QuarantineSettings, now: Callable[[], datetime.datetime] = utcnow) -> SnagStore:
        """The store on the quarantine's database (``[quarantine] database_url``, ``db_timeout``)."""
        return cls(engine_for(settings), now)

    def check(self) -> None:
        """Raise StoreError unless the database answers and is at this version's schema (SchemaBehind: run
        ``mailwarden quarantine migrate``). Every call does this until it succeeds once."""
        if not self._ready:
            check_schema(self.engine, self.where)
            self._ready = True

    def close(self) -> None:
        self.engine.dispose()

    # -- transactions ------------------------------------------------------------------------------------

    def _write(self, what: str, work: Callable[[sa.Connection], T], conflicts: bool = False) -> T:
        self.check()
        with database_errors(what, self.where):
            return retry_deadlocks(self._writer, what, work, ATTEMPTS, conflicts=conflicts)

    @contextmanager
    def _session(self, what: str) -> Iterator[Session]:
        self.check()
        with database_errors(what, self.where), Session(self.engine) as session:
            yield session

    def _audit(self, conn: sa.Connection, actor: str, action: str, detail: str, user: str = "",
               snag_id: int | None = None) -> None:
        conn.execute(sa.insert(Audit).values(snag_id=snag_id, user=clip(user, USER), actor=clip(actor, 255),
                                             action=clip(action, 64), detail=clip(detail, TEXT), at=self.now()))

    # -- snags -------------------------------------------------------------------------------------------

    def create(self, user: str, kind: str, reason: str, evidence: dict[str, Any],
               mode: SnagMode | str = SnagMode.ENFORCE, source_address: str = "",
               message_ids: Iterable[str] = ()) -> Snag:
        """Snag ``user``, or add this finding to the user's undecided snag (see the module): the snag, with
        ``new`` and ``escalated`` telling the caller whether to run the actions (``run_actions``)."""
        key = user_key(user)
        kind = _short("kind", kind, 64)
        try:
            mode = SnagMode(mode)
        except ValueError:
            raise ValueError(f"mode {mode!r}: 'enforce' or 'alert'") from None
        address = _address(source_address)
        ids = _message_ids(message_ids)
        now = self.now()
        finding = {"at": now.isoformat(), "kind": kind, "mode": mode.value, "reason": clip(reason, TEXT),
                   "source_address": address, "evidence": _evidence_json(evidence)}
        summary = f"{kind} ({mode}): {clip(reason, 500)}"

        def work(conn: sa.Connection) -> tuple[int, bool, bool]:
            row = conn.execute(sa.select(SnagRow.id, SnagRow.state, SnagRow.evidence, SnagRow.findings,
                                         SnagRow.source_address)
                               .where(SnagRow.open_key == key).with_for_update()).first()
            if row is None:
                state = SnagState.OPEN if mode is SnagMode.ENFORCE else SnagState.ALERT
                # a unique key taken meanwhile (another writer's snag of this user) raises IntegrityError:
                # the transaction runs again and finds that snag
                inserted = conn.execute(sa.insert(SnagRow).values(
                    public_id=new_public_id(), user=user, user_key=key, open_key=key, kind=kind, state=state.value,
                    mode=mode.value, reason=clip(reason, TEXT), source_address=address,
                    evidence=json.dumps([finding]), findings=1, created_at=now, updated_at=now,
                    state_by=DETECTOR, state_at=now)).inserted_primary_key
                assert inserted is not None
                snag_id = int(inserted[0])
                self._audit(conn, DETECTOR, AuditAction.CREATED, summary, user, snag_id)
                self._add_messages(conn, snag_id, ids, user)
                return snag_id, True, False
            snag_id = int(row.id)
            kept = json.loads(row.evidence)
            kept.append(finding)
            if len(kept) > MAX_FINDINGS:
                kept = kept[:1] + kept[-(MAX_FINDINGS - 1):]
            count = int(row.findings) + 1
            values: dict[str, Any] = {
                "evidence": json.dumps(kept), "findings": count, "updated_at": now,
                "reason": clip(f"{kept[0]['reason']} and {count - 1} more", TEXT)}
            if not row.source_address and address:
                values["source_address"] = address
            escalated = row.state == SnagState.ALERT and mode is SnagMode.ENFORCE
            if escalated:
                values.update(state=SnagState.OPEN.value, mode=SnagMode.ENFORCE.value, state_by=DETECTOR,
                              state_at=now)
            conn.execute(sa.update(SnagRow).where(SnagRow.id == snag_id).values(**values))
            self._audit(conn, DETECTOR, AuditAction.FINDING_ADDED, summary, user, snag_id)
            if escalated:
                self._audit(conn, DETECTOR, AuditAction.ESCALATED,
                            f"alert-only snag now enforced by {kind}", user, snag_id)
            self._add_messages(conn, snag_id, ids, user)
            return snag_id, False, escalated

        snag_id, new, escalated = self._write("record a snag", work, conflicts=True)
        snag = replace(self._by_ids("read the snag", [snag_id])[0], new=new, escalated=escalated)
        log_kv(log, logging.WARNING if new or escalated else logging.INFO,
               "snagged" if new else "escalated" if escalated else "finding added", id=snag.public_id,
               user=user, kind=kind, mode=str(mode), state=str(snag.state), source=address,
               findings=snag.finding_count, reason=reason)
        return snag

    def _add_messages(self, conn: sa.Connection, snag_id: int, ids: Sequence[str], user: str) -> list[str]:
        """Add those of ``ids`` the snag has not got (a duplicate added meanwhile by another writer raises
        IntegrityError: the caller's transaction runs again)."""
        if not ids:
            return []
        have = set(conn.execute(sa.select(SnagMessage.message_id).where(
            SnagMessage.snag_id == snag_id, SnagMessage.message_id.in_(ids))).scalars())
        added = [message_id for message_id in ids if message_id not in have]
        if added:
            now = self.now()
            conn.execute(sa.insert(SnagMessage), [{"snag_id": snag_id, "message_id": message_id, "added_at": now}
                                                  for message_id in added])
            self._audit(conn, DETECTOR, AuditAction.MESSAGES_ADDED, "held: " + ", ".join(added), user, snag_id)
        return added

    def _snag_row(self, conn: sa.Connection, public_id: str) -> sa.Row[int, str, str]:
        """(id, user, state) of the snag; UnknownSnag if there is none."""
        row = conn.execute(sa.select(SnagRow.id, SnagRow.user.label("user"), SnagRow.state)
                           .where(SnagRow.public_id == public_id)).first()
        if row is None:
            raise UnknownSnag(f"no snag {public_id}")
        return row

    def add_messages(self, public_id: str, message_ids: Iterable[str]) -> Snag:
        """Add quarantine public ids to the snag's messages (those it has already are skipped)."""
        ids = _message_ids(message_ids)

        def work(conn: sa.Connection) -> int:
            row = self._snag_row(conn, public_id)
            self._add_messages(conn, int(row.id), ids, str(row.user))
            return int(row.id)

        snag_id = self._write("add messages to a snag", work, conflicts=True)
        return self._by_ids("read the snag", [snag_id])[0]

    def record_action(self, public_id: str, name: str, ok: bool, detail: str, started_at: datetime.datetime,
                      seconds: float) -> ActionRecord:
        """Record one run of a snag action; its position is the next of the snag's."""
        name = _short("action name", name, 64)
        started_at = _aware("started_at", started_at)

        def work(conn: sa.Connection) -> int:
            snag_id = int(self._snag_row(conn, public_id).id)
            position = int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(Action.position) + 1, 0))
                                        .where(Action.snag_id == snag_id)).scalar_one())
            conn.execute(sa.insert(Action).values(snag_id=snag_id, position=position, name=name, ok=bool(ok),
                                                  detail=clip(detail, TEXT), started_at=started_at,
                                                  seconds=float(seconds)))
            return position

        position = self._write("record a snag action", work, conflicts=True)
        log_kv(log, logging.INFO if ok else logging.WARNING, "snag action", id=public_id, action=name,
               ok=ok, seconds=round(seconds, 3), detail=detail)
        return ActionRecord(name=name, ok=bool(ok), detail=clip(detail, TEXT), started_at=started_at,
                            seconds=float(seconds), position=position)

    def transition(self, public_id: str, to_state: SnagState | str, by: str, note: str = "") -> Snag:
        """Move the snag to ``to_state`` if ``TRANSITIONS`` allows it from its state (SnagStateError else,
        UnknownSnag for an unknown id), with its audit row, in one conditional UPDATE: of concurrent callers
        exactly one wins."""
        try:
            target = SnagState(to_state)
        except ValueError:
            raise ValueError(f"state {to_state!r}: one of {', '.join(SnagState)}") from None
        sources = [state.value for state, targets in TRANSITIONS.items() if target in targets]
        by = _short("actor", by, 255)
        now = self.now()

        def work(conn: sa.Connection) -> int:
            changed = conn.execute(sa.update(SnagRow).where(SnagRow.public_id == public_id,
                                                            SnagRow.state.in_(sources))
                                   .values(state=target.value, open_key=None, state_by=by, state_at=now,
                                           updated_at=now)).rowcount
            row = self._snag_row(conn, public_id)
            if changed != 1:
                raise SnagStateError(public_id, SnagState(row.state), target)
            self._audit(conn, by, REVIEW_ACTIONS[target], note, str(row.user), int(row.id))
            return int(row.id)

        snag_id = self._write("change a snag's state", work)
        log_kv(log, logging.INFO, "snag reviewed", id=public_id, state=str(target), by=by, note=note)
        return self._by_ids("read the snag", [snag_id])[0]

    def get(self, public_id: str) -> Snag | None:
        """The snag with its findings, message ids and action runs; None if there is none."""
        with self._session("read a snag") as session:
            rows = session.scalars(sa.select(SnagRow).where(SnagRow.public_id == public_id)).all()
            snags = self._complete(session, rows)
        return snags[0] if snags else None

    def open_for(self, user: str) -> Snag | None:
        """The user's undecided (open or alert) snag, if any."""
        key = user_key(user)
        with self._session("read a snag") as session:
            snags = self._complete(session, session.scalars(sa.select(SnagRow).where(SnagRow.open_key == key)).all())
        return snags[0] if snags else None

    def list(self, states: Iterable[SnagState | str] | None = None, user: str | None = None, limit: int = 100,
             before: datetime.datetime | None = None) -> builtins.list[Snag]:
        """Snags newest first: in ``states`` (all if None), of ``user``, made before ``before`` (for paging:
        give the last one's created_at), at most ``limit``."""
        query = sa.select(SnagRow)
        if states is not None:
            query = query.where(SnagRow.state.in_([SnagState(s).value for s in states]))
        if user is not None:
            query = query.where(SnagRow.user_key == user_key(user))
        if before is not None:
            query = query.where(SnagRow.created_at < _aware("before", before))
        query = query.order_by(SnagRow.created_at.desc(), SnagRow.id.desc()).limit(max(0, int(limit)))
        with self._session("list snags") as session:
            return self._complete(session, session.scalars(query).all())

    def _by_ids(self, what: str, ids: Sequence[int]) -> builtins.list[Snag]:
        with self._session(what) as session:
            return self._complete(session, session.scalars(sa.select(SnagRow).where(SnagRow.id.in_(ids))).all())

    @staticmethod
    def _complete(session: Session, rows: Sequence[SnagRow]) -> builtins.list[Snag]:
        """Snags of ``rows`` with their message ids and action runs (two queries for all of them)."""
        ids = [row.id for row in rows]
        messages: dict[int, builtins.list[str]] = {i: [] for i in ids}
        actions: dict[int, builtins.list[ActionRecord]] = {i: [] for i in ids}
        if ids:
            for snag_id, message_id in session.execute(
                    sa.select(SnagMessage.snag_id, SnagMessage.message_id).where(SnagMessage.snag_id.in_(ids))
                    .order_by(SnagMessage.id)):
                messages[snag_id].append(message_id)
            for action in session.scalars(sa.select(Action).where(Action.snag_id.in_(ids))
                                          .order_by(Action.snag_id, Action.position)):
                actions[action.snag_id].append(ActionRecord(
                    name=action.name, ok=action.ok, detail=action.detail, started_at=action.started_at,
                    seconds=action.seconds, position=action.position))
        return [Snag(public_id=row.public_id, user=row.user, kind=row.kind, state=SnagState(row.state),
                     mode=SnagMode(row.mode), reason=row.reason, source_address=row.source_address,
                     created_at=row.created_at, updated_at=row.updated_at, state_by=row.state_by,
                     state_at=row.state_at, findings=tuple(Finding.from_dict(f) for f in json.loads(row.evidence)),
                     finding_count=row.findings, message_ids=tuple(messages[row.id]),
                     actions=tuple(actions[row.id]))
                for row in rows]

    # -- audit -------------------------------------------------------------------------------------------

    def audit(self, snag_public_id: str | None = None, limit: int = 200) -> builtins.list[AuditEntry]:
        """Audit rows newest first, of one snag or all; at most ``limit``."""
        query = (sa.select(Audit, SnagRow.public_id).outerjoin(SnagRow, Audit.snag_id == SnagRow.id)
                 .order_by(Audit.at.desc(), Audit.id.desc()).limit(max(0, int(limit))))
        if snag_public_id is not None:
            query = query.where(SnagRow.public_id == snag_public_id)
        with self._session("read the audit log") as session:
            return [AuditEntry(id=row.id, at=row.at, actor=row.actor, action=row.action, detail=row.detail,
                               user=row.user, snag=public_id)
                    for row, public_id in session.execute(query)]

    def log_audit(self, actor: str, action: str, detail: str, snag_id: str | None = None, user: str = "") -> None:
        """Add an audit row for something done outside the store (``snag_id``: a snag's public id, whose
        user the row then names unless ``user`` is given)."""
        actor = _short("actor", actor, 255)
        action = _short("action", str(action), 64)

        def work(conn: sa.Connection) -> None:
            row = self._snag_row(conn, snag_id) if snag_id is not None else None
            self._audit(conn, actor, action, detail, user or (str(row.user) if row else ""),
                        int(row.id) if row else None)

        self._write("write the audit log", work)

    # -- travel notices ----------------------------------------------------------------------------------

    def add_travel(self, user: str, countries: Iterable[str] = (), places: Iterable[str] = (), *,
                   starts_at: datetime.datetime, ends_at: datetime.datetime, by: str, note: str = "",
                   snag_id: str | None = None) -> TravelNotice:
        """Expect ``user`` in ``countries`` (ISO codes) or ``places`` (cities) from ``starts_at`` until
        ``ends_at`` (excluded; at most MAX_TRAVEL later). ``snag_id``: the snag whose review made it (its
        audit row is linked to it)."""
        _user(user)
        codes = list(dict.fromkeys(_country(c) for c in ([countries] if isinstance(countries, str) else countries)
                                   if c.strip()))
        names = list(dict.fromkeys(p.strip() for p in ([places] if isinstance(places, str) else places)
                                   if p.strip()))
        if not codes and not names:
            raise ValueError("a travel notice needs at least one country or place")
        if len(codes) > MAX_COUNTRIES:
            raise ValueError(f"{len(codes)} countries: at most {MAX_COUNTRIES} in one notice")
        starts_at, ends_at = _aware("starts_at", starts_at), _aware("ends_at", ends_at)
        if ends_at <= starts_at:
            raise ValueError(f"the travel ends ({ends_at.isoformat()}) before it starts ({starts_at.isoformat()})")
        if ends_at - starts_at > MAX_TRAVEL:
            raise ValueError(f"a travel notice lasts at most {MAX_TRAVEL.days} days; for a lasting place add an "
                             "allow entry")
        by = _short("actor", by, 255)
        now = self.now()
        values = {"user": user, "user_key": user_key(user), "countries": ",".join(codes),
                  "places": json.dumps(names), "starts_at": starts_at, "ends_at": ends_at, "created_by": by,
                  "note": clip(note, TEXT), "created_at": now}

        def work(conn: sa.Connection) -> int:
            snag = self._snag_row(conn, snag_id) if snag_id is not None else None
            inserted = conn.execute(sa.insert(Travel).values(**values)).inserted_primary_key
            assert inserted is not None
            self._audit(conn, by, AuditAction.TRAVEL_NOTICE,
                        f"#{inserted[0]} {', '.join(codes + names)} from {starts_at.isoformat()} until "
                        f"{ends_at.isoformat()}" + (f": {note}" if note else ""), user,
                        int(snag.id) if snag else None)
            return int(inserted[0])

        notice_id = self._write("add a travel notice", work)
        log_kv(log, logging.INFO, "travel notice added", id=notice_id, user=user, countries=",".join(codes),
               places="; ".join(names), starts=starts_at.isoformat(), ends=ends_at.isoformat(), by=by)
        return _travel(Travel(id=notice_id, **values))

    def travel_for(self, user: str, at: datetime.datetime) -> builtins.list[TravelNotice]:
        """The user's notices covering the instant ``at`` (one indexed query)."""
        at = _aware("at", at)
        query = sa.select(Travel).where(Travel.user_key == user_key(user), Travel.ends_at > at,
                                        Travel.starts_at <= at).order_by(Travel.id)
        with self._session("read travel notices") as session:
            return [_travel(row) for row in session.scalars(query)]

    def list_travel(self, user: str | None = None, current_only: bool = True) -> builtins.list[TravelNotice]:
        """Notices of ``user`` (everyone's if None), those not ended yet (now or later) unless ``current_only``
        is False; by start."""
        query = sa.select(Travel).order_by(Travel.starts_at, Travel.id)
        if user is not None:
            query = query.where(Travel.user_key == user_key(user))
        if current_only:
            query = query.where(Travel.ends_at > self.now())
        with self._session("list travel notices") as session:
            return [_travel(row) for row in session.scalars(query)]

    def remove_travel(self, notice_id: int, by: str) -> TravelNotice:
        """Remove a notice (UnknownEntry if there is none); returns it."""
        return self._remove(Travel, notice_id, by, "travel notice", _travel, AuditAction.TRAVEL_REMOVED,
                            lambda n: (f"{', '.join(n.countries + n.places)} from {n.starts_at.isoformat()} until "
                                       f"{n.ends_at.isoformat()}", n.user))

    # -- allow entries -----------------------------------------------------------------------------------

    def add_allow(self, user: str | None, network: str | None = None, country: str | None = None, *, by: str,
                  note: str = "", expires_at: datetime.datetime | None = None,
                  snag_id: str | None = None) -> AllowEntry:
        """Never snag ``user`` (None: anyone) for logins from ``network`` (CIDR) and/or ``country`` (both
        must match when both are given), until ``expires_at`` (None: until removed)."""
        if user is not None:
            _user(user)
        if not network and not country:
            raise ValueError("an allow entry needs a network, a country, or both")
        cidr = _network(network) if network else None
        code = _country(country) if country else None
        if expires_at is not None:
            expires_at = _aware("expires_at", expires_at)
            if expires_at <= self.now():
                raise ValueError(f"expires_at {expires_at.isoformat()} is past: the entry would never apply")
        by = _short("actor", by, 255)
        values = {"user": user, "user_key": user_key(user) if user is not None else None, "network": cidr,
                  "country": code, "created_by": by, "note": clip(note, TEXT), "created_at": self.now(),
                  "expires_at": expires_at}
        what = " ".join(filter(None, [cidr, code]))

        def work(conn: sa.Connection) -> int:
            snag = self._snag_row(conn, snag_id) if snag_id is not None else None
            inserted = conn.execute(sa.insert(Allow).values(**values)).inserted_primary_key
            assert inserted is not None
            self._audit(conn, by, AuditAction.ALLOW,
                        f"#{inserted[0]} {what} for {user if user is not None else 'everyone'}"
                        + (f" until {expires_at.isoformat()}" if expires_at else "") + (f": {note}" if note else ""),
                        user or "", int(snag.id) if snag else None)
            return int(inserted[0])

        entry_id = self._write("add an allow entry", work)
        log_kv(log, logging.INFO, "allow entry added", id=entry_id, user=user or "*", network=cidr or "",
               country=code or "", by=by)
        return _allow(Allow(id=entry_id, **values))

    def allows_for(self, user: str) -> builtins.list[AllowEntry]:
        """The user's entries and the organisation's, unexpired (one indexed query)."""
        now = self.now()
        query = (sa.select(Allow)
                 .where(sa.or_(Allow.user_key == user_key(user), Allow.user_key.is_(None)),
                        sa.or_(Allow.expires_at.is_(None), Allow.expires_at > now))
                 .order_by(Allow.id))
        with self._session("read allow entries") as session:
            return [_allow(row) for row in session.scalars(query)]

    def list_allow(self, user: str | None = None, include_expired: bool = False) -> builtins.list[AllowEntry]:
        """Every entry (of ``user`` and the organisation's when given), by id."""
        query = sa.select(Allow).order_by(Allow.id)
        if user is not None:
            query = query.where(sa.or_(Allow.user_key == user_key(user), Allow.user_key.is_(None)))
        if not include_expired:
            query = query.where(sa.or_(Allow.expires_at.is_(None), Allow.expires_at > self.now()))
        with self._session("list allow entries") as session:
            return [_allow(row) for row in session.scalars(query)]

    def remove_allow(self, entry_id: int, by: str) -> AllowEntry:
        """Remove an entry (UnknownEntry if there is none); returns it."""
        return self._remove(Allow, entry_id, by, "allow entry", _allow, AuditAction.ALLOW_REMOVED,
                            lambda e: (f"{' '.join(filter(None, [e.network, e.country]))} for "
                                       f"{e.user if e.user is not None else 'everyone'}", e.user or ""))

    def _remove(self, model: Any, entry_id: int, by: str, what: str, entry_of: Callable[[Any], E],
                action: AuditAction, describe: Callable[[E], tuple[str, str]]) -> E:
        """Delete one travel notice or allow entry by id, with its audit row (``describe``: the detail and the
        user it names), in one transaction; UnknownEntry if there is none."""
        by = _short("actor", by, 255)

        def work(conn: sa.Connection) -> E:
            with Session(conn) as session:
                row = session.get(model, entry_id)
                if row is None:
                    raise UnknownEntry(f"no {what} #{entry_id}")
                entry = entry_of(row)
            conn.execute(sa.delete(model).where(model.id == entry_id))
            detail, user = describe(entry)
            self._audit(conn, by, action, f"#{entry_id} {detail}", user)
            return entry

        entry = self._write(f"remove a{'n' if what[0] in 'aeiou' else ''} {what}", work)
        log_kv(log, logging.INFO, f"{what} removed", id=entry_id, user=describe(entry)[1] or "*", by=by)
        return entry

        entry = self._write("remove an allow entry", work)
        log_kv(log, logging.INFO, "allow entry removed", id=entry_id, user=entry.user or "*", by=by)
        return entry


def _travel(row: Travel) -> TravelNotice:
    return TravelNotice(id=row.id, user=row.user, countries=tuple(c for c in row.countries.split(",") if c),
                        places=tuple(json.loads(row.places)), starts_at=row.starts_at, ends_at=row.ends_at,
                        created_by=row.created_by, note=row.note, created_at=row.created_at)


def _allow(row: Allow) -> AllowEntry:
    return AllowEntry(id=row.id, user=row.user, network=row.network, country=row.country, created_by=row.created_by,
                      note=row.note, created_at=row.created_at, expires_at=row.expires_at)
