"""A real worker under faults, on a real SQLite file and a real PostgreSQL server: its lease
expires or is taken while it works, its heartbeat meets a database error, it is asked to stop
mid-study, it is offered another bundle's job or a study with an instance it cannot use."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from concurrent.futures import Future
from datetime import timedelta

import pydicom
import pytest
from dicom_factory import chest_pixels, make_dataset
from pydicom.dataset import Dataset
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from scxnn_node.decode_pool import decode_spooled_instance
from scxnn_node.status import node_status
from scxnn_node.store import workers
from scxnn_node.store.assembly import InstanceRecord, enqueue_quiet_studies, record_instance
from scxnn_node.store.db import Database
from scxnn_node.store.models import Delivery, Instance, Job, Result, Study
from scxnn_node.store.queue import JobQueue
from scxnn_node.store.retention import readable_instances
from scxnn_node.store.spool import Spool
from scxnn_node.testing.loopback import free_port, node_config, wait_for
from scxnn_node.triage import triage_study
from scxnn_node.worker import TriageWorker, stop_on_signals


@pytest.fixture
def make_config(tmp_path, small_bundle_dir, database_url):
    """The node's config, with `worker` settings of the test's choosing."""

    def make(**worker):
        return node_config(
            tmp_path,
            database={"url": database_url},
            model={"bundle": str(small_bundle_dir)},
            destinations=[
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}
            ],
            worker={"lease_seconds": 60, "heartbeat_seconds": 0.2, "max_attempts": 2, **worker},
        )

    return make


@pytest.fixture
def config(make_config):
    return make_config()


@pytest.fixture
def db(config):
    database = Database(config.database.url)
    database.create_schema()
    yield database
    database.dispose()


@pytest.fixture
def spool(config) -> Spool:
    return Spool(config.storage.spool_dir)


def _receive(db: Database, spool: Spool, ds: Dataset) -> str:
    """An instance as the SCP leaves it: its spool file and its committed row."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    study = str(ds.StudyInstanceUID)
    rel = spool.instance_path(study, ds.SOPInstanceUID)
    spool.write_durably(rel, buffer.getvalue())
    series = str(ds.get("SeriesInstanceUID", ""))
    record = InstanceRecord(ds.SOPInstanceUID, study, series, ds.SOPClassUID, rel, 1, "PACS")
    assert record_instance(db, record)
    return ds.SOPInstanceUID


def _chest(study: str, seed: int) -> Dataset:
    return make_dataset(chest_pixels(96, seed=seed, bits=12), study_uid=study)


def _queued_study(db: Database, spool: Spool, seed: int = 1) -> str:
    study = pydicom.uid.generate_uid()
    _receive(db, spool, _chest(study, seed))
    assert enqueue_quiet_studies(db, 0, "1.2.3") == 1
    return study


def _outbox_files(spool: Spool) -> set[str]:
    outbox = spool.absolute("outbox")
    return {str(p.relative_to(spool.root)) for p in outbox.rglob("*") if p.is_file()}


def _expire_and_recover(db: Database, job_id: int) -> None:
    """The lease runs out and the scheduler's recovery gives the job back to the queue."""
    with db.session() as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_expires_at=db.now() - timedelta(seconds=1))
        )
    assert JobQueue(db, "scheduler").recover_expired_leases() == 1


class _OvertakenWorker(TriageWorker):
    """Its lease expires while it triages; another worker takes the job and finishes it."""

    rescuer: TriageWorker

    def _triage(self, job):
        outcome = super()._triage(job)
        _expire_and_recover(self.db, job.id)
        assert self.rescuer.process_next()
        return outcome


