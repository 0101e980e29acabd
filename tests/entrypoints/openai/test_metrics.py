"""``ServerMetrics`` without a server: each engine metric (vLLM's names, ``pagedllm:`` prefix)
reads its ``EngineStats`` field, and before the engine's first stats the token counters fall
back on the serving layer's own counts."""

from __future__ import annotations

import dataclasses

from pagedllm.engine.stats import EngineStats
from pagedllm.entrypoints.openai.metrics import ServerMetrics

STATS = EngineStats(
    num_running=2,
    num_waiting=3,
    kv_cache_usage=0.25,
    num_kv_blocks=48,
    num_unfinished_requests=4,
    num_preemptions=5,
    prefix_cache_queries=70,
    prefix_cache_hits=16,
    requests_received_total=9,
    prompt_tokens_total=123,
    generation_tokens_total=456,
    num_steps_total=77,
    requests_finished_stop=1,
    requests_finished_length=2,
    requests_finished_abort=3,
)


def _engine_lines(m: ServerMetrics) -> dict[str, str]:
    """Sample name -> value, for the engine's gauges and counters."""
    names = (
        "pagedllm:num_requests_running",
        "pagedllm:num_requests_waiting",
        "pagedllm:kv_cache_usage_perc",
        "pagedllm:prefix_cache_queries_total",
        "pagedllm:prefix_cache_hits_total",
        "pagedllm:prompt_tokens_total",
        "pagedllm:generation_tokens_total",
        "pagedllm:num_preemptions_total",
    )
    out = {}
    for line in m.render().decode().splitlines():
        name, _, rest = line.partition("{")
        if name in names:
            assert rest.startswith('model_name="tiny"} '), line
            out[name] = rest.rpartition(" ")[2]
    assert set(out) == set(names)
    return out


def _finish_one(m: ServerMetrics) -> None:
    m.observe_finished(
        finish_reasons=["stop"],
        prompt_tokens=7,
        generation_tokens=11,
        ttft=0.1,
        e2e=0.2,
        queue_time=0.01,
    )


def test_engine_metrics_read_the_stats() -> None:
    m = ServerMetrics("tiny")
    _finish_one(m)
    m.update_engine_stats(STATS)
    assert _engine_lines(m) == {
        "pagedllm:num_requests_running": "2.0",
        "pagedllm:num_requests_waiting": "3.0",
        "pagedllm:kv_cache_usage_perc": "0.25",
        "pagedllm:prefix_cache_queries_total": "70.0",
        "pagedllm:prefix_cache_hits_total": "16.0",
        "pagedllm:prompt_tokens_total": "123.0",  # the engine's, not the serving layer's 7
        "pagedllm:generation_tokens_total": "456.0",
        "pagedllm:num_preemptions_total": "5.0",
    }
    m.update_engine_stats(dataclasses.replace(STATS, num_running=0, kv_cache_usage=0.0))
    lines = _engine_lines(m)
    assert lines["pagedllm:num_requests_running"] == lines["pagedllm:kv_cache_usage_perc"] == "0.0"


def test_before_the_engine_stats() -> None:
    m = ServerMetrics("tiny")
    _finish_one(m)
    _finish_one(m)
    assert _engine_lines(m) == {
        "pagedllm:num_requests_running": "0.0",
        "pagedllm:num_requests_waiting": "0.0",
        "pagedllm:kv_cache_usage_perc": "0.0",
        "pagedllm:prefix_cache_queries_total": "0.0",
        "pagedllm:prefix_cache_hits_total": "0.0",
        "pagedllm:prompt_tokens_total": "14.0",
        "pagedllm:generation_tokens_total": "22.0",
        "pagedllm:num_preemptions_total": "0.0",
    }
