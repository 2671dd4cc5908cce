"""The catalogue: held messages (raw bytes stored once) and one held row per recipient.

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

import datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ADDRESS = 320


def _id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _when() -> sa.types.TypeEngine[datetime.datetime]:
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "quarantine_message",
        sa.Column("id", _id(), primary_key=True, autoincrement=True),
        sa.Column("received_at", _when(), nullable=False),
        sa.Column("queue_id", sa.String(64), nullable=False),
        sa.Column("sender", sa.String(ADDRESS), nullable=False),
        sa.Column("client_address", sa.String(64), nullable=False),
        sa.Column("auth_user", sa.String(ADDRESS), nullable=False),
        sa.Column("header_from", sa.Text(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("date", sa.String(255), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("storage", sa.String(16), nullable=False),
        sa.Column("content", sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb"), nullable=True),
        sa.Column("path", sa.String(255), nullable=True),
    )
    op.create_index("ix_quarantine_message_received_at", "quarantine_message", ["received_at"])
    op.create_index("ix_quarantine_message_sender", "quarantine_message", ["sender"])
    op.create_table(
        "quarantine_held",
        sa.Column("id", _id(), primary_key=True, autoincrement=True),
        sa.Column("public_id", sa.String(32), nullable=False),
        sa.Column("message_id", _id(), nullable=False),
        sa.Column("recipient", sa.String(ADDRESS), nullable=False),
        sa.Column("mailbox", sa.String(ADDRESS), nullable=False),
        sa.Column("check_name", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("held_at", _when(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("state_by", sa.String(255), nullable=False),
        sa.Column("state_at", _when(), nullable=False),
        sa.Column("released_queue_id", sa.String(64), nullable=False),
        sa.ForeignKeyConstraint(["message_id"], ["quarantine_message.id"], name="fk_quarantine_held_message",
                                ondelete="CASCADE"),
        sa.UniqueConstraint("public_id", name="uq_quarantine_held_public_id"),
    )
    op.create_index("ix_quarantine_held_message_id", "quarantine_held", ["message_id"])
    op.create_index("ix_quarantine_held_recipient", "quarantine_held", ["recipient"])
    op.create_index("ix_quarantine_held_mailbox", "quarantine_held", ["mailbox"])
    op.create_index("ix_quarantine_held_state_held_at", "quarantine_held", ["state", "held_at"])


def downgrade() -> None:
    op.drop_table("quarantine_held")
    op.drop_table("quarantine_message")
