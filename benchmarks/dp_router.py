"""Data parallelism on a shared-prefix serving workload: cache_aware vs round_robin (issue 11).

python benchmarks/dp_router.py MODEL_DIR [--arms 2:cache_aware 2:round_robin 1:-] [options]
    [-- extra pagedllm serve flags, e.g. --load-format dummy]

Workload: ``--num-prefixes`` system prompts of ``--prefix-len`` random tokens, each shared by
``--users-per-prefix`` requests that add ``--suffix-len`` tokens of their own and generate
``--output-len`` tokens (ignore_eos); requests interleaved over the prefixes in a seeded random
order, all sent at once, at most ``--max-concurrency`` in flight. Each arm ("DP:POLICY";
POLICY "-" for one replica) starts ``pagedllm serve MODEL -dp DP --router-policy POLICY`` on
``--port``, sends one warm-up request, runs the workload with pagedllm's own streaming client
(``pagedllm.bench.serve_client``), reads the per-replica metrics, and stops the server. One
JSON line per arm: request and token throughputs, TTFT p50 / p99 (ms), the prefix-cache hit
rate and the requests each replica got; then one summary line with the speed-ups of the first
arm over the others.

The routing policy matters when a replica's KV cache cannot hold every system prompt: with
room for all of them, round robin soon has every prefix cached on both replicas too. So cap
the pool, e.g. ``-- --num-gpu-blocks-override 3072`` (48k tokens of 16-token blocks: the 16
prefixes cache_aware gives each replica, 32k tokens, plus the running requests' own blocks;
round robin would need all 32, 64k), and compare with the pool at its default size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from pagedllm.bench.serve import run_requests
from pagedllm.bench.serve_client import ServeClient, ServeRequest
from pagedllm.bench.serve_metrics import compute_metrics

_REPO = Path(__file__).resolve().parents[1]


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model")
    p.add_argument("--arms", nargs="+", default=["2:cache_aware", "2:round_robin", "1:-"])
    p.add_argument("--num-prefixes", type=int, default=32)
    p.add_argument("--prefix-len", type=int, default=2048)
    p.add_argument("--users-per-prefix", type=int, default=16)
    p.add_argument("--suffix-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-concurrency", type=int, default=128)
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=600.0)
    return p.parse_args(argv), extra


def workload(args: argparse.Namespace, vocab: int) -> list[ServeRequest]:
    rng = random.Random(args.seed)
    lo, hi = 100, vocab - 100  # clear of the special tokens

    def tokens(n: int) -> list[int]:
        return [rng.randrange(lo, hi) for _ in range(n)]

    prefixes = [tokens(args.prefix_len) for _ in range(args.num_prefixes)]
    reqs = [
        ServeRequest(
            p + tokens(args.suffix_len), args.prefix_len + args.suffix_len, args.output_len
        )
        for p in prefixes
        for _ in range(args.users_per_prefix)
    ]
    rng.shuffle(reqs)
    return reqs


def start_server(
    args: argparse.Namespace, dp: int, policy: str, extra: list[str], log: Path
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "pagedllm.entrypoints.cli",
        "serve",
        args.model,
        "--host",
        "127.0.0.1",
    ]
    cmd += ["--port", str(args.port), "--served-model-name", "bench", "-dp", str(dp)]
    cmd += ["--disable-log-requests", "--uvicorn-log-level", "warning"]
    if policy != "-":
        cmd += ["--router-policy", policy]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")])),
    )
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [*cmd, *extra], stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{args.port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(1.0)
    stop_server(proc)
    raise RuntimeError(f"the server did not start:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def scrape(port: int) -> dict[str, dict[str, float]]:
    """metric name -> {engine label (or "all") -> value} for the figures reported."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, dict[str, float]] = {}
    names = ("prefix_cache_queries_total", "prefix_cache_hits_total", "router_requests_total")
    for m in re.finditer(r"^pagedllm:(\w+)\{([^}]*)\} (\S+)$", text, re.M):
        if m[1] in names:
            engine = re.search(r'engine="(\d+)"', m[2])
            out.setdefault(m[1], {})[engine[1] if engine else "all"] = float(m[3])
    return out


async def run_arm(
    args: argparse.Namespace, reqs: list[ServeRequest], tokenizer: Any
) -> dict[str, Any]:
    from tqdm import tqdm

    client = ServeClient(
        f"http://127.0.0.1:{args.port}",
        "/v1/completions",
        max_connections=args.max_concurrency,
        sampling={"temperature": 0.0, "ignore_eos": True},
    )
    client.model = "bench"
    async with client:
        warm = ServeRequest(reqs[0].prompt[:64], 64, 4)
        res = await client.send(warm)
        if not res.success:
            raise RuntimeError(f"warm-up failed: {res.error}")
        before = scrape(args.port)
        offsets = [0.0] * len(reqs)
        with tqdm(total=len(reqs), disable=True) as bar:
            results, duration, t0 = await run_requests(
                client, reqs, offsets, args.max_concurrency, bar
            )
    after = scrape(args.port)
    metrics = compute_metrics(reqs, results, duration, tokenizer, [50.0, 99.0], t0)

    def delta(name: str) -> dict[str, float]:
        a, b = after.get(name, {}), before.get(name, {})
        return {k: a[k] - b.get(k, 0.0) for k in sorted(a)}

    hits, queries = delta("prefix_cache_hits_total"), delta("prefix_cache_queries_total")
    return {
        "completed": metrics.get("completed"),
        "failed": metrics.get("failed"),
        "duration_s": round(duration, 3),
        "request_throughput": metrics.get("request_throughput"),
        "output_throughput": metrics.get("output_throughput"),
        "total_token_throughput": metrics.get("total_token_throughput"),
        "median_ttft_ms": metrics.get("median_ttft_ms"),
        "p99_ttft_ms": metrics.get("p99_ttft_ms"),
        "mean_ttft_ms": metrics.get("mean_ttft_ms"),
        "median_tpot_ms": metrics.get("median_tpot_ms"),
        "prefix_cache_hit_rate": round(sum(hits.values()) / max(sum(queries.values()), 1.0), 4),
        "requests_per_replica": delta("router_requests_total"),
    }


def main() -> int:
    args, extra = parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    reqs = workload(args, len(tokenizer))
    log_dir = Path(os.environ.get("DP_ROUTER_LOG_DIR", "/tmp"))
    results: dict[str, dict[str, Any]] = {}
    for arm in args.arms:
        dp_text, _, policy = arm.partition(":")
        dp = int(dp_text)
        proc = start_server(
            args, dp, policy or "-", extra, log_dir / f"dp_router_{dp}_{policy}.log"
        )
        try:
            res = asyncio.run(run_arm(args, reqs, tokenizer))
        finally:
            stop_server(proc)
        res = {"arm": arm, "dp": dp, "policy": policy, "num_requests": len(reqs), **res}
        results[arm] = res
        print(json.dumps(res), flush=True)
    first = args.arms[0]
    summary = {
        f"{first}_vs_{other}": {
            "throughput_x": round(
                results[first]["output_throughput"] / results[other]["output_throughput"], 3
            ),
            "median_ttft_x": round(
                results[other]["median_ttft_ms"] / results[first]["median_ttft_ms"], 3
            ),
        }
        for other in args.arms[1:]
        if results[other].get("output_throughput") and results[first].get("median_ttft_ms")
    }
    print(json.dumps({"summary": summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
