"""The inference worker: claim a study, triage it, store the result, queue its deliveries.

A crash at any point leaves either nothing (the job's lease expires and it runs again) or the
whole outcome (result, output files, deliveries and the job's completion commit together), so
a study never gets two SRs for the same input.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import threading
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select

from scxnn_node.config import NodeConfig
from scxnn_node.dicom.sr import build_triage_sr
from scxnn_node.dicom.summary import build_summary_image
from scxnn_node.imaging.decode import ImageRejected
from scxnn_node.model.bundle import Bundle, load_bundle
from scxnn_node.model.engine import EngineOptions, InferenceEngine
from scxnn_node.model.result import StudyResult, Verdict
from scxnn_node.store.db import Database, short_hash, utc_now
from scxnn_node.store.models import Delivery, Instance, Result, Study
from scxnn_node.store.queue import ClaimedJob, JobQueue
from scxnn_node.store.spool import Spool
from scxnn_node.triage import PreparedInstance, prepare_instance, triage_study

log = logging.getLogger(__name__)


class LostLease(Exception):
    """Another worker took the job over (our lease expired); our work is discarded."""


@dataclass(frozen=True)
class Outputs:
    sr_uid: str
    summary_uid: str
    paths: dict[str, str]  # kind -> spool-relative path


class TriageWorker:
    def __init__(self, config: NodeConfig, device: str, bundle: Bundle | None = None) -> None:
        self.config = config
        self.db = Database(config.database.url)
        self.db.check_schema()
        self.spool = Spool(config.storage.spool_dir)
        self.bundle = bundle or load_bundle(config.model.bundle)
        self.manifest = self.bundle.manifest
        self.engine = InferenceEngine(
            self.bundle,
            EngineOptions(
                device=device,
                batch_size=config.model.batch_size,
                precision=config.model.precision,
                backend=config.model.backend,
            ),
        )
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{device}"
        self.queue = JobQueue(
            self.db, self.owner, config.worker.lease_seconds, config.worker.max_attempts
        )
        self.policy = config.selection_policy()
        self.finding_codes = {
            f.name: (f.code.value, f.code.scheme, f.code.meaning) for f in self.manifest.findings
        }

    def process_next(self) -> bool:
        """Process one ready job; False when there was none."""
        job = self.queue.claim_ready_job()
        if job is None:
            return False
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job.id, stop), daemon=True)
        beat.start()
        try:
            result, prepared = self._triage(job)
            self._finish(job, result, prepared)
            log.info(
                "study %s: %s%s",
                short_hash(job.study_instance_uid),
                result.verdict.value,
                f" ({result.risk_tier})" if result.risk_tier else "",
            )
        except Exception as exc:
            state = self.queue.fail(job.id, f"{type(exc).__name__}: {exc}")
            log.exception("job %d failed (%s)", job.id, state)
        finally:
            stop.set()
            beat.join()
        return True

    def run(self, stop: threading.Event) -> None:
        log.info(
            "worker %s serving bundle %s %s", self.owner, self.manifest.name, self.manifest.version
        )
        while not stop.is_set():
            if not self.process_next():
                stop.wait(self.config.worker.poll_seconds)

    def _heartbeat(self, job_id: int, stop: threading.Event) -> None:
        while not stop.wait(self.config.worker.heartbeat_seconds):
            if not self.queue.heartbeat(job_id):
                log.warning("job %d: lease lost", job_id)
                return

    def _triage(self, job: ClaimedJob) -> tuple[StudyResult, list[PreparedInstance]]:
        with self.db.session() as session:
            rows = session.execute(
                select(Instance.sop_instance_uid, Instance.path).where(
                    Instance.sop_instance_uid.in_(job.instance_uids)
                )
            ).all()
        prepared: list[PreparedInstance] = []
        for sop_uid, path in rows:
            try:
                prepared.append(
                    prepare_instance(
                        self.spool.absolute(path), self.manifest.preprocessing, self.policy
                    )
                )
            except ImageRejected as exc:
                log.warning("instance %s not analysable: %s", short_hash(sop_uid), exc)
                prepared.append(PreparedInstance(job.study_instance_uid, sop_uid, None, str(exc)))
        result = triage_study(self.engine, job.study_instance_uid, prepared)
        return result, prepared

    def _predecessor(self, study_uid: str) -> tuple[int | None, Dataset | None]:
        with self.db.session() as session:
            row = session.execute(
                select(Result.id, Result.job_id)
                .where(Result.study_instance_uid == study_uid, Result.verdict != "not_analysed")
                .order_by(Result.id.desc())
                .limit(1)
            ).first()
        if row is None:
            return None, None
        path = self.spool.absolute(self.spool.outbox_path(row.job_id, "sr"))
        return row.id, (dcmread(path) if path.is_file() else None)

    def _build_outputs(
        self,
        job: ClaimedJob,
        result: StudyResult,
        prepared: list[PreparedInstance],
        predecessor: Dataset | None,
    ) -> Outputs:
        analysed = [p for p in prepared if p.analysed and p.header is not None]
        sr_uid, summary_uid = generate_uid(), generate_uid()
        sr = build_triage_sr(
            result,
            [p.header for p in analysed],  # type: ignore[misc]
            bundle_name=self.manifest.name,
            bundle_version=self.manifest.version,
            finding_codes=self.finding_codes,
            series_instance_uid=generate_uid(),
            sop_instance_uid=sr_uid,
            predecessor=predecessor,
        )
        summary = build_summary_image(
            result,
            analysed[0].header,
            analysed[0].image,  # type: ignore[arg-type]
            series_instance_uid=generate_uid(),
            sop_instance_uid=summary_uid,
        )
        paths = {}
        for kind, dataset in (("sr", sr), ("summary", summary)):
            rel = self.spool.outbox_path(job.id, kind)
            self.spool.write_durably(rel, _encode(dataset))
            paths[kind] = rel
        return Outputs(sr_uid, summary_uid, paths)

    def _finish(
        self, job: ClaimedJob, result: StudyResult, prepared: list[PreparedInstance]
    ) -> None:
        predecessor_id, predecessor_sr = self._predecessor(job.study_instance_uid)
        outputs = None
        if result.verdict is not Verdict.NOT_ANALYSED:
            outputs = self._build_outputs(job, result, prepared, predecessor_sr)
        now = utc_now()
        with self.db.session() as session:
            row = Result(
                job_id=job.id,
                study_instance_uid=job.study_instance_uid,
                verdict=result.verdict.value,
                risk_tier=result.risk_tier,
                abnormality_score=result.abnormality_score,
                result_json=json.dumps(result.to_dict()),
                sr_sop_instance_uid=outputs.sr_uid if outputs else "",
                summary_sop_instance_uid=outputs.summary_uid if outputs else "",
                predecessor_id=predecessor_id if outputs else None,
                created_at=now,
            )
            session.add(row)
            session.flush()
            if outputs is not None:
                for destination in self.config.destinations:
                    for kind in destination.outputs:
                        session.add(
                            Delivery(
                                result_id=row.id,
                                destination=destination.name,
                                kind=kind,
                                path=outputs.paths[kind],
                                state="pending",
                                attempts=0,
                                next_attempt_at=now,
                                updated_at=now,
                            )
                        )
            if not self.queue.complete(session, job.id):
                raise LostLease(f"job {job.id} was taken over; result discarded")
            study = session.get(Study, job.study_instance_uid)
            if study is not None and study.state == "queued":
                study.state = "reported"


def _encode(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
