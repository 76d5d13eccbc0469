"""Drift watch: the live window of scores and input statistics (drift_samples).

Revision ID: v4
Revises: v3
"""

import sqlalchemy as sa
from alembic import op

revision = "v4"
down_revision = "v3"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "drift_samples",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("bundle_version", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("abnormality_score", sa.Float(), nullable=True),
        sa.Column("definite_normal", sa.Boolean(), nullable=True),
        sa.Column("windowed_mean", sa.Float(), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("columns", sa.Integer(), nullable=True),
        sa.Column("bits_stored", sa.Integer(), nullable=True),
        sa.Column("manufacturer", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    raise NotImplementedError("the node upgrades in place; restore a backup to go back")
