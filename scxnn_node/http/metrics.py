"""The node's Prometheus metrics, computed from the database at each scrape: counters from the
append-only audit trail, gauges from the state tables (through `node_status`), so every worker
process and every node sharing the database is counted, and a restart loses nothing."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from scxnn_node.drift import PSI, DriftState
from scxnn_node.http.view import NodeView
from scxnn_node.store.audit import audit_counts
from scxnn_node.store.models import (
    AuditAction,
    AuditRecord,
    Delivery,
    DeliveryState,
    InstanceState,
    JobState,
    OutputKind,
    StudyState,
)

# Seconds from a study's last received instance to its SR sent: the quiet period, the queue,
# inference (tens of seconds per study on a CPU) and the C-STORE.
LATENCY_BUCKETS = (5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

# C-STORE answers: a received record's outcome is the label itself (stored, duplicate); a
# skipped or refused record's outcome (reason code, status) becomes the reason label.
_INSTANCE_OUTCOMES = {AuditAction.SKIPPED: "skipped", AuditAction.REFUSED: "refused"}
_ACKNOWLEDGED = (AuditAction.RECEIVED, AuditAction.SKIPPED)
_WORKED_ON = (AuditAction.ANALYSED, AuditAction.NOT_ANALYSED)


class NodeCollector(Collector):
    """A custom collector: every scrape reads the database once more (a few grouped queries on
    indexed columns); nothing is counted in the node's memory."""

    def __init__(self, view: NodeView) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        with self.view.db.session() as session:
            yield from _audit_counters(session)
            yield _latency_histogram(session)
            deliveries = session.execute(
                select(Delivery.destination, Delivery.state, func.count()).group_by(
                    Delivery.destination, Delivery.state
                )
            ).all()
        yield from _state_gauges(self.view.status(), deliveries, self.view)
        info = InfoMetricFamily("scxnn_bundle", "The model bundle this node serves.")
        manifest = self.view.manifest
        info.add_metric([], {"name": manifest.name, "version": manifest.version})
        yield info


def metrics_text(view: NodeView) -> bytes:
    """One scrape in the Prometheus text format, from a registry of this collector alone (the
    default registry's process metrics would describe only the process serving HTTP)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(view))
    return generate_latest(registry)


def _audit_counters(session: Session) -> Iterator[Metric]:
    counts = audit_counts(session)
    received = CounterMetricFamily(
        "scxnn_instances_received",
        "C-STORE requests answered, by outcome (stored; duplicate of an instance held; "
        "skipped by a filter; refused with a failure status) and reason (filter or status).",
        labels=["outcome", "reason"],
    )
    refused = CounterMetricFamily(
        "scxnn_associations_refused",
        "Associations refused (caller not allowed, wrong called AE title, ...), by reason.",
        labels=["reason"],
    )
    unusable = CounterMetricFamily(
        "scxnn_instances_unusable",
        "Stored instances a worker could not use (the study went on without them), by reason.",
        labels=["reason"],
    )
    not_analysed = CounterMetricFamily(
        "scxnn_studies_not_analysed",
        "Studies that ended without a verdict, by reason.",
        labels=["reason"],
    )
    sent = CounterMetricFamily(
        "scxnn_deliveries_sent", "Outputs sent to a destination, by output kind.", labels=["kind"]
    )
    per_action: dict[str, float] = defaultdict(float)
    for (action, outcome), count in sorted(counts.items()):
        per_action[action] += count
        if action == AuditAction.RECEIVED:
            received.add_metric([outcome, ""], count)
        elif action in _INSTANCE_OUTCOMES:
            received.add_metric([_INSTANCE_OUTCOMES[action], outcome], count)
        elif action == AuditAction.ASSOCIATION_REFUSED:
            refused.add_metric([outcome], count)
        elif action == AuditAction.UNUSABLE:
            unusable.add_metric([outcome], count)
        elif action == AuditAction.NOT_ANALYSED:
            not_analysed.add_metric([outcome], count)
        elif action == AuditAction.DELIVERED:
            sent.add_metric([outcome], count)
    yield from (received, refused, unusable, not_analysed, sent)
    for name, action, text in (
        (
            "scxnn_delivery_attempts_failed",
            AuditAction.DELIVERY_FAILED,
            "Failed delivery attempts to be retried (the last one counts as given up).",
        ),
        ("scxnn_deliveries_given_up", AuditAction.DEAD, "Deliveries that became dead."),
        ("scxnn_instances_purged", AuditAction.PURGED, "Received files retention removed."),
    ):
        yield CounterMetricFamily(name, text, value=per_action[action])

    bytes_received, busy_seconds = session.execute(
        select(
            func.sum(case((AuditRecord.action.in_(_ACKNOWLEDGED), AuditRecord.size_bytes))),
            func.sum(case((AuditRecord.action.in_(_WORKED_ON), AuditRecord.seconds))),
        ).where(AuditRecord.action.in_([*_ACKNOWLEDGED, *_WORKED_ON]))
    ).one()
    yield CounterMetricFamily(
        "scxnn_received_bytes",
        "Bytes of the instances acknowledged with Success (stored, duplicate or skipped).",
        value=bytes_received or 0,
    )
    yield CounterMetricFamily(
        "scxnn_worker_busy_seconds",
        "Seconds workers spent on studies (all workers of all nodes on this database).",
        value=busy_seconds or 0.0,
    )
    verdicts = CounterMetricFamily(
        "scxnn_verdicts",
        "Studies analysed, by verdict (definite_normal, abnormal) and risk tier.",
        labels=["verdict", "tier"],
    )
    for verdict, tier, count in session.execute(
        select(AuditRecord.outcome, AuditRecord.risk_tier, func.count())
        .where(AuditRecord.action == AuditAction.ANALYSED)
        .group_by(AuditRecord.outcome, AuditRecord.risk_tier)
        .order_by(AuditRecord.outcome, AuditRecord.risk_tier)
    ):
        verdicts.add_metric([verdict, tier or ""], count)
    yield verdicts


def _latency_histogram(session: Session) -> HistogramMetricFamily:
    """Buckets counted in SQL: one pass over the SR deliveries' audit records."""
    seconds = AuditRecord.seconds
    row = session.execute(
        select(
            func.count(),
            func.sum(seconds),
            *(func.sum(case((seconds <= bound, 1), else_=0)) for bound in LATENCY_BUCKETS),
        ).where(
            AuditRecord.action == AuditAction.DELIVERED,
            AuditRecord.outcome == OutputKind.SR,
            seconds.is_not(None),
        )
    ).one()
    total, total_seconds, *cumulative = row
    buckets = [
        (floatToGoString(bound), count or 0)
        for bound, count in zip(LATENCY_BUCKETS, cumulative, strict=True)
    ]
    buckets.append(("+Inf", total or 0))
    return HistogramMetricFamily(
        "scxnn_result_latency_seconds",
        "Seconds from a study's last received instance to its SR sent, per SR delivery.",
        buckets=buckets,
        sum_value=total_seconds or 0.0,
    )


