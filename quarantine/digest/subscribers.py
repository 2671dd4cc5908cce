"""The digest's rows in the catalogue's database: each mailbox's interval, and the security events of refused
replies. The sending progress (``covered_until``, the claim of a run) is ``send.py``'s.

Owners are mailboxes, lower case (the ``mailbox`` of held rows).
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa

from mailwarden.logs import get_logger, log_kv
from quarantine.digest.settings import Interval
from quarantine.models import DigestEvent, DigestSubscriber
from quarantine.store import QuarantineStore, clip

log = get_logger("quarantine.digest")
security_log = get_logger("quarantine.digest.security")


def interval_of(store: QuarantineStore, owner: str, default: Interval) -> Interval:
    """The owner's digest interval: its own choice, else ``default`` (the site's)."""
    with store.reading("read the digest interval") as conn:
        value = conn.execute(sa.select(DigestSubscriber.interval)
                             .where(DigestSubscriber.owner == owner.lower())).scalar_one_or_none()
    return Interval(value) if value else default


def set_interval(store: QuarantineStore, owner: str, interval: Interval | None, by: str) -> bool:
    """Set the owner's interval (None: back to the site's default); True if it changed."""
    owner = owner.lower()
    value = None if interval is None else str(interval)

    def upsert(conn: sa.Connection) -> bool:
        now = store.now()
        current = conn.execute(sa.select(DigestSubscriber.interval).where(DigestSubscriber.owner == owner)
                               .with_for_update()).first()
        if current is None:
            if value is None:
                return False
            try:
                with conn.begin_nested():
                    conn.execute(sa.insert(DigestSubscriber).values(owner=owner, interval=value, changed_at=now,
                                                                    changed_by=clip(by, 255)))
            except sa.exc.IntegrityError:  # inserted meanwhile by another reply
                conn.execute(sa.update(DigestSubscriber).where(DigestSubscriber.owner == owner)
                             .values(interval=value, changed_at=now, changed_by=clip(by, 255)))
            return True
        if current[0] == value:
            return False
        conn.execute(sa.update(DigestSubscriber).where(DigestSubscriber.owner == owner)
                     .values(interval=value, changed_at=now, changed_by=clip(by, 255)))
        return True

    changed = store.write_transaction("set the digest interval", upsert)
    if changed:
        log_kv(log, logging.INFO, "digest interval changed", owner=owner, interval=value or "default", by=by)
    return changed


@dataclass(frozen=True)
class SecurityEvent:
    reason: str
    """What was wrong: ``forged-sender``, ``not-authenticated``, ``wrong-owner``, ``bad-mac``, ``expired``,
    ``foreign-id``, ``admin-only`` ... (``reply.py`` names them)."""
    sender: str = ""
    owner: str = ""
    sasl_user: str = ""
    client_address: str = ""
    message_id: str = ""
    detail: str = ""
    at: datetime.datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["at"] = self.at.isoformat() if self.at else None
        return data


def record_event(store: QuarantineStore, event: SecurityEvent) -> None:
    """Log the event (always) and keep it in ``digest_event`` (when the database answers: a lost row must
    not lose the log line)."""
    log_kv(security_log, logging.WARNING, "digest reply refused", security="yes", reason=event.reason,
           sender=event.sender, owner=event.owner, sasl_user=event.sasl_user, client=event.client_address,
           message_id=event.message_id, detail=event.detail)
    row = {"at": event.at or store.now(), "reason": clip(event.reason, 64), "sender": clip(event.sender, 320),
           "owner": clip(event.owner, 320), "sasl_user": clip(event.sasl_user, 255),
           "client_address": clip(event.client_address, 64), "message_id": clip(event.message_id, 255),
           "detail": clip(event.detail, 2000)}
    store.write_transaction("record a security event", lambda conn: conn.execute(sa.insert(DigestEvent).values(**row)))


def events(store: QuarantineStore, since: datetime.datetime | None = None, limit: int = 1000) -> list[SecurityEvent]:
    """The newest refused replies first."""
    query = sa.select(DigestEvent).order_by(DigestEvent.at.desc(), DigestEvent.id.desc()).limit(limit)
    if since is not None:
        query = query.where(DigestEvent.at >= since)
    with store.reading_session("read the security events") as session:
        return [SecurityEvent(reason=row.reason, sender=row.sender, owner=row.owner, sasl_user=row.sasl_user,
                              client_address=row.client_address, message_id=row.message_id, detail=row.detail,
                              at=row.at) for row in session.scalars(query)]


def event_counts(store: QuarantineStore) -> dict[str, int]:
    """Refused replies by reason, ever (for the metric)."""
    with store.reading("count the security events") as conn:
        rows = conn.execute(sa.select(DigestEvent.reason, sa.func.count()).group_by(DigestEvent.reason)).all()
    return {reason: count for reason, count in rows}
