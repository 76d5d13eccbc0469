"""Worker liveness: each worker process beats its row; `status`, the node and the scheduler read
which workers are alive, what they serve and hold."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from scxnn_node.store.db import Database, session_now
from scxnn_node.store.models import Worker

MISSED_BEATS = 3  # a worker silent for this many beats is taken for gone


def worker_owner(pid: int, device: str, host: str | None = None) -> str:
    """The name a worker process leases jobs under (the node computes it for a child too)."""
    return f"{host or socket.gethostname()}:{pid}:{device}"


@dataclass(frozen=True)
class WorkerIdentity:
    owner: str
    host: str
    pid: int
    device: str
    bundle_version: str


@dataclass(frozen=True)
class PipelineSeconds:
    """A worker's time since it started: its engine running, and its engine waiting while every
    study it held was still being decoded (what more decode processes would take away)."""

    engine: float = 0.0
    decode_wait: float = 0.0


@dataclass(frozen=True)
class LiveWorker:
    owner: str
    device: str
    bundle_version: str
    job_id: int | None
    started_at: datetime
    beat_at: datetime
    pipeline: PipelineSeconds = PipelineSeconds()


def beat(
    db: Database,
    worker: WorkerIdentity,
    job_id: int | None,
    every_s: float,
    pipeline: PipelineSeconds | None = None,
) -> None:
    """Record that the worker is alive now (and what it works on, and its pipeline's seconds);
    it counts as alive until MISSED_BEATS beats of `every_s` seconds are missed."""
    now = db.now()
    with db.session() as session:
        row = session.get(Worker, worker.owner)
        if row is None:
            row = Worker(
                owner=worker.owner,
                host=worker.host,
                pid=worker.pid,
                device=worker.device,
                bundle_version=worker.bundle_version,
                started_at=now,
            )
            session.add(row)
        row.beat_at = now
        row.alive_until = now + timedelta(seconds=every_s * MISSED_BEATS)
        row.job_id = job_id
        if pipeline is not None:
            row.engine_seconds = pipeline.engine
            row.decode_wait_seconds = pipeline.decode_wait


def forget(db: Database, owner: str) -> None:
    """A worker that stopped (or is known dead) leaves the table."""
    with db.session() as session:
        session.execute(delete(Worker).where(Worker.owner == owner))


def live_workers(session: Session) -> list[LiveWorker]:
    """Workers whose last beat is recent enough (read inside the caller's transaction)."""
    rows = session.execute(
        select(Worker).where(Worker.alive_until >= session_now(session)).order_by(Worker.owner)
    ).scalars()
    return [
        LiveWorker(
            r.owner,
            r.device,
            r.bundle_version,
            r.job_id,
            r.started_at,
            r.beat_at,
            PipelineSeconds(r.engine_seconds or 0.0, r.decode_wait_seconds or 0.0),
        )
        for r in rows
    ]


def served_versions(db: Database) -> set[str]:
    """The bundle versions live workers serve."""
    with db.session() as session:
        return {w.bundle_version for w in live_workers(session)}


def forget_silent(db: Database, silent_for: timedelta) -> int:
    """Rows of workers gone (killed, host lost) for longer than `silent_for` are deleted."""
    with db.session() as session:
        res = session.execute(delete(Worker).where(Worker.alive_until < db.now() - silent_for))
        return res.rowcount
