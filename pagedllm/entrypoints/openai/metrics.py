"""Prometheus metrics named after vLLM's, under the ``pagedllm:`` prefix.

Gauges and engine counters (running / waiting requests, KV-cache usage, prefix-cache queries
and hits, prompt / generation tokens, preemptions) come from ``engine.get_stats()``, refreshed
on every scrape; each metric reads its ``EngineStats`` field by attribute, so a renamed field
fails loudly instead of reading 0. With data-parallel replicas (``serve -dp N``) the engine
metrics come once per replica with an ``engine`` label ("0".."N-1", vLLM's label), alongside
``pagedllm:engine_up`` (1 while that replica's process runs) and
``pagedllm:router_requests`` (requests the router sent to it); with one engine they keep the
``model_name`` label alone. Latency histograms and the per-finish-reason success
counter are observed by the serving layer as requests finish. Each app owns its registry, so
several servers can live in one process (tests).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pagedllm.engine.stats import EngineStats

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
    0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip

_Read = Callable[[EngineStats], float]

# (metric name, help, its value in the engine's stats)
_GAUGES: tuple[tuple[str, str, _Read], ...] = (
    (
        "pagedllm:num_requests_running",
        "Requests in the running batch.",
        lambda s: s.num_running,
    ),
    (
        "pagedllm:num_requests_waiting",
        "Requests waiting to be scheduled.",
        lambda s: s.num_waiting,
    ),
    (
        "pagedllm:kv_cache_usage_perc",
        "KV-cache usage; 1 = 100 percent.",
        lambda s: s.kv_cache_usage,
    ),
)
_COUNTERS: tuple[tuple[str, str, _Read], ...] = (
    (
        "pagedllm:prefix_cache_queries",
        "Prompt tokens looked up.",
        lambda s: s.prefix_cache_queries,
    ),
    (
        "pagedllm:prefix_cache_hits",
        "Prompt tokens found in the cache.",
        lambda s: s.prefix_cache_hits,
    ),
    (
        "pagedllm:prompt_tokens",
        "Prefill tokens processed.",
        lambda s: s.prompt_tokens_total,
    ),
    (
        "pagedllm:generation_tokens",
        "Generation tokens produced.",
        lambda s: s.generation_tokens_total,
    ),
    (
        "pagedllm:num_preemptions",
        "Requests preempted (recompute).",
        lambda s: s.num_preemptions,
    ),
)

# Before the first stats arrive: every engine figure 0.
_NO_STATS = EngineStats(**dict.fromkeys((f.name for f in dataclasses.fields(EngineStats)), 0))


class _EngineStatsCollector(Collector):
    """Turns the last ``EngineStats`` seen into the gauges and counters above, at each scrape.
    Before any were seen (an engine that died before the first scrape), the gauges read 0 and
    the token counters the serving layer's own counts."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        if m.replica_stats is not None:
            yield from self._per_replica(m.replica_stats, m.routed)
            return
        stats = m.engine_stats
        if stats is None:
            stats = dataclasses.replace(
                _NO_STATS,
                prompt_tokens_total=m.served_prompt_tokens,
                generation_tokens_total=m.served_generation_tokens,
            )
        labels = [m.model_name]
        for name, doc, read in _GAUGES:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(labels, float(read(stats)))
            yield g
        for name, doc, read in _COUNTERS:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(labels, float(read(stats)))
            yield c

    def _per_replica(
        self, replicas: Sequence[tuple[EngineStats, bool]], routed: Mapping[int, int]
    ) -> Iterator[Metric]:
        labels = ["model_name", "engine"]
        rows = [([self.metrics.model_name, str(i)], st, up) for i, (st, up) in enumerate(replicas)]
        up_g = GaugeMetricFamily(
            "pagedllm:engine_up", "1 while the engine process runs.", labels=labels
        )
        routed_c = CounterMetricFamily(
            "pagedllm:router_requests", "Requests the router sent to the engine.", labels=labels
        )
        for i, (lab, _, up) in enumerate(rows):
            up_g.add_metric(lab, 1.0 if up else 0.0)
            routed_c.add_metric(lab, float(routed.get(i, 0)))
        yield up_g
        yield routed_c
        for name, doc, read in _GAUGES:
            g = GaugeMetricFamily(name, doc, labels=labels)
            for lab, st, up in rows:
                g.add_metric(lab, float(read(st)) if up else 0.0)
            yield g
        for name, doc, read in _COUNTERS:
            c = CounterMetricFamily(name, doc, labels=labels)
            for lab, st, _ in rows:
                c.add_metric(lab, float(read(st)))
            yield c


class ServerMetrics:
    """All metrics of one server: a private registry plus the last engine stats seen."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self.engine_stats: EngineStats | None = None
        # Data-parallel replicas: each one's stats and liveness, and requests routed to each.
        self.replica_stats: list[tuple[EngineStats, bool]] | None = None
        self.routed: Mapping[int, int] = {}
        # Counted by the serving layer as requests finish: /metrics falls back on them until
        # the engine's own stats have been seen.
        self.served_prompt_tokens = 0
        self.served_generation_tokens = 0
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

    def update_engine_stats(self, stats: EngineStats) -> None:
        self.engine_stats = stats

    def update_replica_stats(
        self, replicas: list[tuple[EngineStats, bool]], routed: Mapping[int, int]
    ) -> None:
        """Several replicas: the engine metrics are then reported per replica."""
        self.replica_stats = list(replicas)
        self.routed = dict(routed)

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
        self.served_prompt_tokens += prompt_tokens
        self.served_generation_tokens += generation_tokens
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
