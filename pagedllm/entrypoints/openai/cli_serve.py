"""``pagedllm serve [MODEL]``: start the engine and the OpenAI-compatible server (uvicorn).

Flags are spelled like vLLM's. On SIGTERM / SIGINT uvicorn stops accepting connections,
lets in-flight requests finish for up to ``--drain-timeout`` seconds, then the app's lifespan
shuts the engine down. The engine process ignores SIGTERM (systemd's default
``KillMode=control-group`` signals the whole group), so a group SIGTERM drains too.

The exit status is 0 after a clean shutdown and 1 whenever the engine died before shutdown was
asked for (even if a SIGTERM came later). With ``--exit-on-engine-death`` (vLLM's behaviour) the
server stops at once when the engine dies, instead of answering 503 until it is restarted.

``-dp N`` (``--data-parallel-size``) starts N engine processes behind this one server (on GPUs
replica i gets GPUs ``[i*tp, (i+1)*tp)``); ``--router-policy`` and its thresholds decide which
one serves each request (``pagedllm.router.policies``). A replica that dies fails only its own
requests; the others go on serving (``--exit-on-engine-death`` stops at the first death), and
the exit status is 1.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from pagedllm.config.cli_args import add_engine_args, engine_kwargs_from_args
from pagedllm.config.model import DEMO_MODEL_DIR
from pagedllm.entrypoints.cli_compat import add_config_file_arg, add_unsupported_vllm_args
from pagedllm.entrypoints.openai.auth import add_auth_args
from pagedllm.entrypoints.openai.cli_http import add_http_args, check_http_args, uvicorn_kwargs
from pagedllm.entrypoints.openai.generation_config import (
    add_generation_config_args,
    check_generation_config_args,
)
from pagedllm.entrypoints.openai.tool_parsers import TOOL_PARSERS
from pagedllm.router.policies import CacheAwareConfig, add_policy_args, policy_config_from_args

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "pagedllm-demo"
_LOG_LEVELS = ["critical", "error", "warning", "info", "debug", "trace"]


def add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``serve`` on the ``pagedllm`` subcommand parser."""
    p: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible HTTP server",
        description=(
            "Serve MODEL (a Hugging Face model directory or hub id such as "
            "Qwen/Qwen2.5-0.5B-Instruct; default: the bundled demo model "
            f"{DEMO_MODEL_DIR}) over an OpenAI-compatible HTTP API."
        ),
    )
    p.add_argument("model", nargs="?", default=None, metavar="MODEL")
    add_config_file_arg(p)
    add_engine_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="0.0.0.0")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="model name(s) clients may use (default: MODEL as given)",
    )
    g.add_argument("--max-request-body-bytes", type=int, default=16 * 1024 * 1024)
    g.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests may run on after SIGTERM",
    )
    g.add_argument(
        "--max-waiting-requests",
        type=int,
        default=None,
        help="answer 503 when this many requests already wait (default: unbounded)",
    )
    g.add_argument("--max-n", type=int, default=128, help="largest n a request may ask for")
    g.add_argument(
        "--max-seqs-per-request",
        type=int,
        default=1024,
        help="largest number of sequences (prompts x n) one request may start",
    )
    g.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        help="end a request that runs longer than this many seconds with a 504 (default: none)",
    )
    g.add_argument(
        "--queue-timeout",
        type=float,
        default=None,
        help="answer 503 when a request gets no first token within this many seconds",
    )
    g.add_argument(
        "--chat-template", default=None, help="Jinja chat template (file path or inline text)"
    )
    g.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='allow tool_choice "auto" (the default when a request has tools): the model\'s '
        "own tool-call markup is parsed into tool_calls; needs --tool-call-parser",
    )
    g.add_argument(
        "--tool-call-parser",
        default=None,
        choices=sorted(TOOL_PARSERS),
        help='the model\'s tool-call format for tool_choice "auto": hermes (Hermes, Qwen2.5: '
        "<tool_call> blocks) or llama3_json (Llama 3.1/3.2 JSON)",
    )
    g.add_argument("--disable-log-requests", action="store_true")
    add_generation_config_args(g)
    g.add_argument(
        "--max-logprobs",
        type=int,
        default=20,
        help="most logprobs (top alternatives) a request may ask for; -1: the vocabulary "
        "size (default: 20)",
    )
    g.add_argument(
        "--enable-tokenizer-info-endpoint",
        action="store_true",
        help="serve GET /tokenizer_info (it shows the chat template)",
    )
    g.add_argument("--ui", action="store_true", help="serve a web chat page at /ui")
    g.add_argument(
        "--enable-request-id-headers",
        action="store_true",
        help="accepted for vLLM compatibility: every response carries X-Request-Id anyway",
    )
    g.add_argument(
        "--tokenizer-pool-size",
        type=int,
        default=4,
        help="threads that template and tokenize requests off the event loop",
    )
    g.add_argument(
        "--engine-health-timeout",
        type=float,
        default=10.0,
        help="/health answers 503 when the engine has sent nothing for this many seconds",
    )
    g.add_argument(
        "--engine-stall-timeout",
        type=float,
        default=None,
        help="kill the engine (and fail its requests) when it sends nothing for this many "
        "seconds (default: never; /health reports a stall after --engine-health-timeout)",
    )
    g.add_argument(
        "--exit-on-engine-death",
        action="store_true",
        help="stop the server (exit 1) as soon as the engine process dies",
    )
    add_auth_args(g)
    add_policy_args(
        p.add_argument_group("data-parallel routing (with --data-parallel-size > 1)"), "router-"
    )
    c = p.add_argument_group("connections")
    c.add_argument(
        "--timeout-keep-alive",
        type=float,
        default=5.0,
        help="close idle keep-alive connections after this many seconds",
    )
    c.add_argument(
        "--header-read-timeout",
        type=float,
        default=10.0,
        help="close a connection whose request line and headers take longer than this",
    )
    c.add_argument(
        "--body-read-timeout",
        type=float,
        default=60.0,
        help="answer 408 when a request body takes longer than this to arrive",
    )
    c.add_argument(
        "--write-timeout",
        type=float,
        default=60.0,
        help="end a request (and close its connection) when its client reads nothing for "
        "this many seconds",
    )
    c.add_argument(
        "--limit-concurrency",
        type=int,
        default=None,
        help="answer 503 beyond this many open connections / in-flight requests (uvicorn)",
    )
    c.add_argument(
        "--h11-max-incomplete-event-size",
        type=int,
        default=64 * 1024,
        help="largest request line + headers, in bytes",
    )
    g.add_argument("--uvicorn-log-level", default="info", choices=_LOG_LEVELS)
    add_http_args(p)
    add_unsupported_vllm_args(p)  # last: flags defined above are never shadowed
    p.set_defaults(func=serve)
    return p