def _state_gauges(
    status: dict[str, Any], deliveries: list[Any], view: NodeView
) -> Iterator[Metric]:
    for name, states, text in (
        ("instances", InstanceState, "Instances held, by state."),
        ("studies", StudyState, "Studies, by state."),
        ("jobs", JobState, "Jobs, by state (ready = waiting for a worker)."),
    ):
        gauge = GaugeMetricFamily(f"scxnn_{name}", text, labels=["state"])
        counts = status[name]
        for state in sorted({*(s.value for s in states), *counts}):
            gauge.add_metric([state], counts.get(state, 0))
        yield gauge
    by_destination = GaugeMetricFamily(
        "scxnn_deliveries",
        "Deliveries, by destination and state (dead = given up; deliveries retry).",
        labels=["destination", "state"],
    )
    known = {(d, s): n for d, s, n in deliveries}
    destinations = {d.name for d in view.config.destinations} | {d for d, _s in known}
    for destination in sorted(destinations):
        for state in sorted({*(s.value for s in DeliveryState), *(s for _d, s in known)}):
            by_destination.add_metric([destination, state], known.get((destination, state), 0))
    yield by_destination
    yield GaugeMetricFamily(
        "scxnn_deliveries_dead",
        "Deliveries dead now, all destinations (they wait for a retry).",
        value=sum(n for (_d, s), n in known.items() if s == DeliveryState.DEAD),
    )
    oldest = status["oldest_waiting_study"]
    yield GaugeMetricFamily(
        "scxnn_oldest_waiting_study_seconds",
        "Seconds since the last instance of the oldest study still receiving or queued "
        "(0 when none waits).",
        value=0.0 if oldest is None else oldest["waiting_seconds"],
    )
    yield GaugeMetricFamily(
        "scxnn_workers_alive",
        "Worker processes beating now (all nodes).",
        value=len(status["workers"]),
    )
    engine = CounterMetricFamily(
        "scxnn_worker_engine_seconds",
        "Seconds a live worker's engine ran since the worker started.",
        labels=["worker"],
    )
    decode_wait = CounterMetricFamily(
        "scxnn_worker_decode_wait_seconds",
        "Seconds a live worker's engine waited, since the worker started, while every study it "
        "held was still being decoded (more worker.decode_processes would take it away).",
        labels=["worker"],
    )
    for w in status["workers"]:
        engine.add_metric([w["owner"]], w["engine_seconds"])
        decode_wait.add_metric([w["owner"]], w["decode_wait_seconds"])
    yield engine
    yield decode_wait
    yield GaugeMetricFamily(
        "scxnn_spool_free_bytes",
        "Free bytes on the spool's file system.",
        value=view.free_bytes(),
    )
    yield GaugeMetricFamily(
        "scxnn_spool_min_free_bytes",
        "storage.min_free_bytes: below it C-STORE answers 0xA700.",
        value=view.config.storage.min_free_bytes,
    )
    yield from _drift_gauges(status.get("drift"))


def _drift_gauges(drift: dict[str, Any] | None) -> Iterator[Metric]:
    psi = GaugeMetricFamily(
        "scxnn_drift_psi",
        "Population stability index of a statistic, live window against the bundle's "
        "calibration data (> drift.psi_threshold: shifted).",
        labels=["statistic"],
    )
    detected = GaugeMetricFamily(
        "scxnn_drift_detected",
        "1 when drift watch finds the statistic shifted, 0 otherwise (also while it has too "
        "few samples or no reference).",
        labels=["statistic"],
    )
    for entry in (drift or {}).get("statistics", []):
        if entry["statistic"] == PSI and entry["value"] is not None:
            psi.add_metric([entry["name"]], entry["value"])
        detected.add_metric([entry["name"]], 1 if entry["state"] == DriftState.DRIFTED else 0)
    yield psi
    yield detected
