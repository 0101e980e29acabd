"""Who may call the server (API keys, JWTs) and how much (per-principal rate limits).

Why this module exists: one shared ``--api-key`` compared byte for byte was all the server had.
Real deployments rotate keys (several valid at once), keep them out of ``ps`` (a key file),
front the server with an identity provider that mints JWTs, and need one tenant not to starve
the others. Everything here is plain, synchronous and decided once at start-up; the ASGI gate
(``gate.py``) calls it per request. ``/health`` (and the other open paths) stay open: the
middleware skips authentication there, not this module.

Credentials — always ``Authorization: Bearer <credential>``; the scheme is case-insensitive
(RFC 7235) and surrounding whitespace is tolerated; any other scheme is a 401:

* API keys: ``--api-key KEY`` (repeatable; default ``$PAGEDLLM_API_KEY``; a key on the command
  line replaces the environment's) and ``--api-key-file PATH`` (one key per line; blank lines
  and ``#`` comment lines ignored). Keys are stored only as SHA-256 digests and compared with
  ``secrets.compare_digest`` against every configured key.
* JWTs (needs ``PyJWT[crypto]``), from exactly one key source: ``--jwt-secret`` (HMAC; default
  ``$PAGEDLLM_JWT_SECRET``), ``--jwt-public-key PATH`` (PEM public key or certificate) or
  ``--jwt-jwks-file PATH`` (a JWKS; the token's ``kid`` header picks the key).
  ``--jwt-algorithms`` (comma list) defaults to HS256 for a secret and to the key's own
  algorithm for a public key / JWKS (RS256 for RSA, ES256 for P-256, ...). ``none`` is never
  accepted, and HMAC algorithms are refused at start-up with a public key or JWKS: an HS256
  token "signed" with the public key would otherwise verify (algorithm confusion). A token must
  carry ``exp`` and ``sub``; ``nbf`` / ``iat`` are checked when present; ``aud`` / ``iss`` are
  required and checked when ``--jwt-audience`` / ``--jwt-issuer`` are set. Clock leeway: 30 s.

A request that presents a configured API key is that key's principal; otherwise, when JWT is
configured, the credential is verified as a JWT. Principals' subjects — the rate-limit and log
identity — are ``key:<first 12 hex of sha256(key)>`` (stable, not reversible) or ``jwt:<sub>``.

Rate limits: ``--rate-limit-requests-per-minute`` and ``--rate-limit-tokens-per-minute`` (prompt
plus completion tokens, charged when a request finishes), per subject, over a sliding 60-second
window kept in one-second buckets (see ``RateLimiter``). A refusal is a 429 whose ``retry_after``
attribute (and ``Retry-After`` header) says when to come back.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pagedllm.entrypoints.openai.errors import APIError

logger = logging.getLogger(__name__)

API_KEY_ENV = "PAGEDLLM_API_KEY"
JWT_SECRET_ENV = "PAGEDLLM_JWT_SECRET"
JWT_LEEWAY_S = 30.0
RATE_WINDOW_S = 60

_CHALLENGE = "Bearer"
_CHALLENGE_BAD_TOKEN = 'Bearer error="invalid_token"'
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}  # RFC 7518 §3.2
_ASYMMETRIC_DEFAULTS = ("RS256", "ES256", "ES384", "ES512", "ES256K", "EdDSA")
_JWT_KEY_FLAGS = ("--jwt-secret", "--jwt-public-key", "--jwt-jwks-file")


# --------------------------------------------------------------------------- flags


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

    Raises ValueError, naming the flag, for any unusable setting.
    """
    keys = _api_keys(args)
    verifier = _jwt_verifier(args)
    if not keys and verifier is None:
        return None
    return Authenticator(keys, verifier)


def build_rate_limiter(args: argparse.Namespace | Any) -> RateLimiter | None:
    """The rate limiter the flags describe, or None when no limit is set."""
    limits = {
        "--rate-limit-requests-per-minute": getattr(args, "rate_limit_requests_per_minute", None),
        "--rate-limit-tokens-per-minute": getattr(args, "rate_limit_tokens_per_minute", None),
    }
    for flag, value in limits.items():
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1 (got {value})")
    rpm, tpm = limits.values()
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
    keys: list[str] = []
    for key in getattr(args, "api_key", None) or []:
        _check_key(key, "--api-key")
        keys.append(key)
    path = getattr(args, "api_key_file", None)
    if path is not None:
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
    return list(dict.fromkeys(keys))