def test_a_stale_worker_leaves_the_committed_outputs_alone(config, db, spool):
    _queued_study(db, spool)
    stale = _OvertakenWorker(config, "cpu")
    stale.rescuer = TriageWorker(config, "cpu", bundle=stale.bundle)
    assert stale.process_next()
    with db.session() as s:
        result = s.execute(select(Result)).scalar_one()
        deliveries = s.execute(select(Delivery)).scalars().all()
        job = s.execute(select(Job)).scalar_one()
    assert (job.state, job.attempts) == ("done", 2)
    assert {d.kind for d in deliveries} == {"sr", "summary"}
    for delivery in deliveries:
        held = pydicom.dcmread(spool.absolute(delivery.path), stop_before_pixels=True)
        named = (
            result.sr_sop_instance_uid if delivery.kind == "sr" else result.summary_sop_instance_uid
        )
        assert held.SOPInstanceUID == named, delivery.kind  # the PACS gets what the DB names
    # The stale worker made nothing: every outbox file is one a delivery names.
    assert _outbox_files(spool) == {d.path for d in deliveries}


def test_a_worker_takes_only_jobs_of_the_bundle_it_serves(config, db, spool):
    study = pydicom.uid.generate_uid()
    _receive(db, spool, _chest(study, 1))
    assert enqueue_quiet_studies(db, 0, "2.0.0") == 1
    worker = TriageWorker(config, "cpu")
    assert worker.manifest.version == "1.2.3"
    assert not worker.process_next()
    with db.session() as s:
        job = s.execute(select(Job)).scalar_one()
        assert (job.state, job.attempts, job.lease_owner) == ("ready", 0, None)


def test_an_instance_the_worker_cannot_use_does_not_poison_its_study(config, db, spool):
    study = pydicom.uid.generate_uid()
    good = _receive(db, spool, _chest(study, 1))
    no_series = _chest(study, 2)
    del no_series.SeriesInstanceUID
    no_series_uid = _receive(db, spool, no_series)
    odd = _chest(study, 3)
    odd.SOPInstanceUID = odd.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.5a"
    odd_uid = _receive(db, spool, odd)
    assert enqueue_quiet_studies(db, 0, "1.2.3") == 1
    assert TriageWorker(config, "cpu").process_next()
    with db.session() as s:
        job = s.execute(select(Job)).scalar_one()
        result = s.execute(select(Result)).scalar_one()
        instances = {i.sop_instance_uid: i for i in s.execute(select(Instance)).scalars()}
        assert s.get(Study, study).state == "reported"
    assert (job.state, job.attempts) == ("done", 1)
    assert result.verdict != "not_analysed" and result.sr_sop_instance_uid
    assert instances[good].state == "stored"
    assert instances[no_series_uid].state == "unusable"
    assert "Series Instance UID" in instances[no_series_uid].skip_reason
    assert instances[odd_uid].state == "unusable"
    assert "SOP Instance UID" in instances[odd_uid].skip_reason
    sr = pydicom.dcmread(
        spool.absolute(
            next(p for p in _outbox_files(spool) if p.endswith("sr.dcm"))
        )
    )
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    referenced = {r.ReferencedSOPInstanceUID for s in evidence for r in s.ReferencedSOPSequence}
    assert referenced == {good}


def test_a_study_of_unusable_instances_ends_not_analysed_with_the_reason(config, db, spool):
    study = pydicom.uid.generate_uid()
    no_series = _chest(study, 2)
    del no_series.SeriesInstanceUID
    uid = _receive(db, spool, no_series)
    assert enqueue_quiet_studies(db, 0, "1.2.3") == 1
    assert TriageWorker(config, "cpu").process_next()
    with db.session() as s:
        result = s.execute(select(Result)).scalar_one()
        assert s.get(Instance, uid).state == "unusable"
        assert s.get(Study, study).state == "reported"
        assert s.execute(select(Job)).scalar_one().state == "done"
    assert result.verdict == "not_analysed"
    assert "Series Instance UID" in result.result_json
    report = node_status(db)
    assert report["oldest_waiting_study"] is None
    assert any("Series Instance UID" in r["reason"] for r in report["not_analysed"])


class _BrokenWorker(TriageWorker):
    def _triage(self, job):
        raise RuntimeError("cannot read the study")


