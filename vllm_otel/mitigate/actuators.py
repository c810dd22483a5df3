"""How strategies reach vLLM and read it back: the real :class:`Actuator` and :class:`MetricsSource`.

``vllm-otel receiver`` calls :func:`build_actuator` and :func:`build_metrics_source` with the
loaded policy. The actuator routes a verb by its prefix:

``control.<action>``
    ``POST <target>/monitoring/control/<action>`` with the policy's control token (read from
    ``actuator.control.token_file`` at each call). The target's base URL is its ``url`` or
    ``http://<instance>``. vLLM's error answers (400 bad params, 401/403 auth, 404 control off,
    409 not possible here) become :class:`ActuatorError` carrying vLLM's message.
``supervisor.status`` / ``supervisor.restart``
    the target's :class:`~vllm_otel.mitigate.supervisor.base.RestartBackend` from
    ``actuator.supervisors[<instance>]``: a ``vllm-otel supervise`` over HTTP, docker compose or
    a Kubernetes Deployment.
``hook.<name>``
    the HTTP call configured under ``actuator.hooks.<name>`` (load balancer, autoscaler, pager):
    method, URL / header / JSON-body templates, secrets from files. Nothing is executed locally.

A reserved parameter ``_timeout_s`` sets how long one call may take; it is never sent on.

The metrics source answers with the names listed in
:mod:`vllm_otel.mitigate.strategies.common`: from Prometheus (one instant query for the
target's series) when ``metrics.prometheus_url`` is set, else by scraping the target's own
``/metrics`` (a failed scrape is ``up = 0``, as Prometheus would record it).
"""

from __future__ import annotations

import asyncio
import functools
import re
import ssl
import time
import weakref
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from vllm_otel.mitigate.records import Target
from vllm_otel.mitigate.policy import (ActuatorConfig, ControlConfig, HookConfig, MetricsConfig,
                                       Policy, SupervisorConfig)
from vllm_otel.mitigate.strategies import ActuatorError, MetricsSnapshot
from vllm_otel.mitigate.strategies import common as k
from vllm_otel.mitigate.supervisor.base import RestartBackend, RestartError, RestartRequest
from vllm_otel.mitigate.supervisor.client import HttpSupervisorBackend
from vllm_otel.mitigate.supervisor.compose import ComposeBackend
from vllm_otel.mitigate.supervisor.kubernetes import KubernetesBackend
from vllm_otel.httpread import ANSWER_MAX_BYTES, METRICS_MAX_BYTES, QUERY_MAX_BYTES, request_capped
from vllm_otel.redact import redact_text

__all__ = ["HttpActuator", "PrometheusMetricsSource", "ScrapeMetricsSource", "build_actuator",
           "build_metrics_source", "reduce_samples", "target_base_url", "render_template"]

_VERB = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
USER_AGENT = "vllm-otel-receiver"


@functools.lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    # Loading the CA bundle is most of what a new httpx client costs (tens of ms of CPU, in the
    # receiver's process, per scrape or action): load it once. Clients stay per call, so they
    # are never shared across event loops (the worker's loop, asyncio.run in scripts).
    return httpx.create_ssl_context()


def _client(timeout: float, transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=timeout, transport=transport, verify=_tls_context())


def warm_up_http(parser: bool = False) -> None:
    """Do now what the first request would do lazily: import httpcore / h11 (httpx imports them
    on its first transport), load the CA bundle, and for scrapes the exposition parser. ~0.2 s
    of CPU that, left to the worker's first job, would hold the GIL right after a restart, when
    the intake takes Alertmanager's retry wave."""
    httpx.AsyncHTTPTransport(verify=_tls_context())
    import h11  # noqa: F401 - imported for its side effect (warm)
    try:  # httpcore's network backend, which anyio loads on the first connect
        import anyio._backends._asyncio  # noqa: F401
        import anyio.streams.tls  # noqa: F401
    except ImportError:  # pragma: no cover - another anyio layout: it loads lazily, as before
        pass
    if parser:
        import prometheus_client.parser  # noqa: F401


