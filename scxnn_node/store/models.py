"""Database tables (instances, studies, jobs, results, deliveries, events, workers, audit
records) and the state names their rows go through. A change here needs a migration
(store/migrations/versions)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


# State names, defined once. StrEnum: a member equals (and is stored as) its string value.
class InstanceState(StrEnum):
    STORED = "stored"  # analysed when its study is quiet
    SKIPPED = "skipped"  # recorded, never analysed (filters, eligibility)
    UNUSABLE = "unusable"  # a worker could not use it (skip_reason says why); its study goes on


class StudyState(StrEnum):
    RECEIVING = "receiving"
    QUEUED = "queued"
    REPORTED = "reported"
    FAILED = "failed"  # its job failed max_attempts times; a new instance or `jobs retry` revives


# A study in one of these states waits for nothing: the cleaner may purge its files.
FINISHED_STUDY_STATES = (StudyState.REPORTED, StudyState.FAILED)


class JobState(StrEnum):
    READY = "ready"
    CLAIMED = "claimed"
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"  # a newer job of its study replaced it before it ran


class DeliveryState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"


class OutputKind(StrEnum):
    """What a delivery carries (config.yaml `destinations[].outputs` names these)."""

    SR = "sr"
    SUMMARY = "summary"
    HL7 = "hl7"  # an ORU^R01, to a destination of kind hl7 (one file per such destination)


class AuditAction(StrEnum):
    """What an audit record says happened (one record per happening, never updated). Each
    acknowledged C-STORE has one `received` or `skipped` record, each refused one `refused`:
    their size_bytes add up to what callers sent. An outcome is a short code (metrics count by
    it); `detail` carries the full reason."""

    # An instance acknowledged (Success); outcome "stored" (new, to analyse) or "duplicate"
    # (a re-send of a known instance); party: the calling AE; size_bytes: its file.
    RECEIVED = "received"
    # A C-STORE answered with a failure status; outcome: the status ("0xA700", "0xC000").
    REFUSED = "refused"
    # outcome "calling_ae_not_allowed" or "called_ae_mismatch"; party: the calling AE.
    ASSOCIATION_REFUSED = "association_refused"
    # A new instance acknowledged but excluded by the filters (never analysed), instead of
    # `received`; outcome: the reason's code ("body_part_not_allowed", "lateral_view", ...).
    SKIPPED = "skipped"
    UNUSABLE = "unusable"  # an instance a worker could not use (outcome: the reason's code)
    # A study triaged: party the worker, bundle_version, outcome the verdict, risk_tier;
    # seconds: the worker's busy time for the job (claim to result).
    ANALYSED = "analysed"
    # A study ended without a verdict; outcome: the reason's code ("no_usable_image", or
    # "job_failed" when its job failed for good).
    NOT_ANALYSED = "not_analysed"
    # An output sent; party: the destination; outcome: the output kind (sr, summary, hl7);
    # seconds: from the study's last received instance to the send.
    DELIVERED = "delivered"
    DELIVERY_FAILED = "delivery_failed"  # one failed attempt, to be retried (detail: why)
    DEAD = "dead"  # a delivery given up after its last attempt (instead of delivery_failed)
    PURGED = "purged"  # an instance's file removed by retention (outcome "retention")


class Base(DeclarativeBase):
    pass


class Instance(Base):
    """One received SOP instance; the SOP Instance UID is the idempotency key."""

    __tablename__ = "instances"
    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    sop_class_uid: Mapped[str] = mapped_column(String(64), default="")
    path: Mapped[str] = mapped_column(Text)  # relative to the spool directory
    size: Mapped[int] = mapped_column(Integer, default=0)
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    state: Mapped[str] = mapped_column(String(16))  # InstanceState
    skip_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    received_at: Mapped[datetime] = mapped_column(DateTime)


class Study(Base):
    """A study's assembly state: receiving until quiet, then queued, then reported (or failed)."""

    __tablename__ = "studies"
    study_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True)  # StudyState
    first_received_at: Mapped[datetime] = mapped_column(DateTime)
    last_received_at: Mapped[datetime] = mapped_column(DateTime)


