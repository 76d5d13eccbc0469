"""The harness auditor's study check on a small real SQLite database made with the node's own
schema: a study is covered by a done job whose instances are its stored ones, those its worker
marked unusable aside."""

from __future__ import annotations

import json
from pathlib import Path

from scxnn_node.store.db import Database
from scxnn_node.store.models import Instance, InstanceState, Job, JobState, Study, StudyState
from scxnn_node.testing.audit import Auditor, NodeDatabase

STUDY = "1.2.3"


def _node_database(tmp_path: Path, states: dict[str, str], job_uids: list[str]) -> str:
    """A reported study with instances in `states` and one done job of `job_uids`."""
    url = f"sqlite:///{tmp_path / 'node.db'}"
    db = Database(url)
    db.create_schema()
    now = db.now()
    with db.session() as session:
        session.add(
            Study(
                study_instance_uid=STUDY,
                state=StudyState.REPORTED,
                first_received_at=now,
                last_received_at=now,
            )
        )
        for uid, state in states.items():
            session.add(
                Instance(
                    sop_instance_uid=uid,
                    study_instance_uid=STUDY,
                    path="",  # purged: the study check reads no files
                    state=state,
                    received_at=now,
                )
            )
        session.add(
            Job(
                study_instance_uid=STUDY,
                instance_set="set",
                instance_uids=json.dumps(job_uids),
                bundle_version="0.1.0",
                state=JobState.DONE,
                created_at=now,
                updated_at=now,
            )
        )
    db.dispose()
    return url


def _stuck(url: str, tmp_path: Path) -> list[str]:
    node_db = NodeDatabase(url)
    try:
        found = Auditor(node_db, tmp_path / "spool", ["0.1.0"]).audit([], everything=True)
    finally:
        node_db.dispose()
    return found.findings["stuck"]


def test_an_unusable_instance_in_the_done_job_leaves_its_study_covered(tmp_path):
    states = {"1.2.3.1": InstanceState.STORED, "1.2.3.2": InstanceState.UNUSABLE}
    url = _node_database(tmp_path, states, ["1.2.3.1", "1.2.3.2"])
    assert _stuck(url, tmp_path) == []


def test_a_stored_instance_no_done_job_holds_is_still_stuck(tmp_path):
    states = {"1.2.3.1": InstanceState.STORED, "1.2.3.2": InstanceState.STORED}
    url = _node_database(tmp_path, states, ["1.2.3.1"])
    [line] = _stuck(url, tmp_path)
    assert "no result covers its 2 stored instances, at most 1" in line
