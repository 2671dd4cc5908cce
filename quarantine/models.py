"""The quarantine catalogue's tables (SQLAlchemy 2 typed declarative), the same on SQLite and MariaDB.

``quarantine_message``: one row per message as received: its envelope, its headers of interest and its
raw bytes, stored once however many recipients it is held for: zlib-compressed in ``content``
(``storage = "inline"``), or as a file under ``message_dir`` named by ``path`` (``storage = "file"``);
``storage = "purged"`` once no recipient holds it any more and purge removed the bytes.

``quarantine_held``: one row per recipient it is held for, with its own public id, reason and state, so
releasing the message to one recipient leaves it held for the others. The SpamAssassin milter also keeps
a row, in state ``delivered``, for a recipient it delivered tagged mail to (a score between their tag and
hold levels: ``record_tagged``), so the digest can list it and a REPORT can learn it as spam from its
bytes; such a row was never held and is never released.

``spam_levels`` and ``spam_senders``: the per-recipient spam preferences (``quarantine/preferences.py``),
kept beside the catalogue so the milters, the CLI and the digest replies share one database: each row's
owner is a mailbox (``alice@example.org``) or a whole domain (``@example.org``), lower case.

Every change here needs a migration in ``migrations/versions/`` (``tests/test_quarantine_store.py``
compares the migrated schema with these models).
"""

from __future__ import annotations

import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class State(StrEnum):
    HELD = "held"
    """Waiting: the recipient may have it released."""
    RELEASING = "releasing"
    """Claimed by a release that is re-injecting it now (back to held if the re-injection fails)."""
    RELEASED = "released"
    DELETED = "deleted"
    EXPIRED = "expired"
    """Held (or recorded as delivered) longer than the retention: purge expired it."""
    DELIVERED = "delivered"
    """Not held: delivered to the recipient, tagged (a score between their tag and hold levels), and kept
    so the recipient can report it as spam from the digest. Release and delete refuse it."""
    REPORTED = "reported"
    """A delivered row its recipient reported as spam (the digest's REPORT: learned as spam)."""


LIVE_STATES = (State.HELD, State.RELEASING, State.DELIVERED)
"""A message whose rows are all in other states is no longer needed: purge removes its bytes."""

RETAINED_STATES = (State.HELD, State.DELIVERED)
"""Rows purge expires once they are older than the retention (by the time they were held or recorded)."""


class Storage(StrEnum):
    INLINE = "inline"
    FILE = "file"
    PURGED = "purged"


class UtcDateTime(sa.TypeDecorator[datetime.datetime]):
    """An aware UTC datetime in Python, a naive UTC one in the database (MariaDB's DATETIME has no zone;
    microseconds kept, which MariaDB drops unless asked)."""

    impl = sa.DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(sa.DateTime())

    def process_bind_param(self, value: datetime.datetime | None, dialect: sa.Dialect) -> datetime.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the quarantine stores UTC, give an aware datetime")
        return value.astimezone(datetime.UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime.datetime | None, dialect: sa.Dialect
                             ) -> datetime.datetime | None:
        return None if value is None else value.replace(tzinfo=datetime.UTC)


LongBlob = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
"""BLOB is 64 KB on MariaDB; a compressed message up to inline_max_size needs more."""

ADDRESS = 320
"""Characters of an address column (64 local part + @ + 255 domain)."""


class Base(DeclarativeBase):
    pass


class Message(Base):
    __tablename__ = "quarantine_message"

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                                    autoincrement=True)
    received_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime(), index=True)
    queue_id: Mapped[str] = mapped_column(sa.String(64), default="")
    sender: Mapped[str] = mapped_column(sa.String(ADDRESS), index=True)
    """The envelope sender ("" for the null sender)."""
    client_address: Mapped[str] = mapped_column(sa.String(64), default="")
    auth_user: Mapped[str] = mapped_column(sa.String(ADDRESS), default="")
    header_from: Mapped[str] = mapped_column(sa.Text(), default="")
    subject: Mapped[str] = mapped_column(sa.Text(), default="")
    date: Mapped[str] = mapped_column(sa.String(255), default="")
    """The Date header as written by the sender (not parsed: it may be garbage)."""
    size: Mapped[int] = mapped_column(sa.BigInteger())
    storage: Mapped[str] = mapped_column(sa.String(16))
    content: Mapped[bytes | None] = mapped_column(LongBlob, nullable=True)
    """zlib-compressed raw message when storage is inline."""
    path: Mapped[str | None] = mapped_column(sa.String(255), nullable=True)
    """File name relative to message_dir when storage is file."""


