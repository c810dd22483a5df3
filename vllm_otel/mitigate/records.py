"""What flows through the mitigation receiver: the Alertmanager webhook (payload version 4) as it
arrives, and the receiver's own records (alerts, actions, outcomes) as the store hands them back.

Wire models ignore unknown fields (Alertmanager adds fields between versions; a 4xx is never
retried, so rejecting a newer payload would silently drop alerts) but validate what we rely on.
Records are plain frozen pydantic models, so no database session leaks out of the store.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

__all__ = [
    "AlertStatus", "AlertmanagerAlert", "AlertmanagerWebhook", "describe_validation_error",
    "Mode", "Outcome", "EXECUTED_OUTCOMES", "FAILED_OUTCOMES", "JobState", "Target",
    "GuardDecision", "AlertRecord", "JobRecord", "ActionRecord", "OutcomeRecord", "KillSwitchState",
    "iso", "to_unix",
]


def to_unix(dt: datetime) -> float:
    """Seconds since the epoch; naive datetimes are taken as UTC (Alertmanager always sends a zone)."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def iso(ts: float | None) -> str | None:
    """RFC 3339 UTC text for a unix time, for JSON views."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- Alertmanager webhook, version 4 -------------------------------------------------------------
# Field caps: far above anything a Prometheus rule produces, far below what would make storing
# and redacting one notification take long (each field is redacted on its own; a 16 kB field
# takes ~10 ms). A notification over them is answered 400 with the field's name.
MAX_LABEL_NAME = 256
MAX_LABEL_VALUE = 8192
MAX_ANNOTATION_VALUE = 16384
MAX_LABELS = 128
MAX_URL = 8192
MAX_GROUP_KEY = 8192
_LabelName = Annotated[str, StringConstraints(max_length=MAX_LABEL_NAME)]
Labels = Annotated[dict[_LabelName, Annotated[str, StringConstraints(max_length=MAX_LABEL_VALUE)]],
                   Field(max_length=MAX_LABELS)]
Annotations = Annotated[dict[_LabelName, Annotated[str, StringConstraints(max_length=MAX_ANNOTATION_VALUE)]],
                        Field(max_length=MAX_LABELS)]

class AlertStatus(str, enum.Enum):
    FIRING = "firing"
    RESOLVED = "resolved"


class AlertmanagerAlert(BaseModel):
    """One alert of a notification. Its own ``status`` counts, not the group's."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    status: AlertStatus
    labels: Labels = Field(default_factory=dict)
    annotations: Annotations = Field(default_factory=dict)
    starts_at: datetime = Field(alias="startsAt")
    # Go's zero time ("0001-01-01T00:00:00Z") is what a firing alert carries: None here.
    ends_at: datetime | None = Field(None, alias="endsAt")
    generator_url: str = Field("", alias="generatorURL", max_length=MAX_URL)
    fingerprint: str = Field(min_length=1, max_length=128)

    @field_validator("starts_at", "ends_at")
    @classmethod
    def _utc(cls, v: datetime | None) -> datetime | None:
        if v is None:
            return None
        if v.tzinfo is None:
            v = v.replace(tzinfo=timezone.utc)
        if v.year <= 1:
            return None
        return v.astimezone(timezone.utc)

    @field_validator("starts_at")
    @classmethod
    def _starts_required(cls, v: datetime | None) -> datetime:
        if v is None:
            raise ValueError("startsAt must be a real time, not Go's zero time")
        return v

    @property
    def alertname(self) -> str:
        return self.labels.get("alertname", "")

    @property
    def dedupe_key(self) -> str:
        """Fingerprint + startsAt: Alertmanager resends whole groups, and HA peers send duplicates;
        a new firing of the same label set after a resolve gets a new startsAt, hence a new key."""
        return f"{self.fingerprint}@{self.starts_at.isoformat(timespec='microseconds')}"


class AlertmanagerWebhook(BaseModel):
    """The notification body Alertmanager posts (``version: "4"``)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    version: Literal["4"]
    group_key: str = Field(alias="groupKey", max_length=MAX_GROUP_KEY)
    truncated_alerts: int = Field(0, ge=0, alias="truncatedAlerts")
    status: AlertStatus
    receiver: str = Field("", max_length=MAX_LABEL_VALUE)
    group_labels: Labels = Field(default_factory=dict, alias="groupLabels")
    common_labels: Labels = Field(default_factory=dict, alias="commonLabels")
    common_annotations: Annotations = Field(default_factory=dict, alias="commonAnnotations")
    external_url: str = Field("", alias="externalURL", max_length=MAX_URL)
    alerts: list[AlertmanagerAlert]


def describe_validation_error(e: ValidationError, limit: int = 5) -> str:
    """A short human message (``alerts.0.fingerprint: Field required; ...``) for a 400 answer."""
    parts = []
    for err in e.errors(include_url=False)[:limit]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = e.error_count() - limit
    if more > 0:
        parts.append(f"... and {more} more")
    return "; ".join(parts)


# --- policy vocabulary ----------------------------------------------------------------------------

class Mode(str, enum.Enum):
    """What the receiver may do with a strategy: nothing, say what it would do, ask, or act."""

    OFF = "off"
    DRY_RUN = "dry-run"
    APPROVAL = "approval"
    AUTO = "auto"


class Outcome(str, enum.Enum):
    SUCCESS = "success"            # executed and verified
    FAILURE = "failure"            # execution failed, raised or timed out
    NO_EFFECT = "no_effect"        # executed, verification says the problem is still there
    INTERRUPTED = "interrupted"    # a receiver stopped during execution; never re-run blindly
    DRY_RUN = "dry_run"            # would have run (mode dry-run)
    BLOCKED = "blocked"            # a guard said no
    SKIPPED = "skipped"            # nothing applicable (preconditions, learner declined)
    UNMAPPED = "unmapped"          # no policy rule for this alert
    CANCELLED = "cancelled"        # the alert resolved before the work ran
    REJECTED = "rejected"          # a human rejected the proposed action


# Outcomes of actions that really ran: the only ones that say anything about a strategy.
EXECUTED_OUTCOMES: frozenset[str] = frozenset(
    {Outcome.SUCCESS.value, Outcome.FAILURE.value, Outcome.NO_EFFECT.value, Outcome.INTERRUPTED.value})
FAILED_OUTCOMES: frozenset[str] = frozenset(
    {Outcome.FAILURE.value, Outcome.NO_EFFECT.value, Outcome.INTERRUPTED.value})


class JobState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    WAITING_APPROVAL = "waiting_approval"
    DONE = "done"
    CANCELLED = "cancelled"


class Target(BaseModel):
    """A vLLM instance the receiver may act on, keyed by the alert's instance label."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    instance: str = Field(min_length=1)
    url: str | None = Field(None, description="base URL of the instance's control endpoints")
    labels: dict[str, str] = Field(default_factory=dict)


