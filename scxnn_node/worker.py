"""The inference worker: claim studies, triage them, store each result, queue its deliveries.

The worker is a pipeline: it holds up to `worker.studies_in_flight` claimed jobs, each under
its own lease (one heartbeat thread beats them all); their instances are decoded and
preprocessed in the decode pool (decode_pool.py) while the engine works on the studies decoded
before, and the studies ready at the same time go through the engine in one pass. Each job is
then concluded on its own (outputs built, written and committed) on a conclusion thread while
the engine goes on with the next studies; the outputs are encoded in the decode processes, one
conclusion thread waiting on each. At most max(`studies_in_flight`, threads) jobs wait to be
concluded, which bounds what a worker holds. A crash at any point leaves, for each held job, either
nothing (the job's lease expires and it runs again) or the whole outcome (result, output files,
deliveries and the job's completion commit together), so a study never gets two SRs for the
same input.
Outputs go to paths unique to the attempt and are written only after the lease is checked; a
job whose lease is gone is abandoned at its next step and makes nothing visible (the others go
on); a worker asked to stop hands back every job it holds. An instance the worker cannot use
is marked unusable and its study is triaged from the others.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from pydicom import dcmread

from scxnn_node.config import Hl7Destination, NodeConfig
from scxnn_node.decode_pool import DecodedInstance, DecodePool, decode_spooled_instance
from scxnn_node.dicom.outputs import StudyOutputs
from scxnn_node.doorbell import Doorbell
from scxnn_node.drift import record_drift_samples
from scxnn_node.hl7.oru import StudyHeaders, build_oru
from scxnn_node.logs import short_hash
from scxnn_node.model.bundle import Bundle, load_bundle
from scxnn_node.model.engine import InferenceEngine
from scxnn_node.model.result import StudyResult, Verdict
from scxnn_node.store import workers
from scxnn_node.store.assembly import mark_instances_unusable, mark_study_reported
from scxnn_node.store.db import Database
from scxnn_node.store.models import OutputKind
from scxnn_node.store.queue import ClaimedJob, JobQueue, LostLease
from scxnn_node.store.results import JobOutputs, SrReference, latest_report, record_result
from scxnn_node.store.retention import readable_instances
from scxnn_node.store.spool import Spool, is_full_disk
from scxnn_node.triage import PreparedInstance, triage_studies, triage_study

log = logging.getLogger(__name__)


class StopRequested(Exception):
    """The worker was asked to stop in the middle of a study: the study is handed back."""


@dataclass
class _Lease:
    """A claimed job as its worker sees it: `lost` once a heartbeat finds it taken over."""

    job: ClaimedJob
    lost: threading.Event = field(default_factory=threading.Event)


@dataclass
class _InFlight:
    """A held job in the pipeline: its readable instances and their decodes, in one order."""

    job: ClaimedJob
    rows: list[tuple[str, str]]  # (SOP Instance UID, spool path)
    decodes: list[Future[DecodedInstance]]

    def decoded(self) -> bool:
        return all(f.done() for f in self.decodes)


@dataclass(frozen=True)
class Triaged:
    """A job's triage: the result, the prepared instances, and those it could not use."""

    result: StudyResult
    prepared: list[PreparedInstance]
    unusable: dict[str, str]  # SOP Instance UID -> why


def stop_on_signals(stop: threading.Event, doorbell: Doorbell | None = None) -> None:
    """SIGTERM and SIGINT ask the worker to stop (main thread only): the study in hand is
    handed back at its next step instead of holding its lease until it expires. `doorbell`,
    the worker's "jobs queued", is rung too: an idle worker wakes now, not at its poll."""

    def asked(*_: object) -> None:
        stop.set()
        if doorbell is not None:
            doorbell.ring()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, asked)


