"""phishhook's tables (SQLAlchemy 2 typed declarative), in the quarantine's database and on its ``Base``.

They share the catalogue's database (``[quarantine] database_url``) so that every MX host, the HTTP service
and the CLI see the same snags, and they share its migrations (``quarantine/migrations/versions/0004_phishhook.py``
onwards): ``mailwarden quarantine migrate`` creates them. Importing this module adds them to
``quarantine.models.Base.metadata`` (the schema comparison in the tests and Alembic's env import it).

``phish_snag``: one row per snagged account and episode: its state (``phishhook/snags.py``, ``SnagState``),
its findings as JSON (opaque to the store: login sightings, distances, a message's envelope), the mode it was
made in (``enforce``: the account is blocked; ``alert``: nothing blocked).

**Login names.** ``user`` keeps the login name exactly as given (up to 320 characters, any Unicode).
Lookups go through ``user_key``, the SHA-256 of its UTF-8 bytes in hex: MariaDB's utf8mb4_general_ci
would take ``Alice`` for ``alice``, ``é`` for ``e`` and ``bob`` for ``bob `` (PAD SPACE), SQLite would
not; the hash compares byte for byte on both, in a short ASCII index. The caller gives canonical names.

**One open snag per user.** ``open_key`` is the user_key while the snag is ``open`` or ``alert`` and NULL
once it is decided; its unique constraint lets the database itself refuse a second open snag of a user (NULLs
never collide), however many milter threads, hosts or the HTTP service snag the user at once.

``phish_snag_message``: the quarantine public ids of the messages held for a snag, one row each rather
than a JSON list in the snag: milter threads add them concurrently without rewriting the snag's row, the
unique (snag_id, message_id) pair drops a duplicate, and the index on message_id finds the snag that holds
a quarantined message. No foreign key to ``quarantine_held``: the quarantine's purge forgets its old rows.

``phish_action``: one row per snag action run (block, ticket, command ...), in order (``position``).

``phish_audit``: who did what and when: snags created, findings added, reviews (confirm, dismiss), travel
notices and allow entries added or removed, failed review logins. ``snag_id`` is NULL for entries made
outside a snag; ``user`` names the account concerned ("" for none).

``phish_travel``: travel notices: a user expected in some countries or places between two instants.

``phish_allow``: allow entries, a user's (``user_key`` set) or the organisation's (NULL): a network, a
country, or both (both must match), until ``expires_at`` (NULL: no end).
"""

from __future__ import annotations

import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import Mapped, mapped_column

from quarantine.models import ADDRESS, Base, UtcDateTime

USER = ADDRESS
"""Characters of a login name (an address at most)."""
KEY = 64
"""Characters of a user key: SHA-256 in hex."""

Ident = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
"""Ids: BIGINT on MariaDB, INTEGER (the rowid) on SQLite."""

Json = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")
"""JSON text: MariaDB's TEXT holds 64 KB, a snag's findings (a message's recipients ...) may need more."""


class Snag(Base):
    __tablename__ = "phish_snag"
    __table_args__ = (sa.UniqueConstraint("public_id", name="uq_phish_snag_public_id"),
                      sa.UniqueConstraint("open_key", name="uq_phish_snag_open_key"),
                      sa.Index("ix_phish_snag_state_created_at", "state", "created_at"),
                      sa.Index("ix_phish_snag_user_key_state", "user_key", "state"),
                      sa.CheckConstraint("mode IN ('enforce', 'alert')", name="ck_phish_snag_mode"))

    id: Mapped[int] = mapped_column(Ident, primary_key=True, autoincrement=True)
    public_id: Mapped[str] = mapped_column(sa.String(32))
    user: Mapped[str] = mapped_column("user_name", sa.String(USER))
    """The login name as given; the column avoids USER, reserved in standard SQL."""
    user_key: Mapped[str] = mapped_column(sa.String(KEY))
    open_key: Mapped[str | None] = mapped_column(sa.String(KEY), nullable=True)
    """``user_key`` while the snag is open or alert, NULL after: at most one undecided snag per user."""
    kind: Mapped[str] = mapped_column(sa.String(64))
    """The first finding's kind: ``impossible-travel``, a region rule's name, ``outbound`` ..."""
    state: Mapped[str] = mapped_column(sa.String(16))
    mode: Mapped[str] = mapped_column(sa.String(8))
    reason: Mapped[str] = mapped_column(sa.Text())
    source_address: Mapped[str] = mapped_column(sa.String(64))
    """The address of the first finding ("" for none); each finding keeps its own."""
    evidence: Mapped[str] = mapped_column(Json)
    """A JSON list of findings, the first always kept (see ``phishhook/snags.py``, ``MAX_FINDINGS``)."""
    findings: Mapped[int] = mapped_column(sa.Integer())
    """How many findings were added, including those no longer kept in ``evidence``."""
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime())
    state_by: Mapped[str] = mapped_column(sa.String(255))
    state_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime())


