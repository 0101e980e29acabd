"""The keys JWTs are verified with — an HMAC secret, a PEM public key, or a JWKS — checked
once, at start-up.

Why so strict: the classic JWT holes are configuration mistakes, not bugs in the verifier.
``alg: none`` tokens, HMAC "signed" with a public key that anyone can read (algorithm
confusion), short HMAC secrets and small RSA keys, private keys shipped where only public keys
belong. Every such setting is refused here, with a message naming the flag, so that a server
that starts is one whose tokens cannot be forged that way. The file reading is done by
``flags.py``; this module gets the bytes and returns keys ready for ``JWTVerifier``.

Algorithm rules: ``--jwt-secret`` verifies only HS256 / HS384 / HS512 (default HS256) and
needs as many bytes as the hash (RFC 7518 section 3.2). A public key or JWKS never verifies
HS*; by default it verifies the one algorithm of its own type and curve (RS256 for RSA, ES256
for P-256, ES384 for P-384, EdDSA for Ed25519, ...). ``none`` is never accepted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from jwt.algorithms import get_default_algorithms

logger = logging.getLogger(__name__)

_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}  # RFC 7518 §3.2
# Tried in order for a public key without --jwt-algorithms: the first that fits is its own.
_ASYMMETRIC_DEFAULTS = ("RS256", "ES256", "ES384", "ES512", "ES256K", "EdDSA")
# RFC 7518 §3.4 / RFC 8812: each ES* algorithm has one curve (older PyJWT does not check it).
_EC_CURVES = {
    "ES256": "secp256r1",
    "ES384": "secp384r1",
    "ES512": "secp521r1",
    "ES256K": "secp256k1",
}


def parse_algorithms(value: str | None) -> list[str] | None:
    """``--jwt-algorithms`` as a list (None when not given); never ``none``, only known names."""
    if value is None:
        return None
    algs = list(dict.fromkeys(a.strip() for a in value.split(",") if a.strip()))
    if not algs:
        raise ValueError("--jwt-algorithms is empty")
    known = set(get_default_algorithms())
    for alg in algs:
        if alg.lower() == "none":
            raise ValueError("--jwt-algorithms: 'none' (unsigned tokens) is never accepted")
        if alg not in known:
            names = ", ".join(sorted(known - {"none"}))
            raise ValueError(f"--jwt-algorithms: unknown algorithm {alg!r} (known: {names})")
    return algs


def secret_keys(secret: str, requested: list[str] | None) -> dict[str, bytes]:
    """{algorithm: key} for ``--jwt-secret``: HMAC only, long enough for each algorithm."""
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
        prepared = _fit(alg, raw)
        if prepared is None:  # PyJWT refuses PEM / JWK-looking secrets
            raise ValueError("--jwt-secret looks like a public key; use --jwt-public-key")
        keys[alg] = prepared
    return keys


def public_keys(pem: bytes, path: str, requested: list[str] | None) -> dict[str, Any]:
    """{algorithm: key} for ``--jwt-public-key``: the key's own algorithm, or ``requested``."""
    if requested is not None:
        _check_no_hmac(requested, "--jwt-public-key")
    where = f"--jwt-public-key {path}"
    key = _load_public_key(pem, where)
    keys: dict[str, Any] = {}
    for alg in requested or _ASYMMETRIC_DEFAULTS:
        prepared = _fit(alg, key)
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


def jwks_keys(
    data: bytes, path: str, requested: list[str] | None
) -> tuple[list[str], dict[str | None, jwt.PyJWK]]:
    """(accepted algorithms, {kid: key}) for ``--jwt-jwks-file``; ``kid`` may be None when the
    set has one key. Keys whose ``use`` is not ``sig`` or whose algorithm is not accepted are
    left out (with a warning)."""
    where = f"--jwt-jwks-file {path}"
    if requested is not None:
        _check_no_hmac(requested, "--jwt-jwks-file")
    try:
        document = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    raw = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(raw, list) or not raw:
        raise ValueError(f'{where}: expected a JWKS object {{"keys": [...]}} with at least one key')
    for entry in raw:
        if not isinstance(entry, dict):
            continue
        if entry.get("kty") == "oct" or str(entry.get("alg", "")).startswith("HS"):
            raise ValueError(f"{where}: holds a symmetric ('oct') key; use --jwt-secret for HMAC")
        if "d" in entry:
            raise ValueError(f"{where}: holds private key material ('d'); publish only public keys")
    try:
        keyset = jwt.PyJWKSet(raw)
    except jwt.PyJWTError as e:
        raise ValueError(f"{where}: no usable key ({e})") from None
    signing = [k for k in keyset.keys if k.public_key_use in (None, "sig")]
    algs = requested or sorted({k.algorithm_name for k in signing})
    by_kid: dict[str | None, jwt.PyJWK] = {}
    for jwk in signing:
        if jwk.algorithm_name not in algs:
            continue
        if jwk.key_id in by_kid:
            raise ValueError(f"{where}: two keys share the kid {jwk.key_id!r}")
        _require_strong(jwk.algorithm_name, jwk.key, f"{where} (kid {jwk.key_id!r})")
        by_kid[jwk.key_id] = jwk
    if not by_kid:
        wanted = f" for --jwt-algorithms {','.join(requested)}" if requested else ""
        raise ValueError(f"{where}: no signing key{wanted}")
    if len(by_kid) < len(raw):
        logger.warning("%s: using %d of its %d keys", where, len(by_kid), len(raw))
    return algs, by_kid


def _check_no_hmac(algs: Sequence[str], flag: str) -> None:
    """Refuse HS* with public key material: anyone could forge tokens (algorithm confusion)."""
    hmac = [a for a in algs if a.startswith("HS")]
    if hmac:
        raise ValueError(
            f"--jwt-algorithms {','.join(hmac)} cannot be used with {flag}: an HMAC algorithm "
            "keyed with public key material lets anyone forge tokens (algorithm confusion); "
            "use RS*, PS*, ES* or EdDSA, or --jwt-secret for HMAC"
        )


def _fit(alg: str, key: Any) -> Any | None:
    """``key`` made ready for ``alg`` by PyJWT, or None when the key is not of ``alg``'s kind."""
    try:
        prepared = get_default_algorithms()[alg].prepare_key(key)
    except (jwt.PyJWTError, TypeError, ValueError):
        return None
    if alg in _EC_CURVES and prepared.curve.name != _EC_CURVES[alg]:
        return None
    return prepared


def _require_strong(alg: str, prepared: Any, where: str) -> None:
    """Refuse keys PyJWT finds too short for ``alg`` (e.g. RSA under 2048 bits)."""
    # check_key_length is newer than the oldest PyJWT we accept; without it, no check.
    check_length = getattr(get_default_algorithms()[alg], "check_key_length", None)
    weakness = check_length(prepared) if check_length is not None else None
    if weakness:
        raise ValueError(f"{where}: {weakness}")


def _load_public_key(pem: bytes, where: str) -> Any:
    """The public key of a PEM public key or certificate; never a private key."""
    if b"PRIVATE KEY" in pem:
        raise ValueError(
            f"{where}: holds a private key; give only the public key "
            "('-----BEGIN PUBLIC KEY-----') or a certificate"
        )
    try:
        return serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        pass
    try:
        return x509.load_pem_x509_certificate(pem).public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(f"{where}: not a PEM public key or certificate") from None
