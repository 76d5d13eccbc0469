"""CPU milliseconds a study costs the node's queue steps, without DICOM or a model: readiness
(a quiet study becomes a job), a worker's claim, one heartbeat, and the completion that
records an SR's result with its deliveries. These steps run in the serve process (readiness)
and in the worker's one process, so their cost bounds studies/s per process on a GPU node.

    python bench/job_queue.py [--studies 300] [--database-url URL]

Each step runs for every study in turn, timed by this process's CPU clock (the database
server's CPU is not counted for PostgreSQL).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from scxnn_node.findings import THESIS_CATALOGUE
from scxnn_node.model.result import (
    BundleIdentity,
    FindingResult,
    MemberCall,
    StudyResult,
    Verdict,
)
from scxnn_node.store.assembly import InstanceRecord, enqueue_quiet_studies, record_instance
from scxnn_node.store.db import Database
from scxnn_node.store.models import Study
from scxnn_node.store.queue import ClaimedJob, JobQueue
from scxnn_node.store.results import JobOutputs, SrReference, record_result

DX = "1.2.840.10008.5.1.4.1.1.1.1"
VERSION = "1.0.0"


def cpu_ms_each(step: Callable[[], object], times: int) -> float:
    start = time.process_time()
    for _ in range(times):
        step()
    return (time.process_time() - start) * 1000 / times


def abnormal_result(study: str) -> StudyResult:
    """A thesis-catalogue result: the first finding's member says target."""
    first = THESIS_CATALOGUE[0].name
    target = {"normal": 0.2, "target": 0.7, "others": 0.1}
    normal = {"normal": 0.9, "target": 0.05, "others": 0.05}
    return StudyResult(
        study_instance_uid=study,
        verdict=Verdict.ABNORMAL,
        reason=None,
        risk_tier=THESIS_CATALOGUE[0].tier,
        abnormality_score=0.8,
        threshold=0.1,
        findings=tuple(
            FindingResult(
                f.name,
                f.tier,
                MemberCall.TARGET if f.name == first else MemberCall.NORMAL,
                target if f.name == first else normal,
            )
            for f in THESIS_CATALOGUE
        ),
        bundle=BundleIdentity("bench", VERSION, demo=False),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=300)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="scxnn-queue-"))
    db = Database(args.database_url or f"sqlite:///{root / 'node.db'}")
    db.create_schema()
    n = args.studies
    for i in range(n):
        study = f"1.2.826.0.1.{i}"
        record_instance(db, InstanceRecord(f"{study}.1", study, f"{study}.9", DX, "p", 1, "PACS"))
    with db.session() as session:  # each study quiet at its own moment, one at a time
        moments = sorted(session.execute(select(Study.last_received_at)).scalars())
    queue = JobQueue(db, "bench-worker", 300, 3, bundle_version=VERSION)
    claimed: list[ClaimedJob] = []
    quiet = iter(moments)

    def ready_one() -> None:
        assert enqueue_quiet_studies(db, 0.0, VERSION, now=next(quiet)) >= 1

    def claim() -> None:
        job = queue.claim_ready_job()
        assert job is not None
        claimed.append(job)

    beats = iter(claimed)

    def heartbeat() -> None:
        assert queue.heartbeat(next(beats).id)

    done = iter(claimed)

    def complete() -> None:
        job = next(done)
        uid = job.study_instance_uid
        outputs = JobOutputs(
            SrReference(uid, f"{uid}.7", "1.2.840.10008.5.1.4.1.1.88.34", f"{uid}.8"),
            f"{uid}.5",
            f"{uid}.6",
            {"sr": f"outbox/{uid}/sr.dcm", "summary": f"outbox/{uid}/summary.dcm"},
        )
        with db.session() as session:
            assert queue.complete(session, job.id)
            record_result(
                session, job, abnormal_result(uid), outputs, None, {"pacs": ["sr", "summary"]}
            )

    figures = {
        "readiness": cpu_ms_each(ready_one, n),
        "claim": cpu_ms_each(claim, n),
        "heartbeat": cpu_ms_each(heartbeat, n),
        "complete + record_result": cpu_ms_each(complete, n),
    }
    print(f"{n} studies on {db.engine.dialect.name}; CPU ms a study:")
    for step, ms in figures.items():
        print(f"  {step}: {ms:.2f}")
    db.dispose()


if __name__ == "__main__":
    main()
