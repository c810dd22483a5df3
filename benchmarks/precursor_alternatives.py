"""The precursor models' alternatives, side by side with the shipped ones on recorded scenarios.

Not shipped: each alternative lost to the model the detector uses (docs/decisions/0005 and 0006).
They are kept here so the comparison can be rerun on new recordings:

- ``measured_arrivals``: the offered-load model with the arrival rate measured over the window
  held for the horizon, with Poisson error, instead of the rate predicted by the regression
  learned per instance (short bursts at a steady load are taken to last);
- ``window_forecast``: a preemption storm from the generic forecast of the windowed count, instead
  of the window's own model (it trends a window that must empty as its preemptions age out).

    python benchmarks/precursor_alternatives.py --dir DIR [--threshold 0.7]

``DIR`` holds recordings from ``benchmarks/record_scenarios.py`` (query_range JSON plus
``.meta.json``). Prints, per failure type, each variant's caught/events, false/all alarms and
median (over recordings) of the median lead, pooled over the recordings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from vllm_otel.forecast.backtest import replay, score
from vllm_otel.forecast.detector import PredictiveFailureDetector
from vllm_otel.forecast.detector_config import DetectorConfig
from vllm_otel.forecast.failures import FailureCatalog
from vllm_otel.forecast.precursors.offered_load import OfferedLoad
from vllm_otel.forecast.promjson import load_query_range


class MeasuredArrivals(OfferedLoad):
    """The arrival rate measured over the window, held for the horizon (Poisson error)."""

    def coming_rate(self, rows: np.ndarray, measured: np.ndarray, window: float
                    ) -> tuple[np.ndarray, np.ndarray]:
        return measured, measured / window


class MeasuredArrivalsDetector(PredictiveFailureDetector):
    offered_load_model = MeasuredArrivals


class WindowForecastDetector(PredictiveFailureDetector):
    """Preemption storms from the generic forecast of the windowed count."""

    preemption_model = None


VARIANTS: dict[str, type[PredictiveFailureDetector]] = {
    "shipped": PredictiveFailureDetector,
    "measured_arrivals": MeasuredArrivalsDetector,
    "window_forecast": WindowForecastDetector,
}
FAILURES = {"measured_arrivals": "queue_overload", "window_forecast": "preemption_storm"}


def _config(path: Path) -> DetectorConfig:
    meta_path = path.with_name(path.stem + ".meta.json")
    meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    catalog: dict[str, Any] = {}
    if meta.get("max_num_seqs"):
        catalog["queue_overload"] = {"running_limit": int(meta["max_num_seqs"])}
    return DetectorConfig(catalog=FailureCatalog(**catalog))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--threshold", type=float, default=0.7)
    args = ap.parse_args()
    paths = sorted(p for p in args.dir.glob("*.json") if not p.name.endswith(".meta.json"))
    if not paths:
        print(f"no recordings in {args.dir}", file=sys.stderr)
        return 2
    totals: dict[tuple[str, str], list[Any]] = {}
    for path in paths:
        frame = load_query_range(path)
        cfg = _config(path).model_copy(update={"step_s": frame.step_s})
        for name, cls in VARIANTS.items():
            for row in score(replay(frame, cfg, detector=cls), threshold=args.threshold):
                if row.method != "detector" or row.failure_type not in FAILURES.values():
                    continue
                t = totals.setdefault((row.failure_type, name), [0, 0, 0, 0, []])
                t[0] += row.caught
                t[1] += row.events
                t[2] += row.false_alarms
                t[3] += row.alarms
                if row.median_lead_s is not None:
                    t[4].append(row.median_lead_s)
    print(f"{'failure':>18} {'variant':>18} {'caught/events':>14} {'false/alarms':>13} {'lead s':>14}")
    for (f, name), (caught, events, false, alarms, leads) in sorted(totals.items()):
        if name != "shipped" and FAILURES[name] != f:
            continue
        lead = f"{float(np.median(leads)):.0f}" if leads else "-"
        print(f"{f:>18} {name:>18} {f'{caught}/{events}':>14} {f'{false}/{alarms}':>13} {lead:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