class GuardDecision(BaseModel):
    model_config = ConfigDict(frozen=True)

    guard: str
    ok: bool
    detail: str = ""
    strategy: str | None = None


# --- records read back from the store -------------------------------------------------------------

class _Record(BaseModel):
    model_config = ConfigDict(frozen=True)


class AlertRecord(_Record):
    id: int
    key: str
    fingerprint: str
    alertname: str
    instance: str | None
    failure_type: str | None
    severity: str | None
    starts_at: float
    labels: dict[str, Any]
    annotations: dict[str, Any]
    generator_url: str
    group_key: str
    received_at: float
    resolved_at: float | None = None
    time_to_resolve_s: float | None = None


class JobRecord(_Record):
    id: int
    alert_id: int
    target: str | None
    state: JobState
    owner: str | None
    lease_until: float | None
    attempts: int
    action_id: int | None
    cancel_requested: bool
    rechecks: int = 0  # times its preconditions were re-checked while the alert kept firing


class OutcomeRecord(_Record):
    id: int
    action_id: int | None
    at: float
    alertname: str | None
    failure_type: str | None
    target: str | None
    strategy: str | None
    outcome: str
    state: dict[str, Any]
    errors: list[str]
    metrics: dict[str, float]
    metrics_after: dict[str, float] | None
    duration_s: float | None
    detail: str


class ActionRecord(_Record):
    """One entry of the audit trail: a decision about an alert, and what came of it."""

    id: int
    alert_id: int | None
    fingerprint: str | None
    alertname: str | None
    instance: str | None
    target: str | None
    strategy: str | None
    params: dict[str, Any]
    why: str
    confidence: float | None
    mode: str
    guards: list[dict[str, Any]]
    metrics_before: dict[str, Any]
    metrics_after: dict[str, Any] | None
    result: dict[str, Any] | None
    verification: dict[str, Any] | None
    status: str          # awaiting_approval | approved | running | finished
    outcome: str | None
    detail: str | None
    replica: str | None
    created_at: float
    approved_at: float | None
    approved_by: str | None
    started_at: float | None
    finished_at: float | None
    duration_s: float | None
    alert_starts_at: float | None
    alert_received_at: float | None
    alert_resolved_at: float | None
    time_to_resolve_s: float | None

    def to_json(self) -> dict[str, Any]:
        """The GET /actions shape: grouped, with RFC 3339 times next to the unix ones."""
        return {
            "id": self.id,
            "alert": {"id": self.alert_id, "alertname": self.alertname, "fingerprint": self.fingerprint,
                      "instance": self.instance, "starts_at": iso(self.alert_starts_at),
                      "received_at": iso(self.alert_received_at),
                      "resolved_at": iso(self.alert_resolved_at),
                      "time_to_resolve_s": self.time_to_resolve_s},
            "target": self.target,
            "strategy": self.strategy,
            "params": self.params,
            "why": self.why,
            "confidence": self.confidence,
            "mode": self.mode,
            "guards": self.guards,
            "metrics_before": self.metrics_before,
            "metrics_after": self.metrics_after,
            "result": self.result,
            "verification": self.verification,
            "status": self.status,
            "outcome": self.outcome,
            "detail": self.detail,
            "replica": self.replica,
            "timings": {
                "created_at": iso(self.created_at), "approved_at": iso(self.approved_at),
                "approved_by": self.approved_by, "started_at": iso(self.started_at),
                "finished_at": iso(self.finished_at), "duration_s": self.duration_s,
                "decision_latency_s": (None if self.alert_received_at is None
                                       else round(self.created_at - self.alert_received_at, 6)),
                "resolved_after_start_s": (
                    None if self.alert_resolved_at is None or self.started_at is None
                    else round(self.alert_resolved_at - self.started_at, 6)),
            },
        }


class KillSwitchState(_Record):
    engaged: bool
    source: str          # "config" | "api" | "default"
    reason: str = ""
    by: str | None = None
    at: float | None = None
