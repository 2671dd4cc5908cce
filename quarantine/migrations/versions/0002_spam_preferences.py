"""Per-recipient spam preferences: score levels and sender white/black lists, per mailbox or domain.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

ADDRESS = 320


def _id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _when() -> sa.types.TypeEngine[datetime.datetime]:
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "spam_levels",
        sa.Column("id", _id(), primary_key=True, autoincrement=True),
        sa.Column("owner", sa.String(ADDRESS), nullable=False),
        sa.Column("tag_level", sa.Double(), nullable=True),
        sa.Column("hold_level", sa.Double(), nullable=True),
        sa.Column("reject_level", sa.Double(), nullable=True),
        sa.Column("changed_at", _when(), nullable=False),
        sa.Column("changed_by", sa.String(255), nullable=False),
        sa.UniqueConstraint("owner", name="uq_spam_levels_owner"),
    )
    op.create_table(
        "spam_senders",
        sa.Column("id", _id(), primary_key=True, autoincrement=True),
        sa.Column("owner", sa.String(ADDRESS), nullable=False),
        sa.Column("pattern", sa.String(ADDRESS), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("created_at", _when(), nullable=False),
        sa.Column("created_by", sa.String(255), nullable=False),
        sa.UniqueConstraint("owner", "pattern", name="uq_spam_senders_owner_pattern"),
        sa.CheckConstraint("kind IN ('white', 'black')", name="ck_spam_senders_kind"),
    )


def downgrade() -> None:
    op.drop_table("spam_senders")
    op.drop_table("spam_levels")
