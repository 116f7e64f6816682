"""Prometheus metrics of the gateway (one registry per app, so tests can run several)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from serving.gateway.routes import RouteTable

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class RouteMetrics:
    """Label-bound metric children of one model version (looked up once, not per request)."""

    def __init__(self, metrics: GatewayMetrics, model: str, version: str) -> None:
        self._metrics = metrics
        self._labels = (model, version)
        self.latency = metrics.latency.labels(model, version)
        self.batch_requests = metrics.batch_requests.labels(model, version)
        self.batch_rows = metrics.batch_rows.labels(model, version)
        self._by_code: dict[int, Counter] = {}
        self._calls: dict[str, Counter] = {}
        self._errors: dict[str, Counter] = {}

    def request(self, status: int, seconds: float, gateway_error: bool) -> None:
        """Count one answered scoring request."""
        counter = self._by_code.get(status)
        if counter is None:
            counter = self._metrics.requests.labels(*self._labels, str(status))
            self._by_code[status] = counter
        counter.inc()
        self.latency.observe(seconds)
        if status >= 400:
            self.error("gateway" if gateway_error else "replica")

    def error(self, source: str) -> None:
        """Count one non-2xx answer, by who produced it."""
        counter = self._errors.get(source)
        if counter is None:
            counter = self._metrics.errors.labels(*self._labels, source)
            self._errors[source] = counter
        counter.inc()

    def backend_call(self, kind: str) -> None:
        """Count one call to a replica ('single', 'batch' or 'fallback')."""
        counter = self._calls.get(kind)
        if counter is None:
            counter = self._metrics.backend_calls.labels(*self._labels, kind)
            self._calls[kind] = counter
        counter.inc()

    def batch(self, requests: int, rows: int) -> None:
        """Record the size of one merged call."""
        self.batch_requests.observe(requests)
        self.batch_rows.observe(rows)


class GatewayMetrics:
    """All gateway metrics in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "flowline_gateway_requests",
            "Scoring requests answered, by model, version and HTTP status.",
            ["model", "version", "code"],
            registry=r,
        )
        self.errors = Counter(
            "flowline_gateway_errors",
            "Non-2xx scoring answers, by model, version and source (replica or gateway).",
            ["model", "version", "source"],
            registry=r,
        )
        self.latency = Histogram(
            "flowline_gateway_request_duration_seconds",
            "Scoring latency seen by the gateway, body read to answer.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.backend_calls = Counter(
            "flowline_gateway_backend_calls",
            "Calls to replicas: single (one request as is), batch (merged), fallback "
            "(a request re-sent alone after its merged call failed).",
            ["model", "version", "kind"],
            registry=r,
        )
        self.batch_requests = Histogram(
            "flowline_gateway_batch_requests",
            "Client requests per merged backend call.",
            ["model", "version"],
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "flowline_gateway_batch_rows",
            "Rows per merged backend call.",
            ["model", "version"],
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "flowline_gateway_rejected",
            "Requests refused before routing (unauthorized, body_too_large, overloaded, "
            "not_deployed).",
            ["reason"],
            registry=r,
        )
        self.inflight = Gauge(
            "flowline_gateway_inflight_requests",
            "Scoring requests in the gateway now.",
            registry=r,
        )
        self.capture_dropped = Counter(
            "flowline_gateway_capture_dropped",
            "Scored requests not handed to the capture hook (queue full or hook error).",
            registry=r,
        )
        self.rate_limited = Counter(
            "flowline_gateway_rate_limited",
            "Scoring requests refused with 429: the caller's rate limit for the model was spent.",
            ["model"],
            registry=r,
        )
        self.cache_lookups = Counter(
            "flowline_gateway_cache_lookups",
            "Response cache lookups of models with a cache, by result (hit or miss).",
            ["model", "result"],
            registry=r,
        )
        self.store_errors = Counter(
            "flowline_gateway_store_errors",
            "Failed calls to the shared store (Redis): the rate limit failed open (limit) "
            "or the response cache was skipped (cache).",
            ["store"],
            registry=r,
        )
        # The shadow (serving/gateway/shadow.py); agreement gauges come from its collector.
        self.shadow_requests = Counter(
            "flowline_gateway_shadow_requests",
            "Requests mirrored to a shadow version, by outcome: ok (compared), error, "
            "timeout, mismatch (answer not row-aligned), dropped (too many in flight).",
            ["model", "version", "outcome"],
            registry=r,
        )
        self.shadow_rows = Counter(
            "flowline_gateway_shadow_rows",
            "Prediction rows compared with production: equal, different (labels), numeric.",
            ["model", "version", "result"],
            registry=r,
        )
        self.shadow_abs_diff = Counter(
            "flowline_gateway_shadow_abs_diff",
            "Sum of absolute differences of the shadow's numeric predictions from production's.",
            ["model", "version"],
            registry=r,
        )
        self.shadow_seconds = Histogram(
            "flowline_gateway_shadow_seconds",
            "Latency of the shadow's mirrored calls.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._routes: dict[tuple[str, str], RouteMetrics] = {}

    def for_route(self, model: str, version: str) -> RouteMetrics:
        """Cached label-bound children for one model version."""
        key = (model, version)
        found = self._routes.get(key)
        if found is None:
            found = self._routes[key] = RouteMetrics(self, model, version)
        return found

    def watch(self, table: RouteTable) -> None:
        """Export deployment and replica health gauges read from `table` at scrape time."""
        self.registry.register(_TableCollector(table))


class _TableCollector(Collector):
    def __init__(self, table: RouteTable) -> None:
        self._table = table

    def collect(self) -> Iterable[Metric]:
        deployed = GaugeMetricFamily(
            "flowline_gateway_deployment_info",
            "1 for each active model version.",
            labels=["model", "version"],
        )
        up = GaugeMetricFamily(
            "flowline_gateway_replica_up",
            "1 when the replica is considered healthy.",
            labels=["model", "version", "replica"],
        )
        for route in self._table.routes():
            d = route.deployment
            deployed.add_metric([d.model, d.version], 1)
            for url in d.replicas:
                up.add_metric([d.model, d.version, url], int(self._table.replica(url).healthy))
        variants = GaugeMetricFamily(
            "flowline_gateway_variant_info",
            "The share of each canary (weight, percent) or shadow (sample, 0-1) version.",
            labels=["model", "version", "role"],
        )
        for route in self._table.variants():
            d, variant = route.deployment, route.variant
            if variant is not None:
                variants.add_metric([d.model, d.version, variant.role], variant.share)
            for url in d.replicas:
                up.add_metric([d.model, d.version, url], int(self._table.replica(url).healthy))
        yield deployed
        yield up
        yield variants
