"""Prometheus metrics named after vLLM's, under the ``pagedllm:`` prefix.

Gauges and engine counters (running / waiting requests, KV-cache usage, prefix-cache queries
and hits, prompt / generation tokens, preemptions) come from ``engine.get_stats()``, refreshed
on every scrape. Latency histograms and the per-finish-reason success counter are observed by
the serving layer as requests finish. Each app owns its registry, so several servers can live
in one process (tests).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
    0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip

# (metric name, engine stats key, help)
_GAUGES = (
    ("pagedllm:num_requests_running", "num_running", "Requests in the running batch."),
    ("pagedllm:num_requests_waiting", "num_waiting", "Requests waiting to be scheduled."),
    ("pagedllm:kv_cache_usage_perc", "kv_cache_usage", "KV-cache usage; 1 = 100 percent."),
)
_COUNTERS = (
    ("pagedllm:prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up."),
    ("pagedllm:prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the cache."),
    ("pagedllm:prompt_tokens", "prompt_tokens_total", "Prefill tokens processed."),
    ("pagedllm:generation_tokens", "generation_tokens_total", "Generation tokens produced."),
    ("pagedllm:num_preemptions", "num_preemptions", "Requests preempted (recompute)."),
)


class _EngineStatsCollector(Collector):
    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        stats = m.engine_stats
        labels = [m.model_name]
        for name, key, doc in _GAUGES:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(labels, float(stats.get(key, 0.0)))
            yield g
        for name, key, doc in _COUNTERS:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            value = stats.get(key)
            if value is None:  # engine without this stat: the serving layer's own count
                value = m.fallback_counts.get(key, 0.0)
            c.add_metric(labels, float(value))
            yield c


class ServerMetrics:
    """All metrics of one server: a private registry plus the last engine stats seen."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self.engine_stats: dict[str, float] = {}
        self.fallback_counts: dict[str, float] = {
            "prompt_tokens_total": 0.0,
            "generation_tokens_total": 0.0,
        }
        lab = ["model_name"]
        reg = self.registry
        self.request_success = Counter(
            "pagedllm:request_success",
            "Finished requests (one count per choice), by finish reason.",
            ["model_name", "finished_reason"],
            registry=reg,
        )
        self.ttft = Histogram(
            "pagedllm:time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            lab,
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.itl = Histogram(
            "pagedllm:inter_token_latency_seconds",
            "Time between consecutive generated tokens (streamed requests).",
            lab,
            buckets=_ITL_BUCKETS,
            registry=reg,
        )
        self.e2e = Histogram(
            "pagedllm:e2e_request_latency_seconds",
            "Time from arrival to the last token.",
            lab,
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.queue_time = Histogram(
            "pagedllm:request_queue_time_seconds",
            "Time from arrival until the engine first scheduled the request.",
            lab,
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        reg.register(_EngineStatsCollector(self))

    def update_engine_stats(self, stats: dict[str, float]) -> None:
        self.engine_stats = dict(stats)

    def observe_finished(
        self,
        *,
        finish_reasons: list[str],
        prompt_tokens: int,
        generation_tokens: int,
        ttft: float | None,
        e2e: float,
        queue_time: float | None,
        itls: list[float] | None = None,
    ) -> None:
        name = self.model_name
        for reason in finish_reasons:
            self.request_success.labels(name, reason).inc()
        self.fallback_counts["prompt_tokens_total"] += prompt_tokens
        self.fallback_counts["generation_tokens_total"] += generation_tokens
        if ttft is not None:
            self.ttft.labels(name).observe(max(ttft, 0.0))
        if queue_time is not None:
            self.queue_time.labels(name).observe(max(queue_time, 0.0))
        self.e2e.labels(name).observe(max(e2e, 0.0))
        if itls:
            h = self.itl.labels(name)
            for v in itls:
                h.observe(max(v, 0.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
