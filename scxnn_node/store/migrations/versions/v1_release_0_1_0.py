"""The schema of release 0.1.0: the baseline. That release made it (with a schema_info table,
version 1); `scxnn-node db upgrade` recognises such a database as this revision.

Revision ID: v1
"""

revision = "v1"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # nothing before it: databases of 0.1.0 were made whole by that release


def downgrade() -> None:
    raise NotImplementedError("the node upgrades in place; restore a backup to go back")
