"""The invariant auditor: reads the node's tables with plain SQL and checks them, the spool
files and what the PACS received against the rules, one counter per kind of defect."""

from __future__ import annotations

import json
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from scxnn_node.store.models import DeliveryState, InstanceState, JobState, OutputKind, StudyState
from scxnn_node.testing.peers import Sent, read_uids

SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.33"}


# --- the database, read with plain SQL -----------------------------------------------------


class NodeDatabase:
    """The node's tables read with plain SELECTs; nothing here writes."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url, poolclass=NullPool)

    def rows(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(text(sql), params)]

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            table: {
                r["state"]: r["n"]
                for r in self.rows(f"SELECT state, COUNT(*) AS n FROM {table} GROUP BY state")
            }
            for table in ("instances", "studies", "jobs", "deliveries")
        }

    def busy(self) -> bool:
        """True while the node still has work it can make progress on: a study receiving, a
        job ready or claimed, a delivery pending."""
        counts = self.counts()
        return bool(
            counts["studies"].get(StudyState.RECEIVING)
            or counts["jobs"].get(JobState.READY)
            or counts["jobs"].get(JobState.CLAIMED)
            or counts["deliveries"].get(DeliveryState.PENDING)
        )

    def dispose(self) -> None:
        self.engine.dispose()


def wait_settled(db: NodeDatabase, timeout: float, polls: int = 3) -> bool:
    """Wait until the node has nothing left to do (`polls` looks in a row); False on timeout.
    A study queued with no job left to run counts as settled: it is stuck, not busy."""
    deadline = time.monotonic() + timeout
    quiet = 0
    while time.monotonic() < deadline:
        quiet = quiet + 1 if not db.busy() else 0
        if quiet >= polls:
            return True
        time.sleep(0.3)
    return False


# --- the audit -----------------------------------------------------------------------------

# stuck: left receiving or queued with nothing left to move it; failed: the node gave up on the
# study (no SR, no not-analysed verdict), waiting for an operator's retry.
COUNTERS = (
    "lost",
    "misattributed",
    "duplicated",
    "stuck",
    "failed",
    "stale",
    "wrong_bundle",
    "unanswered",
)


@dataclass
class Audit:
    """What the auditor found: one line per defect under each counter."""

    findings: dict[str, list[str]] = field(default_factory=lambda: {c: [] for c in COUNTERS})
    acknowledged: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, counter: str, line: str) -> None:
        self.findings[counter].append(line)

    def count(self, counter: str) -> int:
        return len(self.findings[counter])

    @property
    def ok(self) -> bool:
        return not any(self.findings.values())

    def merge(self, other: Audit) -> None:
        for counter in COUNTERS:
            self.findings[counter].extend(other.findings[counter])
        self.acknowledged += other.acknowledged
        self.notes.extend(other.notes)

    def summary(self, runs: int) -> str:
        """`runs N, lost 0, misattributed 0, duplicated 0, stuck 0, ...`"""
        counts = ", ".join(f"{c.replace('_', ' ')} {self.count(c)}" for c in COUNTERS)
        return f"runs {runs}, {counts}"

    def report(self, limit: int = 12) -> str:
        lines = [f"{self.acknowledged} acknowledged instances audited"]
        for counter in COUNTERS:
            for line in self.findings[counter][:limit]:
                lines.append(f"  {counter}: {line}")
            if self.count(counter) > limit:
                lines.append(f"  {counter}: ... {self.count(counter) - limit} more")
        lines.extend(f"  note: {note}" for note in self.notes[:limit])
        return "\n".join(lines)


def _header(path: Path) -> Dataset | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return None


def _versions(ds: Dataset) -> set[str]:
    """The Software Versions an object names (the node puts its bundle version there)."""
    value = ds.get("SoftwareVersions")
    if value is None:
        return set()
    values = [value] if isinstance(value, str) else list(value)
    return {str(v).strip() for v in values}


def _short(uid: str | None) -> str:
    """A UID short enough for a report line, still telling near neighbours apart."""
    if uid is None or len(uid) <= 40:
        return repr(uid)
    return f"'{uid[:12]}...{uid[-14:]}' ({len(uid)} chars)"


class Auditor:
    """Checks the node's state against the rules, from outside:
    - every acknowledged instance has its row, and the row's spool file holds that instance;
    - every study with analysable instances is reported, with a current result for exactly
      the instances it holds, unusable or skipped ones aside (never left receiving or
      queued, never given up as failed);
    - one result per (study, instance set, bundle), made under a live lease by that bundle;
    - the outbox files, the database and the PACS name the same SR and summary UIDs.
    """

    def __init__(
        self,
        db: NodeDatabase,
        spool_dir: Path,
        bundle_versions: Iterable[str],
        pacs_dir: Path | None = None,
    ) -> None:
        self.db = db
        self.spool_dir = spool_dir
        self.bundle_versions = set(bundle_versions)
        self.pacs_dir = pacs_dir

    def audit(
        self,
        sends: Sequence[Sent],
        *,
        expect_answers: bool = True,
        settled: bool = True,
        everything: bool = False,
    ) -> Audit:
        """Audit `sends` and the studies they touch (every study when `everything`). With
        `expect_answers`, a C-STORE with no response is a defect (not during chaos, where the
        node is killed under the senders). With `settled`, studies must be finished."""
        found = Audit()
        instances = {r["sop_instance_uid"]: r for r in self.db.rows("SELECT * FROM instances")}
        scope = self._check_instances(found, sends, instances, expect_answers)
        if everything:
            scope |= {r["study_instance_uid"] for r in instances.values()}
        if settled:
            self._check_studies(found, scope, instances)
        self._check_results(found, scope, settled)
        return found

    def _check_instances(
        self,
        found: Audit,
        sends: Sequence[Sent],
        instances: Mapping[str, dict[str, Any]],
        expect_answers: bool,
    ) -> set[str]:
        studies: set[str] = set()
        checked: set[str] = set()
        for sent in sends:
            if sent.status is None and expect_answers:
                found.add("unanswered", f"{sent.label}: C-STORE got no response")
            if not sent.acknowledged:
                continue
            found.acknowledged += 1
            uid = sent.sop_instance_uid
            if uid is None:
                found.notes.append(f"{sent.label}: acknowledged; its bytes carry no readable UID")
                continue
            if uid in checked:
                continue
            checked.add(uid)
            row = instances.get(uid)
            if row is None:
                found.add("lost", f"{sent.label}: {_short(uid)} acknowledged, no instance row")
                continue
            studies.add(row["study_instance_uid"])
            if row["study_instance_uid"] != sent.study_instance_uid:
                found.add(
                    "misattributed",
                    f"{sent.label}: row of {_short(uid)} names study "
                    f"{_short(row['study_instance_uid'])}, sent {_short(sent.study_instance_uid)}",
                )
            if not row["path"]:
                continue  # purged after retention
            path = self.spool_dir / row["path"]
            held = read_uids(path)[0] if path.is_file() else None
            if not path.is_file():
                found.add("lost", f"{sent.label}: {_short(uid)} row names missing {row['path']}")
            elif held != uid:
                found.add(
                    "misattributed",
                    f"{sent.label}: row of {_short(uid)} points at {row['path']}, "
                    f"which holds {_short(held)}",
                )
        return studies

    def _check_studies(
        self, found: Audit, scope: set[str], instances: Mapping[str, dict[str, Any]]
    ) -> None:
        studies = {r["study_instance_uid"]: r for r in self.db.rows("SELECT * FROM studies")}
        jobs = self.db.rows("SELECT * FROM jobs ORDER BY id")
        stored: dict[str, set[str]] = defaultdict(set)
        # A job may hold instances its worker then marked unusable (or a filter skipped): they
        # are covered by it without being stored ones.
        excused: dict[str, set[str]] = defaultdict(set)
        for row in instances.values():
            if row["state"] == InstanceState.STORED:
                stored[row["study_instance_uid"]].add(row["sop_instance_uid"])
            elif row["state"] in (InstanceState.UNUSABLE, InstanceState.SKIPPED):
                excused[row["study_instance_uid"]].add(row["sop_instance_uid"])
        done_sets: dict[str, list[set[str]]] = defaultdict(list)
        last_job: dict[str, dict[str, Any]] = {}
        for job in jobs:
            last_job[job["study_instance_uid"]] = job
            if job["state"] == JobState.DONE:
                done_sets[job["study_instance_uid"]].append(set(json.loads(job["instance_uids"])))
        for study_uid in sorted(scope):
            if not stored.get(study_uid):
                continue  # every instance skipped by the filters: nothing to analyse
            study = studies.get(study_uid)
            state = study["state"] if study else "(no study row)"
            job = last_job.get(study_uid)
            why = (
                f"last job {job['id']} {job['state']}"
                + (f": {job['last_error'][:160]}" if job.get("last_error") else "")
                if job
                else "no job"
            )
            if state == StudyState.FAILED:
                found.add("failed", f"study {_short(study_uid)} given up ({why})")
            elif state != StudyState.REPORTED:
                found.add("stuck", f"study {_short(study_uid)} left {state} ({why})")
            elif not any(
                done - excused[study_uid] == stored[study_uid]
                for done in done_sets.get(study_uid, [])
            ):
                covered = max((len(s & stored[study_uid]) for s in done_sets[study_uid]), default=0)
                found.add(
                    "stuck",
                    f"study {_short(study_uid)} reported, but no result covers its "
                    f"{len(stored[study_uid])} stored instances, at most {covered} ({why})",
                )

    def _check_results(self, found: Audit, scope: set[str], settled: bool) -> None:
        jobs = {r["id"]: r for r in self.db.rows("SELECT * FROM jobs")}
        results = [
            r for r in self.db.rows("SELECT * FROM results ORDER BY id")
            if r["study_instance_uid"] in scope
        ]
        deliveries: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for d in self.db.rows("SELECT * FROM deliveries ORDER BY id"):
            deliveries[d["result_id"]].append(d)
        pacs = self._pacs_objects(scope)
        per_input: dict[tuple[str, str, str], list[int]] = defaultdict(list)
        by_output: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {}
        for result in results:
            job = jobs.get(result["job_id"])
            if job is None or job["state"] != JobState.DONE:
                state = "missing" if job is None else job["state"]
                found.add("stale", f"result {result['id']} belongs to job in state {state}")
            if job is not None:
                key = (job["study_instance_uid"], job["instance_set"], job["bundle_version"])
                per_input[key].append(result["id"])
                if job["bundle_version"] not in self.bundle_versions:
                    found.add(
                        "wrong_bundle",
                        f"result {result['id']} from bundle {job['bundle_version']}, "
                        f"node runs {sorted(self.bundle_versions)}",
                    )
            for uid_key in ("sr_sop_instance_uid", "summary_sop_instance_uid"):
                if result[uid_key]:
                    by_output[result[uid_key]] = (result, job)
            for delivery in deliveries.get(result["id"], []):
                self._check_delivery(found, result, job, delivery, pacs, settled)
        for (study_uid, _, version), ids in per_input.items():
            if len(ids) > 1:
                found.add(
                    "duplicated",
                    f"study {_short(study_uid)}: results {ids} for one instance set, bundle "
                    f"{version}",
                )
        pacs_srs: dict[tuple[str, str, str], set[str]] = defaultdict(set)
        for uid, (name, ds) in pacs.items():
            owner = by_output.get(uid)
            if owner is None:
                found.add("stale", f"PACS holds {name} ({_short(uid)}) that no result names")
                continue
            result, job = owner
            if str(ds.get("StudyInstanceUID", "")) != result["study_instance_uid"]:
                found.add("misattributed", f"PACS {name} is in another study than its result")
            if job is not None and str(ds.get("SOPClassUID", "")) in SR_CLASSES:
                key = (job["study_instance_uid"], job["instance_set"], job["bundle_version"])
                pacs_srs[key].add(uid)
                self._check_bundle(found, f"PACS {name}", ds, job)
        for (study_uid, _, _), uids in pacs_srs.items():
            if len(uids) > 1:
                found.add(
                    "duplicated",
                    f"study {_short(study_uid)}: PACS holds {len(uids)} SRs for one input",
                )

    def _check_delivery(
        self,
        found: Audit,
        result: dict[str, Any],
        job: dict[str, Any] | None,
        delivery: dict[str, Any],
        pacs: Mapping[str, tuple[str, Dataset]],
        settled: bool,
    ) -> None:
        sr = delivery["kind"] == OutputKind.SR
        expected = result["sr_sop_instance_uid" if sr else "summary_sop_instance_uid"]
        what = f"delivery {delivery['id']} ({delivery['kind']} of result {result['id']})"
        if settled and delivery["state"] != DeliveryState.SENT:
            found.add("stuck", f"{what} left {delivery['state']}: {delivery['last_error']}")
        path = self.spool_dir / delivery["path"]
        ds = _header(path) if path.is_file() else None
        if ds is not None:
            held = str(ds.get("SOPInstanceUID", ""))
            if held != expected:
                found.add(
                    "stale",
                    f"{what}: outbox file holds {_short(held)}, the result names "
                    f"{_short(expected)}",
                )
            if str(ds.get("StudyInstanceUID", "")) != result["study_instance_uid"]:
                found.add("misattributed", f"{what}: outbox file is in another study")
            if job is not None and sr:
                self._check_bundle(found, what, ds, job)
        sent = delivery["state"] == DeliveryState.SENT
        if sent and self.pacs_dir is not None and expected not in pacs:
            found.add("lost", f"{what} marked sent, the PACS has no {_short(expected)}")

    def _check_bundle(self, found: Audit, what: str, ds: Dataset, job: dict[str, Any]) -> None:
        versions = _versions(ds)
        if versions and job["bundle_version"] not in versions:
            found.add(
                "wrong_bundle",
                f"{what}: SR made by {sorted(versions)} for a job of bundle "
                f"{job['bundle_version']}",
            )

    def _pacs_objects(self, scope: set[str]) -> dict[str, tuple[str, Dataset]]:
        """SOP Instance UID -> (file name, header) of what the PACS holds for these studies."""
        out: dict[str, tuple[str, Dataset]] = {}
        if self.pacs_dir is None or not self.pacs_dir.is_dir():
            return out
        for path in sorted(self.pacs_dir.iterdir()):
            ds = _header(path) if path.is_file() else None
            if ds is not None and str(ds.get("StudyInstanceUID", "")) in scope:
                out[str(ds.get("SOPInstanceUID", ""))] = (path.name, ds)
        return out
