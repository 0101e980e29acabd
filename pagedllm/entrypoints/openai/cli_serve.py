"""``pagedllm serve [MODEL]``: start the engine and the OpenAI-compatible server (uvicorn).

Flags are spelled like vLLM's. On SIGTERM / SIGINT uvicorn stops accepting connections,
lets in-flight requests finish for up to ``--drain-timeout`` seconds, then the app's lifespan
shuts the engine down and the process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from pagedllm.config import DEMO_MODEL_DIR
from pagedllm.entrypoints.cli import add_engine_args, engine_kwargs

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "pagedllm-demo"
_LOG_LEVELS = ["critical", "error", "warning", "info", "debug", "trace"]


def add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``serve`` on the ``pagedllm`` subcommand parser."""
    p: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible HTTP server",
        description=(
            "Serve MODEL (a Hugging Face model directory; default: the bundled demo model "
            f"{DEMO_MODEL_DIR}) over an OpenAI-compatible HTTP API."
        ),
    )
    p.add_argument("model", nargs="?", default=None, metavar="MODEL")
    add_engine_args(p)
    if "--tokenizer" not in p._option_string_actions:  # unless the shared engine flags have it
        p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: MODEL)")
    if "--enforce-eager" not in p._option_string_actions:
        p.add_argument("--enforce-eager", action="store_true", help="never capture CUDA graphs")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="0.0.0.0")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="model name(s) clients may use (default: MODEL as given)",
    )
    g.add_argument(
        "--api-key",
        default=os.environ.get("PAGEDLLM_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $PAGEDLLM_API_KEY)",
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
        "--queue-timeout",
        type=float,
        default=None,
        help="answer 503 when a request gets no first token within this many seconds",
    )
    g.add_argument(
        "--chat-template", default=None, help="Jinja chat template (file path or inline text)"
    )
    g.add_argument("--disable-log-requests", action="store_true")
    g.add_argument("--uvicorn-log-level", default="info", choices=_LOG_LEVELS)
    p.set_defaults(func=serve)
    return p


def _check(args: argparse.Namespace) -> None:
    checks = [
        (args.max_request_body_bytes >= 1, "--max-request-body-bytes must be >= 1"),
        (args.drain_timeout >= 0, "--drain-timeout must be >= 0"),
        (args.max_n >= 1, "--max-n must be >= 1"),
        (args.max_waiting_requests is None or args.max_waiting_requests >= 0,
         "--max-waiting-requests must be >= 0"),
        (args.queue_timeout is None or args.queue_timeout > 0, "--queue-timeout must be > 0"),
        (0 <= args.port <= 65535, "--port must be in [0, 65535]"),
    ]  # fmt: skip
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


def _load_chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    return path.read_text() if path.is_file() else value


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def serve(args: argparse.Namespace) -> int:
    """Load the engine, then run uvicorn until SIGTERM / SIGINT."""
    import uvicorn

    from pagedllm.config import EngineConfig
    from pagedllm.engine.async_llm import AsyncLLM
    from pagedllm.entrypoints.openai.api_server import build_app

    _check(args)
    model = args.model or args.model_flag
    args.model = model
    if not args.served_model_name and model is None:
        args.served_model_name = [DEMO_MODEL_NAME]
    args.chat_template = _load_chat_template(args.chat_template)
    req_log = logging.getLogger("pagedllm.requests")
    if not req_log.handlers:  # one bare JSON line per finished request
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        req_log.addHandler(handler)
        req_log.propagate = False
    req_log.setLevel(logging.INFO)
    logging.getLogger("pagedllm.entrypoints.openai").setLevel(logging.INFO)

    kwargs = engine_kwargs(args, model)
    kwargs.setdefault("tokenizer", args.tokenizer)
    kwargs.setdefault("enforce_eager", args.enforce_eager)
    config = EngineConfig(**kwargs)
    # Uvicorn re-raises the signal it drained on after shutting down; exit 0 then.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        engine = AsyncLLM.from_config(config, max_waiting_requests=args.max_waiting_requests)
    except RuntimeError as e:  # the engine process failed to start (logged above)
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        app = build_app(engine, args)
        uv_config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.uvicorn_log_level,
            timeout_graceful_shutdown=args.drain_timeout,
            lifespan="on",
        )
        uvicorn.Server(uv_config).run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it drained on
        pass
    finally:
        if engine.is_running:
            engine.shutdown()
    return 0