class TriageWorker:
    def __init__(
        self,
        config: NodeConfig,
        device: str,
        bundle: Bundle | None = None,
        jobs_queued: Doorbell | None = None,
        results_committed: Doorbell | None = None,
    ) -> None:
        self.config = config
        log.info("worker on %s starting: bundle, engine, decode processes", device)
        # Rung by the scheduler when it queues jobs; rung here when a result's deliveries are
        # committed. Without them (tests, a lone worker) the worker polls.
        self.jobs_queued = jobs_queued or Doorbell()
        self.results_committed = results_committed or Doorbell()
        self.db = Database(config.database.url)
        self.db.check_schema()
        self.spool = Spool(config.storage.spool_dir)
        self.bundle = bundle or load_bundle(config.model.bundle)
        self.manifest = self.bundle.manifest
        self.engine = InferenceEngine(self.bundle, config.engine_options(device))
        self.owner = workers.worker_owner(os.getpid(), device)
        self.identity = workers.WorkerIdentity(
            self.owner, socket.gethostname(), os.getpid(), device, self.manifest.version
        )
        self.queue = JobQueue(
            self.db,
            self.owner,
            config.worker.lease_seconds,
            config.worker.max_attempts,
            bundle_version=self.manifest.version,
            retry_backoff_seconds=config.worker.retry_backoff_seconds,
        )
        self.policy = config.selection_policy()
        self.finding_codes = {
            f.name: (f.code.value, f.code.scheme, f.code.meaning) for f in self.manifest.findings
        }
        self.destinations = {
            d.name: [OutputKind.HL7] if isinstance(d, Hl7Destination) else list(d.outputs)
            for d in config.destinations
        }
        self.hl7_destinations = [d for d in config.destinations if isinstance(d, Hl7Destination)]
        self.stop_requested = threading.Event()  # run() replaces it with its stop event
        cuda = device.startswith("cuda")
        cuda_index = self.engine.device.index or 0
        self.decode_pool = DecodePool(
            config.worker.decode_processes,
            config.logging.level,
            config.logging.json_format,
            gpu_device=cuda_index if cuda and config.worker.gpu_decode == "auto" else None,
            preprocess_device=(
                f"cuda:{cuda_index}" if cuda and config.worker.gpu_preprocess == "auto" else None
            ),
        )
        self._leases: dict[int, _Lease] = {}  # job id -> lease, for every job held
        self._leases_lock = threading.Lock()
        self._in_flight: list[_InFlight] = []
        # A conclusion thread per decode process: each waits while its study's outputs are
        # encoded in a decode process (with none, one thread encodes them itself).
        self._conclusions = ThreadPoolExecutor(
            max_workers=self._conclusion_threads, thread_name_prefix="conclude"
        )
        self._concluding: list[Future[None]] = []
        # Written by the engine thread only, read by the liveness beat.
        self._engine_seconds = 0.0
        self._decode_wait_seconds = 0.0

    @property
    def pipeline_seconds(self) -> workers.PipelineSeconds:
        return workers.PipelineSeconds(self._engine_seconds, self._decode_wait_seconds)

    @property
    def _conclusion_threads(self) -> int:
        return max(1, self.config.worker.decode_processes)

    @property
    def _lease(self) -> _Lease | None:
        """The oldest job this worker holds (its liveness row names one), None when idle."""
        with self._leases_lock:
            return next(iter(self._leases.values()), None)

    def _hold(self, job: ClaimedJob) -> None:
        with self._leases_lock:
            self._leases[job.id] = _Lease(job)

    def _let_go(self, job_id: int) -> None:
        with self._leases_lock:
            self._leases.pop(job_id, None)

    def process_next(self) -> bool:
        """Process one ready job by itself, decoding in this thread; False when there was none."""
        job = self.queue.claim_ready_job()
        if job is None:
            return False
        self._hold(job)
        try:
            with self._leases_kept():
                self._process(job)
        finally:
            self._let_go(job.id)
        return True

    def _process(self, job: ClaimedJob) -> None:
        self._conclude(job, lambda: self._triage(job))

    def pump(self) -> bool:
        """One turn of the pipeline: claim jobs up to `studies_in_flight` (their instances go to
        the decode pool at once), wait up to a poll for a study to be fully decoded, then triage
        together every held study that is, their conclusions left to the conclusion thread.
        False when the worker holds no job."""
        self._claim_more()
        self._drop_lost()
        self._concluding = [f for f in self._concluding if not f.done()]
        poll = self.config.worker.poll_seconds
        if not self._in_flight:
            if not self._concluding:
                return False
            wait(self._concluding, timeout=poll, return_when=FIRST_COMPLETED)
            return True
        if not any(flight.decoded() for flight in self._in_flight):
            pending = [f for flight in self._in_flight for f in flight.decodes if not f.done()]
            waiting = time.monotonic()
            wait(pending, timeout=poll, return_when=FIRST_COMPLETED)
            self._decode_wait_seconds += time.monotonic() - waiting
        ready = [flight for flight in self._in_flight if flight.decoded()]
        if ready:
            self._in_flight = [flight for flight in self._in_flight if flight not in ready]
            self._triage_together(ready)
        return True

    def _conclude_now(self, job: ClaimedJob, triage: Callable[[], Triaged]) -> None:
        try:
            self._conclude(job, triage)
        finally:
            self._let_go(job.id)

    def _conclude_later(self, job: ClaimedJob, triaged: Triaged) -> None:
        """On the conclusion thread; the engine thread waits first when `studies_in_flight`
        conclusions are already waiting (bounded memory: each holds its images)."""
        while len(self._concluding) >= max(
            self.config.worker.studies_in_flight, self._conclusion_threads
        ):
            wait(self._concluding, return_when=FIRST_COMPLETED)
            self._concluding = [f for f in self._concluding if not f.done()]
        try:
            self._concluding.append(
                self._conclusions.submit(self._conclude_now, job, lambda: triaged)
            )
        except RuntimeError as exc:  # the pool is shut: the worker is stopping
            self._conclude_now(job, _raising(StopRequested(str(exc))))

    def _await_conclusions(self) -> None:
        """A stopping worker lets every conclusion end: committed, or handed back at its next
        step (each checks for the stop first)."""
        wait(self._concluding)
        self._concluding = []

    def _claim_more(self) -> None:
        spec, policy = self.manifest.preprocessing, self.policy
        while (
            len(self._in_flight) < self.config.worker.studies_in_flight
            and not self.stop_requested.is_set()
        ):
            job = self.queue.claim_ready_job()
            if job is None:
                return
            self._hold(job)
            try:
                rows = readable_instances(self.db, job.instance_uids)  # retention may purge
                study = job.study_instance_uid
                decodes = [
                    self.decode_pool.submit(self.spool.absolute(path), uid, study, spec, policy)
                    for uid, path in rows
                ]
            except Exception as exc:
                self._conclude_now(job, _raising(exc))
                continue
            self._in_flight.append(_InFlight(job, rows, decodes))

    def _drop_lost(self) -> None:
        """Jobs whose lease is gone leave the pipeline now, not after their decode."""
        for flight in list(self._in_flight):
            lease = self._leases.get(flight.job.id)
            if lease is not None and lease.lost.is_set():
                for decode in flight.decodes:
                    decode.cancel()
                self._in_flight.remove(flight)
                lost = LostLease(f"job {flight.job.id} was taken over")
                self._conclude_now(flight.job, _raising(lost))

    def _hand_back_in_flight(self) -> None:
        """A stopping worker gives back every job it still holds."""
        flights, self._in_flight = self._in_flight, []
        for flight in flights:
            for decode in flight.decodes:
                decode.cancel()
            self._conclude_now(flight.job, _raising(StopRequested()))

    def _triage_together(self, flights: list[_InFlight]) -> None:
        """Decoded studies: one engine pass over all their images, then each job concluded on
        its own (a job that fails or lost its lease takes no other job with it)."""
        gathered: list[tuple[_InFlight, list[PreparedInstance], dict[str, str]]] = []
        for flight in flights:
            try:
                self._checkpoint(flight.job)
                prepared, unusable = _gathered([f.result() for f in flight.decodes])
            except Exception as exc:  # a decode process died, MemoryError, stop, lost lease
                self._conclude_now(flight.job, _raising(exc))
                continue
            gathered.append((flight, prepared, unusable))
        if not gathered:
            return
        try:
            results = self._infer(
                [(flight.job.study_instance_uid, prepared) for flight, prepared, _ in gathered]
            )
        except Exception as exc:
            for flight, _, _ in gathered:
                self._conclude_now(flight.job, _raising(exc))
            return
        for (flight, prepared, unusable), result in zip(gathered, results, strict=True):
            purged = _purged(flight.job, flight.rows)
            triaged = Triaged(replace(result, purged_instances=purged), prepared, unusable)
            self._conclude_later(flight.job, triaged)

    def _infer(self, studies: list[tuple[str, list[PreparedInstance]]]) -> list[StudyResult]:
        started = time.monotonic()
        try:
            return triage_studies(self.engine, studies)
        finally:
            self._engine_seconds += time.monotonic() - started

    def _conclude(self, job: ClaimedJob, triage: Callable[[], Triaged]) -> None:
        """Triage a held job and commit its outcome; otherwise the job is handed back (the
        worker is stopping), abandoned (its lease is gone), postponed (the spool's disk is
        full) or failed (anything else)."""
        try:
            triaged = triage()
            self._finish(job, triaged)
            self._let_go(job.id)  # done: no more beats (one now would find the lease ended)
            self._log_outcome(job, triaged.result)
        except StopRequested:
            try:
                if self.queue.hand_back(job.id):
                    log.info("job %d handed back: the worker is stopping", job.id)
            except Exception:
                log.exception("job %d: could not hand it back; its lease will expire", job.id)
        except LostLease as exc:
            log.warning("job %d abandoned, nothing made visible: %s", job.id, exc)
        except Exception as exc:
            if is_full_disk(exc):
                self._postpone(job, exc)
                return
            log.exception("job %d failed", job.id)
            try:
                state = self.queue.fail(job.id, f"{type(exc).__name__}: {exc}")
                log.warning("job %d is now %s", job.id, state)
            except Exception:
                log.exception("job %d: could not record its failure; its lease will expire", job.id)

    def _postpone(self, job: ClaimedJob, exc: BaseException) -> None:
        """The spool's disk is full: the study waits, its attempts unspent (the SCP refuses
        new instances meanwhile; scxnn_spool_free_bytes is what to alert on)."""
        log.error("job %d postponed, the spool's disk is full: %s", job.id, exc)
        try:
            self.queue.postpone(job.id, f"{type(exc).__name__}: {exc}")
        except Exception:
            log.exception("job %d: could not postpone it; its lease will expire", job.id)

    @staticmethod
    def _log_outcome(job: ClaimedJob, result: StudyResult) -> None:
        log.info(
            "study %s: %s%s%s",
            short_hash(job.study_instance_uid),
            result.verdict.value,
            f" ({result.risk_tier})" if result.risk_tier else "",
            f": {result.reason}" if result.verdict is Verdict.NOT_ANALYSED else "",
        )

    def run(self, stop: threading.Event, parent_pid: int | None = None) -> None:
        """Work the pipeline until `stop` is set, or until the process `parent_pid` (the node)
        is gone; the jobs still held are handed back."""
        self.stop_requested = stop
        self.decode_pool.start()  # its processes up (and their GPU decoders) before a study
        log.info(
            "worker %s serving bundle %s %s", self.owner, self.manifest.name, self.manifest.version
        )
        finished = threading.Event()
        alive = threading.Thread(
            target=self._stay_alive, args=(finished, parent_pid), daemon=True, name="liveness"
        )
        alive.start()
        try:
            with self._leases_kept():
                try:
                    while not stop.is_set():
                        try:
                            worked = self.pump()
                        except Exception:  # the database, most likely: try again after a poll
                            log.exception("worker %s: could not claim a job", self.owner)
                            worked = False
                        if not worked and not stop.is_set():
                            self.jobs_queued.wait(self.config.worker.poll_seconds)
                finally:
                    self._hand_back_in_flight()
                    self._await_conclusions()
        finally:
            self._conclusions.shutdown(wait=True)
            self.decode_pool.close()
            finished.set()
            alive.join()
            try:
                workers.forget(self.db, self.owner)
            except Exception:
                log.exception("worker %s: could not remove its liveness row", self.owner)
        log.info("worker %s stopped", self.owner)

    def _stay_alive(self, finished: threading.Event, parent_pid: int | None) -> None:
        """Beat this worker's liveness row; stop the worker when its node is gone."""
        every = self.config.worker.heartbeat_seconds
        while True:
            lease = self._lease
            try:
                job_id = lease.job.id if lease else None
                workers.beat(self.db, self.identity, job_id, every, self.pipeline_seconds)
            except Exception as exc:  # transient: the next beat tries again
                log.warning("worker %s: liveness beat failed: %s", self.owner, exc)
            if parent_pid is not None and os.getppid() != parent_pid:
                log.error("worker %s: its node (pid %d) is gone; stopping", self.owner, parent_pid)
                self.stop_requested.set()  # (its process's watchdog bounds how long it takes)
                self.jobs_queued.ring()
                return
            if finished.wait(min(every, 1.0)):
                return

    @contextmanager
    def _leases_kept(self) -> Iterator[None]:
        """A heartbeat thread keeps every held job's lease while the block runs."""
        finished = threading.Event()
        beat = threading.Thread(
            target=self._keep_leases, args=(finished,), daemon=True, name="lease-heartbeat"
        )
        beat.start()
        try:
            yield
        finally:
            finished.set()
            beat.join()

    def _keep_leases(self, finished: threading.Event) -> None:
        """Extend each held job's lease every beat. A database error is logged and the next
        beat tries again; a lease found taken over marks that job lost (it alone is abandoned)."""
        while not finished.wait(self.config.worker.heartbeat_seconds):
            with self._leases_lock:
                leases = [lease for lease in self._leases.values() if not lease.lost.is_set()]
            for lease in leases:
                try:
                    held = self.queue.heartbeat(lease.job.id)
                except Exception as exc:
                    log.warning("job %d: heartbeat failed (%s); retrying", lease.job.id, exc)
                    continue
                with self._leases_lock:
                    concluded = lease.job.id not in self._leases  # completed meanwhile
                if not held and not concluded:
                    log.warning("job %d: lease lost", lease.job.id)
                    lease.lost.set()

    def _checkpoint(self, job: ClaimedJob) -> None:
        """Between steps: stop when asked to, give up a job whose lease is gone."""
        if self.stop_requested.is_set():
            raise StopRequested
        lease = self._leases.get(job.id)
        if lease is not None and lease.lost.is_set():
            raise LostLease(f"job {job.id} was taken over")

    def _triage(self, job: ClaimedJob) -> Triaged:
        """One job by itself, decoded in this thread (process_next; the pipeline decodes in
        the decode pool and triages in _triage_together)."""
        rows = readable_instances(self.db, job.instance_uids)  # retention may have purged some
        decoded: list[DecodedInstance] = []
        for sop_uid, path in rows:
            self._checkpoint(job)
            decoded.append(
                decode_spooled_instance(
                    self.spool.absolute(path),
                    sop_uid,
                    job.study_instance_uid,
                    self.manifest.preprocessing,
                    self.policy,
                )
            )
        self._checkpoint(job)
        prepared, unusable = _gathered(decoded)
        result = triage_study(self.engine, job.study_instance_uid, prepared)
        purged = _purged(job, rows)
        return Triaged(replace(result, purged_instances=purged), prepared, unusable)

    def _build_outputs(
        self,
        job: ClaimedJob,
        result: StudyResult,
        prepared: list[PreparedInstance],
        predecessor: SrReference | None,
    ) -> JobOutputs:
        analysed = [p for p in prepared if p.analysed and p.header is not None]
        encoded = self.decode_pool.encode_outputs(
            StudyOutputs(
                result,
                [p.header for p in analysed],  # type: ignore[misc]
                analysed[0].image,  # type: ignore[arg-type]
                self.manifest.name,
                self.manifest.version,
                self.finding_codes,
                predecessor,
            )
        )
        attempt = uuid.uuid4().hex[:16]
        paths: dict[str, str] = {}
        hl7_paths: dict[str, str] = {}
        try:
            for kind, data in ((OutputKind.SR, encoded.sr), (OutputKind.SUMMARY, encoded.summary)):
                paths[kind] = self.spool.outbox_path(job.id, attempt, kind)
                self.spool.write_durably(paths[kind], data)
            study = StudyHeaders.of(analysed[0].header)  # type: ignore[arg-type]
            self._write_orus(job, attempt, result, study, predecessor is not None, hl7_paths)
        except BaseException:
            self._remove([*paths.values(), *hl7_paths.values()])
            raise
        return JobOutputs(
            encoded.sr_reference,
            encoded.summary_series_instance_uid,
            encoded.summary_sop_instance_uid,
            paths,
            hl7_paths,
        )

    def _write_orus(
        self,
        job: ClaimedJob,
        attempt: str,
        result: StudyResult,
        study: StudyHeaders,
        amended: bool,
        written: dict[str, str],
    ) -> None:
        """An ORU^R01 per HL7 destination (its MSH names the destination's parties), each
        path put in `written` (destination -> path) as soon as its file may exist."""
        for index, destination in enumerate(self.hl7_destinations):
            message = build_oru(
                result,
                study,
                destination,
                model_name=self.manifest.name,
                model_version=self.manifest.version,
                finding_codes=self.finding_codes,
                control_id=uuid.uuid4().hex[:20],
                amended=amended,
                now=datetime.now(UTC),
            )
            rel = self.spool.outbox_path(job.id, attempt, f"{OutputKind.HL7}-{index}")
            written[destination.name] = rel.removesuffix(".dcm") + ".hl7"
            self.spool.write_durably(written[destination.name], message)

    def _build_not_analysed_outputs(
        self,
        job: ClaimedJob,
        result: StudyResult,
        prepared: list[PreparedInstance],
        amended: bool,
    ) -> JobOutputs | None:
        """A study not analysed has no SR, but each RIS still learns it was not triaged: its
        ORU^R01 messages, None when there is no HL7 destination or no header to name the
        patient and order by."""
        if not self.hl7_destinations:
            return None
        study = self._study_headers(job, prepared)
        if study is None:
            log.warning(
                "study %s not analysed and no instance header readable: no HL7 result sent",
                short_hash(job.study_instance_uid),
            )
            return None
        attempt = uuid.uuid4().hex[:16]
        hl7_paths: dict[str, str] = {}
        try:
            self._write_orus(job, attempt, result, study, amended, hl7_paths)
        except BaseException:
            self._remove(hl7_paths.values())
            raise
        return JobOutputs(None, "", "", {}, hl7_paths)

    def _study_headers(
        self, job: ClaimedJob, prepared: list[PreparedInstance]
    ) -> StudyHeaders | None:
        """The study as a received instance's header names it: a prepared instance's, or, when
        none was read (every image unusable), the first spooled instance whose header reads."""
        for instance in prepared:
            if instance.header is not None:
                return StudyHeaders.of(instance.header)
        for _, path in readable_instances(self.db, job.instance_uids):
            try:
                header = dcmread(self.spool.absolute(path), stop_before_pixels=True)
            except Exception as exc:  # garbage or a missing file: try the next instance
                log.debug("header of %s unreadable: %s", path, exc)
                continue
            return StudyHeaders.of(header)
        return None

    def _finish(self, job: ClaimedJob, triaged: Triaged) -> None:
        self._checkpoint(job)
        # The lease is checked before anything is written; the outputs go to paths unique to
        # this attempt, so even a lease lost from here on leaves committed files untouched.
        if not self.queue.heartbeat(job.id):
            raise LostLease(f"job {job.id} was taken over before its outputs were written")
        result = triaged.result
        predecessor = latest_report(self.db, job.study_instance_uid)
        outputs = None
        try:
            if result.verdict is not Verdict.NOT_ANALYSED:
                outputs = self._build_outputs(
                    job, result, triaged.prepared, predecessor.sr if predecessor else None
                )
            else:
                outputs = self._build_not_analysed_outputs(
                    job, result, triaged.prepared, predecessor is not None
                )
            # One commit: the result, its deliveries and the study's state become visible
            # only through the completion that checks our lease (DESIGN rule 2).
            with self.db.session() as session:
                record_result(session, job, result, outputs, predecessor, self.destinations)
                record_drift_samples(session, result, triaged.prepared)
                if not self.queue.complete(session, job.id):
                    raise LostLease(f"job {job.id} was taken over; result discarded")
                mark_study_reported(session, job.study_instance_uid)
                mark_instances_unusable(session, triaged.unusable)
            self.results_committed.ring()
        except BaseException:
            self._remove(outputs.all_paths if outputs else ())
            raise

    def _remove(self, paths: Iterable[str]) -> None:
        """Outputs of an attempt that made nothing visible are deleted (best effort)."""
        for rel in paths:
            try:
                self.spool.remove(rel)
            except OSError as exc:
                log.warning("could not remove %s: %s", rel, exc)


def _gathered(decoded: list[DecodedInstance]) -> tuple[list[PreparedInstance], dict[str, str]]:
    """A study's decoded instances: all prepared ones, and why the unusable ones are so."""
    unusable = {d.prepared.sop_instance_uid: d.unusable for d in decoded if d.unusable}
    return [d.prepared for d in decoded], unusable


def _purged(job: ClaimedJob, rows: list[tuple[str, str]]) -> tuple[str, ...]:
    """The job's instances retention removed before they could be read."""
    readable = {uid for uid, _ in rows}
    return tuple(uid for uid in job.instance_uids if uid not in readable)


def _raising(exc: Exception) -> Callable[[], Triaged]:
    """A triage step that failed before _conclude ran it: concluding it raises `exc`."""

    def step() -> Triaged:
        raise exc

    return step
