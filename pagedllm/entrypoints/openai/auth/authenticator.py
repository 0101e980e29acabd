"""From an ``Authorization`` header to a ``Principal`` — or to a 401 that says what is wrong.

Why a principal: the rate limiter and the request log need a stable identity per caller that
is never the secret itself. An API key becomes ``key:<first 12 hex of sha256(key)>`` (stable,
not reversible), a JWT its ``jwt:<sub>``. Why the care in comparing: API keys are held only as
SHA-256 digests and a presented credential is compared with every one of them
(``secrets.compare_digest``, no early exit), so neither memory dumps nor timing give keys away.
401s carry the RFC 6750 challenge: ``Bearer`` when no credential came, ``Bearer
error="invalid_token"`` when one came and was refused; messages never echo a secret.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import jwt
from jwt.exceptions import (
    DecodeError,
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAlgorithmError,
    InvalidAudienceError,
    InvalidIssuedAtError,
    InvalidIssuerError,
    InvalidSignatureError,
    InvalidSubjectError,  # not re-exported as InvalidSubjectError
    MissingRequiredClaimError,
    PyJWTError,
)

from pagedllm.entrypoints.openai.errors import APIError

JWT_LEEWAY_S = 30.0

_CHALLENGE = "Bearer"
_CHALLENGE_BAD_TOKEN = 'Bearer error="invalid_token"'

# (PyJWT exception, what the client is told), most specific first; never a secret.
_JWT_ERROR_MESSAGES: tuple[tuple[type[Exception], str], ...] = (
    (ExpiredSignatureError, "The token has expired."),
    (ImmatureSignatureError, "The token is not valid yet (nbf or iat in the future)."),
    (InvalidAudienceError, "The token's audience ('aud') is not accepted."),
    (InvalidIssuerError, "The token's issuer ('iss') is not accepted."),
    (InvalidSignatureError, "The token signature is invalid."),  # before DecodeError
    (InvalidAlgorithmError, "The token algorithm is not accepted."),
    (InvalidSubjectError, "The token's 'sub' claim must be a non-empty string."),
    (InvalidIssuedAtError, "The token's 'iat' claim must be a number."),
    (DecodeError, "Malformed token."),
)


@dataclass(frozen=True)
class Principal:
    """Who made a request: the rate-limit and log identity, never a secret."""

    subject: str
    kind: Literal["api_key", "jwt"]


def _unauthorized(message: str, *, bad_token: bool = False) -> APIError:
    """A 401; ``bad_token`` when a credential was presented but is invalid (RFC 6750 §3.1)."""
    challenge = _CHALLENGE_BAD_TOKEN if bad_token else _CHALLENGE
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": challenge})


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


class JWTVerifier:
    """Verifies a JWT's signature and claims; built by ``build_auth`` from the ``--jwt-*`` flags.

    Keys come either per algorithm (``keys_by_alg``: a secret or one public key) or from a JWKS
    (``jwks``: kid -> ``PyJWK``; a token without ``kid`` matches only a one-key set). Only the
    token's own ``alg`` is tried, and only when it is one of ``algorithms`` — never ``none``.
    A token must carry ``exp`` and ``sub`` (a non-empty string); ``nbf`` / ``iat`` are checked
    when present; ``aud`` / ``iss`` are required and checked when ``audience`` / ``issuer`` are
    set. Clocks may differ by ``leeway_s``.
    """

    def __init__(
        self,
        algorithms: Sequence[str],
        *,
        keys_by_alg: dict[str, Any] | None = None,
        jwks: dict[str | None, jwt.PyJWK] | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway_s: float = JWT_LEEWAY_S,
    ) -> None:
        if (keys_by_alg is None) == (jwks is None):
            raise ValueError("give exactly one of keys_by_alg and jwks")
        if any(a.lower() == "none" for a in algorithms):
            raise ValueError("the 'none' algorithm is never accepted")
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

    def verify(self, token: str) -> Principal:
        """The token's principal; raises a 401 ``APIError`` saying what is wrong with it."""
        try:
            header = jwt.get_unverified_header(token)
        except PyJWTError:
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
        except MissingRequiredClaimError as e:
            message = f"The token lacks the required '{e.claim}' claim."
            raise _unauthorized(message, bad_token=True) from None
        except (PyJWTError, ValueError, TypeError) as e:
            raise _unauthorized(_describe(e), bad_token=True) from None
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


def _describe(error: Exception) -> str:
    for kind, message in _JWT_ERROR_MESSAGES:
        if isinstance(error, kind):
            return message
    return "Invalid token."


class Authenticator:
    """Turns an ``Authorization`` header into a ``Principal`` or a 401 ``APIError``.

    Built by ``build_auth`` from the flags; ``GateMiddleware`` (``gate.py``) calls
    ``authenticate`` on every request to a non-open path. A credential that matches a
    configured API key is that key's principal; otherwise, when JWT is configured and the
    credential looks like one (three dot-separated parts), ``jwt`` verifies it.
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
        return (err.headers or {}).get("WWW-Authenticate", _CHALLENGE)

    def _match_key(self, credential: str) -> str | None:
        """The subject of the configured key equal to ``credential``; every key is compared."""
        if not self._keys or not credential.isascii():  # keys are ASCII (checked at start-up)
            return None
        digest = hashlib.sha256(credential.encode()).digest()
        found: str | None = None
        for key_digest, subject in self._keys:
            if secrets.compare_digest(digest, key_digest):
                found = subject
        return found
