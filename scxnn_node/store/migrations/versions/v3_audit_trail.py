"""Release 0.3.0: the append-only audit trail (audit_records).

Revision ID: v3
Revises: v2
"""

import sqlalchemy as sa
from alembic import op

revision = "v3"
down_revision = "v2"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_records",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("study", sa.String(16), nullable=False),
        sa.Column("instance", sa.String(16), nullable=False),
        sa.Column("party", sa.String(128), nullable=False),
        sa.Column("bundle_version", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(64), nullable=False),
        sa.Column("risk_tier", sa.String(32), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_records_at", "audit_records", ["at"])
    op.create_index("ix_audit_records_action_outcome", "audit_records", ["action", "outcome"])


def downgrade() -> None:
    raise NotImplementedError("the node upgrades in place; restore a backup to go back")