def test_a_failing_job_backs_off_then_its_study_ends_failed(make_config, db, spool):
    config = make_config(retry_backoff_seconds=0.3)
    study = _queued_study(db, spool)
    worker = _BrokenWorker(config, "cpu")
    assert worker.process_next()
    with db.session() as s:
        job = s.execute(select(Job)).scalar_one()
    assert (job.state, job.next_attempt_at - job.updated_at) == ("ready", timedelta(seconds=0.3))
    assert not worker.process_next()  # backing off
    wait_for(worker.process_next, 10, interval=0.05)
    with db.session() as s:
        assert s.execute(select(Job)).scalar_one().state == "failed"  # max_attempts 2
        assert s.get(Study, study).state == "failed"
    assert node_status(db)["oldest_waiting_study"] is None


class _SlowWorker(TriageWorker):
    """Triage that outlasts the lease several times over; heartbeats must keep it."""

    seconds = 3.0

    def _triage(self, job):
        time.sleep(self.seconds)
        return super()._triage(job)


def _recovering(db: Database, done: threading.Event) -> threading.Thread:
    """The scheduler's lease recovery, run often while the worker works."""

    def loop() -> None:
        queue = JobQueue(db, "scheduler")
        while not done.wait(0.1):
            queue.recover_expired_leases()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def test_the_heartbeat_survives_a_database_error(make_config, db, spool):
    # The triage outlasts the lease 2.5 times; the lease leaves room for a slow, loaded
    # machine to renew it after the failed beat (1 s was too tight for CI on 2 cores).
    config = make_config(lease_seconds=2.0)
    _queued_study(db, spool)
    worker = _SlowWorker(config, "cpu")
    worker.seconds = 5.0
    real_heartbeat = worker.queue.heartbeat
    calls = []

    def heartbeat_failing_once(job_id: int) -> bool:
        calls.append(job_id)
        if len(calls) == 1:
            raise OperationalError("UPDATE jobs", {}, Exception("server closed the connection"))
        return real_heartbeat(job_id)

    worker.queue.heartbeat = heartbeat_failing_once
    done = threading.Event()
    recovery = _recovering(db, done)
    try:
        assert worker.process_next()
    finally:
        done.set()
        recovery.join()
    assert len(calls) > 2  # it went on beating after the error
    with db.session() as s:
        job = s.execute(select(Job)).scalar_one()
        assert (job.state, job.attempts) == ("done", 1)  # never lost, never run twice
        assert len(s.execute(select(Result)).scalars().all()) == 1


def test_a_worker_whose_lease_is_gone_abandons_its_job(config, db, spool):
    _queued_study(db, spool)
    worker = _SlowWorker(config, "cpu")
    worker.seconds = 1.5

    def take_over() -> None:
        time.sleep(0.5)
        with db.session() as s:
            s.execute(update(Job).values(lease_owner="other-worker"))

    thief = threading.Thread(target=take_over)
    thief.start()
    assert worker.process_next()
    thief.join()
    with db.session() as s:
        assert s.execute(select(Result)).scalars().all() == []
        job = s.execute(select(Job)).scalar_one()
        assert (job.state, job.lease_owner) == ("claimed", "other-worker")
    assert _outbox_files(spool) == set()  # nothing written for the PACS


class _StoppedMidStudyWorker(TriageWorker):
    """Receives SIGTERM (a graceful stop of the node) while it triages (run's pipeline runs
    the engine through _infer)."""

    def _infer(self, studies):
        os.kill(os.getpid(), signal.SIGTERM)
        return super()._infer(studies)


def _run_until_signalled(worker: TriageWorker) -> None:
    """Run the worker with the node's signal handling until a SIGTERM it sends itself stops it,
    then put the test process's handlers back."""
    stop = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    stop_on_signals(stop)
    try:
        worker.run(stop)  # returns: the signal stopped it
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_sigterm_mid_study_hands_the_study_back_without_counting_an_attempt(
    config, db, spool
):
    study = _queued_study(db, spool)
    worker = _StoppedMidStudyWorker(config, "cpu")
    _run_until_signalled(worker)
    with db.session() as s:
        job = s.execute(select(Job)).scalar_one()
        assert (job.state, job.attempts, job.lease_owner) == ("ready", 0, None)
        assert job.next_attempt_at is None  # due at once for the next worker
        assert s.execute(select(Result)).scalars().all() == []
        assert s.get(Study, study).state == "queued"
    assert _outbox_files(spool) == set()