class Held(Base):
    __tablename__ = "quarantine_held"
    __table_args__ = (sa.Index("ix_quarantine_held_state_held_at", "state", "held_at"),
                      sa.Index("ix_quarantine_held_mailbox_held_at", "mailbox", "held_at"),
                      sa.UniqueConstraint("public_id", name="uq_quarantine_held_public_id"))

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                                    autoincrement=True)
    public_id: Mapped[str] = mapped_column(sa.String(32))
    message_id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        sa.ForeignKey("quarantine_message.id", name="fk_quarantine_held_message", ondelete="CASCADE"), index=True)
    recipient: Mapped[str] = mapped_column(sa.String(ADDRESS), index=True)
    mailbox: Mapped[str] = mapped_column(sa.String(ADDRESS), index=True)
    check: Mapped[str] = mapped_column("check_name", sa.String(64))
    """The check that held it (``clamav``, ``banned``); the column avoids CHECK, reserved in SQL."""
    kind: Mapped[str] = mapped_column(sa.String(64))
    reason: Mapped[str] = mapped_column(sa.Text(), default="")
    held_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime())
    state: Mapped[str] = mapped_column(sa.String(16))
    state_by: Mapped[str] = mapped_column(sa.String(255), default="")
    """Who made the last change of state (a login name, ``purge``); the check that held it at first."""
    state_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime())
    released_queue_id: Mapped[str] = mapped_column(sa.String(64), default="")
    """The Postfix queue id the re-injection listener gave the released copy."""


OWNER = ADDRESS
"""Characters of a preferences owner: a mailbox address, or ``@`` and a domain."""

SENDER_KINDS = ("white", "black")


class SpamLevels(Base):
    """The score levels of one owner; a level left NULL comes from the owner's domain, else the defaults."""

    __tablename__ = "spam_levels"
    __table_args__ = (sa.UniqueConstraint("owner", name="uq_spam_levels_owner"),)

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                                    autoincrement=True)
    owner: Mapped[str] = mapped_column(sa.String(OWNER))
    tag_level: Mapped[float | None] = mapped_column(sa.Double(), nullable=True)
    hold_level: Mapped[float | None] = mapped_column(sa.Double(), nullable=True)
    reject_level: Mapped[float | None] = mapped_column(sa.Double(), nullable=True)
    changed_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime())
    changed_by: Mapped[str] = mapped_column(sa.String(255))


class SpamSender(Base):
    """One white- or blacklist entry of an owner: a sender address or domain pattern."""

    __tablename__ = "spam_senders"
    __table_args__ = (sa.UniqueConstraint("owner", "pattern", name="uq_spam_senders_owner_pattern"),
                      sa.CheckConstraint("kind IN ('white', 'black')", name="ck_spam_senders_kind"))

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                                    autoincrement=True)
    owner: Mapped[str] = mapped_column(sa.String(OWNER))
    pattern: Mapped[str] = mapped_column(sa.String(ADDRESS))
    kind: Mapped[str] = mapped_column(sa.String(8))
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime())
    created_by: Mapped[str] = mapped_column(sa.String(255))


INTERVALS = ("daily", "weekly", "immediate", "off")


class DigestSubscriber(Base):
    """One mailbox's digest: its interval (NULL: the site's default) and how far its digests got.

    ``covered_until`` is the cut-off of the last digest sent (messages held up to it were offered once);
    ``sending_cutoff`` is set while a run sends this mailbox's digest, so a run that dies between claiming and
    marking never sends it twice (the next run logs the unknown outcome and moves on)."""

    __tablename__ = "digest_subscriber"
    __table_args__ = (sa.UniqueConstraint("owner", name="uq_digest_subscriber_owner"),
                      sa.CheckConstraint("digest_interval IS NULL OR digest_interval IN "
                                         "('daily', 'weekly', 'immediate', 'off')",
                                         name="ck_digest_subscriber_interval"))

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                                    autoincrement=True)
    owner: Mapped[str] = mapped_column(sa.String(ADDRESS))
    interval: Mapped[str | None] = mapped_column("digest_interval", sa.String(16), nullable=True)
    """``daily``, ``weekly``, ``immediate``, ``off``; NULL: ``[quarantine.digest] interval``."""
    last_sent_at: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    covered_until: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    sending_cutoff: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    sending_since: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    changed_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime())
    changed_by: Mapped[str] = mapped_column(sa.String(255), default="")


class DigestRun(Base):
    """One ``digest send`` run: what it sent, for the stale warning and ``digest status``."""

    __tablename__ = "digest_run"

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                                    autoincrement=True)
    started_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime(), index=True)
    finished_at: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    host: Mapped[str] = mapped_column(sa.String(255), default="")
    sent: Mapped[int] = mapped_column(sa.Integer(), default=0)
    failed: Mapped[int] = mapped_column(sa.Integer(), default=0)
    skipped: Mapped[int] = mapped_column(sa.Integer(), default=0)


class DigestEvent(Base):
    """A reply to a digest that was refused for a reason of security (forged sender, a token of another
    mailbox, tampered, expired, replayed ...): the security log the team reviews and the metric counts."""

    __tablename__ = "digest_event"

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                                    autoincrement=True)
    at: Mapped[datetime.datetime] = mapped_column(UtcDateTime(), index=True)
    reason: Mapped[str] = mapped_column(sa.String(64))
    sender: Mapped[str] = mapped_column(sa.String(ADDRESS), default="")
    owner: Mapped[str] = mapped_column(sa.String(ADDRESS), default="")
    """The mailbox the reply claimed to act for (a token's or the address's), "" if none."""
    sasl_user: Mapped[str] = mapped_column(sa.String(255), default="")
    client_address: Mapped[str] = mapped_column(sa.String(64), default="")
    message_id: Mapped[str] = mapped_column(sa.String(255), default="")
    detail: Mapped[str] = mapped_column(sa.Text(), default="")