# --------------------------------------------------------------------------- JWT set-up


def _import_jwt() -> Any:
    try:
        import jwt
    except ImportError:
        raise ValueError(
            "the --jwt-* options need PyJWT with cryptography: pip install 'PyJWT[crypto]'"
        ) from None
    return jwt


def _parse_algorithms(value: str | None, known: Iterable[str]) -> list[str] | None:
    """``--jwt-algorithms`` as a list (None when not given); never ``none``, only known names."""
    if value is None:
        return None
    algs = list(dict.fromkeys(a.strip() for a in value.split(",") if a.strip()))
    if not algs:
        raise ValueError("--jwt-algorithms is empty")
    known = set(known)
    for alg in algs:
        if alg.lower() == "none":
            raise ValueError("--jwt-algorithms: 'none' (unsigned tokens) is never accepted")
        if alg not in known:
            names = ", ".join(sorted(known - {"none"}))
            raise ValueError(f"--jwt-algorithms: unknown algorithm {alg!r} (known: {names})")
    return algs


def _check_no_hmac(algs: Sequence[str], flag: str) -> None:
    hmac = [a for a in algs if a.startswith("HS")]
    if hmac:
        raise ValueError(
            f"--jwt-algorithms {','.join(hmac)} cannot be used with {flag}: an HMAC algorithm "
            "keyed with public key material lets anyone forge tokens (algorithm confusion); "
            "use RS*, PS*, ES* or EdDSA, or --jwt-secret for HMAC"
        )


def _fit(jwt: Any, alg: str, key: Any) -> Any | None:
    """``key`` made ready for ``alg`` by PyJWT, or None when the key is not of ``alg``'s kind."""
    from jwt.algorithms import get_default_algorithms

    try:
        return get_default_algorithms()[alg].prepare_key(key)
    except (jwt.PyJWTError, TypeError, ValueError):
        return None


def _require_strong(alg: str, prepared: Any, where: str) -> None:
    """Refuse keys PyJWT finds too short for ``alg`` (e.g. RSA under 2048 bits)."""
    from jwt.algorithms import get_default_algorithms

    check_length = getattr(get_default_algorithms()[alg], "check_key_length", None)
    weakness = check_length(prepared) if check_length is not None else None  # PyJWT >= 2.10
    if weakness:
        raise ValueError(f"{where}: {weakness}")


def _secret_keys(jwt: Any, secret: str, requested: list[str] | None) -> dict[str, bytes]:
    algs = requested or ["HS256"]
    others = [a for a in algs if not a.startswith("HS")]
    if others:
        raise ValueError(
            f"--jwt-algorithms {','.join(others)} needs --jwt-public-key or --jwt-jwks-file; "
            "--jwt-secret verifies only HS256, HS384 and HS512"
        )
    raw = secret.encode()
    keys: dict[str, bytes] = {}
    for alg in algs:
        if len(raw) < _HMAC_MIN_BYTES[alg]:
            raise ValueError(
                f"--jwt-secret is {len(raw)} bytes; {alg} needs at least "
                f"{_HMAC_MIN_BYTES[alg]} (RFC 7518 section 3.2)"
            )
        prepared = _fit(jwt, alg, raw)
        if prepared is None:  # PyJWT refuses PEM / JWK-looking secrets
            raise ValueError("--jwt-secret looks like a public key; use --jwt-public-key")
        keys[alg] = prepared
    return keys


def _load_public_key(path: str) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    data = _read_file(path, "--jwt-public-key")
    if b"PRIVATE KEY" in data:
        raise ValueError(
            f"--jwt-public-key {path}: holds a private key; give only the public key "
            "('-----BEGIN PUBLIC KEY-----') or a certificate"
        )
    try:
        return serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        pass
    try:
        return x509.load_pem_x509_certificate(data).public_key()
    except (ValueError, TypeError):
        raise ValueError(f"--jwt-public-key {path}: not a PEM public key or certificate") from None