class SnagMessage(Base):
    __tablename__ = "phish_snag_message"
    __table_args__ = (sa.UniqueConstraint("snag_id", "message_id", name="uq_phish_snag_message"),)

    id: Mapped[int] = mapped_column(Ident, primary_key=True, autoincrement=True)
    snag_id: Mapped[int] = mapped_column(
        Ident, sa.ForeignKey("phish_snag.id", name="fk_phish_snag_message_snag", ondelete="CASCADE"))
    message_id: Mapped[str] = mapped_column(sa.String(32), index=True)
    """A quarantine public id (``quarantine_held.public_id``)."""
    added_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime())


class Action(Base):
    __tablename__ = "phish_action"
    __table_args__ = (sa.UniqueConstraint("snag_id", "position", name="uq_phish_action_position"),)

    id: Mapped[int] = mapped_column(Ident, primary_key=True, autoincrement=True)
    snag_id: Mapped[int] = mapped_column(
        Ident, sa.ForeignKey("phish_snag.id", name="fk_phish_action_snag", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(sa.Integer())
    """0, 1, 2 ... in the order the runs were recorded for the snag."""
    name: Mapped[str] = mapped_column(sa.String(64))
    ok: Mapped[bool] = mapped_column(sa.Boolean())
    detail: Mapped[str] = mapped_column(sa.Text())
    started_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime())
    seconds: Mapped[float] = mapped_column(sa.Double())


class Audit(Base):
    __tablename__ = "phish_audit"

    id: Mapped[int] = mapped_column(Ident, primary_key=True, autoincrement=True)
    snag_id: Mapped[int | None] = mapped_column(
        Ident, sa.ForeignKey("phish_snag.id", name="fk_phish_audit_snag", ondelete="SET NULL"), nullable=True,
        index=True)
    user: Mapped[str] = mapped_column("user_name", sa.String(USER))
    """The account the entry concerns ("" for none)."""
    actor: Mapped[str] = mapped_column(sa.String(255))
    action: Mapped[str] = mapped_column(sa.String(64))
    detail: Mapped[str] = mapped_column(sa.Text())
    at: Mapped[datetime.datetime] = mapped_column(UtcDateTime(), index=True)


class Travel(Base):
    __tablename__ = "phish_travel"
    __table_args__ = (sa.Index("ix_phish_travel_user_key_ends_at", "user_key", "ends_at"),)

    id: Mapped[int] = mapped_column(Ident, primary_key=True, autoincrement=True)
    user: Mapped[str] = mapped_column("user_name", sa.String(USER))
    user_key: Mapped[str] = mapped_column(sa.String(KEY))
    countries: Mapped[str] = mapped_column(sa.String(255))
    """ISO 3166 codes, comma-separated, upper case ("" for none)."""
    places: Mapped[str] = mapped_column(sa.Text())
    """A JSON list of place names (cities), ``[]`` for none."""
    starts_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime())
    ends_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime())
    """Excluded: the notice covers starts_at <= t < ends_at."""
    created_by: Mapped[str] = mapped_column(sa.String(255))
    note: Mapped[str] = mapped_column(sa.Text())
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime())


class Allow(Base):
    __tablename__ = "phish_allow"

    id: Mapped[int] = mapped_column(Ident, primary_key=True, autoincrement=True)
    user: Mapped[str | None] = mapped_column("user_name", sa.String(USER), nullable=True)
    """NULL: the whole organisation."""
    user_key: Mapped[str | None] = mapped_column(sa.String(KEY), nullable=True, index=True)
    network: Mapped[str | None] = mapped_column(sa.String(64), nullable=True)
    """CIDR, normalised (``192.0.2.0/24``, ``2001:db8::/32``)."""
    country: Mapped[str | None] = mapped_column(sa.String(2), nullable=True)
    created_by: Mapped[str] = mapped_column(sa.String(255))
    note: Mapped[str] = mapped_column(sa.Text())
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime())
    expires_at: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
