"""The chaos run: senders on several associations while a schedule of faults (kill -9, SIGSTOP
of a worker mid-job, PACS down, restart, bundle switch) hits the node and its PACS; then
everything is healed, the node left to finish, and audited."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from scxnn_node.store.models import DeliveryState, JobState
from scxnn_node.testing.audit import Audit, Auditor, NodeDatabase, wait_settled
from scxnn_node.testing.datasets import chest_dataset, write_part10
from scxnn_node.testing.dcmtk import Storescp
from scxnn_node.testing.node_process import NodeProcess, bundle_version, send_signal, serve_config
from scxnn_node.testing.peers import Sent, send_until_acknowledged, wait_until


@dataclass(frozen=True)
class ChaosPlan:
    """How hard one chaos run pushes: senders, studies, and faults while they send."""

    senders: int = 3
    studies_per_sender: int = 6
    instances_per_study: int = 3  # 1 to this many
    faults: int = 6
    resend_chance: float = 0.3  # an acknowledged instance sent again (a PACS retrying)
    amend_chance: float = 0.2  # a later instance for an earlier study (an amended SR)
    image_size: int = 64
    settle_seconds: float = 300.0
    seed: int = 0
    shuffle_faults: bool = True  # False: the faults in the order given, round robin


# The node's waits after a fault (see ChaosRun.__init__), in seconds.
WORKER_LEASE_SECONDS = 3.0
DELIVERY_LEASE_SECONDS = 5.0
RETRY_BACKOFF_SECONDS = 0.5

FAULTS = (
    "kill_serve",  # kill -9 the serve process (and its group, as systemd does), restart it
    "kill_helper",  # kill -9 one process the node started (a worker, or another service)
    "pause_mid_job",  # SIGSTOP the worker holding a claimed job past its lease, then SIGCONT
    "pacs_down",  # the destination goes away for a few seconds
    "restart",  # SIGTERM, then start again
    "switch_bundle",  # kill -9, restart with the other bundle
    "database_drop",  # PostgreSQL ends every connection of the node's (a restart, a failover)
)


class ChaosRun:
    """One chaos run: senders on several associations while faults hit the node and its
    PACS; then everything is healed, the node left to finish, and audited."""

    def __init__(
        self,
        root: Path,
        bundles: Sequence[Path],
        plan: ChaosPlan,
        database_url: str | None = None,
        faults: Sequence[str] = FAULTS,
    ) -> None:
        self.root = root
        self.bundles = list(bundles)
        self.plan = plan
        on_postgres = database_url is not None and database_url.startswith("postgresql")
        self.faults = [
            f
            for f in faults
            if (f != "switch_bundle" or len(self.bundles) > 1)
            and (f != "database_drop" or on_postgres)
        ]
        self.rng = np.random.default_rng(plan.seed)
        self.pacs = Storescp(root / "pacs")
        config = serve_config(
            root / "node",
            self.bundles[0],
            database_url=database_url,
            pacs_port=self.pacs.port,
            model={"devices": ["cpu", "cpu"]},  # two workers: one can take over the other's job
            # Every wait a fault leaves the node with is short against settle_seconds: a lease
            # held by a killed process (retaken only at its expiry; the delivery default of
            # 600 s outlasted the audit once a kill -9 hit a delivery under way), and the
            # backoff of a job given up, doubled at each fault it meets (default 10 s: the
            # job frozen by pause_mid_job was not retaken before the fault's wait ran out).
            worker={
                "lease_seconds": WORKER_LEASE_SECONDS,
                "heartbeat_seconds": 0.5,
                "max_attempts": 50,
                "retry_backoff_seconds": RETRY_BACKOFF_SECONDS,
            },
            delivery={"lease_seconds": DELIVERY_LEASE_SECONDS},
            node={"max_associations": 32},
        )
        self.node = NodeProcess(config, root / "node")
        self.sends: list[Sent] = []
        self.injected: list[str] = []
        self._lock = threading.Lock()
        self._paused: set[int] = set()

    # senders

    def _files(self, sender: int) -> Iterator[list[Path]]:
        """Per study: its instances; sometimes a re-send or a late instance of an earlier
        study of this sender."""
        rng = np.random.default_rng(self.plan.seed * 1000 + sender)
        earlier: list[tuple[str, list[Path]]] = []
        folder = self.root / "sent" / f"sender{sender}"
        for number in range(self.plan.studies_per_sender):
            study = generate_uid()
            count = int(rng.integers(1, self.plan.instances_per_study + 1))
            files = [
                write_part10(
                    chest_dataset(
                        study_uid=study, size=self.plan.image_size, seed=int(rng.integers(1 << 30))
                    ),
                    folder / f"{number:03d}-{i}.dcm",
                )
                for i in range(count)
            ]
            yield files
            earlier.append((study, files))
            if rng.random() < self.plan.resend_chance:
                yield [earlier[int(rng.integers(len(earlier)))][1][0]]
            if rng.random() < self.plan.amend_chance:
                old_study, _ = earlier[int(rng.integers(len(earlier)))]
                late = folder / f"{number:03d}-late.dcm"
                yield [write_part10(chest_dataset(study_uid=old_study, seed=number), late)]

    def _sender(self, sender: int) -> None:
        rng = np.random.default_rng(self.plan.seed * 7919 + sender)
        for files in self._files(sender):
            sends = send_until_acknowledged(self.node.port, files, time.monotonic() + 240)
            with self._lock:
                self.sends.extend(sends)
            time.sleep(float(rng.uniform(0.0, 0.6)))

    # faults

    def _fault(self, name: str) -> None:
        node, pacs = self.node, self.pacs
        if name in ("kill_serve", "switch_bundle"):
            node.kill()
            self._paused.clear()  # SIGKILL ends stopped processes too
            time.sleep(float(self.rng.uniform(0, 1)))
            if name == "switch_bundle":
                current = self.bundles.index(Path(node.config["model"]["bundle"]))
                following = self.bundles[(current + 1) % len(self.bundles)]
                node.config["model"]["bundle"] = str(following)
            node.start()
        elif name == "restart":
            node.stop()
            self._paused.clear()
            node.start()
        elif name == "kill_helper":
            helpers = sorted(node.helpers())
            if helpers:
                send_signal(helpers[int(self.rng.integers(len(helpers)))], signal.SIGKILL)
            else:
                name = "kill_helper (none running)"
        elif name == "pause_mid_job":
            name = self._pause_mid_job()
        elif name == "database_drop":
            name = f"database_drop ({_drop_connections(node.database_url)} connections)"
        elif name == "pacs_down":
            pacs.stop()
            time.sleep(float(self.rng.uniform(1, 4)))
            pacs.start()
        self.injected.append(name)

    def _probe_study(self, number: int) -> None:
        """A study of a few instances sent by the chaos itself, so that a worker has a job to
        be caught in even when the senders are done."""
        study = generate_uid()
        files = [
            write_part10(
                chest_dataset(study_uid=study, size=self.plan.image_size, seed=number * 10 + i),
                self.root / "sent" / "probes" / f"{number:03d}-{i}.dcm",
            )
            for i in range(3)
        ]
        sends = send_until_acknowledged(self.node.port, files, time.monotonic() + 60)
        with self._lock:
            self.sends.extend(sends)

    def _pause_mid_job(self) -> str:
        """SIGSTOP the worker that holds a claimed job (its pid is in the lease owner) until
        the lease has expired and another worker has had time to take the job over. Probe
        studies give the workers something to hold when the queue is empty (workers can take
        a minute to start on a busy machine, several on a machine loaded by other work)."""
        db = NodeDatabase(self.node.database_url)
        try:
            deadline, probes, probed = time.monotonic() + 300, 0, 0.0
            while time.monotonic() < deadline:
                jobs = db.rows("SELECT id, state, lease_owner FROM jobs")
                for job in jobs:
                    claimed = job["state"] == JobState.CLAIMED
                    pid = _owner_pid(job["lease_owner"]) if claimed else None
                    if pid is not None and pid in self.node.helpers():
                        self._freeze(db, pid, job["id"])
                        return "pause_mid_job"
                idle = not any(j["state"] in (JobState.READY, JobState.CLAIMED) for j in jobs)
                if idle and probes < 5 and time.monotonic() - probed > 5:
                    self._probe_study(len(self.injected) * 5 + probes)
                    probes, probed = probes + 1, time.monotonic()
                time.sleep(0.01)
            return "pause_mid_job (no claimed job of a worker seen)"
        finally:
            db.dispose()

    def _freeze(self, db: NodeDatabase, pid: int, job_id: int) -> None:
        send_signal(pid, signal.SIGSTOP)
        self._paused.add(pid)
        lease = float(self.node.config["worker"]["lease_seconds"])
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: _job_state(db, job_id) == JobState.DONE, lease * 4)
        time.sleep(0.5)
        send_signal(pid, signal.SIGCONT)
        self._paused.discard(pid)

    def _chaos(self, period: float) -> None:
        """Every fault of the plan, spread over the run (also after the senders are done:
        then they hit processing and delivery)."""
        for number in range(self.plan.faults):
            time.sleep(float(self.rng.uniform(0.3, period)))
            pick = (
                int(self.rng.integers(len(self.faults)))
                if self.plan.shuffle_faults
                else number % len(self.faults)
            )
            self._fault(self.faults[pick])

    # the run

    def run(self) -> Audit:
        self.pacs.start()
        self.node.start()
        try:
            senders = [
                threading.Thread(target=self._sender, args=(i,), daemon=True)
                for i in range(self.plan.senders)
            ]
            chaos = threading.Thread(target=self._chaos, args=(3.0,), daemon=True)
            for thread in senders:
                thread.start()
            chaos.start()
            for thread in senders:
                thread.join()
            chaos.join()
            return self._heal_and_audit()
        finally:
            self.node.stop()
            self.pacs.stop()

    def _heal_and_audit(self) -> Audit:
        for pid in list(self._paused):
            send_signal(pid, signal.SIGCONT)
        if not self.pacs.running:
            self.pacs.start()
        if not self.node.alive():
            self.node.start()
        db = NodeDatabase(self.node.database_url)
        try:
            settled = wait_settled(db, self.plan.settle_seconds)
            busy = "" if settled else _open_work(db)
            versions = [bundle_version(b) for b in self.bundles]
            audit = Auditor(db, self.node.spool_dir, versions, self.pacs.directory).audit(
                self.sends, expect_answers=False, everything=True
            )
        finally:
            db.dispose()
        if not settled:
            audit.notes.append(
                f"not settled after {self.plan.settle_seconds:.0f} s; still open: {busy}"
            )
        if not self.node.helpers():
            audit.notes.append("no process left under serve: a killed worker was not replaced")
        audit.notes.append("faults: " + (", ".join(self.injected) or "none"))
        return audit


def _open_work(db: NodeDatabase) -> str:
    """The jobs and deliveries a node that did not settle still has open, with the lease or
    backoff each waits on (a lease held by a killed process is retaken only at its expiry)."""
    now = datetime.now(UTC).replace(tzinfo=None)  # as the node writes its times: naive UTC
    jobs = db.rows(
        "SELECT id, state, lease_owner, lease_expires_at, next_attempt_at FROM jobs"
        " WHERE state IN (:ready, :claimed) ORDER BY id",
        ready=JobState.READY.value,
        claimed=JobState.CLAIMED.value,
    )
    deliveries = db.rows(
        "SELECT id, lease_owner, lease_expires_at, next_attempt_at FROM deliveries"
        " WHERE state = :pending ORDER BY id",
        pending=DeliveryState.PENDING.value,
    )
    lines = [
        f"job {j['id']} {j['state']} (lease {j['lease_owner']} until {j['lease_expires_at']},"
        f" next attempt {j['next_attempt_at']})"
        for j in jobs
    ] + [
        f"delivery {d['id']} pending (lease {d['lease_owner']} until {d['lease_expires_at']},"
        f" next attempt {d['next_attempt_at']})"
        for d in deliveries
    ]
    return f"at {now:%H:%M:%S} UTC: " + ("; ".join(lines) or "a study receiving")


def _drop_connections(database_url: str, seconds: float = 2.0) -> int:
    """End every session on the node's PostgreSQL database, again and again for `seconds`
    (a server restarting, a failover), so that some are cut mid-transaction; returns how many
    sessions were ended."""
    db = NodeDatabase(database_url)
    ended = 0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            rows = db.rows(
                "SELECT pg_terminate_backend(pid) AS ended FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            ended += sum(bool(r["ended"]) for r in rows)
            time.sleep(0.05)
        return ended
    finally:
        db.dispose()


def _job_state(db: NodeDatabase, job_id: int) -> str:
    rows = db.rows("SELECT state FROM jobs WHERE id = :id", id=job_id)
    return str(rows[0]["state"]) if rows else "missing"


def _owner_pid(lease_owner: str | None) -> int | None:
    """The pid in a lease owner such as `host:1234:cpu`, if it has one."""
    for part in (lease_owner or "").split(":"):
        if part.isdigit():
            return int(part)
    return None