def test_a_late_instance_during_a_running_job_gives_an_amendment_not_a_second_original(
    config, db, spool
):
    study = _queued_study(db, spool)
    first = _SlowWorker(config, "cpu")
    first.seconds = 2.0
    second = TriageWorker(config, "cpu", bundle=first.bundle)
    running = threading.Thread(target=first.process_next)
    running.start()
    wait_for(lambda: first._lease is not None, 30, interval=0.02)  # it holds the first job
    _receive(db, spool, _chest(study, 2))  # a late instance: a second job of the study
    assert enqueue_quiet_studies(db, 0, "1.2.3") == 1
    assert not second.process_next()  # the study is being worked on: its job waits
    running.join()
    assert second.process_next()
    with db.session() as s:
        original, amended = s.execute(select(Result).order_by(Result.id)).scalars().all()
        assert s.get(Study, study).state == "reported"
    assert original.predecessor_id is None
    assert amended.predecessor_id == original.id  # one chain: the study's current result


# The pipeline: several studies held at once, decoded ahead of the engine, batched together.


class _CountingWorker(TriageWorker):
    """Records each engine pass: the studies it covered and their results."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.passes: list[list[str]] = []
        self.results: dict[str, object] = {}

    def _infer(self, studies):
        self.passes.append([study for study, _ in studies])
        results = super()._infer(studies)
        self.results.update({r.study_instance_uid: r for r in results})
        return results


def _pump_until_idle(worker: TriageWorker, timeout: float = 120) -> None:
    try:
        wait_for(lambda: not worker.pump(), timeout, interval=0)
    finally:
        worker.decode_pool.close()


def test_studies_decoded_together_share_one_engine_pass_and_keep_their_own_results(
    make_config, db, spool
):
    config = make_config(studies_in_flight=3, decode_processes=0)
    studies = [_queued_study(db, spool, seed) for seed in (1, 2, 3)]
    worker = _CountingWorker(config, "cpu")
    _pump_until_idle(worker)
    assert worker.passes == [studies]  # claimed in order, decoded at claim: one pass for all
    with db.session() as s:
        jobs = s.execute(select(Job)).scalars().all()
        results = {r.study_instance_uid: r for r in s.execute(select(Result)).scalars()}
        assert {s.get(Study, study).state for study in studies} == {"reported"}
    assert [(j.state, j.attempts) for j in jobs] == [("done", 1)] * 3
    assert set(results) == set(studies)
    alone = TriageWorker(config, "cpu", bundle=worker.bundle)
    for study in studies:
        rows = readable_instances(db, [i for i in _instances_of(db, study)])
        prepared = [
            decode_spooled_instance(spool.absolute(path), uid, study, alone.manifest.preprocessing)
            .prepared
            for uid, path in rows
        ]
        by_itself = triage_study(alone.engine, study, prepared)
        batched = worker.results[study]
        assert batched.verdict == by_itself.verdict
        assert batched.analysed_instances == by_itself.analysed_instances
        assert batched.abnormality_score == pytest.approx(by_itself.abnormality_score, abs=1e-4)
        for mine, theirs in zip(batched.findings, by_itself.findings, strict=True):
            assert mine.name == theirs.name
            assert mine.probabilities == pytest.approx(theirs.probabilities, abs=1e-4)


def _instances_of(db: Database, study: str) -> list[str]:
    with db.session() as s:
        return list(
            s.execute(
                select(Instance.sop_instance_uid).where(Instance.study_instance_uid == study)
            ).scalars()
        )


def test_a_pipeline_with_decode_processes_reports_every_study_once(make_config, db, spool):
    config = make_config(studies_in_flight=2, decode_processes=1)
    studies = [_queued_study(db, spool, seed) for seed in (1, 2, 3)]
    worker = _CountingWorker(config, "cpu")
    _pump_until_idle(worker)
    assert sorted(s for one_pass in worker.passes for s in one_pass) == sorted(studies)
    with db.session() as s:
        jobs = s.execute(select(Job)).scalars().all()
        results = s.execute(select(Result)).scalars().all()
    assert [(j.state, j.attempts) for j in jobs] == [("done", 1)] * 3
    assert sorted(r.study_instance_uid for r in results) == sorted(studies)
    assert len(_outbox_files(spool)) == 2 * 3  # an SR and a summary per study, no more


class _StoppedMidBatchWorker(_CountingWorker):
    """Receives SIGTERM while the engine works on the first studies decoded."""

    def _infer(self, studies):
        os.kill(os.getpid(), signal.SIGTERM)
        return super()._infer(studies)


@pytest.mark.parametrize("decode_processes", [0, 1])
def test_a_stopping_pipeline_hands_back_every_study_it_holds(
    make_config, db, spool, decode_processes
):
    config = make_config(studies_in_flight=3, decode_processes=decode_processes)
    studies = [_queued_study(db, spool, seed) for seed in (1, 2, 3)]
    worker = _StoppedMidBatchWorker(config, "cpu")
    _run_until_signalled(worker)
    assert worker.passes  # it was stopped with studies in the engine
    with db.session() as s:
        jobs = s.execute(select(Job)).scalars().all()
        assert [(j.state, j.attempts, j.lease_owner) for j in jobs] == [("ready", 0, None)] * 3
        assert s.execute(select(Result)).scalars().all() == []
        assert {s.get(Study, study).state for study in studies} == {"queued"}
    assert _outbox_files(spool) == set()


class _OneLeaseStolenWorker(_CountingWorker):
    """Loses the second study's job to another worker while the engine works on all three."""

    def _infer(self, studies):
        results = super()._infer(studies)
        with self.db.session() as s:
            s.execute(
                update(Job)
                .where(Job.study_instance_uid == studies[1][0])
                .values(lease_owner="other-worker")
            )
        return results