def _public_keys(jwt: Any, path: str, requested: list[str] | None) -> dict[str, Any]:
    if requested is not None:
        _check_no_hmac(requested, "--jwt-public-key")
    key = _load_public_key(path)
    where = f"--jwt-public-key {path}"
    keys: dict[str, Any] = {}
    for alg in requested or _ASYMMETRIC_DEFAULTS:
        prepared = _fit(jwt, alg, key)
        if prepared is None:
            if requested is not None:
                raise ValueError(f"--jwt-algorithms {alg} does not fit the key in {where}")
            continue
        _require_strong(alg, prepared, where)
        keys[alg] = prepared
        if requested is None:
            break  # the default: the one algorithm this key's type (and curve) is for
    if not keys:
        raise ValueError(f"{where}: no default algorithm fits this key; set --jwt-algorithms")
    return keys


def _jwks_keys(jwt: Any, path: str, requested: list[str] | None) -> tuple[list[str], dict]:
    """(accepted algorithms, {kid: PyJWK}) from a JWKS file; ``kid`` may be None for one key."""
    flag = f"--jwt-jwks-file {path}"
    if requested is not None:
        _check_no_hmac(requested, "--jwt-jwks-file")
    try:
        data = json.loads(_read_file(path, "--jwt-jwks-file"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{flag}: not valid JSON ({e})") from None
    raw = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(raw, list) or not raw:
        raise ValueError(f'{flag}: expected a JWKS object {{"keys": [...]}} with at least one key')
    for jwk in raw:
        if not isinstance(jwk, dict):
            continue
        if jwk.get("kty") == "oct" or str(jwk.get("alg", "")).startswith("HS"):
            raise ValueError(f"{flag}: holds a symmetric ('oct') key; use --jwt-secret for HMAC")
        if "d" in jwk:
            raise ValueError(f"{flag}: holds private key material ('d'); publish only public keys")
    try:
        keyset = jwt.PyJWKSet(raw)
    except jwt.PyJWTError as e:
        raise ValueError(f"{flag}: no usable key ({e})") from None
    usable = [k for k in keyset.keys if k.public_key_use in (None, "sig")]
    algs = requested or sorted({k.algorithm_name for k in usable})
    by_kid: dict[str | None, Any] = {}
    for jwk in usable:
        if jwk.algorithm_name not in algs:
            continue
        if jwk.key_id in by_kid:
            raise ValueError(f"{flag}: two keys share the kid {jwk.key_id!r}")
        _require_strong(jwk.algorithm_name, jwk.key, f"{flag} (kid {jwk.key_id!r})")
        by_kid[jwk.key_id] = jwk
    if not by_kid:
        raise ValueError(f"{flag}: no signing key for --jwt-algorithms {','.join(algs)}")
    if len(by_kid) < len(raw):
        logger.warning("%s: using %d of its %d keys", flag, len(by_kid), len(raw))
    return algs, by_kid


def _jwt_verifier(args: Any) -> JWTVerifier | None:
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
                raise ValueError(f"{flag} needs a JWT key: set {', '.join(_JWT_KEY_FLAGS)}")
        return None
    if len(given) > 1:
        raise ValueError(
            f"{' and '.join(given)} are mutually exclusive: give one JWT key source "
            f"(--jwt-secret may come from ${JWT_SECRET_ENV})"
        )
    jwt = _import_jwt()
    from jwt.algorithms import get_default_algorithms

    requested = _parse_algorithms(options["--jwt-algorithms"], get_default_algorithms())
    claims = {"audience": options["--jwt-audience"], "issuer": options["--jwt-issuer"]}
    if sources["--jwt-secret"] is not None:
        keys = _secret_keys(jwt, sources["--jwt-secret"], requested)
        return JWTVerifier(list(keys), keys_by_alg=keys, **claims)
    if sources["--jwt-public-key"] is not None:
        keys = _public_keys(jwt, sources["--jwt-public-key"], requested)
        return JWTVerifier(list(keys), keys_by_alg=keys, **claims)
    algs, by_kid = _jwks_keys(jwt, sources["--jwt-jwks-file"], requested)
    return JWTVerifier(algs, jwks=by_kid, **claims)


# --------------------------------------------------------------------------- authentication


@dataclass(frozen=True)
class Principal:
    """Who made a request: the rate-limit and log identity, never a secret."""

    subject: str
    kind: Literal["api_key", "jwt"]


def _unauthorized(message: str, *, bad_token: bool = False) -> APIError:
    """A 401; ``bad_token`` when a credential was presented but is invalid (RFC 6750 §3.1)."""
    err = APIError(401, message, code="invalid_api_key")
    challenge = _CHALLENGE_BAD_TOKEN if bad_token else _CHALLENGE
    err.www_authenticate = challenge  # type: ignore[attr-defined]
    err.headers = {"WWW-Authenticate": challenge}  # sent by APIError.response()
    return err


def _bearer_credential(authorization: str | None) -> str:
    """The credential of ``Bearer <credential>`` (any case, any surrounding whitespace)."""
    parts = (authorization or "").split()
    if not parts:
        raise _unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
    if parts[0].lower() != "bearer":
        raise _unauthorized("The Authorization header must use the Bearer scheme.")
    if len(parts) != 2:
        raise _unauthorized("Malformed Authorization header: expected 'Bearer <key>'.")
    return parts[1]


def _key_subject(key: str) -> str:
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _jwt_error_messages(jwt: Any) -> list[tuple[type[Exception], str]]:
    """(PyJWT exception, what the client is told), most specific first; never a secret."""
    table = [
        ("ExpiredSignatureError", "The token has expired."),
        ("ImmatureSignatureError", "The token is not valid yet (nbf or iat in the future)."),
        ("InvalidAudienceError", "The token's audience ('aud') is not accepted."),
        ("InvalidIssuerError", "The token's issuer ('iss') is not accepted."),
        ("InvalidSignatureError", "The token signature is invalid."),
        ("InvalidAlgorithmError", "The token algorithm is not accepted."),
        ("InvalidSubjectError", "The token's 'sub' claim must be a non-empty string."),
        ("InvalidIssuedAtError", "The token's 'iat' claim must be a number."),
        ("DecodeError", "Malformed token."),
    ]
    return [(getattr(jwt, name), message) for name, message in table if hasattr(jwt, name)]


class JWTVerifier:
    """Verifies a JWT's signature and claims; built by ``build_auth`` from the ``--jwt-*`` flags.

    Keys come either per algorithm (``keys_by_alg``: a secret or one public key) or from a JWKS
    (``jwks``: kid -> ``PyJWK``; a token without ``kid`` matches only a one-key set).
    """

    def __init__(
        self,
        algorithms: Sequence[str],
        *,
        keys_by_alg: dict[str, Any] | None = None,
        jwks: dict[str | None, Any] | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway_s: float = JWT_LEEWAY_S,
    ) -> None:
        if (keys_by_alg is None) == (jwks is None):
            raise ValueError("give exactly one of keys_by_alg and jwks")
        if any(a.lower() == "none" for a in algorithms):
            raise ValueError("the 'none' algorithm is never accepted")
        self._jwt = _import_jwt()
        self.algorithms = tuple(algorithms)
        self._keys_by_alg = keys_by_alg
        self._jwks = jwks
        self.audience = audience
        self.issuer = issuer
        self.leeway_s = leeway_s
        required = ["exp", "sub"]
        required += ["aud"] if audience is not None else []
        required += ["iss"] if issuer is not None else []
        self._options = {"require": required}
        self._errors = _jwt_error_messages(self._jwt)

    def verify(self, token: str) -> Principal:
        """The token's principal; raises a 401 ``APIError`` saying what is wrong with it."""
        jwt = self._jwt
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _unauthorized("Malformed token.", bad_token=True) from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise _unauthorized(
                f"The token algorithm is not accepted (accepted: {', '.join(self.algorithms)}).",
                bad_token=True,
            )
        key = self._key_for(alg, header.get("kid"))
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options=self._options,
            )
        except jwt.MissingRequiredClaimError as e:
            message = f"The token lacks the required '{e.claim}' claim."
            raise _unauthorized(message, bad_token=True) from None
        except (jwt.PyJWTError, ValueError, TypeError) as e:
            raise _unauthorized(self._describe(e), bad_token=True) from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            message = "The token's 'sub' claim must be a non-empty string."
            raise _unauthorized(message, bad_token=True)
        return Principal("jwt:" + sub, "jwt")

    def _key_for(self, alg: str, kid: Any) -> Any:
        if self._keys_by_alg is not None:
            key = self._keys_by_alg.get(alg)
            if key is None:
                raise _unauthorized("The token algorithm is not accepted.", bad_token=True)
            return key
        assert self._jwks is not None
        if kid is None:
            if len(self._jwks) != 1:
                raise _unauthorized("The token has no 'kid' header.", bad_token=True)
            jwk = next(iter(self._jwks.values()))
        else:
            jwk = self._jwks.get(kid) if isinstance(kid, str) else None
            if jwk is None:
                raise _unauthorized("The token's 'kid' names no known key.", bad_token=True)
        if jwk.algorithm_name != alg:
            raise _unauthorized("The token algorithm does not match its key.", bad_token=True)
        return jwk.key

    def _describe(self, error: Exception) -> str:
        for kind, message in self._errors:
            if isinstance(error, kind):
                return message
        return "Invalid token."


class Authenticator:
    """Turns an ``Authorization`` header into a ``Principal`` or a 401 ``APIError``.

    ``api_keys`` are kept only as SHA-256 digests; a presented credential is compared with every
    one of them (``secrets.compare_digest``, no early exit). A credential that is no configured
    key goes to ``jwt`` when JWT is configured.
    """

    def __init__(self, api_keys: Iterable[str] = (), jwt: JWTVerifier | None = None) -> None:
        self._keys = [
            (hashlib.sha256(key.encode()).digest(), _key_subject(key))
            for key in dict.fromkeys(api_keys)
        ]
        self._jwt = jwt
        if not self._keys and jwt is None:
            raise ValueError("an Authenticator needs at least one API key or a JWT verifier")

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal behind ``authorization`` (the raw header value, None when absent)."""
        credential = _bearer_credential(authorization)
        subject = self._match_key(credential)
        if subject is not None:
            return Principal(subject, "api_key")
        if self._jwt is not None and credential.count(".") == 2:
            return self._jwt.verify(credential)
        if self._keys:
            raise _unauthorized("Invalid API key.", bad_token=True)
        raise _unauthorized("Malformed token: expected a JWT.", bad_token=True)

    def www_authenticate(self, err: APIError) -> str:
        """The ``WWW-Authenticate`` value for a 401 raised by ``authenticate``."""
        return getattr(err, "www_authenticate", _CHALLENGE)

    def describe(self) -> str:
        """What is accepted, for a start-up log line (no secrets)."""
        parts = [f"{len(self._keys)} API key(s)"] if self._keys else []
        if self._jwt is not None:
            parts.append(f"JWT ({', '.join(self._jwt.algorithms)})")
        return " and ".join(parts)

    def _match_key(self, credential: str) -> str | None:
        if not self._keys or not credential.isascii():
            return None
        digest = hashlib.sha256(credential.encode()).digest()
        found: str | None = None
        for key_digest, subject in self._keys:
            if secrets.compare_digest(digest, key_digest):
                found = subject
        return found


# --------------------------------------------------------------------------- rate limits


class _Window:
    """One subject's last minute: ``[second, requests, tokens]`` buckets, oldest first."""

    __slots__ = ("buckets", "requests", "tokens")

    def __init__(self) -> None:
        self.buckets: deque[list[int]] = deque()
        self.requests = 0
        self.tokens = 0

    def expire(self, now: float) -> None:
        """Drop buckets whose every moment is a full window old."""
        while self.buckets and _expiry(self.buckets[0][0]) <= now:
            _, requests, tokens = self.buckets.popleft()
            self.requests -= requests
            self.tokens -= tokens

    def add(self, now: float, requests: int, tokens: int) -> None:
        second = math.floor(now)
        if not self.buckets or self.buckets[-1][0] != second:
            self.buckets.append([second, 0, 0])
        self.buckets[-1][1] += requests
        self.buckets[-1][2] += tokens
        self.requests += requests
        self.tokens += tokens

    def free_at(self, field: int, total: int, limit: int) -> float:
        """When expiring buckets brings ``total`` (requests: 1, tokens: 2) below ``limit``."""
        for bucket in self.buckets:
            total -= bucket[field]
            if total < limit:
                return _expiry(bucket[0])
        return 0.0  # unreachable while total >= limit


def _expiry(second: int) -> float:
    """A bucket for ``[second, second + 1)`` counts until a full window after its end."""
    return second + 1 + RATE_WINDOW_S


class RateLimiter:
    """Per-subject requests and tokens over a sliding 60-second window.

    Each subject's window holds one-second buckets; an event counts until 60 s after the end of
    its second (60 to 61 s), so no rolling 60 s ever holds more than the limit. ``check`` refuses
    a request (429, ``code="rate_limit_exceeded"``, ``retry_after`` seconds on the error) when
    the subject already made ``requests_per_minute`` requests or used ``tokens_per_minute``
    tokens in the window, and records it otherwise; ``charge`` adds a finished request's tokens.
    Memory is bounded: at most 62 buckets per subject, and subjects whose window emptied are
    dropped — their own on each call, all of them in a sweep at most every few seconds.
    Not thread-safe (the asyncio loop calls it).
    """

    SWEEP_INTERVAL_S = 5.0

    def __init__(
        self,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for name, value in (
            ("requests_per_minute", requests_per_minute),
            ("tokens_per_minute", tokens_per_minute),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (got {value})")
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._next_sweep = clock() + self.SWEEP_INTERVAL_S

    def __len__(self) -> int:
        """How many subjects are tracked (memory use)."""
        return len(self._windows)

    def check(self, subject: str) -> None:
        """Admit and record one request of ``subject``, or raise a 429 ``APIError``."""
        now = self._clock()
        self._maybe_sweep(now)
        window = self._current(subject, now)
        if window is not None:
            self._refuse_if_over(window, now)
        else:
            window = self._windows[subject] = _Window()
        window.add(now, 1, 0)

    def charge(self, subject: str, tokens: int) -> None:
        """Add a finished request's prompt + completion ``tokens`` to ``subject``'s window."""
        if self.tokens_per_minute is None or tokens <= 0:
            return
        now = self._clock()
        self._maybe_sweep(now)
        window = self._current(subject, now)
        if window is None:
            window = self._windows[subject] = _Window()
        window.add(now, 0, tokens)

    def prune(self) -> None:
        """Forget every subject whose window is empty now."""
        now = self._clock()
        for subject in list(self._windows):
            self._current(subject, now)
        self._next_sweep = now + self.SWEEP_INTERVAL_S

    def _maybe_sweep(self, now: float) -> None:
        """Prune all subjects, at most once every ``SWEEP_INTERVAL_S``."""
        if now >= self._next_sweep:
            self.prune()

    def _current(self, subject: str, now: float) -> _Window | None:
        """``subject``'s window with old buckets dropped (None, and forgotten, when empty)."""
        window = self._windows.get(subject)
        if window is None:
            return None
        window.expire(now)
        if not window.buckets:
            del self._windows[subject]
            return None
        return window

    def _refuse_if_over(self, window: _Window, now: float) -> None:
        reasons: list[str] = []
        free_at = now
        rpm, tpm = self.requests_per_minute, self.tokens_per_minute
        if rpm is not None and window.requests >= rpm:
            reasons.append(f"{rpm} requests per minute")
            free_at = max(free_at, window.free_at(1, window.requests, rpm))
        if tpm is not None and window.tokens >= tpm:
            reasons.append(f"{tpm} tokens per minute ({window.tokens} used)")
            free_at = max(free_at, window.free_at(2, window.tokens, tpm))
        if not reasons:
            return
        retry_after = max(1, math.ceil(free_at - now))
        err = APIError(
            429,
            f"Rate limit exceeded: {' and '.join(reasons)}; retry after {retry_after} s.",
            code="rate_limit_exceeded",
        )
        err.retry_after = retry_after  # type: ignore[attr-defined]
        err.headers = {"Retry-After": str(retry_after)}  # sent by APIError.response()
        raise err
