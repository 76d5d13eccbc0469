"""Worker liveness carries its pipeline's seconds: engine running, engine waiting for decoding.

Revision ID: v5
Revises: v4
"""

import sqlalchemy as sa
from alembic import op

revision = "v5"
down_revision = "v4"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as table:
        table.add_column(
            sa.Column("engine_seconds", sa.Float(), nullable=False, server_default="0")
        )
        table.add_column(
            sa.Column("decode_wait_seconds", sa.Float(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    raise NotImplementedError("the node upgrades in place; restore a backup to go back")
