"""``pagedllm router --worker-urls URL [URL ...]``: the standalone router (``app.py``).

For replicas that are separate ``pagedllm serve`` processes, possibly on other machines: one
address for clients, requests spread by the cache-aware policy on their text, dead workers out
of rotation until their ``/health`` passes again. Flags follow SGLang's router
(``--worker-urls``, ``--policy``, ``--cache-threshold``, ``--balance-abs-threshold``,
``--balance-rel-threshold``, ``--max-tree-size``). Imports stay light (no torch): the router
process never loads a model.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from pagedllm.router.policies import add_policy_args, policy_config_from_args


def add_router_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``router`` on the ``pagedllm`` subcommand parser."""
    p: argparse.ArgumentParser = sub.add_parser(
        "router",
        help="route OpenAI requests over several pagedllm serve workers",
        description="Proxy the OpenAI routes to the healthy worker that most likely holds the "
        "request's prefix in its cache (or by round robin / least load).",
    )
    p.add_argument("--worker-urls", nargs="+", required=True, metavar="URL")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=30000)
    add_policy_args(p.add_argument_group("routing policy"))
    g = p.add_argument_group("workers")
    g.add_argument(
        "--health-check-interval",
        type=float,
        default=5.0,
        help="seconds between GET /health rounds over the workers (default 5)",
    )
    g.add_argument(
        "--health-check-timeout",
        type=float,
        default=2.0,
        help="a worker that does not answer /health within this is unhealthy (default 2)",
    )
    g.add_argument(
        "--max-retries",
        type=int,
        default=2,
        help="other workers a request that did not start (unreachable worker, 5xx) is sent to "
        "(default 2)",
    )
    g.add_argument(
        "--connect-timeout",
        type=float,
        default=5.0,
        help="seconds to connect to a worker before trying another (default 5)",
    )
    g.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        help="seconds a worker may stay silent while answering (default: no limit)",
    )
    p.add_argument("--uvicorn-log-level", default="warning")
    p.set_defaults(func=run_router)
    return p


def _check(args: argparse.Namespace) -> None:
    checks = [
        (args.health_check_interval > 0, "--health-check-interval must be > 0"),
        (args.health_check_timeout > 0, "--health-check-timeout must be > 0"),
        (args.max_retries >= 0, "--max-retries must be >= 0"),
        (args.connect_timeout > 0, "--connect-timeout must be > 0"),
        (args.request_timeout is None or args.request_timeout > 0, "--request-timeout must be > 0"),
        (0 <= args.port <= 65535, "--port must be in [0, 65535]"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    for url in args.worker_urls:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--worker-urls: {url!r} is not an http(s) URL.")
    policy_config_from_args(args)  # ValueError naming a bad threshold


def run_router(args: argparse.Namespace) -> int:
    """Run the router under uvicorn until SIGTERM / SIGINT."""
    import uvicorn

    from pagedllm.router.app import build_router_app

    _check(args)
    logging.getLogger("pagedllm.router").setLevel(logging.INFO)
    app = build_router_app(args)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level)
    return 0
