"""phishhook: snags, the messages held for them, their action runs, the audit log, travel notices, allow entries.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

USER = 320
KEY = 64


def _id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _when() -> sa.types.TypeEngine[datetime.datetime]:
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def _json() -> sa.types.TypeEngine[str]:
    return sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "phish_snag",
        sa.Column("id", _id(), primary_key=True, autoincrement=True),
        sa.Column("public_id", sa.String(32), nullable=False),
        sa.Column("user_name", sa.String(USER), nullable=False),
        sa.Column("user_key", sa.String(KEY), nullable=False),
        sa.Column("open_key", sa.String(KEY), nullable=True),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("mode", sa.String(8), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("source_address", sa.String(64), nullable=False),
        sa.Column("evidence", _json(), nullable=False),
        sa.Column("findings", sa.Integer(), nullable=False),
        sa.Column("created_at", _when(), nullable=False),
        sa.Column("updated_at", _when(), nullable=False),
        sa.Column("state_by", sa.String(255), nullable=False),
        sa.Column("state_at", _when(), nullable=False),
        sa.UniqueConstraint("public_id", name="uq_phish_snag_public_id"),
        sa.UniqueConstraint("open_key", name="uq_phish_snag_open_key"),
        sa.CheckConstraint("mode IN ('enforce', 'alert')", name="ck_phish_snag_mode"),
    )
    op.create_index("ix_phish_snag_state_created_at", "phish_snag", ["state", "created_at"])
    op.create_index("ix_phish_snag_user_key_state", "phish_snag", ["user_key", "state"])
    op.create_table(
        "phish_snag_message",
        sa.Column("id", _id(), primary_key=True, autoincrement=True),
        sa.Column("snag_id", _id(), sa.ForeignKey("phish_snag.id", name="fk_phish_snag_message_snag",
                                                  ondelete="CASCADE"), nullable=False),
        sa.Column("message_id", sa.String(32), nullable=False),
        sa.Column("added_at", _when(), nullable=False),
        sa.UniqueConstraint("snag_id", "message_id", name="uq_phish_snag_message"),
    )
    op.create_index("ix_phish_snag_message_message_id", "phish_snag_message", ["message_id"])
    op.create_table(
        "phish_action",
        sa.Column("id", _id(), primary_key=True, autoincrement=True),
        sa.Column("snag_id", _id(), sa.ForeignKey("phish_snag.id", name="fk_phish_action_snag", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("started_at", _when(), nullable=False),
        sa.Column("seconds", sa.Double(), nullable=False),
        sa.UniqueConstraint("snag_id", "position", name="uq_phish_action_position"),
    )
    op.create_table(
        "phish_audit",
        sa.Column("id", _id(), primary_key=True, autoincrement=True),
        sa.Column("snag_id", _id(), sa.ForeignKey("phish_snag.id", name="fk_phish_audit_snag", ondelete="SET NULL"),
                  nullable=True),
        sa.Column("user_name", sa.String(USER), nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("at", _when(), nullable=False),
    )
    op.create_index("ix_phish_audit_snag_id", "phish_audit", ["snag_id"])
    op.create_index("ix_phish_audit_at", "phish_audit", ["at"])
    op.create_table(
        "phish_travel",
        sa.Column("id", _id(), primary_key=True, autoincrement=True),
        sa.Column("user_name", sa.String(USER), nullable=False),
        sa.Column("user_key", sa.String(KEY), nullable=False),
        sa.Column("countries", sa.String(255), nullable=False),
        sa.Column("places", sa.Text(), nullable=False),
        sa.Column("starts_at", _when(), nullable=False),
        sa.Column("ends_at", _when(), nullable=False),
        sa.Column("created_by", sa.String(255), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("created_at", _when(), nullable=False),
    )
    op.create_index("ix_phish_travel_user_key_ends_at", "phish_travel", ["user_key", "ends_at"])
    op.create_table(
        "phish_allow",
        sa.Column("id", _id(), primary_key=True, autoincrement=True),
        sa.Column("user_name", sa.String(USER), nullable=True),
        sa.Column("user_key", sa.String(KEY), nullable=True),
        sa.Column("network", sa.String(64), nullable=True),
        sa.Column("country", sa.String(2), nullable=True),
        sa.Column("created_by", sa.String(255), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("created_at", _when(), nullable=False),
        sa.Column("expires_at", _when(), nullable=True),
    )
    op.create_index("ix_phish_allow_user_key", "phish_allow", ["user_key"])


def downgrade() -> None:
    # each table with its indexes (MariaDB refuses to drop alone an index a foreign key uses)
    for table in ("phish_allow", "phish_travel", "phish_audit", "phish_action", "phish_snag_message", "phish_snag"):
        op.drop_table(table)