class Job(Base):
    """Work for a worker: triage one study's instance set with one bundle version."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint(
            "study_instance_uid", "instance_set", "bundle_version", name="uq_job_input"
        ),
        Index("ix_jobs_state_id", "state", "id"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    instance_set: Mapped[str] = mapped_column(String(64))  # sha256 of the sorted SOP UIDs
    instance_uids: Mapped[str] = mapped_column(Text)  # JSON list of those SOP UIDs
    bundle_version: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))  # JobState
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Not claimed before this time: a failed attempt backs off (doubling) before the next one.
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class Result(Base):
    """The triage of a job, with the UIDs of the SR and summary image made from it (empty for
    a study not analysed). The SR's identity is what an amended SR names as its predecessor, so
    it lives here rather than only in an outbox file that retention purges."""

    __tablename__ = "results"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    verdict: Mapped[str] = mapped_column(String(32))
    risk_tier: Mapped[str | None] = mapped_column(String(32), nullable=True)
    abnormality_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    result_json: Mapped[str] = mapped_column(Text)
    sr_series_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    sr_sop_class_uid: Mapped[str] = mapped_column(String(64), default="")
    sr_sop_instance_uid: Mapped[str] = mapped_column(String(64))
    summary_series_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    summary_sop_instance_uid: Mapped[str] = mapped_column(String(64))
    predecessor_id: Mapped[int | None] = mapped_column(ForeignKey("results.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Delivery(Base):
    """One output file to one destination, retried with backoff until sent or dead. A pending
    delivery is sent only by the dispatcher holding its lease, so nodes sharing a database never
    send it at once; a dispatcher that stopped mid-send loses it when the lease expires."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("result_id", "destination", "kind", name="uq_delivery"),
        Index("ix_deliveries_state_next", "state", "next_attempt_at"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"))
    destination: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # OutputKind
    path: Mapped[str] = mapped_column(Text)  # relative to the spool directory
    state: Mapped[str] = mapped_column(String(16))  # DeliveryState
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class Worker(Base):
    """A worker process's liveness, beaten while it runs, so that `status` (another process)
    sees which workers are alive and what they hold."""

    __tablename__ = "workers"
    owner: Mapped[str] = mapped_column(String(128), primary_key=True)  # the jobs' lease_owner
    host: Mapped[str] = mapped_column(String(64))
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(32))
    bundle_version: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(DateTime)
    beat_at: Mapped[datetime] = mapped_column(DateTime)
    alive_until: Mapped[datetime] = mapped_column(DateTime, index=True)  # beat_at + 3 beats
    job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the job it works on
    # Since the worker started: seconds its engine ran, and seconds it held studies none of
    # which was decoded yet (its engine waiting for decoding).
    engine_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    decode_wait_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")


class Event(Base):
    """Audit log: what happened, without patient data (UIDs are hashed)."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime, index=True)
    level: Mapped[str] = mapped_column(String(8))
    kind: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str] = mapped_column(String(64), default="")
    message: Mapped[str] = mapped_column(Text)


class AuditRecord(Base):
    """The audit trail: one row per thing that happened to an instance, study or delivery,
    appended and never changed. Identifiers are stored as their short_hash, as logs show them;
    no patient data."""

    __tablename__ = "audit_records"
    __table_args__ = (Index("ix_audit_records_action_outcome", "action", "outcome"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime, index=True)
    action: Mapped[str] = mapped_column(String(32))  # AuditAction
    study: Mapped[str] = mapped_column(String(16), default="")  # short_hash of the study UID
    instance: Mapped[str] = mapped_column(String(16), default="")  # short_hash of the SOP UID
    party: Mapped[str] = mapped_column(String(128), default="")  # calling AE, destination, worker
    bundle_version: Mapped[str] = mapped_column(String(64), default="")
    outcome: Mapped[str] = mapped_column(String(64), default="")  # verdict, status, reason code
    risk_tier: Mapped[str] = mapped_column(String(32), default="")
    size_bytes: Mapped[int | None] = mapped_column(Integer, nullable=True)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="")  # a short reason, identifiers hashed


class DriftSample(Base):
    """Drift watch's live window (scxnn_node/drift.py): one "study" row per analysed study
    (its score and verdict), followed by one "image" row per image it analysed (input
    statistics). Only the newest drift.window_studies studies are kept; no patient data."""

    __tablename__ = "drift_samples"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime)
    bundle_version: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(8))  # "study" or "image"
    abnormality_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    definite_normal: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    windowed_mean: Mapped[float | None] = mapped_column(Float, nullable=True)
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    columns: Mapped[int | None] = mapped_column(Integer, nullable=True)
    bits_stored: Mapped[int | None] = mapped_column(Integer, nullable=True)
    manufacturer: Mapped[str | None] = mapped_column(String(64), nullable=True)
