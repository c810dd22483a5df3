"""A complete monitoring example: a monitored vLLM, requests, its status, and failure predictions.

Server (vLLM started with ``VLLM_PLUGINS=vllm_otel``; Prometheus scraping it)::

    python examples/monitoring_example.py --url http://127.0.0.1:8000 --prometheus http://127.0.0.1:9090

sends a few completions, prints ``GET /monitoring/status`` (lifecycle state, requests in flight,
stalls, OTLP export health) and vllm-otel's own series from ``/metrics``, then runs one cycle of the
forecaster over Prometheus' history of that server and prints each failure type's probability
and time to failure.

Offline (no server, the spec's ``LLM(..., enable_monitoring=True)``)::

    python examples/monitoring_example.py --offline /path/to/model

Add ``--json`` for machine-readable output.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import httpx


def server(args: argparse.Namespace) -> dict[str, Any]:
    base = args.url.rstrip("/")
    model = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
    done = 0
    for i in range(args.requests):
        r = httpx.post(f"{base}/v1/completions", timeout=120, json={
            "model": model, "prompt": f"Request {i}: tell me about monitoring.", "max_tokens": 16})
        r.raise_for_status()
        done += 1
    out: dict[str, Any] = {"model": model, "completions": done}
    status = httpx.get(f"{base}/monitoring/status", timeout=30, headers=_auth(args))
    if status.status_code in (401, 403):
        raise SystemExit(f"monitoring_example: {base}/monitoring/status wants a token: pass --token "
                         "(vLLM's API key or the vllm-otel control token)")
    status.raise_for_status()
    out["status"] = status.json()
    metrics = httpx.get(f"{base}/metrics", timeout=30).text
    out["vllm_otel_series"] = sorted({line.split("{")[0].split(" ")[0] for line in metrics.splitlines()
                                      if line.startswith("vllm_otel_")})
    if args.prometheus:
        out["predictions"] = predictions(args.prometheus, args.selector, args.min_history)
    return out


def _auth(args: argparse.Namespace) -> dict[str, str]:
    return {"Authorization": f"Bearer {args.token}"} if args.token else {}


def predictions(prometheus: str, selector: str, min_history_s: float | None) -> dict[str, Any]:
    """One forecaster cycle over Prometheus' recent history (what `vllm-otel forecaster` serves)."""
    from vllm_otel.forecast.detector_config import DetectorConfig
    from vllm_otel.forecast.service import ForecasterService
    from vllm_otel.forecast.sources import PrometheusSource

    config = DetectorConfig(step_s=1.0, **({"min_history_s": min_history_s} if min_history_s else {}))
    source = PrometheusSource(prometheus, selector, 10.0, step_s=1.0, backfill_s=config.fit_window,
                              inputs=config.inputs)
    try:
        service = ForecasterService(source, config)
        service.run_cycle()
        return service.to_json()
    finally:
        source.close()


def offline(args: argparse.Namespace) -> dict[str, Any]:
    from vllm import SamplingParams

    from vllm_otel import LLM

    llm = LLM(model=args.offline, enable_monitoring=True, dtype="float32", enforce_eager=True,
              max_model_len=1024, gpu_memory_utilization=0.3)
    outputs = llm.generate([f"Request {i}: tell me about monitoring." for i in range(args.requests)],
                           SamplingParams(max_tokens=16, ignore_eos=True))
    return {"completions": len(outputs), "status": llm.get_monitoring_status()}


def show(out: dict[str, Any]) -> None:
    print(f"{out['completions']} completions")
    status = out["status"]
    for engine, st in (status.get("engines") or {}).items():
        print(f"engine {engine}: lifecycle {st.get('lifecycle_state')}, in flight {st.get('active_requests')}, "
              f"stalls {st.get('stalls')}, finished {st.get('finished_requests')}")
    if out.get("vllm_otel_series"):
        print(f"{len(out['vllm_otel_series'])} vllm_otel_ series on /metrics, e.g. "
              + ", ".join(out["vllm_otel_series"][:5]))
    for unit in (out.get("predictions") or {}).get("instances", []):
        print(f"predictions for {unit['unit']} (data age {unit['data_age_seconds']:.1f} s):")
        for failure, v in unit["failures"].items():
            p = "no prediction yet" if v["probability"] is None else f"p={v['probability']:.3f}"
            ttf = v["time_to_failure_seconds"]
            print(f"  {failure:22s} {p}" + ("" if ttf is None else f", failure in {ttf:.0f} s"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--url", help="a vLLM OpenAI server with the vllm-otel plugins")
    mode.add_argument("--offline", metavar="MODEL", help="run vLLM in this process on MODEL instead")
    ap.add_argument("--prometheus", help="Prometheus scraping that server: adds the forecaster's predictions")
    ap.add_argument("--selector", default="", help="PromQL matchers selecting the server, e.g. 'job=\"vllm\"'")
    ap.add_argument("--min-history", type=float, help="seconds of data before predicting (default: the forecaster's)")
    ap.add_argument("--token", help="vLLM's API key / vllm-otel control token, when the monitoring routes need one")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        out = offline(args) if args.offline else server(args)
    except httpx.HTTPError as e:
        print(f"monitoring_example: {args.url}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if args.json:  # one line: in offline mode vLLM's own log shares stdout
        print(json.dumps(out, default=str))
    else:
        show(out)
    return 0


if __name__ == "__main__":  # vLLM spawns workers in offline mode: the guard is required
    raise SystemExit(main())
