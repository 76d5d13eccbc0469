"""A dispatcher of this host that died holding deliveries (kill -9, a crash) does not hold them
for delivery.lease_seconds: a node starting on the same database releases them at once, in its
serve process or in its first dispatch process."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
from result_rows import add_pending_delivery
from sqlalchemy import select

from scxnn_node.node import Node
from scxnn_node.store.db import Database
from scxnn_node.store.models import Delivery
from scxnn_node.store.spool import Spool
from scxnn_node.testing.dcmtk import Storescp
from scxnn_node.testing.loopback import node_config, wait_for


def _dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("dispatch_processes", [0, 1])
def test_a_dead_dispatcher_s_deliveries_go_out_when_a_node_starts(
    tmp_path, small_bundle_dir, dispatch_processes
):
    pacs = Storescp(tmp_path / "pacs").start()
    config = node_config(
        tmp_path,
        model={"bundle": str(small_bundle_dir)},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
        node={"dispatch_processes": dispatch_processes},
        delivery={"lease_seconds": 3600},
        scheduler={"delivery_seconds": 0.2},
    )
    db = Database(config.database.url)
    db.create_schema()
    spool = Spool(config.storage.spool_dir)
    host = socket.gethostname()
    orphan = add_pending_delivery(db, spool, 1, f"{host}:{_dead_pid()}:dispatcher:0dead0ff")
    # Alive (this very process), or on another host: their leases are theirs to end.
    alive = add_pending_delivery(db, spool, 2, f"{host}:{os.getpid()}:dispatcher:0a11fe00")
    remote = add_pending_delivery(db, spool, 3, f"elsewhere:{_dead_pid()}:dispatcher:0e15e000")
    node = Node(config, workers=False)
    node.start()
    try:

        def states() -> dict[int, tuple[str, str | None]]:
            with db.session() as s:
                rows = s.execute(select(Delivery)).scalars()
                return {d.id: (d.state, d.lease_owner) for d in rows}

        wait_for(lambda: states()[orphan][0] == "sent", 60)  # not after the hour's lease
        assert len(pacs.received()) == 1
        now = states()
        assert now[alive][0] == "pending" and now[alive][1].endswith("0a11fe00")
        assert now[remote][0] == "pending" and now[remote][1].startswith("elsewhere:")
    finally:
        node.stop()
        pacs.stop()
        db.dispose()
