"""The tables (SQLAlchemy 2 ORM). Audit tables are insert-only; jobs, locks and alert_activity
are coordination tables (see the package docstring)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class WebhookRow(Base):
    """Every accepted notification (metadata only), for the audit trail."""

    __tablename__ = "webhooks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[float] = mapped_column(Float, index=True)
    group_key: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    receiver: Mapped[str] = mapped_column(String(255))
    n_alerts: Mapped[int] = mapped_column(Integer)
    truncated_alerts: Mapped[int] = mapped_column(Integer)
    replica: Mapped[str] = mapped_column(String(255))


class AlertRow(Base):
    __tablename__ = "alerts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(255), unique=True)  # the dedupe key
    fingerprint: Mapped[str] = mapped_column(String(128), index=True)
    alertname: Mapped[str] = mapped_column(String(255), index=True)
    instance: Mapped[str | None] = mapped_column(String(255), index=True)
    failure_type: Mapped[str | None] = mapped_column(String(255))
    severity: Mapped[str | None] = mapped_column(String(64))
    starts_at: Mapped[float] = mapped_column(Float)
    labels: Mapped[dict[str, Any]] = mapped_column(JSON)
    annotations: Mapped[dict[str, Any]] = mapped_column(JSON)
    generator_url: Mapped[str] = mapped_column(Text)
    group_key: Mapped[str] = mapped_column(Text)
    received_at: Mapped[float] = mapped_column(Float, index=True)
    replica: Mapped[str] = mapped_column(String(255))


class AlertResolutionRow(Base):
    __tablename__ = "alert_resolutions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    alert_id: Mapped[int] = mapped_column(ForeignKey("alerts.id"), unique=True)
    ends_at: Mapped[float | None] = mapped_column(Float)
    received_at: Mapped[float] = mapped_column(Float)
    time_to_resolve_s: Mapped[float | None] = mapped_column(Float)


class AlertActivityRow(Base):
    """When an alert was last delivered (coordination: blast radius counts alerts still alive)."""

    __tablename__ = "alert_activity"
    alert_id: Mapped[int] = mapped_column(ForeignKey("alerts.id"), primary_key=True)
    instance: Mapped[str | None] = mapped_column(String(255), index=True)
    last_seen_at: Mapped[float] = mapped_column(Float, index=True)
    resolved: Mapped[bool] = mapped_column(Boolean, default=False)


class JobRow(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    alert_id: Mapped[int] = mapped_column(ForeignKey("alerts.id"), unique=True)
    target: Mapped[str | None] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(32), index=True)
    owner: Mapped[str | None] = mapped_column(String(255))
    lease_until: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    action_id: Mapped[int | None] = mapped_column(Integer)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # A pending job is not claimed before this (a re-check of its preconditions, deferred).
    run_after: Mapped[float | None] = mapped_column(Float)
    rechecks: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class ActionRow(Base):
    __tablename__ = "actions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    alert_id: Mapped[int | None] = mapped_column(ForeignKey("alerts.id"), index=True)
    job_id: Mapped[int | None] = mapped_column(Integer)
    strategy: Mapped[str | None] = mapped_column(String(255), index=True)
    target: Mapped[str | None] = mapped_column(String(255), index=True)
    mode: Mapped[str] = mapped_column(String(32))
    why: Mapped[str] = mapped_column(Text)
    confidence: Mapped[float | None] = mapped_column(Float)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    guards: Mapped[list[Any]] = mapped_column(JSON)
    state: Mapped[dict[str, Any]] = mapped_column(JSON)
    errors: Mapped[list[Any]] = mapped_column(JSON)
    metrics_before: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    replica: Mapped[str] = mapped_column(String(255))


class ActionEventRow(Base):
    """approved / started / finished: each at most once per action (the constraint is the lock)."""

    __tablename__ = "action_events"
    __table_args__ = (UniqueConstraint("action_id", "kind", name="uq_action_event_kind"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    action_id: Mapped[int] = mapped_column(ForeignKey("actions.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    replica: Mapped[str] = mapped_column(String(255))


class OutcomeRow(Base):
    """Every outcome with its context: what the learner learns from."""

    __tablename__ = "outcomes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    action_id: Mapped[int | None] = mapped_column(ForeignKey("actions.id"), unique=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    alertname: Mapped[str | None] = mapped_column(String(255))
    failure_type: Mapped[str | None] = mapped_column(String(255))
    target: Mapped[str | None] = mapped_column(String(255), index=True)
    strategy: Mapped[str | None] = mapped_column(String(255), index=True)
    outcome: Mapped[str] = mapped_column(String(32), index=True)
    state: Mapped[dict[str, Any]] = mapped_column(JSON)
    errors: Mapped[list[Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    metrics_after: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float)
    detail: Mapped[str] = mapped_column(Text)


class KillSwitchEventRow(Base):
    __tablename__ = "kill_switch_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[float] = mapped_column(Float)
    engaged: Mapped[bool] = mapped_column(Boolean)
    by: Mapped[str | None] = mapped_column(String(255))
    reason: Mapped[str] = mapped_column(Text)


class LockRow(Base):
    """Named leases: one action per target, one decision at a time across replicas."""

    __tablename__ = "locks"
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    owner: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[float] = mapped_column(Float)
