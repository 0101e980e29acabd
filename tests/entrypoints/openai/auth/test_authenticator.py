"""``auth/authenticator.py``: Bearer parsing, API-key principals and JWT verification."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pagedllm.entrypoints.openai.auth import Authenticator, JWTVerifier, Principal
from tests.entrypoints.openai.auth.conftest import (
    SECRET,
    auth_for,
    claims,
    hand_made_token,
    public_pem,
    refused,
)

# --------------------------------------------------------------------------- API keys


def test_repeated_api_key_flags_each_authenticate_as_their_own_subject() -> None:
    auth = auth_for("--api-key", "sk-one", "--api-key", "sk-two")
    one = auth.authenticate("Bearer sk-one")
    two = auth.authenticate("Bearer sk-two")
    assert one == Principal("key:" + hashlib.sha256(b"sk-one").hexdigest()[:12], "api_key")
    assert two.kind == "api_key" and two.subject != one.subject
    assert "sk-two" not in two.subject


@pytest.mark.parametrize("header", ["bearer sk-k", "BEARER sk-k", "  Bearer \t sk-k  "])
def test_bearer_scheme_is_case_insensitive_and_whitespace_tolerant(header: str) -> None:
    assert auth_for("--api-key", "sk-k").authenticate(header).kind == "api_key"


def test_wrong_key_is_refused_as_an_invalid_token() -> None:
    auth = auth_for("--api-key", "sk-right")
    for header in ("Bearer sk-wrong", "Bearer sk-righ", "Bearer sk-right2", "Bearer sk-rïght"):
        err = refused(auth, header)
        assert auth.www_authenticate(err) == 'Bearer error="invalid_token"'
        assert err.headers == {"WWW-Authenticate": 'Bearer error="invalid_token"'}
        assert "sk-right" not in err.message


@pytest.mark.parametrize("header", [None, "", "   "])
def test_missing_credentials_get_a_bare_bearer_challenge(header: str | None) -> None:
    auth = auth_for("--api-key", "sk-k")
    err = refused(auth, header)
    assert auth.www_authenticate(err) == "Bearer"
    assert "missing" in err.message.lower()


@pytest.mark.parametrize(
    "header",
    [
        "Basic " + base64.b64encode(b"user:sk-k").decode(),
        "Basic sk-k",
        "sk-k",  # no scheme
        "Token sk-k",
        "Bearer",  # no credential
        "Bearer sk-k extra",
    ],
)
def test_other_schemes_and_malformed_headers_are_refused(header: str) -> None:
    refused(auth_for("--api-key", "sk-k"), header)


def test_an_authenticator_needs_something_to_accept() -> None:
    with pytest.raises(ValueError):
        Authenticator([])
    with pytest.raises(ValueError, match="none"):
        JWTVerifier(["none"], keys_by_alg={"none": None})


# --------------------------------------------------------------------------- JWT with a secret


def test_hs256_token_is_accepted_with_its_sub_as_subject() -> None:
    auth = auth_for("--jwt-secret", SECRET)
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert auth.authenticate(f"Bearer {token}") == Principal("jwt:alice", "jwt")


def test_api_keys_and_jwts_work_side_by_side() -> None:
    auth = auth_for("--api-key", "sk-k", "--jwt-secret", SECRET)
    assert auth.authenticate("Bearer sk-k").kind == "api_key"
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert auth.authenticate(f"Bearer {token}").kind == "jwt"
    assert "Invalid API key" in refused(auth, "Bearer sk-other").message


def test_expired_token_is_refused_saying_so() -> None:
    auth = auth_for("--jwt-secret", SECRET)
    now = int(time.time())
    token = jwt.encode(claims(iat=now - 7200, exp=now - 3600), SECRET, algorithm="HS256")
    err = refused(auth, f"Bearer {token}")
    assert "expired" in err.message
    assert auth.www_authenticate(err) == 'Bearer error="invalid_token"'


def test_clock_leeway_tolerates_slightly_stale_and_early_tokens() -> None:
    auth = auth_for("--jwt-secret", SECRET)
    now = int(time.time())
    stale = jwt.encode(claims(exp=now - 5), SECRET, algorithm="HS256")
    early = jwt.encode(claims(nbf=now + 5, iat=now + 5), SECRET, algorithm="HS256")
    assert auth.authenticate(f"Bearer {stale}").kind == "jwt"
    assert auth.authenticate(f"Bearer {early}").kind == "jwt"
    not_yet = jwt.encode(claims(nbf=now + 600), SECRET, algorithm="HS256")
    assert "not valid yet" in refused(auth, f"Bearer {not_yet}").message


def test_audience_is_required_and_checked_when_configured() -> None:
    auth = auth_for("--jwt-secret", SECRET, "--jwt-audience", "pagedllm")
    ok = jwt.encode(claims(aud="pagedllm"), SECRET, algorithm="HS256")
    assert auth.authenticate(f"Bearer {ok}").subject == "jwt:alice"
    wrong = jwt.encode(claims(aud="billing"), SECRET, algorithm="HS256")
    assert "audience" in refused(auth, f"Bearer {wrong}").message
    missing = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert "'aud'" in refused(auth, f"Bearer {missing}").message


def test_issuer_is_required_and_checked_when_configured() -> None:
    auth = auth_for("--jwt-secret", SECRET, "--jwt-issuer", "https://idp.example")
    ok = jwt.encode(claims(iss="https://idp.example"), SECRET, algorithm="HS256")
    assert auth.authenticate(f"Bearer {ok}").kind == "jwt"
    wrong = jwt.encode(claims(iss="https://evil.example"), SECRET, algorithm="HS256")
    assert "issuer" in refused(auth, f"Bearer {wrong}").message
    missing = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert "'iss'" in refused(auth, f"Bearer {missing}").message


@pytest.mark.parametrize("claim", ["sub", "exp"])
def test_sub_and_exp_are_required(claim: str) -> None:
    auth = auth_for("--jwt-secret", SECRET)
    payload = claims()
    del payload[claim]
    token = jwt.encode(payload, SECRET, algorithm="HS256")
    assert f"'{claim}'" in refused(auth, f"Bearer {token}").message


@pytest.mark.parametrize("sub", ["", 42])
def test_sub_must_be_a_non_empty_string(sub: Any) -> None:
    auth = auth_for("--jwt-secret", SECRET)
    token = hand_made_token({"alg": "HS256", "typ": "JWT"}, claims(sub=sub), SECRET.encode())
    assert "'sub'" in refused(auth, f"Bearer {token}").message


def test_token_signed_with_another_secret_is_refused() -> None:
    auth = auth_for("--jwt-secret", SECRET)
    token = jwt.encode(claims(), "x" * 40, algorithm="HS256")
    err = refused(auth, f"Bearer {token}")
    assert "signature" in err.message
    assert SECRET not in err.message


def test_garbage_token_is_refused() -> None:
    auth = auth_for("--jwt-secret", SECRET)
    assert "Malformed" in refused(auth, "Bearer aaa.bbb.ccc").message
    assert "expected a JWT" in refused(auth, "Bearer not-a-jwt").message


def test_alg_none_and_unlisted_algorithms_are_refused() -> None:
    auth = auth_for("--jwt-secret", SECRET)
    token = hand_made_token({"alg": "none", "typ": "JWT"}, claims(), None)
    assert "algorithm" in refused(auth, f"Bearer {token}").message
    hs512 = jwt.encode(claims(), "k" * 64, algorithm="HS512")
    assert "accepted: HS256" in refused(auth, f"Bearer {hs512}").message


# --------------------------------------------------------------------------- JWT with public keys


def test_rs256_token_is_verified_with_a_pem_public_key(rsa_key: Any, tmp_path: Path) -> None:
    pem = tmp_path / "idp.pem"
    pem.write_bytes(public_pem(rsa_key))
    auth = auth_for("--jwt-public-key", str(pem))
    token = jwt.encode(claims(sub="svc"), rsa_key, algorithm="RS256")
    assert auth.authenticate(f"Bearer {token}") == Principal("jwt:svc", "jwt")
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(claims(sub="svc"), other, algorithm="RS256")
    assert "signature" in refused(auth, f"Bearer {forged}").message


def es256_jwks(tmp_path: Path, keys: dict[str | None, Any]) -> Path:
    entries = []
    for kid, private_key in keys.items():
        entry = jwt.algorithms.ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
        entries.append({**entry, **({"kid": kid} if kid else {}), "use": "sig", "alg": "ES256"})
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": entries}))
    return path


def test_es256_token_is_verified_with_the_jwks_key_its_kid_names(tmp_path: Path) -> None:
    key_a = ec.generate_private_key(ec.SECP256R1())
    key_b = ec.generate_private_key(ec.SECP256R1())
    auth = auth_for("--jwt-jwks-file", str(es256_jwks(tmp_path, {"a": key_a, "b": key_b})))
    token = jwt.encode(claims(sub="carol"), key_b, algorithm="ES256", headers={"kid": "b"})
    assert auth.authenticate(f"Bearer {token}") == Principal("jwt:carol", "jwt")
    wrong_kid = jwt.encode(claims(), key_b, algorithm="ES256", headers={"kid": "a"})
    assert "signature" in refused(auth, f"Bearer {wrong_kid}").message
    unknown_kid = jwt.encode(claims(), key_b, algorithm="ES256", headers={"kid": "zz"})
    assert "'kid'" in refused(auth, f"Bearer {unknown_kid}").message
    no_kid = jwt.encode(claims(), key_b, algorithm="ES256")
    assert "'kid'" in refused(auth, f"Bearer {no_kid}").message


def test_a_one_key_jwks_accepts_tokens_without_kid(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    auth = auth_for("--jwt-jwks-file", str(es256_jwks(tmp_path, {None: key})))
    token = jwt.encode(claims(sub="dan"), key, algorithm="ES256")
    assert auth.authenticate(f"Bearer {token}") == Principal("jwt:dan", "jwt")
