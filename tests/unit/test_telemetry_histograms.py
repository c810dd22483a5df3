"""vllm_otel.telemetry.histograms: histograms aggregated outside the SDK reach an OTLP metric
exporter as the SDK's own would (buckets, sum, count, min, max, exemplars), in the temporality the
exporter asks for, merged into the SDK's scope."""

from __future__ import annotations

from opentelemetry.sdk.metrics import Histogram as HistogramInstrument
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader, MetricExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from vllm_otel.telemetry import CountingMetricExporter, HistogramSet

A = (("gen_ai.operation.name", "chat"), ("vllm.engine", 0))


def test_buckets_sum_count_min_max_match_the_sdk():
    values = [0.0005, 0.01, 0.02, 0.3, 0.3, 7.0, 100.0]
    bounds = (0.001, 0.01, 0.1, 1.0, 10.0)
    hs = HistogramSet()
    h = hs.histogram("lat", "s", "latency", bounds)
    reader = InMemoryMetricReader()
    sdk = MeterProvider(metric_readers=[reader]).get_meter("t").create_histogram(
        "lat", unit="s", explicit_bucket_boundaries_advisory=bounds)
    for v in values:
        h.record(v, A)
        sdk.record(v, dict(A))
    ours = hs.metrics(AggregationTemporality.CUMULATIVE)[0].data.data_points[0]
    theirs = reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics[0].data.data_points[0]
    assert list(ours.bucket_counts) == list(theirs.bucket_counts)
    assert (ours.count, ours.sum, ours.min, ours.max) == (theirs.count, theirs.sum, theirs.min, theirs.max)
    assert tuple(ours.explicit_bounds) == tuple(theirs.explicit_bounds) and ours.attributes == dict(A)


def test_delta_resets_cumulative_keeps_and_exemplars_point_at_sampled_spans():
    hs = HistogramSet()
    h = hs.histogram("lat", "s", "latency", (1.0,))
    h.record(0.5, A, exemplar=(0xABC, 0x12))
    h.record(2.0, A)
    cum = hs.metrics(AggregationTemporality.CUMULATIVE)[0].data.data_points[0]
    assert cum.count == 2 and [(e.trace_id, e.span_id, e.value) for e in cum.exemplars] == [(0xABC, 0x12, 0.5)]
    h.record(3.0, A)
    cum = hs.metrics(AggregationTemporality.CUMULATIVE)[0].data.data_points[0]
    assert cum.count == 3 and cum.exemplars == []  # exemplars are per collection interval
    delta = hs.metrics(AggregationTemporality.DELTA)
    assert delta[0].data.data_points[0].count == 3
    assert hs.metrics(AggregationTemporality.DELTA) == []  # nothing new since


class _Inner:
    def __init__(self, temporality: AggregationTemporality) -> None:
        self._preferred_temporality = {HistogramInstrument: temporality}
        self._preferred_aggregation = {}
        self.got = []

    def export(self, data, timeout_millis=0, **kw):  # noqa: ANN001, ANN201
        self.got.append(data)
        return MetricExportResult.SUCCESS


def test_the_exporter_merges_them_into_the_sdk_scope_in_the_preferred_temporality():
    hs = HistogramSet()
    hs.histogram("lat", "s", "latency", (1.0,)).record(0.5, A)
    reader = InMemoryMetricReader()
    mp = MeterProvider(metric_readers=[reader])
    mp.get_meter("vllm_otel", "1").create_counter("c").add(1)
    inner = _Inner(AggregationTemporality.DELTA)
    results: list[bool] = []
    exp = CountingMetricExporter(inner, results.append, hs, InstrumentationScope("vllm_otel", "1"))
    assert exp.export(reader.get_metrics_data()) == MetricExportResult.SUCCESS and results == [True]
    scopes = inner.got[0].resource_metrics[0].scope_metrics
    assert [s.scope.name for s in scopes] == ["vllm_otel"]
    by_name = {m.name: m for m in scopes[0].metrics}
    assert set(by_name) == {"c", "lat"}
    assert by_name["lat"].data.aggregation_temporality == AggregationTemporality.DELTA
