"""``serve``'s HTTP and logging flags, spelled and defaulted as vLLM's, and what they turn into.

Browser front ends (Open WebUI, chat pages, notebooks) call the API from another origin, so the
server answers CORS preflights: ``--allowed-origins/methods/headers`` (JSON lists, default
``["*"]`` as in vLLM) and ``--allow-credentials`` configure Starlette's ``CORSMiddleware``,
which sits outside the auth gate so a preflight (which never carries credentials) is answered
without a key. TLS, a Unix socket, the access log and ``--root-path`` (the ASGI root path of
an app behind a proxy that strips a path prefix) are uvicorn's own options
(``uvicorn_kwargs``); ``--disable-fastapi-docs`` removes ``/docs``, ``/redoc`` and
``/openapi.json``.

Logging: one JSON line per finished request unless ``--disable-log-requests``
(``--enable-log-requests`` is vLLM's spelling of that default); a periodic stats line
(``stats_log.py``) every ``--log-stats-interval`` seconds unless ``--disable-log-stats``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _json_list(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}); e.g. '[\"*\"]'") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError("must be a JSON list of strings, e.g. '[\"*\"]'")
    return value


_json_list.parses_json = True  # type: ignore[attr-defined]  # --config: a list is one value


def add_http_args(parser: argparse.ArgumentParser) -> None:
    """Add the HTTP (CORS, TLS, socket, docs) and logging flags of ``serve``."""
    h = parser.add_argument_group("http", "CORS, TLS, Unix socket, proxies, API docs")
    for what in ("origins", "methods", "headers"):
        h.add_argument(
            f"--allowed-{what}",
            type=_json_list,
            default=["*"],
            metavar="JSON",
            help=f'CORS: allowed {what}, a JSON list (default: ["*"])',
        )
    h.add_argument(
        "--allow-credentials", action="store_true", help="CORS: allow credentials (cookies)"
    )
    h.add_argument("--ssl-keyfile", default=None, help="TLS private key file (PEM)")
    h.add_argument("--ssl-certfile", default=None, help="TLS certificate chain file (PEM)")
    h.add_argument(
        "--ssl-ca-certs", default=None, help="CA certificates client certificates must chain to"
    )
    h.add_argument(
        "--ssl-cert-reqs",
        type=int,
        default=0,
        choices=(0, 1, 2),
        help="client certificates: 0 not asked, 1 optional, 2 required (Python's ssl.CERT_*)",
    )
    h.add_argument(
        "--root-path",
        default=None,
        help="path prefix under which a proxy serves the API (ASGI root_path)",
    )
    h.add_argument("--uds", default=None, help="listen on this Unix socket instead of host:port")
    h.add_argument(
        "--disable-fastapi-docs",
        action="store_true",
        help="serve no /docs, /redoc or /openapi.json",
    )
    h.add_argument(
        "--disable-uvicorn-access-log", action="store_true", help="no access log line per request"
    )
    lg = parser.add_argument_group("logging")
    lg.add_argument(
        "--log-config-file",
        default=None,
        help="uvicorn's logging configuration file (JSON, YAML or INI, as logging.config takes)",
    )
    lg.add_argument(
        "--enable-log-requests",
        action="store_true",
        help="log one JSON line per finished request (the default; vLLM's spelling)",
    )
    lg.add_argument(
        "--disable-log-stats", action="store_true", help="no periodic engine stats log line"
    )
    lg.add_argument(
        "--log-stats-interval",
        type=float,
        default=10.0,
        help="seconds between engine stats log lines (default: 10)",
    )
    lg.add_argument(
        "--max-log-len",
        type=int,
        default=None,
        help="accepted for vLLM compatibility: request log lines hold counts and timings, "
        "never prompt text, so there is nothing to truncate",
    )


def check_http_args(args: argparse.Namespace) -> None:
    """ValueError for inconsistent HTTP / logging flags (before the model loads)."""
    if args.enable_log_requests and args.disable_log_requests:
        raise ValueError("--enable-log-requests and --disable-log-requests contradict each other")
    if args.log_stats_interval <= 0:
        raise ValueError("--log-stats-interval must be > 0")
    if args.max_log_len is not None and args.max_log_len < 0:
        raise ValueError("--max-log-len must be >= 0")
    if (args.ssl_keyfile is None) != (args.ssl_certfile is None):
        raise ValueError("--ssl-keyfile and --ssl-certfile go together")
    for flag in ("ssl_keyfile", "ssl_certfile", "ssl_ca_certs"):
        value = getattr(args, flag)
        if value is not None and not Path(value).is_file():
            raise ValueError(f"--{flag.replace('_', '-')} {value}: no such file")
    if args.ssl_cert_reqs and args.ssl_ca_certs is None:
        raise ValueError("--ssl-cert-reqs 1 or 2 needs --ssl-ca-certs (to verify client certs)")
    if (args.ssl_ca_certs or args.ssl_cert_reqs) and args.ssl_certfile is None:
        raise ValueError("--ssl-ca-certs / --ssl-cert-reqs need --ssl-keyfile and --ssl-certfile")
    if args.log_config_file is not None and not Path(args.log_config_file).is_file():
        raise ValueError(f"--log-config-file {args.log_config_file}: no such file")
    if args.root_path is not None and not args.root_path.startswith("/"):
        raise ValueError("--root-path must start with '/'")
    if args.max_log_len is not None:
        logger.info("--max-log-len: request log lines carry no prompt text; nothing to cut.")


def uvicorn_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``uvicorn.Config`` keywords of the TLS, socket and access-log flags."""
    kwargs: dict[str, Any] = {"access_log": not args.disable_uvicorn_access_log}
    if args.root_path is not None:
        kwargs["root_path"] = args.root_path
    if args.uds is not None:
        kwargs["uds"] = args.uds
    if args.log_config_file is not None:
        kwargs["log_config"] = args.log_config_file
    if args.ssl_certfile is not None:
        kwargs.update(
            ssl_keyfile=args.ssl_keyfile,
            ssl_certfile=args.ssl_certfile,
            ssl_ca_certs=args.ssl_ca_certs,
            ssl_cert_reqs=args.ssl_cert_reqs,
        )
    return kwargs


def fastapi_kwargs(args: Any) -> dict[str, Any]:
    """The ``FastAPI(...)`` keywords of ``--disable-fastapi-docs`` (``args`` may lack it)."""
    kwargs: dict[str, Any] = {}
    if getattr(args, "disable_fastapi_docs", False):
        kwargs.update(docs_url=None, redoc_url=None, openapi_url=None)
    return kwargs


def cors_kwargs(args: Any) -> dict[str, Any]:
    """``CORSMiddleware``'s keywords (``args`` may lack the flags: vLLM's defaults)."""

    def pick(name: str) -> list[str]:
        value = getattr(args, name, None)
        return ["*"] if value is None else list(value)

    return {
        "allow_origins": pick("allowed_origins"),
        "allow_methods": pick("allowed_methods"),
        "allow_headers": pick("allowed_headers"),
        "allow_credentials": bool(getattr(args, "allow_credentials", False)),
    }