class _LoopClients:
    """One keep-alive client per event loop, for the metrics sources: a job takes several
    snapshots (before, while verifying, after), and a new client per snapshot cost ~2 ms of CPU
    plus a TCP connect each. Per loop, because an httpx client belongs to the loop it first ran
    on (the worker has its own; scripts and tests run others); a loop's client goes with it."""

    def __init__(self, timeout: float, transport: httpx.AsyncBaseTransport | None) -> None:
        self.timeout = timeout
        self.transport = transport
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = \
            weakref.WeakKeyDictionary()

    def get(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        c = self._by_loop.get(loop)
        if c is None or c.is_closed:
            c = self._by_loop[loop] = _client(self.timeout, self.transport)
        return c


def target_base_url(target: Target, scheme: str = "http") -> str:
    return (target.url or f"{scheme}://{target.instance}").rstrip("/")


def _secret(path: Path | None, what: str) -> str:
    if path is None:
        raise ActuatorError(f"no {what} configured")
    try:
        value = Path(path).read_text().strip()
    except OSError as e:
        raise ActuatorError(f"cannot read {what} {path}: {e.strerror}") from None
    if not value:
        raise ActuatorError(f"{what} {path} is empty")
    return value


def _error_message(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return redact_text(r.text[:300])
    if isinstance(body, Mapping):
        err = body.get("error", body)
        if isinstance(err, Mapping):  # vLLM's own errors: {"error": {"message": ...}}
            err = err.get("message", err)
        return redact_text(str(err)[:500])
    return redact_text(str(body)[:300])


def render_template(value: Any, variables: Mapping[str, Any], *, url: bool = False) -> Any:
    """Substitute ``${name}`` in strings (recursively in lists / dicts). A string that is exactly
    ``${name}`` becomes the value itself (keeps its JSON type); ``url=True`` percent-encodes."""
    if isinstance(value, str):
        whole = _VAR.fullmatch(value)
        if whole and not url:
            return _lookup(variables, whole.group(1))

        def sub(m: re.Match[str]) -> str:
            v = _lookup(variables, m.group(1))
            s = "" if v is None else str(v)
            return quote(s, safe="") if url else s

        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [render_template(v, variables, url=url) for v in value]
    if isinstance(value, dict):
        return {kk: render_template(v, variables, url=url) for kk, v in value.items()}
    return value


def _lookup(variables: Mapping[str, Any], name: str) -> Any:
    if name not in variables:
        raise ActuatorError(f"hook template uses ${{{name}}}, which is not provided "
                            f"(available: {', '.join(sorted(variables))})")
    return variables[name]


class HttpActuator:
    """The composite actuator: control endpoints, restart backends, external hooks."""

    def __init__(self, config: ActuatorConfig | None = None, *,
                 transport: httpx.AsyncBaseTransport | None = None,
                 backends: Mapping[str, RestartBackend] | None = None) -> None:
        self.config = config or ActuatorConfig()
        self._transport = transport
        self._backends: dict[str, RestartBackend] = dict(backends or {})

    def warm_up(self) -> None:
        warm_up_http()

    async def call(self, target: Target, action: str, params: Mapping[str, Any]) -> Mapping[str, Any]:
        if target is None:
            raise ActuatorError(f"{action}: no target")
        kind, _, verb = action.partition(".")
        body = dict(params or {})
        timeout = body.pop("_timeout_s", None)
        if not _VERB.match(verb):
            raise ActuatorError(f"bad action {action!r}")
        if kind == "control":
            return await self._control(target, verb, body, timeout)
        if kind == "supervisor":
            return await self._supervisor(target, verb, body, timeout)
        if kind == "hook":
            return await self._hook(target, verb, body, timeout)
        raise ActuatorError(f"unknown action {action!r}: expected control.<action>, "
                            "supervisor.<status|restart> or hook.<name>")

    # --- control endpoints ------------------------------------------------------------------------------

    async def _control(self, target: Target, verb: str, body: dict[str, Any],
                       timeout: float | None) -> Mapping[str, Any]:
        cc: ControlConfig = self.config.control
        token = _secret(cc.token_file, "control token file (actuator.control.token_file)")
        url = f"{target_base_url(target, cc.scheme)}/monitoring/control/{verb}"
        try:
            async with _client(timeout or cc.timeout_s, self._transport) as c:
                r = await request_capped(c, "POST", url, max_bytes=ANSWER_MAX_BYTES, json=body,
                                         headers={"Authorization": f"Bearer {token}",
                                                  "User-Agent": USER_AGENT})
        except httpx.HTTPError as e:
            raise ActuatorError(f"control.{verb} on {target.instance}: {type(e).__name__}: "
                                f"{redact_text(e)}") from None
        if r.status_code != 200:
            raise ActuatorError(f"control.{verb} on {target.instance}: vLLM answered HTTP "
                                f"{r.status_code}: {_error_message(r)}")
        try:
            return r.json()
        except ValueError:
            raise ActuatorError(f"control.{verb} on {target.instance}: answer is not JSON") from None

    # --- restarts ----------------------------------------------------------------------------------------

    def backend(self, target: Target) -> RestartBackend:
        """The target's restart backend (built once from ``actuator.supervisors``)."""
        if target.instance in self._backends:
            return self._backends[target.instance]
        sc: SupervisorConfig | None = self.config.supervisors.get(target.instance)
        if sc is None:
            raise ActuatorError(f"no supervisor configured for {target.instance} "
                                "(actuator.supervisors): restarts are not possible")
        base = target_base_url(target, self.config.control.scheme)
        b: RestartBackend
        if sc.kind == "http":
            token = _secret(sc.token_file, "supervisor token file") if sc.token_file else None
            b = HttpSupervisorBackend(sc.url or "", token, timeout_s=sc.timeout_s)
        elif sc.kind == "compose":
            b = ComposeBackend(sc.project_dir or ".", sc.service or "", files=sc.files,
                               override_file=sc.override_file, health_url=sc.health_url or f"{base}/health",
                               control_url=base, control_token_file=self.config.control.token_file,
                               timeout_s=sc.timeout_s)
        else:
            b = KubernetesBackend(sc.namespace or "", sc.deployment or "", container=sc.container,
                                  context=sc.context, timeout_s=sc.timeout_s)
        self._backends[target.instance] = b
        return b

    async def _supervisor(self, target: Target, verb: str, body: dict[str, Any],
                          timeout: float | None) -> Mapping[str, Any]:
        b = self.backend(target)
        try:
            if verb == "status":
                return await asyncio.to_thread(b.status)
            if verb == "restart":
                try:
                    req = RestartRequest.model_validate(body)
                except ValidationError as e:
                    raise ActuatorError(f"bad restart request: {e.errors(include_url=False)[:3]}") from None
                if isinstance(b, HttpSupervisorBackend):
                    return await asyncio.to_thread(b.restart, req, timeout)
                return await asyncio.to_thread(b.restart, req)
        except RestartError as e:
            extra = f" (rolled back: {e.data.get('rolled_back')})" if "rolled_back" in e.data else ""
            raise ActuatorError(f"supervisor.{verb} on {target.instance}: {e}{extra}") from None
        raise ActuatorError(f"unknown supervisor verb {verb!r}: status or restart")

    # --- external hooks -------------------------------------------------------------------------------------

    async def _hook(self, target: Target, name: str, body: dict[str, Any],
                    timeout: float | None) -> Mapping[str, Any]:
        hc: HookConfig | None = self.config.hooks.get(name)
        if hc is None:
            raise ActuatorError(f"no hook {name!r} configured (actuator.hooks)")
        variables = {"instance": target.instance, "target_url": target_base_url(target),
                     "hook": name, **body}
        url = render_template(hc.url, variables, url=True)
        headers = {"User-Agent": USER_AGENT, **{h: str(render_template(v, variables))
                                                 for h, v in hc.headers.items()}}
        for h, path in hc.header_files.items():
            headers[h] = _secret(path, f"hook {name} header file")
        if hc.token_file is not None:
            headers["Authorization"] = f"Bearer {_secret(hc.token_file, f'hook {name} token file')}"
        payload = None if hc.body is None or hc.method in ("GET", "DELETE") else render_template(hc.body, variables)
        try:
            async with _client(timeout or hc.timeout_s, self._transport) as c:
                r = await request_capped(c, hc.method, url, max_bytes=ANSWER_MAX_BYTES, json=payload,
                                         headers=headers)
        except httpx.HTTPError as e:
            raise ActuatorError(f"hook {name}: {type(e).__name__}: {redact_text(e)}") from None
        if not 200 <= r.status_code < 300:
            raise ActuatorError(f"hook {name} answered HTTP {r.status_code}: {_error_message(r)}")
        try:
            answer: Any = r.json()
        except ValueError:
            answer = redact_text(r.text[:2000])
        return {"status_code": r.status_code, "body": answer}


# --- metrics ----------------------------------------------------------------------------------------------

_WANTED = (
    "up", "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm_otel_engine_stalled", "vllm:num_preemptions_total", "vllm:admission_rejections_total",
    "vllm:engine_sleep_state", "vllm_otel_lifecycle_state", "vllm_otel_gpu_collector_up",
    "vllm_otel_gpu_memory_used_bytes", "vllm_otel_gpu_memory_total_bytes",
    "vllm_otel_host_memory_available_bytes", "vllm_otel_host_memory_total_bytes",
    "vllm:cache_config_info", "vllm_otel_process_count", "vllm_otel_process_resident_memory_bytes",
)


def _num(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "", "None") else None
    except ValueError:
        return None


def reduce_samples(samples: Iterable[tuple[str, Mapping[str, str], float]]) -> dict[str, float]:
    """One number per name (see :mod:`vllm_otel.mitigate.strategies.common`) from raw samples."""
    by: dict[str, list[tuple[Mapping[str, str], float]]] = defaultdict(list)
    for name, labels, value in samples:
        by[name].append((labels, float(value)))
    out: dict[str, float] = {}

    def total(name: str, key: str, keep: Any = lambda lb: True) -> None:
        vals = [v for lb, v in by.get(name, ()) if keep(lb)]
        if vals:
            out[key] = float(sum(vals))

    def peak(name: str, key: str, keep: Any = lambda lb: True) -> None:
        vals = [v for lb, v in by.get(name, ()) if keep(lb)]
        if vals:
            out[key] = float(max(vals))

    peak("up", k.UP)
    total("vllm:num_requests_running", k.RUNNING)
    total("vllm:num_requests_waiting", k.WAITING)
    peak("vllm:kv_cache_usage_perc", k.KV_USAGE)
    peak("vllm_otel_engine_stalled", k.STALLED)
    total("vllm:num_preemptions_total", k.PREEMPTIONS)
    total("vllm:admission_rejections_total", k.REJECTIONS)
    peak("vllm_otel_gpu_collector_up", k.GPU_COLLECTOR_UP)
    peak("vllm_otel_lifecycle_state", k.PAUSED, lambda lb: lb.get("state") == "paused")
    total("vllm_otel_process_count", k.WORKERS, lambda lb: lb.get("role") == "worker")
    total("vllm_otel_process_resident_memory_bytes", k.WORKERS_RESIDENT,
          lambda lb: lb.get("role") in ("worker", "engine_core"))
    if "vllm:engine_sleep_state" in by:
        asleep = [v for lb, v in by["vllm:engine_sleep_state"] if lb.get("sleep_state") != "awake"]
        out[k.SLEEPING] = 1.0 if any(v > 0 for v in asleep) else 0.0
    totals = {lb.get("gpu"): v for lb, v in by.get("vllm_otel_gpu_memory_total_bytes", ())}
    if totals:
        out[k.GPU_COUNT] = float(len(totals))
        used = {lb.get("gpu"): v for lb, v in by.get("vllm_otel_gpu_memory_used_bytes", ())}
        fr = [used[g] / t for g, t in totals.items() if g in used and t > 0]
        if fr:
            out[k.GPU_MEM_FRACTION] = max(fr)
    elif k.GPU_COLLECTOR_UP in out:
        out[k.GPU_COUNT] = 0.0
    avail = [v for _, v in by.get("vllm_otel_host_memory_available_bytes", ())]
    tot = [v for _, v in by.get("vllm_otel_host_memory_total_bytes", ())]
    if avail and tot and sum(tot) > 0:
        out[k.HOST_MEM_AVAILABLE] = sum(avail) / sum(tot)
    for lb, _ in by.get("vllm:cache_config_info", ())[:1]:
        for label, key in (("gpu_memory_utilization", k.GPU_MEM_UTIL), ("kv_cache_size_tokens", k.KV_SIZE_TOKENS)):
            v = _num(lb.get(label))
            if v is not None:
                out[key] = v
    return out


def _promql_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


class PrometheusMetricsSource:
    """The target's series from Prometheus, with one instant query."""

    def __init__(self, config: MetricsConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        if not config.prometheus_url:
            raise ValueError("metrics.prometheus_url is not set")
        self.config = config
        self.url = config.prometheus_url.rstrip("/") + "/api/v1/query"
        self._transport = transport
        self._clients = _LoopClients(config.timeout_s, transport)

    def warm_up(self) -> None:
        warm_up_http()

    def query(self, target: Target) -> str:
        names = "|".join(re.escape(n).replace("\\:", ":") for n in _WANTED)
        sel = [f'__name__=~"{names}"', f"{self.config.instance_label}={_promql_string(target.instance)}"]
        if self.config.selector.strip():
            sel.append(self.config.selector.strip().strip(","))
        return "{" + ",".join(sel) + "}"

    async def snapshot(self, target: Target) -> MetricsSnapshot | None:
        headers = {"User-Agent": USER_AGENT}
        if self.config.token_file is not None:
            headers["Authorization"] = f"Bearer {_secret(self.config.token_file, 'Prometheus token file')}"
        at = time.time()
        r = await request_capped(self._clients.get(), "GET", self.url, max_bytes=QUERY_MAX_BYTES,
                                 params={"query": self.query(target)}, headers=headers)
        r.raise_for_status()
        body = r.json()
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus: {body.get('error', body)}")
        result = body["data"]["result"]
        if not result:
            return None  # Prometheus knows nothing about this target: unknown, not "down"
        samples = [(s["metric"].get("__name__", ""), s["metric"], float(s["value"][1])) for s in result]
        return MetricsSnapshot(values=reduce_samples(samples), at=at)


class ScrapeMetricsSource:
    """No Prometheus: read the target's own ``/metrics``."""

    def __init__(self, config: MetricsConfig | None = None, *, scheme: str = "http",
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config or MetricsConfig()
        self.scheme = scheme
        self._transport = transport
        self._clients = _LoopClients(self.config.timeout_s, transport)

    def warm_up(self) -> None:
        warm_up_http(parser=True)

    async def snapshot(self, target: Target) -> MetricsSnapshot | None:
        from prometheus_client.parser import text_string_to_metric_families

        at = time.time()
        try:
            r = await request_capped(self._clients.get(), "GET",
                                     f"{target_base_url(target, self.scheme)}/metrics",
                                     max_bytes=METRICS_MAX_BYTES, headers={"User-Agent": USER_AGENT})
        except httpx.HTTPError:
            return MetricsSnapshot(values={k.UP: 0.0}, at=at)
        if r.status_code != 200:
            return MetricsSnapshot(values={k.UP: 0.0}, at=at)
        wanted = set(_WANTED)
        # Only the lines we use: vLLM's /metrics is mostly histogram buckets.
        lines = [ln for ln in r.text.splitlines()
                 if ln.split("{", 1)[0].split(" ", 1)[0] in wanted
                 or (ln.startswith("# TYPE ") and ln.split(" ")[2] in _FAMILIES)]
        samples = [(s.name, s.labels, s.value)
                   for fam in text_string_to_metric_families("\n".join(lines) + "\n") for s in fam.samples
                   if s.name in wanted]
        return MetricsSnapshot(values={k.UP: 1.0, **reduce_samples(samples)}, at=at)


# TYPE lines keep counters' sample names intact (``..._total``) when the parser reads them.
_FAMILIES = frozenset(n[: -len("_total")] if n.endswith("_total") else n for n in _WANTED)


def build_actuator(policy: Policy) -> HttpActuator:
    """The receiver's actuator, from the policy's ``actuator`` section."""
    return HttpActuator(policy.config.actuator)


def build_metrics_source(policy: Policy) -> PrometheusMetricsSource | ScrapeMetricsSource:
    """Prometheus when ``metrics.prometheus_url`` is set, else each target's own /metrics."""
    cfg = policy.config.metrics
    if cfg.prometheus_url:
        return PrometheusMetricsSource(cfg)
    return ScrapeMetricsSource(cfg, scheme=policy.config.actuator.control.scheme)
