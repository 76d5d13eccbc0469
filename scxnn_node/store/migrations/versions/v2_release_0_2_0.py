"""Release 0.2.0: results keep their SR's identity (series, class) and the summary's series;
deliveries and jobs carry leases and backoff; workers report liveness; the version lives in
Alembic's table instead of schema_info.

Revision ID: v2
Revises: v1
"""

import sqlalchemy as sa
from alembic import op

revision = "v2"
down_revision = "v1"
branch_labels = None
depends_on = None

# Release 0.1.0 wrote every SR as a Comprehensive 3D SR (highdicom's Comprehensive3DSR).
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def upgrade() -> None:
    # NOT NULL columns of existing rows need a value: the empty string ("unknown"), as the
    # models' own default writes for a study not analysed.
    for column in ("sr_series_instance_uid", "sr_sop_class_uid", "summary_series_instance_uid"):
        op.add_column(
            "results",
            sa.Column(column, sa.String(64), nullable=False, server_default=""),
        )
    op.execute(
        sa.text(
            "UPDATE results SET sr_sop_class_uid = :sr_class WHERE sr_sop_instance_uid != ''"
        ).bindparams(sr_class=COMPREHENSIVE_3D_SR)
    )
    op.add_column("deliveries", sa.Column("lease_owner", sa.String(128), nullable=True))
    op.add_column("deliveries", sa.Column("lease_expires_at", sa.DateTime(), nullable=True))
    op.add_column("jobs", sa.Column("next_attempt_at", sa.DateTime(), nullable=True))
    op.create_table(
        "workers",
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("host", sa.String(64), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("device", sa.String(32), nullable=False),
        sa.Column("bundle_version", sa.String(64), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("beat_at", sa.DateTime(), nullable=False),
        sa.Column("alive_until", sa.DateTime(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("owner"),
    )
    op.create_index("ix_workers_alive_until", "workers", ["alive_until"])
    op.drop_table("schema_info")


def downgrade() -> None:
    raise NotImplementedError("the node upgrades in place; restore a backup to go back")
