"""``pagedllm bench lang``: SGLang's classic frontend workloads on ``pagedllm.lang``.

Three workloads, with data made here (seeded, no downloads), each a ``run_batch`` of programs:

* ``fewshot_select``: HellaSwag-style few-shot multiple choice: a shared few-shot preamble,
  then a context and ``select`` over four endings;
* ``tree_of_thought``: a question forked 3 x 3 x 3 (plans, steps, answers: 27 leaves);
* ``multi_turn``: a four-turn chat (system, then user/assistant turns with ``gen``).

Each runs on the in-process engine (``LocalBackend``) and over HTTP (``Endpoint``: a server
given by ``--url``, or one started in this process on the same engine flags), reporting
programs/s and the prefix-cache hit rate (prompt tokens found cached / looked up) over the run.
Backends run one after the other, so only one engine holds the device at a time. The server
started here shares this process (and its GIL) with the client threads; ``--url`` of a
``pagedllm serve`` of its own measures HTTP without that. Importing
this module (to register the command) loads neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import gc
import random
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pagedllm.bench.presets import PRESETS, bench_engine_kwargs
from pagedllm.config.cli_args import add_engine_args
from pagedllm.lang import Backend, Endpoint, LocalBackend, function, gen, select
from pagedllm.lang import assistant as assistant_turn
from pagedllm.lang import system as system_turn
from pagedllm.lang import user as user_turn

WORKLOADS = ("fewshot_select", "tree_of_thought", "multi_turn")
_WORDS = [
    "the",
    "man",
    "woman",
    "child",
    "dog",
    "cat",
    "walks",
    "runs",
    "opens",
    "closes",
    "takes",
    "gives",
    "looks",
    "finds",
    "a",
    "red",
    "blue",
    "small",
    "large",
    "door",
    "box",
    "ball",
    "car",
    "house",
    "garden",
    "kitchen",
    "table",
    "window",
    "slowly",
    "quickly",
    "then",
    "and",
]


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n)).capitalize() + "."


@function
def fewshot_select(s: Any, shots: str, context: str, endings: list[str]) -> None:
    s += shots + "Context: " + context + "\nEnding:"
    s += select("answer", choices=[" " + e for e in endings])


@function
def tree_of_thought(s: Any, question: str, max_tokens: int) -> None:
    s += "Question: " + question + "\n"
    plans = s.fork(3)
    for i, p in enumerate(plans):
        p += f"Plan {i + 1}:" + gen("plan", max_tokens=max_tokens, stop="\n") + "\n"
    for p in plans:
        steps = p.fork(3)
        for j, st in enumerate(steps):
            st += f"Step {j + 1}:" + gen("step", max_tokens=max_tokens, stop="\n") + "\n"
        for st in steps:
            answers = st.fork(3)
            answers += "Answer:" + gen("answer", max_tokens=max_tokens, stop="\n")
            answers.join()
        steps.join()
    plans.join()


@function
def multi_turn(s: Any, turns: list[str], max_tokens: int) -> None:
    s += system_turn("You are a helpful assistant.")
    for question in turns:
        s += user_turn(question)
        s += assistant_turn(gen(max_tokens=max_tokens))


def workload_args(name: str, num_programs: int, max_tokens: int, seed: int) -> list[dict]:
    """The ``run_batch`` arguments of a workload (deterministic in ``seed``)."""
    rng = random.Random(seed)
    if name == "fewshot_select":
        shots = "".join(
            f"Context: {_sentence(rng, 12)}\nEnding: {_sentence(rng, 6)}\n\n" for _ in range(5)
        )
        return [
            {
                "shots": shots,
                "context": _sentence(rng, 12),
                "endings": [_sentence(rng, 6) for _ in range(4)],
            }
            for _ in range(num_programs)
        ]
    if name == "tree_of_thought":
        return [
            {"question": _sentence(rng, 10), "max_tokens": max_tokens} for _ in range(num_programs)
        ]
    if name == "multi_turn":
        return [
            {"turns": [_sentence(rng, 8) for _ in range(4)], "max_tokens": max_tokens}
            for _ in range(num_programs)
        ]
    raise ValueError(f"Unknown workload {name!r}; choose from {', '.join(WORKLOADS)}.")


_PROGRAMS = {
    "fewshot_select": fewshot_select,
    "tree_of_thought": tree_of_thought,
    "multi_turn": multi_turn,
}


def _run_workloads(
    backend: Backend,
    counters: Callable[[], tuple[int, int]],
    args: argparse.Namespace,
) -> dict[str, dict[str, float]]:
    """programs/s and prefix-cache hit rate of each workload on ``backend`` (and, in process,
    the most requests the engine held at once)."""
    results: dict[str, dict[str, float]] = {}
    driver = getattr(backend, "_driver", None)
    for name in args.workloads:
        batch = workload_args(name, args.num_programs, args.max_tokens, args.data_seed)
        if driver is not None and hasattr(driver, "peak_in_flight"):
            driver.peak_in_flight = 0
        queries0, hits0 = counters()
        start = time.perf_counter()
        states = _PROGRAMS[name].run_batch(
            batch,
            backend=backend,
            temperature=0,
            num_threads=args.num_threads or "auto",
            progress_bar=not args.disable_tqdm,
        )
        elapsed = time.perf_counter() - start
        errors = [s.error for s in states if s.error is not None]
        if errors:
            raise RuntimeError(f"{len(errors)} {name} programs failed; first: {errors[0]}")
        queries, hits = counters()
        looked_up = queries - queries0
        results[name] = {
            "programs": len(states),
            "seconds": elapsed,
            "programs_per_s": len(states) / elapsed,
            "prefix_cache_hit_rate": (hits - hits0) / looked_up if looked_up else 0.0,
        }
        if driver is not None and hasattr(driver, "peak_in_flight"):
            results[name]["peak_requests_in_flight"] = driver.peak_in_flight
    return results


def _run_local(kwargs: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from pagedllm.entrypoints.llm import LLM

    llm = LLM(**kwargs)
    backend = LocalBackend(llm)
    engine = llm.llm_engine

    def counters() -> tuple[int, int]:
        st = engine.stats()  # read while the engine is idle between workloads
        return st.prefix_cache_queries, st.prefix_cache_hits

    try:
        return _run_workloads(backend, counters, args)
    finally:
        backend.close()


def _metric_counters(endpoint: Endpoint) -> Callable[[], tuple[int, int]]:
    """The server's prefix-cache counters, read from ``/metrics``."""

    def read() -> tuple[int, int]:
        text = endpoint._client.get("/metrics").text
        values = []
        for metric in ("pagedllm:prefix_cache_queries_total", "pagedllm:prefix_cache_hits_total"):
            m = re.search(rf"^{re.escape(metric)}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M)
            values.append(int(float(m.group(1))) if m else 0)
        return values[0], values[1]

    return read


@contextmanager
def _local_server(kwargs: dict[str, Any]) -> Iterator[str]:
    """A server on the engine flags (``build_app`` + native routes, uvicorn in a thread)."""
    import socket
    import threading

    import uvicorn

    from pagedllm.config import EngineConfig
    from pagedllm.engine.async_llm import AsyncLLM
    from pagedllm.entrypoints.openai.api_server import build_app
    from pagedllm.entrypoints.openai.native_routes import register_native_routes

    engine = AsyncLLM.from_config(EngineConfig(**kwargs))
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        serve_args = argparse.Namespace(disable_log_requests=True)
        app = build_app(engine, serve_args)
        register_native_routes(app, serve_args)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 120
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("The benchmark's HTTP server did not start.")
            time.sleep(0.02)
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        finally:
            server.should_exit = True
            thread.join(30)
    finally:
        engine.shutdown()
        sock.close()


def _run_http(kwargs: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    if args.url:
        endpoint = Endpoint(args.url, api_key=args.api_key)
        try:
            return _run_workloads(endpoint, _metric_counters(endpoint), args)
        finally:
            endpoint.close()
    with _local_server(kwargs) as url:
        endpoint = Endpoint(url)
        try:
            return _run_workloads(endpoint, _metric_counters(endpoint), args)
        finally:
            endpoint.close()


def _markdown(rep: dict[str, Any]) -> str:
    from pagedllm.bench import report

    rows = [
        [
            w,
            b,
            r["programs"],
            r["programs_per_s"],
            r["prefix_cache_hit_rate"],
            r.get("peak_requests_in_flight"),
        ]
        for b, per in rep["results"].items()
        for w, r in per.items()
    ]
    args = rep["args"]
    extra = [f"{args['num_programs']} programs per workload, max_tokens {args['max_tokens']}"]
    head = report.header_lines("pagedllm bench lang", rep["env"], rep["model"], extra)
    table = [
        "workload",
        "backend",
        "programs",
        "programs/s",
        "prefix-cache hit rate",
        "peak requests in flight",
    ]
    return head + report.markdown_table(table, rows)


def main(args: argparse.Namespace) -> int:
    """Run ``pagedllm bench lang`` with parsed CLI ``args``."""
    import torch

    from pagedllm.bench import report

    args.workloads = [w for w in args.workloads.split(",") if w]
    for w in args.workloads:
        if w not in WORKLOADS:
            raise ValueError(f"Unknown workload {w!r}; choose from {', '.join(WORKLOADS)}.")
    backends = [b for b in args.backends.split(",") if b]
    if not backends or set(backends) - {"local", "http"}:
        raise ValueError("--backends takes local, http or both (comma-separated).")
    paths = report.output_paths("lang", args.output_json)
    kwargs = bench_engine_kwargs(args)
    results: dict[str, Any] = {}
    if "local" in backends:
        results["local"] = _run_local(kwargs, args)
        # Hand the in-process engine's device memory back before a server's engine starts
        # (its pool is sized from what is free: the cached blocks would look taken).
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if "http" in backends:
        results["http"] = _run_http(kwargs, args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rep = {
        "kind": "lang",
        "env": report.env_info(device),
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "model": args.model_config or kwargs.get("model") or "demo model",
        "results": results,
    }
    series = {b: [r["programs_per_s"] for r in per.values()] for b, per in results.items()}

    def plot(path: Any) -> None:
        report.plot_bars(path, "programs/s", list(args.workloads), series)

    report.write_report(paths, rep, _markdown(rep), plot)
    return 0


def add_lang_parser(bsub: Any) -> None:
    """Register ``lang`` on ``pagedllm bench``'s subparsers."""
    p = bsub.add_parser(
        "lang",
        help="pagedllm.lang programs: few-shot select, tree of thought, multi-turn",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    add_engine_args(p)
    p.add_argument(
        "--model-config",
        choices=PRESETS,
        default=None,
        help="config-only preset with dummy weights (instead of --model)",
    )
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated")
    p.add_argument("--backends", default="local,http", help="local, http or both")
    p.add_argument("--url", default=None, help="a running pagedllm serve (http backend)")
    p.add_argument("--api-key", default=None, help="its API key")
    p.add_argument("--num-programs", type=int, default=64, help="programs per workload")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per gen")
    p.add_argument("--num-threads", type=int, default=None, help="run_batch threads (auto)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the generated data")
    p.add_argument("--output-json", default=None, help="report path (.md and .png beside it)")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bars")
    p.set_defaults(func=main)
