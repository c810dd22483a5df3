"""What the detector takes and gives, besides arrays: one instance's checkpoint, one prediction,
everything one step produced."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from vllm_otel.forecast.failures import FORECAST_SIGNAL
from vllm_otel.forecast.precursors import PRECURSORS
from vllm_otel.forecast.signals import InputSeries, collect_samples

__all__ = ["Prediction", "Checkpoint", "StepResult", "SOURCES"]

# where a probability came from (StepResult.source holds the index)
SOURCES = ("none", "breach", "forecast", "state_graph", "precursor")


@dataclass(frozen=True)
class Prediction:
    """One failure forecast for one instance."""

    instance: str
    failure_type: str
    probability: float
    time_to_failure: float | None          # seconds; 0 when already failing; None: not within horizon
    recommended_actions: tuple[str, ...]
    timestamp: float
    source: str                            # breach | forecast | state_graph | precursor
    model: str | None = None               # the forecasting model behind a forecast
    precursors: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"instance": self.instance, "failure_type": self.failure_type,
                "probability": self.probability, "time_to_failure_seconds": self.time_to_failure,
                "recommended_actions": list(self.recommended_actions), "t": self.timestamp,
                "source": self.source, "model": self.model, "precursors": list(self.precursors)}


@dataclass
class Checkpoint:
    """What one instance looked like at one time: input values and histogram buckets.

    ``values`` are keyed by input name (``kv_usage``, ``running``, ``preemptions``...: see
    :data:`~vllm_otel.forecast.signals.INPUT_KINDS`); ``histograms`` map an input to
    ``{le: cumulative count}``. :meth:`from_samples` builds one from raw Prometheus samples.
    """

    instance: str
    timestamp: float
    values: Mapping[str, float] = field(default_factory=dict)
    histograms: Mapping[str, Mapping[float, float]] = field(default_factory=dict)

    @classmethod
    def from_samples(cls, instance: str, timestamp: float,
                     samples: Iterable[tuple[str, Mapping[str, str], float]],
                     inputs: InputSeries | None = None) -> "Checkpoint":
        values, hists = collect_samples(samples, inputs or InputSeries())
        return cls(instance, timestamp, values, hists)


@dataclass
class StepResult:
    """Everything one step produced, as arrays over its instances (rows) and failure types (cols)."""

    t: float
    units: list[str]
    failure_types: tuple[str, ...]
    probability: np.ndarray      # (n, F); NaN: no prediction (too little data)
    time_to_failure: np.ndarray  # (n, F) seconds; NaN: not within the horizon / no prediction
    source: np.ndarray           # (n, F) index into SOURCES
    breached: np.ndarray         # (n, F) bool
    signals: dict[str, np.ndarray]
    states: np.ndarray           # (n,) index into the detector's state names
    precursors: dict[str, np.ndarray]
    models: dict[str, list[str | None]]
    actions: dict[str, tuple[str, ...]]
    forecast_probability: np.ndarray  # (n, F) the statistical forecast alone; NaN: none (no model/data)

    def predictions(self, min_probability: float = 0.0) -> list[Prediction]:
        out: list[Prediction] = []
        for i, unit in enumerate(self.units):
            for j, f in enumerate(self.failure_types):
                p = self.probability[i, j]
                if not np.isfinite(p) or p < min_probability:
                    continue
                ttf = self.time_to_failure[i, j]
                sig = FORECAST_SIGNAL.get(f)
                pre = tuple(k for k, fs in PRECURSORS.items() if f in fs and self.precursors[k][i])
                out.append(Prediction(
                    instance=unit, failure_type=f, probability=float(p),
                    time_to_failure=float(ttf) if np.isfinite(ttf) else None,
                    recommended_actions=self.actions[f], timestamp=self.t,
                    source=SOURCES[int(self.source[i, j])],
                    model=self.models[sig][i] if sig in self.models and self.source[i, j] == 2 else None,
                    precursors=pre))
        out.sort(key=lambda p: -p.probability)
        return out