def test_a_lost_lease_abandons_only_its_own_study(make_config, db, spool):
    config = make_config(studies_in_flight=3, decode_processes=0)
    first, stolen, third = (_queued_study(db, spool, seed) for seed in (1, 2, 3))
    worker = _OneLeaseStolenWorker(config, "cpu")
    _pump_until_idle(worker)
    with db.session() as s:
        jobs = {j.study_instance_uid: j for j in s.execute(select(Job)).scalars()}
        reported = {r.study_instance_uid for r in s.execute(select(Result)).scalars()}
        deliveries = s.execute(select(Delivery)).scalars().all()
    assert reported == {first, third}
    assert (jobs[stolen].state, jobs[stolen].lease_owner) == ("claimed", "other-worker")
    assert {jobs[first].state, jobs[third].state} == {"done"}
    assert _outbox_files(spool) == {d.path for d in deliveries}  # nothing of the stolen study


class _SlowEngineWorker(_CountingWorker):
    seconds = 5.0

    def _infer(self, studies):
        time.sleep(self.seconds)
        return super()._infer(studies)


def test_the_heartbeat_keeps_the_lease_of_every_study_held(make_config, db, spool):
    # The engine pass outlasts the lease 2.5 times while three studies are held.
    config = make_config(lease_seconds=2.0, studies_in_flight=3, decode_processes=0)
    studies = [_queued_study(db, spool, seed) for seed in (1, 2, 3)]
    worker = _SlowEngineWorker(config, "cpu")
    done = threading.Event()
    recovery = _recovering(db, done)
    try:
        with worker._leases_kept():
            _pump_until_idle(worker)
    finally:
        done.set()
        recovery.join()
    assert worker.passes == [studies]
    with db.session() as s:
        jobs = s.execute(select(Job)).scalars().all()
        assert [(j.state, j.attempts) for j in jobs] == [("done", 1)] * 3  # none run twice
        assert len(s.execute(select(Result)).scalars().all()) == 3


class _DecodeKillingWorker(_CountingWorker):
    """Kills its decode process with SIGKILL right after handing it the first studies."""

    killed = 0

    def _claim_more(self):
        super()._claim_more()
        executor = self.decode_pool._executor
        if not self.killed and executor is not None:
            for process in list(executor._processes.values()):
                os.kill(process.pid, signal.SIGKILL)
                self.killed += 1


