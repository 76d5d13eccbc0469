"""What `scxnn-node status` reports: counts per state, oldest waiting study, last errors."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from scxnn_node.store.db import Database, short_hash, utc_now
from scxnn_node.store.models import Delivery, Event, Instance, Job, Study


def node_status(db: Database, errors: int = 5) -> dict[str, Any]:
    now = utc_now()
    report: dict[str, Any] = {}
    with db.session() as session:
        for name, model in (
            ("instances", Instance),
            ("studies", Study),
            ("jobs", Job),
            ("deliveries", Delivery),
        ):
            rows = session.execute(select(model.state, func.count()).group_by(model.state)).all()
            report[name] = {state: count for state, count in rows}
        oldest = session.execute(
            select(Study.study_instance_uid, Study.last_received_at)
            .where(Study.state.in_(["receiving", "queued"]))
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
    oldest = report["oldest_waiting_study"]
    lines.append(
        "oldest waiting study: "
        + ("none" if oldest is None else f"{oldest['study']} for {oldest['waiting_seconds']} s")
    )
    if report["last_errors"]:
        lines.append("last errors:")
        lines.extend(f"  {e['at']}  {e['what']}: {e['error']}" for e in report["last_errors"])
    else:
        lines.append("last errors: none")
    return "\n".join(lines)
