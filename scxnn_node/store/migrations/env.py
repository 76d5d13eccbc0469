"""Alembic's entry point for the node's migrations. They run only through
scxnn_node.store.migrate, on the connection (and inside the transaction) it passes: there is no
alembic.ini and no offline mode."""

from alembic import context

from scxnn_node.store.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("the node's migrations run through `scxnn-node db upgrade`")
context.configure(connection=connection, target_metadata=Base.metadata)
with context.begin_transaction():
    context.run_migrations()