def serve_engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``serve``'s ``EngineConfig`` keywords: the flags, with the positional MODEL winning over
    ``--model``."""
    kwargs = engine_kwargs_from_args(args)
    kwargs["model"] = args.model or args.model_flag
    return kwargs


def _check(args: argparse.Namespace) -> None:
    checks = [
        (args.max_request_body_bytes >= 1, "--max-request-body-bytes must be >= 1"),
        (args.drain_timeout >= 0, "--drain-timeout must be >= 0"),
        (args.max_n >= 1, "--max-n must be >= 1"),
        (args.max_seqs_per_request >= 1, "--max-seqs-per-request must be >= 1"),
        (args.request_timeout is None or args.request_timeout > 0,
         "--request-timeout must be > 0"),
        (args.tokenizer_pool_size >= 1, "--tokenizer-pool-size must be >= 1"),
        (args.engine_health_timeout > 0, "--engine-health-timeout must be > 0"),
        (args.engine_stall_timeout is None or args.engine_stall_timeout > 0,
         "--engine-stall-timeout must be > 0"),
        (args.timeout_keep_alive > 0, "--timeout-keep-alive must be > 0"),
        (args.header_read_timeout > 0, "--header-read-timeout must be > 0"),
        (args.body_read_timeout > 0, "--body-read-timeout must be > 0"),
        (args.write_timeout > 0, "--write-timeout must be > 0"),
        (args.limit_concurrency is None or args.limit_concurrency >= 1,
         "--limit-concurrency must be >= 1"),
        (args.h11_max_incomplete_event_size >= 1024,
         "--h11-max-incomplete-event-size must be >= 1024"),
        (args.max_waiting_requests is None or args.max_waiting_requests >= 0,
         "--max-waiting-requests must be >= 0"),
        (args.queue_timeout is None or args.queue_timeout > 0, "--queue-timeout must be > 0"),
        (args.data_parallel_size >= 1, "--data-parallel-size must be >= 1"),
        (0 <= args.port <= 65535, "--port must be in [0, 65535]"),
        (args.max_logprobs >= -1, "--max-logprobs must be >= 0, or -1 for the vocabulary size"),
        (not args.enable_auto_tool_choice or args.tool_call_parser is not None,
         "--enable-auto-tool-choice needs --tool-call-parser (one of "
         + ", ".join(sorted(TOOL_PARSERS)) + ")"),
    ]  # fmt: skip
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    _check_router_flags(args)
    check_http_args(args)
    check_generation_config_args(args)


def _check_router_flags(args: argparse.Namespace) -> None:
    """The routing flags choose among replicas: with one, a changed one is an error, not a
    silent no-op."""
    if args.data_parallel_size != 1:
        return
    defaults = {"router_policy": "cache_aware", **vars(CacheAwareConfig())}
    for name, default in defaults.items():
        dest = name if name.startswith("router_") else f"router_{name}"
        if getattr(args, dest) != default:
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"{flag} routes over data-parallel replicas; it needs -dp > 1.")


def _load_chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    return path.read_text() if path.is_file() else value


def serve(args: argparse.Namespace) -> int:
    """Load the engine, then run uvicorn until SIGTERM / SIGINT (see the module doc)."""
    import uvicorn

    from pagedllm.config import EngineConfig
    from pagedllm.engine.async_llm import AsyncLLM
    from pagedllm.entrypoints.model_source import check_architecture
    from pagedllm.entrypoints.openai.api_server import build_app
    from pagedllm.entrypoints.openai.auth import build_auth, build_rate_limiter
    from pagedllm.entrypoints.openai.generation_config import apply_generation_config
    from pagedllm.entrypoints.openai.http_protocol import protocol_with_header_timeout

    _check(args)
    build_auth(args)  # flag errors before the model loads
    build_rate_limiter(args)
    router_config = policy_config_from_args(args, "router-")
    model = args.model or args.model_flag
    args.model = model
    if not args.served_model_name and model is None:
        args.served_model_name = [DEMO_MODEL_NAME]
    args.chat_template = _load_chat_template(args.chat_template)
    _setup_logging()
    started = time.monotonic()
    logger.info("Loading %s; the engine starts in its own process.", model or "the demo model")

    kwargs = serve_engine_kwargs(args)
    dp = kwargs.pop("data_parallel_size")  # each engine is one replica; AsyncLLM starts dp
    config = EngineConfig(**kwargs)  # downloads a hub id's snapshot
    check_architecture(config)
    try:
        engine = AsyncLLM.from_config(
            config,
            max_waiting_requests=args.max_waiting_requests,
            health_timeout_s=args.engine_health_timeout,
            engine_stall_timeout_s=args.engine_stall_timeout,
            data_parallel_size=dp,
            router_policy=args.router_policy,
            router_config=router_config,
        )
    except RuntimeError as e:  # the engine process failed to start (logged above)
        print(f"error: {e}", file=sys.stderr)
        return 1
    apply_generation_config(engine, args)
    where = f"unix:{args.uds}" if args.uds else f"{args.host}:{args.port}"
    logger.info(
        "Engine ready in %.1f s; serving %s on %s.",
        time.monotonic() - started,
        ", ".join(args.served_model_name or [str(model)]),
        where,
    )

    def exit_status() -> int:
        return 1 if engine.died_unexpectedly else 0

    def on_signal_reraised(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(exit_status())  # uvicorn re-raises the signal it drained on

    signal.signal(signal.SIGTERM, on_signal_reraised)
    try:
        app = build_app(engine, args)
        uv_config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.uvicorn_log_level,
            timeout_graceful_shutdown=args.drain_timeout,
            timeout_keep_alive=args.timeout_keep_alive,
            limit_concurrency=args.limit_concurrency,
            h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
            http=protocol_with_header_timeout(args.header_read_timeout),
            lifespan="on",
            **uvicorn_kwargs(args),
        )
        server = uvicorn.Server(uv_config)
        if args.exit_on_engine_death:

            def stop(reason: str) -> None:
                logger.error("The engine died (%s); stopping the server.", reason)
                server.should_exit = True

            engine.on_engine_death = stop
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it drained on
        pass
    finally:
        if engine.is_running:
            engine.shutdown()
    return exit_status()


def _setup_logging() -> None:
    req_log = logging.getLogger("pagedllm.requests")
    if not req_log.handlers:  # one bare JSON line per finished request
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        req_log.addHandler(handler)
        req_log.propagate = False
    req_log.setLevel(logging.INFO)
    logging.getLogger("pagedllm.entrypoints.openai").setLevel(logging.INFO)
    logging.getLogger("pagedllm.stats").setLevel(logging.INFO)
