"""What `scxnn-node status` reports: counts per state, live workers, oldest waiting study,
studies not analysed and why, last errors, and (given a drift report) drift watch."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import func, select

from scxnn_node.drift import DriftReport, format_drift
from scxnn_node.logs import short_hash
from scxnn_node.model.result import Verdict
from scxnn_node.store.db import Database
from scxnn_node.store.models import Delivery, Event, Instance, Job, Result, Study, StudyState
from scxnn_node.store.workers import live_workers


def node_status(db: Database, errors: int = 5, drift: DriftReport | None = None) -> dict[str, Any]:
    now = db.now()
    report: dict[str, Any] = {} if drift is None else {"drift": drift.to_dict()}
    with db.session() as session:
        for name, model in (
            ("instances", Instance),
            ("studies", Study),
            ("jobs", Job),
            ("deliveries", Delivery),
        ):
            rows = session.execute(select(model.state, func.count()).group_by(model.state)).all()
            report[name] = {state: count for state, count in rows}
        report["workers"] = [
            {
                "owner": w.owner,
                "device": w.device,
                "bundle_version": w.bundle_version,
                "job": w.job_id,
                "beat_seconds_ago": round((now - w.beat_at).total_seconds(), 1),
                "engine_seconds": round(w.pipeline.engine, 3),
                "decode_wait_seconds": round(w.pipeline.decode_wait, 3),
            }
            for w in live_workers(session)
        ]
        oldest = session.execute(
            select(Study.study_instance_uid, Study.last_received_at)
            .where(Study.state.in_([StudyState.RECEIVING, StudyState.QUEUED]))
            .order_by(Study.last_received_at)
            .limit(1)
        ).first()
        report["oldest_waiting_study"] = (
            None
            if oldest is None
            else {
                "study": short_hash(oldest.study_instance_uid),
                "waiting_seconds": round((now - oldest.last_received_at).total_seconds(), 1),
            }
        )
        report["not_analysed"] = [
            {
                "at": at.isoformat(),
                "study": short_hash(study_uid),
                "reason": json.loads(result_json).get("reason") or "",
            }
            for study_uid, at, result_json in session.execute(
                select(Result.study_instance_uid, Result.created_at, Result.result_json)
                .where(Result.verdict == Verdict.NOT_ANALYSED)
                .order_by(Result.id.desc())
                .limit(errors)
            )
        ]
        last: list[dict[str, Any]] = []
        for job in session.execute(
            select(Job)
            .where(Job.last_error.is_not(None))
            .order_by(Job.updated_at.desc())
            .limit(errors)
        ).scalars():
            last.append(
                {
                    "at": job.updated_at.isoformat(),
                    "what": f"job {job.id} ({job.state})",
                    "error": job.last_error,
                }
            )
        for delivery in session.execute(
            select(Delivery)
            .where(Delivery.last_error.is_not(None))
            .order_by(Delivery.updated_at.desc())
            .limit(errors)
        ).scalars():
            last.append(
                {
                    "at": delivery.updated_at.isoformat(),
                    "what": f"delivery {delivery.id} to {delivery.destination} ({delivery.state})",
                    "error": delivery.last_error,
                }
            )
        for event in session.execute(
            select(Event)
            .where(Event.level.in_(["ERROR", "WARNING"]))
            .order_by(Event.at.desc())
            .limit(errors)
        ).scalars():
            last.append({"at": event.at.isoformat(), "what": event.kind, "error": event.message})
        report["last_errors"] = sorted(last, key=lambda e: e["at"], reverse=True)[:errors]
    return report


def format_status(report: dict[str, Any]) -> str:
    lines = []
    for name in ("instances", "studies", "jobs", "deliveries"):
        counts = report[name]
        text = ", ".join(f"{state} {count}" for state, count in sorted(counts.items())) or "none"
        lines.append(f"{name:<11} {text}")
    live = report["workers"]
    lines.append(
        f"{'workers':<11} "
        + (
            ", ".join(
                f"{w['owner']} (bundle {w['bundle_version']}, "
                + (f"job {w['job']}, " if w["job"] is not None else "idle, ")
                + f"engine {w['engine_seconds']:.0f} s, "
                + f"waited for decoding {w['decode_wait_seconds']:.0f} s)"
                for w in live
            )
            or "none alive"
        )
    )
    oldest = report["oldest_waiting_study"]
    lines.append(
        "oldest waiting study: "
        + ("none" if oldest is None else f"{oldest['study']} for {oldest['waiting_seconds']} s")
    )
    if report["not_analysed"]:
        lines.append("not analysed:")
        lines.extend(
            f"  {n['at']}  study {n['study']}: {n['reason']}" for n in report["not_analysed"]
        )
    if report["last_errors"]:
        lines.append("last errors:")
        lines.extend(f"  {e['at']}  {e['what']}: {e['error']}" for e in report["last_errors"])
    else:
        lines.append("last errors: none")
    if "drift" in report:
        lines.extend(format_drift(report["drift"]))
    return "\n".join(lines)
