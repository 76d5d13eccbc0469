"""Two nodes on one PostgreSQL database whose hosts' clocks disagree (an NTP client that failed
on one of them): readiness, leases and heartbeats must be judged on one clock, the database's.
The skewed node's processes read a wall clock ten minutes ahead (tests/clock_ahead)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from scxnn_node.testing.audit import NodeDatabase, wait_settled
from scxnn_node.testing.datasets import chest_dataset, write_part10
from scxnn_node.testing.dcmtk import Storescp
from scxnn_node.testing.node_process import NodeProcess, serve_config
from scxnn_node.testing.peers import store_files, wait_until

SKEW_SECONDS = 600
# Only the wall clock is off (monotonic time stays real), as on a host whose time was set wrong.
AHEAD = {
    "PYTHONPATH": os.pathsep.join(
        filter(None, [str(Path(__file__).parent / "clock_ahead"), os.environ.get("PYTHONPATH")])
    ),
    "SCXNN_TEST_CLOCK_AHEAD_SECONDS": str(SKEW_SECONDS),
}
QUIET_SECONDS = 4.0


def _sr_references(pacs: Storescp, study_uid: str) -> list[set[str]]:
    """For each SR the PACS holds for the study: the SOP Instance UIDs it cites."""
    found = []
    for path in pacs.received():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.get("Modality") == "SR" and ds.get("StudyInstanceUID") == study_uid:
            cited = {str(e.value) for e in ds.iterall() if e.keyword == "ReferencedSOPInstanceUID"}
            found.append(cited)
    return found


def _two_instances(root: Path) -> tuple[str, list[Path]]:
    study, series = generate_uid(), generate_uid()
    files = [
        write_part10(
            chest_dataset(study_uid=study, series_uid=series, seed=i, InstanceNumber=i + 1),
            root / f"instance{i}.dcm",
        )
        for i in range(2)
    ]
    return study, files


@pytest.fixture
def two_nodes(
    tmp_path: Path, small_bundle_dir: Path, postgres_url: str
) -> Iterator[tuple[NodeProcess, NodeProcess, Storescp]]:
    pacs = Storescp(tmp_path / "pacs").start()
    nodes = []
    for name, env in (("on_time", {}), ("ahead", AHEAD)):
        config = serve_config(
            tmp_path / name,
            small_bundle_dir,
            database_url=postgres_url,
            pacs_port=pacs.port,
            study={"quiet_seconds": QUIET_SECONDS},
            # One database, one spool (a shared file system): either node runs any job.
            storage={"spool_dir": str(tmp_path / "spool")},
        )
        nodes.append(NodeProcess(config, tmp_path / name, env=env))
    try:
        for node in nodes:
            node.start()
        yield nodes[0], nodes[1], pacs
    finally:
        for node in nodes:
            node.kill()
        pacs.stop()


@pytest.mark.parametrize("receiver", ["on_time", "ahead"])
def test_a_study_is_reported_once_when_the_nodes_clocks_disagree(
    two_nodes: tuple[NodeProcess, NodeProcess, Storescp], tmp_path: Path, receiver: str
) -> None:
    on_time, ahead, pacs = two_nodes
    node = on_time if receiver == "on_time" else ahead
    study, files = _two_instances(tmp_path)

    # The second instance comes well inside quiet_seconds of the first: one study, one SR.
    sent = time.monotonic()
    assert store_files(node.port, files[:1])[0].acknowledged
    time.sleep(QUIET_SECONDS / 4)
    assert store_files(node.port, files[1:])[0].acknowledged

    # Neither node may judge the study quiet by its own clock: not early (the node ahead
    # reading the other's arrival times), not ten minutes late (the other reading its times).
    wait_until(lambda: _sr_references(pacs, study), 60, 0.2)
    assert time.monotonic() - sent >= QUIET_SECONDS
    database = NodeDatabase(on_time.database_url)
    try:
        assert wait_settled(database, 60)
        time.sleep(2 * QUIET_SECONDS)  # time for a second SR, had one been coming
        assert _sr_references(pacs, study) == [{_sop(f) for f in files}]
        jobs = database.rows(
            "SELECT attempts FROM jobs WHERE study_instance_uid = :study", study=study
        )
        # One job, claimed once: no node took it from a live holder whose lease it misread.
        assert [job["attempts"] for job in jobs] == [1]
    finally:
        database.dispose()


def _sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_a_node_with_its_clock_ahead_keeps_time_with_the_database(postgres_url: str) -> None:
    """Database.now() on PostgreSQL is the server's clock, whatever the host's says."""
    probe = (
        "from scxnn_node.store.db import Database\n"
        "from datetime import UTC, datetime\n"
        "from sqlalchemy import text\n"
        f"db = Database({postgres_url!r})\n"
        "with db.reading() as c:\n"
        "    server = c.execute(text(\"SELECT timezone('UTC', clock_timestamp())\")).scalar_one()\n"
        "local = datetime.now(UTC).replace(tzinfo=None)\n"
        "print((db.now() - server).total_seconds(), (local - server).total_seconds())\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, **AHEAD},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    node_minus_server, host_minus_server = map(float, run.stdout.split())
    assert host_minus_server == pytest.approx(SKEW_SECONDS, abs=30)  # the host is off...
    assert abs(node_minus_server) < 1.0  # ...the node's clock is not
