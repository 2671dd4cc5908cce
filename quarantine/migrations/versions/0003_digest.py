"""Quarantine digests: each mailbox's interval and progress, the runs, the refused replies.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

ADDRESS = 320


def _id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _when() -> sa.types.TypeEngine[datetime.datetime]:
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "digest_subscriber",
        sa.Column("id", _id(), primary_key=True, autoincrement=True),
        sa.Column("owner", sa.String(ADDRESS), nullable=False),
        sa.Column("digest_interval", sa.String(16), nullable=True),
        sa.Column("last_sent_at", _when(), nullable=True),
        sa.Column("covered_until", _when(), nullable=True),
        sa.Column("sending_cutoff", _when(), nullable=True),
        sa.Column("sending_since", _when(), nullable=True),
        sa.Column("changed_at", _when(), nullable=False),
        sa.Column("changed_by", sa.String(255), nullable=False),
        sa.UniqueConstraint("owner", name="uq_digest_subscriber_owner"),
        sa.CheckConstraint("digest_interval IS NULL OR digest_interval IN ('daily', 'weekly', 'immediate', 'off')",
                           name="ck_digest_subscriber_interval"),
    )
    op.create_table(
        "digest_run",
        sa.Column("id", _id(), primary_key=True, autoincrement=True),
        sa.Column("started_at", _when(), nullable=False),
        sa.Column("finished_at", _when(), nullable=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("sent", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("skipped", sa.Integer(), nullable=False),
    )
    op.create_index("ix_digest_run_started_at", "digest_run", ["started_at"])
    op.create_table(
        "digest_event",
        sa.Column("id", _id(), primary_key=True, autoincrement=True),
        sa.Column("at", _when(), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("sender", sa.String(ADDRESS), nullable=False),
        sa.Column("owner", sa.String(ADDRESS), nullable=False),
        sa.Column("sasl_user", sa.String(255), nullable=False),
        sa.Column("client_address", sa.String(64), nullable=False),
        sa.Column("message_id", sa.String(255), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
    )
    op.create_index("ix_digest_event_at", "digest_event", ["at"])
    # the digest's query: held rows of a mailbox since its last digest
    op.create_index("ix_quarantine_held_mailbox_held_at", "quarantine_held", ["mailbox", "held_at"])


def downgrade() -> None:
    op.drop_index("ix_quarantine_held_mailbox_held_at", table_name="quarantine_held")
    op.drop_index("ix_digest_event_at", table_name="digest_event")
    op.drop_table("digest_event")
    op.drop_index("ix_digest_run_started_at", table_name="digest_run")
    op.drop_table("digest_run")
    op.drop_table("digest_subscriber")
