"""``pagedllm bench serve``: online-serving benchmark against any OpenAI-compatible server.

Like vLLM's ``bench serve``: the workload (random token ids or ShareGPT, from
:mod:`pagedllm.bench.datasets`) is sent as streaming requests whose arrivals follow a gamma
process of ``--request-rate`` requests/s (``--burstiness 1`` = Poisson: exponential gaps;
``inf`` = all at once), seeded by ``--seed``; ``--max-concurrency`` caps requests in flight
(later arrivals wait for a slot, and their clock starts when they are sent). Completions get
token-id prompts, chat gets them decoded to text. One unmeasured test request goes first.
Metrics: :mod:`pagedllm.bench.serve_metrics`; the HTTP client: :mod:`pagedllm.bench.serve_client`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagedllm.bench.presets import (
    PRESETS,
    is_synthetic_tokenizer,
    materialize_preset,
    synthetic_tokenizer_dir,
)

if TYPE_CHECKING:
    from tqdm import tqdm

    from pagedllm.bench.datasets import BenchRequest
    from pagedllm.bench.serve_client import ServeClient, ServeRequest, ServeResult

_EPILOG = """\
example (Poisson 4 req/s, random 1024 in / 128 out):
  pagedllm bench serve --base-url http://127.0.0.1:8000 --dataset-name random \\
      --random-input-len 1024 --random-output-len 128 --num-prompts 160 \\
      --request-rate 4 --ignore-eos --save-result
