"""Who may call the server (API keys, JWTs) and how much (per-principal rate limits).

Why this package exists: one shared ``--api-key`` compared byte for byte was all the server had.
Real deployments rotate keys (several valid at once), keep them out of ``ps`` (a key file),
front the server with an identity provider that mints JWTs, and need one tenant not to starve
the others. Everything here is plain, synchronous and decided once at start-up; the ASGI gate
(``gate.py``) calls it per request. ``/health`` and ``/ping`` stay open: the gate skips
authentication there (and rate limits there and on ``/metrics``), not this package.

Credentials — always ``Authorization: Bearer <credential>``; the scheme is case-insensitive
(RFC 7235) and surrounding whitespace is tolerated; any other scheme is a 401:

* API keys: ``--api-key KEY`` (repeatable; default ``$PAGEDLLM_API_KEY``; a key on the command
  line replaces the environment's) and ``--api-key-file PATH`` (one key per line; blank lines
  and ``#`` comment lines ignored). Keys are stored only as SHA-256 digests and compared with
  ``secrets.compare_digest`` against every configured key.
* JWTs, from exactly one key source: ``--jwt-secret`` (HMAC; default ``$PAGEDLLM_JWT_SECRET``),
  ``--jwt-public-key PATH`` (PEM public key or certificate) or ``--jwt-jwks-file PATH`` (a JWKS;
  the token's ``kid`` header picks the key). ``--jwt-algorithms`` (comma list) defaults to HS256
  for a secret and to the key's own algorithm for a public key / JWKS (RS256 for RSA, ES256 for
  P-256, ...). ``none`` is never accepted, and HMAC algorithms are refused at start-up with a
  public key or JWKS: an HS256 token "signed" with the public key would otherwise verify
  (algorithm confusion). A token must carry ``exp`` and ``sub``; ``nbf`` / ``iat`` are checked
  when present; ``aud`` / ``iss`` are required and checked when ``--jwt-audience`` /
  ``--jwt-issuer`` are set. Clock leeway: 30 s.

A request that presents a configured API key is that key's principal; otherwise, when JWT is
configured, the credential is verified as a JWT. Principals' subjects — the rate-limit and log
identity — are ``key:<first 12 hex of sha256(key)>`` (stable, not reversible) or ``jwt:<sub>``.

Rate limits: ``--rate-limit-requests-per-minute`` and ``--rate-limit-tokens-per-minute`` (prompt
plus completion tokens, charged when a request finishes), per subject, over a sliding 60-second
window kept in one-second buckets. A refusal is a 429 whose ``retry_after`` attribute (and
``Retry-After`` header) says when to come back.

Modules: ``flags`` (the flags, ``build_auth`` / ``build_rate_limiter``, reading key files),
``jwt_keys`` (checking JWT key material and algorithms), ``authenticator`` (``Authenticator``,
``JWTVerifier``, ``Principal``), ``rate_limit`` (``RateLimiter``).
"""

from pagedllm.entrypoints.openai.auth.authenticator import Authenticator, JWTVerifier, Principal
from pagedllm.entrypoints.openai.auth.flags import add_auth_args, build_auth, build_rate_limiter
from pagedllm.entrypoints.openai.auth.rate_limit import RateLimiter

__all__ = [
    "Authenticator",
    "JWTVerifier",
    "Principal",
    "RateLimiter",
    "add_auth_args",
    "build_auth",
    "build_rate_limiter",
]
