"""Metrics and report of ``pagedllm bench serve`` (field names as vLLM's ``bench serve``).

Per successful request: TTFT, TPOT = (e2e latency - TTFT) / (output tokens - 1) (requests of
one output token have none), every inter-token gap (ITL) and the end-to-end latency (E2EL).
Output tokens come from the usage chunk, else from tokenizing the generated text. Each latency
gets mean / median / std / p99 and the ``--metric-percentiles``, in milliseconds
(``mean_ttft_ms``, ``p90_itl_ms``, ...). Throughputs divide by the benchmark's duration
(first request sent to last response finished); input tokens are the server's
``usage.prompt_tokens`` where reported, else the workload's prompt lengths.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pagedllm.bench import report
from pagedllm.bench.serve_client import ServeRequest, ServeResult

METRICS: dict[str, tuple[str, str]] = {
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
}
_WIDTH = 50


def peak_concurrency(intervals: Sequence[tuple[float, float]]) -> int:
    """The most ``(start, end)`` intervals open at one instant."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    peak = cur = 0
    for _, step in events:  # at equal times ends (-1) sort before starts
        cur += step
        peak = max(peak, cur)
    return peak


def shown_percentiles(percentiles: Sequence[float]) -> list[float]:
    """The percentile rows of the tables: p99 always, plus the requested ones except 50."""
    return sorted({99.0, *(float(p) for p in percentiles)} - {50.0})


def pct_key(p: float) -> str:
    return f"p{p:g}".replace(".", "_")


def compute_metrics(
    requests: Sequence[ServeRequest],
    results: Sequence[ServeResult],
    duration: float,
    tokenizer: Any,
    percentiles: Sequence[float],
    t0: float,
) -> dict[str, Any]:
    """Aggregate results (``t0``: the benchmark's start on ``perf_counter``)."""
    in_lens: list[int] = []
    out_lens: list[int] = []
    samples: dict[str, list[float]] = {m: [] for m in METRICS}
    for req, res in zip(requests, results, strict=True):
        if not res.success:
            in_lens.append(0)
            out_lens.append(0)
            continue
        n_out = res.usage_output_tokens
        if n_out is None:
            n_out = len(tokenizer(res.generated_text, add_special_tokens=False).input_ids)
        in_lens.append(res.usage_prompt_tokens or req.prompt_len)
        out_lens.append(n_out)
        samples["ttft"].append(res.ttft)
        samples["e2el"].append(res.latency)
        samples["itl"].extend(res.itl)
        if n_out > 1:
            samples["tpot"].append((res.latency - res.ttft) / (n_out - 1))
    completed = sum(r.success for r in results)
    out: dict[str, Any] = {
        "duration": duration,
        "completed": completed,
        "failed": len(results) - completed,
        "total_input_tokens": sum(in_lens),
        "total_output_tokens": sum(out_lens),
        "request_throughput": completed / duration,
        "output_throughput": sum(out_lens) / duration,
        "total_token_throughput": (sum(in_lens) + sum(out_lens)) / duration,
        "peak_concurrent_requests": peak_concurrency(
            [(r.start, r.start + r.latency) for r in results if r.success]
        ),
    }
    for name, values in samples.items():
        ms = np.asarray(values, dtype=np.float64) * 1000.0
        stats = {"mean": np.mean, "median": np.median, "std": np.std}
        for stat, fn in stats.items():
            out[f"{stat}_{name}_ms"] = float(fn(ms)) if ms.size else None
        for p in shown_percentiles(percentiles):
            out[f"{pct_key(p)}_{name}_ms"] = float(np.percentile(ms, p)) if ms.size else None
    errors = [r.error for r in results if not r.success]
    out.update(
        input_lens=in_lens,
        output_lens=out_lens,
        ttfts=[r.ttft if r.success else None for r in results],
        e2els=[r.latency if r.success else None for r in results],
        itls=[r.itl for r in results],
        start_times=[r.start - t0 for r in results],
        errors=errors,
        error_counts=dict(Counter(e.split(":", 1)[0] for e in errors).most_common()),
        generated_texts=[r.generated_text for r in results],
    )
    return out


def _line(label: str, value: Any) -> str:
    return f"{label:<40} {report.fmt(value)}"


def text_table(res: dict[str, Any], selected: Sequence[str]) -> str:
    """The console block, laid out like vLLM's ``Serving Benchmark Result``."""
    rate = res["request_rate"]
    lines = [
        f"{' Serving Benchmark Result ':=^{_WIDTH}}",
        _line("Successful requests:", res["completed"]),
        _line("Failed requests:", res["failed"]),
        _line("Request rate configured (RPS):", rate if rate == "inf" else float(rate)),
        _line("Benchmark duration (s):", res["duration"]),
        _line("Total input tokens:", res["total_input_tokens"]),
        _line("Total generated tokens:", res["total_output_tokens"]),
        _line("Request throughput (req/s):", res["request_throughput"]),
        _line("Output token throughput (tok/s):", res["output_throughput"]),
        _line("Peak concurrent requests:", res["peak_concurrent_requests"]),
        _line("Total token throughput (tok/s):", res["total_token_throughput"]),
    ]
    for name in selected:
        short, title = METRICS[name]
        lines.append(f"{' ' + title + ' ':-^{_WIDTH}}")
        lines.append(_line(f"Mean {short} (ms):", res[f"mean_{name}_ms"]))
        lines.append(_line(f"Median {short} (ms):", res[f"median_{name}_ms"]))
        for p in shown_percentiles(res["metric_percentiles"]):
            lines.append(_line(f"P{p:g} {short} (ms):", res[f"{pct_key(p)}_{name}_ms"]))
    lines.append("=" * _WIDTH)
    if res["max_concurrency"]:
        lines.insert(3, _line("Maximum request concurrency:", res["max_concurrency"]))
    return "\n".join(lines)