def test_a_decode_process_killed_mid_study_loses_and_repeats_nothing(make_config, db, spool):
    config = make_config(studies_in_flight=2, decode_processes=1, retry_backoff_seconds=0)
    studies = [_queued_study(db, spool, seed) for seed in (1, 2, 3)]
    worker = _DecodeKillingWorker(config, "cpu")
    _pump_until_idle(worker)
    assert worker.killed == 1
    with db.session() as s:
        jobs = s.execute(select(Job)).scalars().all()
        results = s.execute(select(Result)).scalars().all()
        states = {s.get(Study, study).state for study in studies}
    # Whatever the kill broke was tried again: every study reported once, none failed.
    assert [j.state for j in jobs] == ["done"] * 3
    # A spawned decode process takes a second to start: the kill lands before any decode.
    assert sorted(j.attempts for j in jobs) == [1, 2, 2]
    assert sorted(r.study_instance_uid for r in results) == sorted(studies)
    assert states == {"reported"}
    assert len(_outbox_files(spool)) == 2 * 3  # an SR and a summary per study, no more


class _SlowOutputsWorker(_CountingWorker):
    """The first study's outputs (SR, summary) wait until the engine has run a second pass,
    or give up after `patience` seconds."""

    patience = 20.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.first_outputs_started = threading.Event()
        self.second_pass = threading.Event()
        self.overlapped: bool | None = None

    def _infer(self, studies):
        results = super()._infer(studies)
        if len(self.passes) >= 2:
            self.second_pass.set()
        return results

    def _build_outputs(self, *args, **kwargs):
        if not self.first_outputs_started.is_set():
            self.first_outputs_started.set()
            self.overlapped = self.second_pass.wait(self.patience)
        return super()._build_outputs(*args, **kwargs)


def test_the_engine_does_not_wait_for_a_studys_outputs(make_config, db, spool):
    # On a GPU the engine takes ~25 ms a study and the outputs ~100 ms of CPU: the next pass
    # must run while the last studies' outputs are built and committed.
    config = make_config(studies_in_flight=2, decode_processes=0, poll_seconds=0.05)
    first = _queued_study(db, spool, 1)
    worker = _SlowOutputsWorker(config, "cpu")
    stop = threading.Event()
    running = threading.Thread(target=worker.run, args=(stop,))
    running.start()
    try:
        assert worker.first_outputs_started.wait(120)
        second = _queued_study(db, spool, 2)
        worker.jobs_queued.ring()

        def reported() -> bool:
            with db.session() as s:
                return len(s.execute(select(Result)).scalars().all()) == 2

        wait_for(reported, 120)
    finally:
        stop.set()
        running.join()
    assert worker.overlapped is True
    assert worker.passes == [[first], [second]]
    with db.session() as s:
        jobs = s.execute(select(Job)).scalars().all()
        assert [(j.state, j.attempts) for j in jobs] == [("done", 1)] * 2
        assert {s.get(Study, study).state for study in (first, second)} == {"reported"}
    assert len(_outbox_files(spool)) == 2 * 2


class _SlowDecodesWorker(_CountingWorker):
    """Each decode ends `decode_delay` seconds after it was submitted; each engine pass takes
    `engine_delay` seconds more than the engine's own."""

    decode_delay = 0.6
    engine_delay = 0.3

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        submit = self.decode_pool.submit

        def late_submit(*args, **kwargs) -> Future:
            decoded, late = submit(*args, **kwargs), Future()

            def hand_over() -> None:
                if not late.set_running_or_notify_cancel():
                    return  # cancelled meanwhile (a lost lease, a stop)
                if decoded.exception() is not None:
                    late.set_exception(decoded.exception())
                else:
                    late.set_result(decoded.result())

            threading.Timer(self.decode_delay, hand_over).start()
            return late

        self.decode_pool.submit = late_submit
        member_logits = self.engine.member_logits

        def slow_member_logits(images):
            time.sleep(self.engine_delay)
            return member_logits(images)

        self.engine.member_logits = slow_member_logits


