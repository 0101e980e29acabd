"""The ``pagedllm serve`` flags for authentication and rate limits, and what they build.

Why here, apart from the objects: every unusable setting must fail at start-up — before the
model loads, with the flag named — not on the first request. ``cli_serve.py`` calls
``build_auth`` / ``build_rate_limiter`` once for that check and ``api_server.py`` again for the
objects it serves with. This module also does the file reading (key files, PEM, JWKS) so that
``jwt_keys.py`` deals only in key material.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from pagedllm.entrypoints.openai.auth import jwt_keys
from pagedllm.entrypoints.openai.auth.authenticator import Authenticator, JWTVerifier
from pagedllm.entrypoints.openai.auth.rate_limit import RateLimiter

API_KEY_ENV = "PAGEDLLM_API_KEY"
JWT_SECRET_ENV = "PAGEDLLM_JWT_SECRET"


class _AppendReplacingDefault(argparse.Action):
    """``append`` whose first use replaces the default (``$PAGEDLLM_API_KEY``), not extends it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest, None)
        items = [] if current is None or current is self.default else list(current)
        items.append(values)
        setattr(namespace, self.dest, items)


def add_auth_args(group: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    """Add the authentication and rate-limit flags of ``pagedllm serve`` to ``group``."""
    env_key = os.environ.get(API_KEY_ENV) or None
    group.add_argument(
        "--api-key",
        action=_AppendReplacingDefault,
        default=[env_key] if env_key else None,
        metavar="KEY",
        help=f"require 'Authorization: Bearer KEY'; repeatable (default: ${API_KEY_ENV})",
    )
    group.add_argument(
        "--api-key-file",
        default=None,
        metavar="PATH",
        help="file of accepted API keys, one per line ('#' comments and blank lines ignored)",
    )
    group.add_argument(
        "--jwt-secret",
        default=os.environ.get(JWT_SECRET_ENV) or None,
        metavar="SECRET",
        help=f"accept JWTs signed with this HMAC secret (default: ${JWT_SECRET_ENV})",
    )
    group.add_argument(
        "--jwt-public-key",
        default=None,
        metavar="PATH",
        help="accept JWTs signed by this PEM public key or certificate (RS*/PS*/ES*/EdDSA)",
    )
    group.add_argument(
        "--jwt-jwks-file",
        default=None,
        metavar="PATH",
        help="accept JWTs signed by a key of this JWKS file, chosen by the token's 'kid'",
    )
    group.add_argument(
        "--jwt-audience", default=None, metavar="AUD", help="required 'aud' claim of JWTs"
    )
    group.add_argument(
        "--jwt-issuer", default=None, metavar="ISS", help="required 'iss' claim of JWTs"
    )
    group.add_argument(
        "--jwt-algorithms",
        default=None,
        metavar="ALG[,ALG...]",
        help="accepted JWT algorithms (default: HS256 with --jwt-secret, else the key's own, "
        "e.g. RS256 or ES256); 'none' is never accepted",
    )
    group.add_argument(
        "--rate-limit-requests-per-minute",
        type=int,
        default=None,
        metavar="N",
        help="answer 429 when one API key / JWT subject made N requests in the last minute",
    )
    group.add_argument(
        "--rate-limit-tokens-per-minute",
        type=int,
        default=None,
        metavar="N",
        help="answer 429 when one API key / JWT subject used N prompt + completion tokens "
        "in the last minute",
    )


def build_auth(args: argparse.Namespace | Any) -> Authenticator | None:
    """The authenticator the flags describe, or None when none is set (an open server).

    ``args`` is the parsed namespace; a missing attribute counts as an unset flag. Raises
    ValueError, naming the flag, for any unusable setting.
    """
    keys = _api_keys(args)
    verifier = _jwt_verifier(args)
    if not keys and verifier is None:
        return None
    return Authenticator(keys, verifier)


def build_rate_limiter(args: argparse.Namespace | Any) -> RateLimiter | None:
    """The rate limiter the flags describe, or None when no limit is set."""
    rpm = getattr(args, "rate_limit_requests_per_minute", None)
    tpm = getattr(args, "rate_limit_tokens_per_minute", None)
    for flag, value in (
        ("--rate-limit-requests-per-minute", rpm),
        ("--rate-limit-tokens-per-minute", tpm),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1 (got {value})")
    if rpm is None and tpm is None:
        return None
    return RateLimiter(rpm, tpm)


def _read_file(path: str, flag: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None


def _check_key(key: str, where: str) -> None:
    """API keys are visible ASCII: anything else could never arrive intact in a header."""
    if not key:
        raise ValueError(f"{where}: an API key must not be empty")
    if not all("\x21" <= c <= "\x7e" for c in key):
        raise ValueError(
            f"{where}: an API key must be printable ASCII without spaces or control characters"
        )


def _api_keys(args: Any) -> list[str]:
    """``--api-key`` values, then the keys of ``--api-key-file`` (duplicates are harmless)."""
    keys: list[str] = []
    for key in getattr(args, "api_key", None) or []:
        _check_key(key, "--api-key")
        keys.append(key)
    path = getattr(args, "api_key_file", None)
    if path is None:
        return keys
    try:
        text = _read_file(path, "--api-key-file").decode()
    except UnicodeDecodeError:
        raise ValueError(f"--api-key-file {path}: not UTF-8 text") from None
    found = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        _check_key(key, f"--api-key-file {path}:{lineno}")
        keys.append(key)
        found += 1
    if not found:
        raise ValueError(f"--api-key-file {path}: contains no keys")
    return keys


def _jwt_verifier(args: Any) -> JWTVerifier | None:
    """The verifier of the one ``--jwt-*`` key source given (None when none is)."""
    sources = {
        "--jwt-secret": getattr(args, "jwt_secret", None),
        "--jwt-public-key": getattr(args, "jwt_public_key", None),
        "--jwt-jwks-file": getattr(args, "jwt_jwks_file", None),
    }
    options = {
        "--jwt-audience": getattr(args, "jwt_audience", None),
        "--jwt-issuer": getattr(args, "jwt_issuer", None),
        "--jwt-algorithms": getattr(args, "jwt_algorithms", None),
    }
    for flag, value in {**sources, **options}.items():
        if value is not None and not value.strip():
            raise ValueError(f"{flag} must not be empty")
    given = [flag for flag, value in sources.items() if value is not None]
    if not given:
        for flag, value in options.items():
            if value is not None:
                raise ValueError(f"{flag} needs a JWT key: set {', '.join(sources)}")
        return None
    if len(given) > 1:
        raise ValueError(
            f"{' and '.join(given)} are mutually exclusive: give one JWT key source "
            f"(--jwt-secret may come from ${JWT_SECRET_ENV})"
        )
    requested = jwt_keys.parse_algorithms(options["--jwt-algorithms"])
    claims = {"audience": options["--jwt-audience"], "issuer": options["--jwt-issuer"]}
    flag, value = given[0], sources[given[0]]
    if flag == "--jwt-jwks-file":
        data = _read_file(value, flag)
        algs, by_kid = jwt_keys.jwks_keys(data, value, requested)
        return JWTVerifier(algs, jwks=by_kid, **claims)
    if flag == "--jwt-secret":
        keys = jwt_keys.secret_keys(value, requested)
    else:
        keys = jwt_keys.public_keys(_read_file(value, flag), value, requested)
    return JWTVerifier(list(keys), keys_by_alg=keys, **claims)