def markdown(res: dict[str, Any]) -> str:
    """The Markdown report: settings, the summary, the latency table and any errors."""
    git = res["env"]["git"]
    commit = git["commit"][:12] + (" (dirty)" if git.get("dirty") else "")
    w = res["workload"]
    head = [
        "## pagedllm bench serve",
        "",
        f"- date: {res['date']}, client commit {commit}",
        f"- server: {res['base_url']}{res['endpoint']}, version {res['server_version'] or '?'}",
        f"- model: {res['model_id']}, tokenizer: {res['tokenizer_id']}",
        f"- workload: {res['dataset_name']}, {w['num_requests']} requests, input "
        f"{w['input_len_min']}-{w['input_len_max']} (mean {w['input_len_mean']}), output "
        f"{w['output_len_min']}-{w['output_len_max']} (mean {w['output_len_mean']})",
        f"- arrivals: request rate {res['request_rate']}, burstiness {res['burstiness']}, "
        f"max concurrency {res['max_concurrency'] or 'unlimited'}, seed {res['seed']}",
        "",
    ]
    rows = [
        ["completed / failed", f"{res['completed']} / {res['failed']}"],
        ["duration (s)", res["duration"]],
        ["request throughput (req/s)", res["request_throughput"]],
        ["output token throughput (tok/s)", res["output_throughput"]],
        ["total token throughput (tok/s)", res["total_token_throughput"]],
        ["total input / output tokens", f"{res['total_input_tokens']:,} / "
         f"{res['total_output_tokens']:,}"],
        ["peak concurrent requests", res["peak_concurrent_requests"]],
    ]  # fmt: skip
    pcts = shown_percentiles(res["metric_percentiles"])
    lat_head = ["latency (ms)", "mean", "median", *(f"p{p:g}" for p in pcts), "std"]
    lat_rows = [
        [short, *(res[f"{k}_{m}_ms"] for k in ("mean", "median", *map(pct_key, pcts), "std"))]
        for m, (short, _) in METRICS.items()
    ]
    text = "\n".join(head) + "\n" + report.markdown_table(["metric", "value"], rows) + "\n"
    text += report.markdown_table(lat_head, lat_rows)
    if res["error_counts"]:
        text += "\nerrors: " + ", ".join(f"{k} x{v}" for k, v in res["error_counts"].items())
        text += f"\n\nfirst error: `{res['errors'][0][:300]}`\n"
    return text


def plot(path: Path, res: dict[str, Any], selected: Sequence[str]) -> None:
    """One CDF panel per selected latency metric, then requests in flight over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(selected) or list(METRICS)
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4.2 * (len(names) + 1), 3.8))
    ok = [i for i, t in enumerate(res["ttfts"]) if t is not None]
    series: dict[str, list[float]] = {
        "ttft": [res["ttfts"][i] for i in ok],
        "e2el": [res["e2els"][i] for i in ok],
        "itl": [g for i in ok for g in res["itls"][i]],
        "tpot": [
            (res["e2els"][i] - res["ttfts"][i]) / (res["output_lens"][i] - 1)
            for i in ok
            if res["output_lens"][i] > 1
        ],
    }
    for ax, name in zip(axes[:-1], names, strict=True):
        ms = np.sort(np.asarray(series[name]) * 1000.0)
        if ms.size:
            ax.step(ms, np.arange(1, ms.size + 1) / ms.size, where="post")
            for q, style in ((50, "--"), (99, ":")):
                v = float(np.percentile(ms, q))
                ax.axvline(v, color="gray", ls=style, lw=1, label=f"p{q} {v:,.1f} ms")
            ax.legend(fontsize=8, loc="lower right")
        ax.set_title(f"{METRICS[name][0]} CDF", fontsize=10)
        ax.set_xlabel("ms")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
    ax = axes[-1]
    events = sorted(
        [(res["start_times"][i], 1) for i in ok]
        + [(res["start_times"][i] + res["e2els"][i], -1) for i in ok]
    )
    if events:
        ax.step([t for t, _ in events], np.cumsum([s for _, s in events]), where="post")
    ax.set_title("requests in flight", fontsize=10)
    ax.set_xlabel("s since start")
    ax.grid(True, alpha=0.3)
    rate = res["request_rate"]
    fig.suptitle(
        f"{Path(res['model_id']).name} @ {rate} req/s, {res['completed']} requests "
        f"({res['failed']} failed), {res['output_throughput']:,.0f} out tok/s",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
