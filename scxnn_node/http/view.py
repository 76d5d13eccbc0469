"""What the HTTP endpoints read: `node_status` with drift watch, the last studies and the
deliveries not sent, and the spool's free disk, with every identifier hashed and every error
redacted before it leaves this module."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from scxnn_node.config import NodeConfig
from scxnn_node.drift import drift_report
from scxnn_node.logs import redact, short_hash
from scxnn_node.model.manifest import Manifest
from scxnn_node.status import node_status
from scxnn_node.store.db import Database
from scxnn_node.store.models import (
    AuditAction,
    AuditRecord,
    Delivery,
    DeliveryState,
    OutputKind,
    Result,
    Study,
)
from scxnn_node.store.spool import Spool


@dataclass(frozen=True)
class StudyLine:
    study: str  # short_hash of the Study Instance UID
    state: str
    last_received_at: datetime
    verdict: str  # "" until a result exists
    risk_tier: str
    latency_seconds: float | None  # last instance -> SR sent (the audit's DELIVERED sr record)


@dataclass(frozen=True)
class DeliveryLine:
    id: int
    destination: str
    kind: str
    state: str
    attempts: int
    updated_at: datetime
    last_error: str  # redacted


@dataclass(frozen=True)
class NodeView:
    """The node's database, spool and bundle, read the way the HTTP port shows them."""

    config: NodeConfig
    db: Database
    spool: Spool
    manifest: Manifest

    def status(self) -> dict[str, Any]:
        """`scxnn-node status` with drift watch (its errors redacted again: a job's last error
        is stored as the worker wrote it)."""
        report = node_status(self.db, drift=drift_report(self.db, self.manifest, self.config.drift))
        for entry in report["last_errors"]:
            entry["error"] = redact(str(entry["error"] or ""))
        return report

    def free_bytes(self) -> int:
        return self.spool.free_bytes()

    def last_studies(self, limit: int = 15) -> list[StudyLine]:
        """The studies that received an instance last, newest first, with their latest
        result's verdict and tier and, once sent, the latency of their SR."""
        with self.db.session() as session:
            studies = (
                session.execute(select(Study).order_by(Study.last_received_at.desc()).limit(limit))
                .scalars()
                .all()
            )
            uids = [s.study_instance_uid for s in studies]
            latest: dict[str, tuple[str, str]] = {}
            for uid, verdict, tier in session.execute(
                select(Result.study_instance_uid, Result.verdict, Result.risk_tier)
                .where(Result.study_instance_uid.in_(uids))
                .order_by(Result.id)
            ):
                latest[uid] = (verdict, tier or "")  # ordered by id: the newest wins
            hashes = {uid: short_hash(uid) for uid in uids}
            latency: dict[str, float] = {}
            for study, seconds in session.execute(
                select(AuditRecord.study, AuditRecord.seconds)
                .where(
                    AuditRecord.action == AuditAction.DELIVERED,
                    AuditRecord.outcome == OutputKind.SR,
                    AuditRecord.study.in_(list(hashes.values())),
                    AuditRecord.seconds.is_not(None),
                )
                .order_by(AuditRecord.id)
            ):
                latency[study] = seconds  # the latest SR sent (an amendment's, if any)
            return [
                StudyLine(
                    study=hashes[s.study_instance_uid],
                    state=s.state,
                    last_received_at=s.last_received_at,
                    verdict=latest.get(s.study_instance_uid, ("", ""))[0],
                    risk_tier=latest.get(s.study_instance_uid, ("", ""))[1],
                    latency_seconds=latency.get(hashes[s.study_instance_uid]),
                )
                for s in studies
            ]

    def unsent_deliveries(self, limit: int = 25) -> list[DeliveryLine]:
        """Deliveries not sent (dead first, then pending), most recently changed first."""
        with self.db.session() as session:
            rows = session.execute(
                select(Delivery)
                .where(Delivery.state != DeliveryState.SENT)
                .order_by((Delivery.state == DeliveryState.DEAD).desc(), Delivery.updated_at.desc())
                .limit(limit)
            ).scalars()
            return [
                DeliveryLine(
                    id=d.id,
                    destination=d.destination,
                    kind=d.kind,
                    state=d.state,
                    attempts=d.attempts,
                    updated_at=d.updated_at,
                    last_error=redact(d.last_error or ""),
                )
                for d in rows
            ]