"""
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _csv(kind: type) -> Any:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(x) for x in text.replace(" ", "").split(",") if x]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list: {text!r}") from e

    return parse


def add_serve_parser(bsub: Any) -> None:
    """Register ``bench serve`` on the ``bench`` subparsers (flags spelled like vLLM's)."""
    p = bsub.add_parser(
        "serve",
        help="online serving benchmark against an OpenAI-compatible server",
        description="Stream a workload to an OpenAI-compatible server at a request rate; "
        "report TTFT, TPOT, ITL, end-to-end latency and throughput.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:8000 (over host/port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default="/v1/completions", help="or /v1/chat/completions")
    p.add_argument("--model", default=None, help="served model name (default: first listed)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: model dir/preset)")
    p.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("--dataset-name", choices=["random", "sharegpt"], default="random")
    p.add_argument("--dataset-path", default=None, help="ShareGPT JSON file")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--sharegpt-output-len", type=int, default=None)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="req/s (inf)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--structured-output",
        choices=["none", "ticket", "ticket-new"],
        default="none",
        help="ticket: constrain outputs to a customer-service ticket JSON schema "
        "(response_format json_schema); ticket-new: a schema variant per request, so every "
        "request's grammar is compiled anew",
    )
    p.add_argument(
        "--structured-output-ratio",
        type=float,
        default=1.0,
        help="fraction of requests constrained (seeded choice); below 1 the report also gives "
        "the constrained and the free requests' metrics apart",
    )
    p.add_argument("--percentile-metrics", type=_csv(str), default=["ttft", "tpot", "itl", "e2el"])
    p.add_argument("--metric-percentiles", type=_csv(float), default=[50.0, 90.0, 99.0])
    p.add_argument("--request-timeout", type=float, default=None, help="seconds per request")
    p.add_argument(
        "--ready-check-timeout-sec",
        type=float,
        default=0.0,
        help="retry listing models and the initial test request this long (server starting)",
    )
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--save-result", action="store_true", help="write JSON, Markdown and PNG")
    p.add_argument("--result-dir", default="bench-results")
    p.add_argument("--result-filename", default=None, help="JSON name (.md/.png beside it)")
    p.set_defaults(func=main)


def check_args(args: argparse.Namespace) -> None:
    from pagedllm.bench.serve_metrics import METRICS

    checks = [
        (args.num_prompts >= 1, "--num-prompts must be >= 1"),
        (args.request_rate > 0, "--request-rate must be > 0 (inf: all at once)"),
        (args.burstiness > 0, "--burstiness must be > 0"),
        (args.max_concurrency is None or args.max_concurrency >= 1,
         "--max-concurrency must be >= 1"),
        (set(args.percentile_metrics) <= set(METRICS),
         f"--percentile-metrics: choose from {','.join(METRICS)}"),
        (all(0 < q < 100 for q in args.metric_percentiles),
         "--metric-percentiles must be in (0, 100)"),
        (args.dataset_name != "sharegpt" or bool(args.dataset_path),
         "--dataset-name sharegpt needs --dataset-path FILE.json"),
        (0.0 <= args.structured_output_ratio <= 1.0,
         "--structured-output-ratio must be in [0, 1]"),
    ]  # fmt: skip
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


def arrival_offsets(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Send times (s after the start) of ``n`` requests: gamma gaps with mean ``1/rate``."""
    import numpy as np

    if rate == float("inf"):
        return [0.0] * n
    gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / (rate * burstiness), size=n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


def resolve_tokenizer(explicit: str | None, candidates: list[str | None]) -> str:
    """``--tokenizer``, else the first candidate (model name, served root) that is a directory
    with a tokenizer or a materialized preset, else a preset of that name."""
    if explicit:
        return explicit
    names = [c for c in candidates if c]
    for cand in names:
        path = Path(cand).expanduser()
        if any((path / f).is_file() for f in _TOKENIZER_FILES):
            return str(path)
        if is_synthetic_tokenizer(synthetic_tokenizer_dir(path)):
            return str(synthetic_tokenizer_dir(path))
    for cand in names:
        if Path(cand).name in PRESETS:
            return str(synthetic_tokenizer_dir(materialize_preset(Path(cand).name)))
    raise ValueError(f"No tokenizer found for {names or 'the model'}; pass --tokenizer DIR.")


def load_workload(
    args: argparse.Namespace, tokenizer: Any, tok_dir: str, max_len: int | None
) -> list[BenchRequest]:
    """The ``--dataset-name`` workload (random ids below the vocabulary size, or ShareGPT)."""
    from pagedllm.bench.datasets import (
        ratio_range,
        sample_random,
        sample_sharegpt,
        special_token_ids,
    )

    if args.dataset_name == "sharegpt":
        return sample_sharegpt(
            args.dataset_path, args.num_prompts, tokenizer, args.seed,
            args.sharegpt_output_len, max_len,
        )  # fmt: skip
    in_range = ratio_range(args.random_input_len, args.random_range_ratio)
    out_range = ratio_range(args.random_output_len, args.random_range_ratio)
    if max_len is not None and in_range[1] + out_range[1] > max_len:
        raise ValueError(
            f"Longest request ({in_range[1]} + {out_range[1]} tokens) exceeds the "
            f"server's max_model_len ({max_len})."
        )
    vocab = len(tokenizer)
    cfg = Path(tok_dir) / "config.json"
    if cfg.is_file():
        vocab = min(vocab, int(json.loads(cfg.read_text()).get("vocab_size") or vocab))
    return sample_random(
        args.num_prompts, in_range, out_range, vocab, special_token_ids(tokenizer), args.seed
    )


def mark_structured(reqs: list[ServeRequest], args: argparse.Namespace) -> set[int]:
    """Give ``--structured-output-ratio`` of the requests (a seeded choice) the structured
    output's ``response_format``; returns their indices."""
    if args.structured_output == "none":
        return set()
    from pagedllm.bench.schemas import ticket_response_format

    k = round(args.structured_output_ratio * len(reqs))
    chosen = set(random.Random(args.seed).sample(range(len(reqs)), k))
    for i in chosen:
        variant = i if args.structured_output == "ticket-new" else None
        reqs[i].response_format = ticket_response_format(variant)
    return chosen


def to_serve_requests(
    workload: list[BenchRequest], tokenizer: Any, chat: bool
) -> list[ServeRequest]:
    """Token-id prompts for completions; for chat the text (decoded ids for random prompts)."""
    from pagedllm.bench.serve_client import ServeRequest

    return [
        ServeRequest(
            (r.prompt or tokenizer.decode(r.prompt_token_ids)) if chat else r.prompt_token_ids,
            r.prompt_len,
            r.output_len,
        )
        for r in workload
    ]


async def _list_models(client: ServeClient, deadline: float) -> list[dict[str, Any]]:
    """``GET /v1/models``'s cards, retried until ``deadline`` (server still starting)."""
    while True:
        try:
            return list((await client.get_json("/v1/models")).get("data") or [])
        except (ValueError, AttributeError):
            if time.monotonic() >= deadline:
                raise
        await asyncio.sleep(1.0)


async def _ready(client: ServeClient, req: ServeRequest, deadline: float) -> None:
    """Send the test request until it succeeds or ``deadline`` (``time.monotonic``) passes."""
    while True:
        res = await client.send(req)
        if res.success:
            return
        if time.monotonic() >= deadline:
            raise ValueError(f"The initial test request failed: {res.error}")
        await asyncio.sleep(1.0)


async def run_requests(
    client: ServeClient,
    reqs: list[ServeRequest],
    offsets: list[float],
    max_concurrency: int | None,
    bar: tqdm,
) -> tuple[list[ServeResult], float, float]:
    """Send every request at its offset; returns (results, duration, start perf_counter)."""
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    t0 = time.perf_counter()

    async def one(req: ServeRequest, at: float) -> ServeResult:
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if sem is None:
            res = await client.send(req)
        else:
            async with sem:
                res = await client.send(req)
        bar.update(1)
        return res

    results = await asyncio.gather(*(one(r, a) for r, a in zip(reqs, offsets, strict=True)))
    return list(results), time.perf_counter() - t0, t0


async def _benchmark(args: argparse.Namespace, base_url: str) -> dict[str, Any]:
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from pagedllm.bench.datasets import workload_summary
    from pagedllm.bench.serve_client import DEFAULT_TIMEOUT_S, ServeClient
    from pagedllm.bench.serve_metrics import compute_metrics

    sampling: dict[str, Any] = {"temperature": args.temperature}
    if args.ignore_eos:
        sampling["ignore_eos"] = True
    client = ServeClient(
        base_url,
        args.endpoint,
        api_key=args.api_key,
        timeout_s=args.request_timeout or DEFAULT_TIMEOUT_S,
        max_connections=args.max_concurrency,
        sampling=sampling,
    )
    deadline = time.monotonic() + args.ready_check_timeout_sec
    async with client:
        cards: list[dict[str, Any]] = []
        try:
            cards = await _list_models(client, deadline)
        except (ValueError, AttributeError) as e:
            if args.model is None:
                raise ValueError(f"Cannot list the server's models ({e}); pass --model.") from e
        if not cards and args.model is None:
            raise ValueError(f"{base_url}/v1/models lists no model; pass --model.")
        client.model = args.model or str(cards[0]["id"])
        card = next((c for c in cards if c.get("id") == client.model), {})
        try:
            version = (await client.get_json("/version", timeout_s=5.0)).get("version")
        except (ValueError, AttributeError):
            version = None
        tok_dir = resolve_tokenizer(args.tokenizer, [client.model, card.get("root")])
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        max_len = card.get("max_model_len")
        workload = load_workload(args, tokenizer, tok_dir, max_len)
        reqs = to_serve_requests(workload, tokenizer, client.chat)
        constrained = mark_structured(reqs, args)
        await _ready(client, reqs[0], deadline)
        offsets = arrival_offsets(len(reqs), args.request_rate, args.burstiness, args.seed)
        with tqdm(total=len(reqs), desc="requests", disable=args.disable_tqdm) as bar:
            results, duration, t0 = await run_requests(
                client, reqs, offsets, args.max_concurrency, bar
            )
    pct = args.metric_percentiles
    metrics = compute_metrics(reqs, results, duration, tokenizer, pct, t0)
    if 0 < len(constrained) < len(reqs):  # mixed: each group's latencies apart
        groups = {"constrained": constrained, "free": set(range(len(reqs))) - constrained}
        metrics["groups"] = {
            name: compute_metrics(
                [reqs[i] for i in sorted(idx)], [results[i] for i in sorted(idx)],
                duration, tokenizer, pct, t0,
            )
            for name, idx in groups.items()
        }  # fmt: skip
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "backend": "openai-chat" if client.chat else "openai",
        "base_url": base_url,
        "endpoint": args.endpoint,
        "model_id": client.model,
        "tokenizer_id": tok_dir,
        "server_version": version,
        "server_max_model_len": max_len,
        "num_prompts": len(reqs),
        "dataset_name": args.dataset_name,
        "request_rate": args.request_rate if args.request_rate < float("inf") else "inf",
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "seed": args.seed,
        "metric_percentiles": list(args.metric_percentiles),
        "workload": workload_summary(workload),
        **metrics,
    }


def _result_paths(args: argparse.Namespace, res: dict[str, Any]) -> tuple[Path, Path, Path]:
    name = args.result_filename
    if not name:
        rate = res["request_rate"] if res["request_rate"] == "inf" else f"{res['request_rate']:g}"
        conc = f"-c{res['max_concurrency']}" if res["max_concurrency"] else ""
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = f"serve-{Path(res['model_id']).name}-{rate}qps{conc}-{stamp}.json"
    path = Path(args.result_dir) / name
    stem = path.with_suffix("") if path.suffix == ".json" else path
    return stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")


def main(args: argparse.Namespace) -> int:
    """Run the serving benchmark described by parsed CLI ``args``."""
    from pagedllm.bench import report, serve_metrics

    check_args(args)
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    res = asyncio.run(_benchmark(args, base_url))
    res["env"] = {"git": report.git_commit(), "python": platform.python_version(),
                  "hostname": platform.node()}  # fmt: skip
    inf = float("inf")
    res["args"] = {k: "inf" if v == inf else v for k, v in vars(args).items() if k != "func"}
    print(serve_metrics.text_table(res, args.percentile_metrics))
    for name, group in res.get("groups", {}).items():
        print(
            f"{name} requests ({group['completed']}): median TTFT "
            f"{group['median_ttft_ms']:.1f} ms, median TPOT {group['median_tpot_ms']:.2f} ms"
        )
    if res["errors"]:
        print(f"{res['failed']} requests failed; first error: {res['errors'][0][:300]}")
    if args.save_result:
        json_path, md_path, png_path = _result_paths(args, res)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        res["files"] = {"json": str(json_path), "markdown": str(md_path), "plot": str(png_path)}
        json_path.write_text(json.dumps(report.jsonable(res), indent=2) + "\n")
        md_path.write_text(serve_metrics.markdown(res) + "\n")
        serve_metrics.plot(png_path, res, args.percentile_metrics)
        print(f"Wrote {json_path}, {md_path}, {png_path}")
    return 0
