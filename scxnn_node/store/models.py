"""Database tables: instances, studies, jobs, results, deliveries, events, schema version."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
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

SCHEMA_VERSION = 1


class Base(DeclarativeBase):
    pass


class SchemaInfo(Base):
    __tablename__ = "schema_info"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)


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
    state: Mapped[str] = mapped_column(String(16))  # stored | skipped
    skip_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    received_at: Mapped[datetime] = mapped_column(DateTime)


class Study(Base):
    """A study's assembly state: receiving until quiet, then queued, then reported."""

    __tablename__ = "studies"
    study_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True)  # receiving | queued | reported
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
    state: Mapped[str] = mapped_column(String(16))  # ready | claimed | done | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class Result(Base):
    """The triage of a job, with the UIDs of the SR and summary image made from it."""

    __tablename__ = "results"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    verdict: Mapped[str] = mapped_column(String(32))
    risk_tier: Mapped[str | None] = mapped_column(String(32), nullable=True)
    abnormality_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    result_json: Mapped[str] = mapped_column(Text)
    sr_sop_instance_uid: Mapped[str] = mapped_column(String(64))
    summary_sop_instance_uid: Mapped[str] = mapped_column(String(64))
    predecessor_id: Mapped[int | None] = mapped_column(ForeignKey("results.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Delivery(Base):
    """One output file to one destination, retried with backoff until sent or dead."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("result_id", "destination", "kind", name="uq_delivery"),
        Index("ix_deliveries_state_next", "state", "next_attempt_at"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"))
    destination: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # sr | summary
    path: Mapped[str] = mapped_column(Text)  # relative to the spool directory
    state: Mapped[str] = mapped_column(String(16))  # pending | sent | dead
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class Event(Base):
    """Audit log: what happened, without patient data (UIDs are hashed)."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime, index=True)
    level: Mapped[str] = mapped_column(String(8))
    kind: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str] = mapped_column(String(64), default="")
    message: Mapped[str] = mapped_column(Text)