def _pipeline_seconds_over(worker: TriageWorker) -> tuple[workers.PipelineSeconds, float]:
    started = time.monotonic()
    _pump_until_idle(worker)
    return worker.pipeline_seconds, time.monotonic() - started


def test_the_worker_counts_its_engine_waiting_for_decoding(make_config, db, spool):
    """What `status` and /metrics show to tell an engine starved by decoding: the seconds it
    ran and the seconds it held only studies not yet decoded."""
    config = make_config(studies_in_flight=2, decode_processes=0, poll_seconds=0.1)
    for seed in (1, 2, 3):
        _queued_study(db, spool, seed)
    slow = _SlowDecodesWorker(config, "cpu")
    seconds, elapsed = _pipeline_seconds_over(slow)
    assert sum(len(one_pass) for one_pass in slow.passes) == 3
    # At least the first wait, when nothing held could be decoded yet; never more than the run.
    assert 0.9 * slow.decode_delay <= seconds.decode_wait
    assert len(slow.passes) * slow.engine_delay <= seconds.engine
    assert seconds.engine + seconds.decode_wait <= elapsed

    for seed in (4, 5, 6):  # decoded as soon as claimed: the engine never waits
        _queued_study(db, spool, seed)
    prompt = _CountingWorker(config, "cpu", bundle=slow.bundle)
    seconds_prompt, _ = _pipeline_seconds_over(prompt)
    assert sum(len(one_pass) for one_pass in prompt.passes) == 3
    assert seconds_prompt.decode_wait < 0.1 * slow.decode_delay
    assert seconds_prompt.engine > 0

    workers.beat(db, slow.identity, None, 5, seconds)
    (shown,) = node_status(db)["workers"]
    assert shown["decode_wait_seconds"] == round(seconds.decode_wait, 3)
    assert shown["engine_seconds"] == round(seconds.engine, 3)


def test_a_full_spool_postpones_the_study_without_spending_its_attempts(
    tmp_path, small_bundle_dir, database_url, small_filesystem
):
    """The spool's disk fills (the kernel's ENOSPC) just as the worker writes a study's SR:
    the disk's fault, not the study's. However often that happens, the study waits ready with
    its attempts unspent and no outputs half-written; once space is freed it is reported."""
    fs = small_filesystem.mount(8 << 20)
    config = node_config(
        tmp_path,
        database={"url": database_url},
        # the ONNX cache off the full disk: a worker that cannot write it does not start
        # (test_compile_cache.py has that case); this test is about the study's outputs
        model={"bundle": str(small_bundle_dir), "onnx_cache_dir": str(tmp_path / "onnx-cache")},
        storage={"spool_dir": str(fs / "spool")},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9}],
        worker={"max_attempts": 2, "retry_backoff_seconds": 0.2, "decode_processes": 0},
    )
    db = Database(config.database.url)
    db.create_schema()
    spool = Spool(config.storage.spool_dir)
    study = _queued_study(db, spool)
    filler = small_filesystem.fill(fs)
    worker = TriageWorker(config, "cpu")
    try:
        for _ in range(2 * config.worker.max_attempts):
            wait_for(worker.process_next, 10, interval=0.05)
            with db.session() as s:
                job = s.execute(select(Job)).scalar_one()
                assert (job.state, job.attempts) == ("ready", 0)
                assert "No space left" in job.last_error
                assert s.get(Study, study).state != "failed"
            assert not _outbox_files(spool)
            assert not worker.process_next()  # it waits before trying again
        filler.unlink()
        wait_for(worker.process_next, 10, interval=0.05)
        with db.session() as s:
            assert s.execute(select(Job)).scalar_one().state == "done"
            assert s.get(Study, study).state == "reported"
            deliveries = list(s.execute(select(Delivery)).scalars())
            assert {d.kind for d in deliveries} == {"sr", "summary"}
            assert all(spool.absolute(d.path).is_file() for d in deliveries)
    finally:
        db.dispose()
