"""``auth.py``: API keys, JWTs and per-principal rate limits, driven by the serve flags.

No server: flags are parsed by a real ``argparse`` parser (as users spell them), then
``build_auth`` / ``build_rate_limiter`` and the resulting objects are exercised directly.
The rate limiter runs on a fake clock.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import pytest

from pagedllm.entrypoints.openai.auth import (
    Authenticator,
    Principal,
    RateLimiter,
    add_auth_args,
    build_auth,
    build_rate_limiter,
)
from pagedllm.entrypoints.openai.errors import APIError

try:
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
except ImportError:  # PyJWT[crypto] is optional: only the --jwt-* flags need it
    jwt = None

needs_jwt = pytest.mark.skipif(jwt is None, reason="needs PyJWT[crypto]")

SECRET = "s" * 40  # >= 32 bytes, as HS256 requires


@pytest.fixture(autouse=True)
def _no_env_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PAGEDLLM_API_KEY", raising=False)
    monkeypatch.delenv("PAGEDLLM_JWT_SECRET", raising=False)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_auth_args(parser.add_argument_group("auth"))
    return parser.parse_args(list(argv))


def auth_for(*argv: str) -> Authenticator:
    auth = build_auth(parse(*argv))
    assert auth is not None
    return auth


def refused(auth: Authenticator, header: str | None) -> APIError:
    with pytest.raises(APIError) as info:
        auth.authenticate(header)
    err = info.value
    assert err.status_code == 401
    assert err.code == "invalid_api_key"
    return err


def build_error(*argv: str) -> str:
    with pytest.raises(ValueError) as info:
        build_auth(parse(*argv))
    return str(info.value)


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "alice", "iat": now, "exp": now + 600, **extra}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made_token(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None) -> str:
    """A JWT built without PyJWT (which refuses to sign the attacks below)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    if hmac_key is None:
        return signing_input + "."
    sig = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(sig)}"


# --------------------------------------------------------------------------- API keys


def test_no_flags_leave_the_server_open() -> None:
    assert build_auth(parse()) is None
    assert build_rate_limiter(parse()) is None


def test_repeated_api_key_flags_each_authenticate_as_their_own_subject() -> None:
    auth = auth_for("--api-key", "sk-one", "--api-key", "sk-two")
    one = auth.authenticate("Bearer sk-one")
    two = auth.authenticate("Bearer sk-two")
    assert one == Principal("key:" + hashlib.sha256(b"sk-one").hexdigest()[:12], "api_key")
    assert two.kind == "api_key" and two.subject != one.subject
    assert "sk-two" not in two.subject


def test_api_key_from_env_is_the_default_and_a_flag_replaces_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PAGEDLLM_API_KEY", "sk-env")
    assert parse().api_key == ["sk-env"]
    assert parse("--api-key", "sk-flag").api_key == ["sk-flag"]
    auth = auth_for("--api-key", "sk-flag")
    refused(auth, "Bearer sk-env")


def test_api_key_file_skips_blank_lines_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text("# team A\nsk-file-a\n\n   sk-file-b  \n#sk-commented\n")
    auth = auth_for("--api-key-file", str(path), "--api-key", "sk-flag")
    for key in ("sk-file-a", "sk-file-b", "sk-flag"):
        assert auth.authenticate(f"Bearer {key}").kind == "api_key"
    refused(auth, "Bearer #sk-commented")
    refused(auth, "Bearer sk-commented")


def test_empty_or_missing_key_file_is_a_startup_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    message = build_error("--api-key-file", str(empty))
    assert "--api-key-file" in message and "no keys" in message
    assert "--api-key-file" in build_error("--api-key-file", str(tmp_path / "absent.txt"))


def test_key_with_whitespace_is_a_startup_error() -> None:
    assert "--api-key" in build_error("--api-key", "two words")


@pytest.mark.parametrize("header", ["bearer sk-k", "BEARER sk-k", "  Bearer \t sk-k  "])
def test_bearer_scheme_is_case_insensitive_and_whitespace_tolerant(header: str) -> None:
    assert auth_for("--api-key", "sk-k").authenticate(header).kind == "api_key"


def test_wrong_key_is_refused_as_an_invalid_token() -> None:
    auth = auth_for("--api-key", "sk-right")
    for header in ("Bearer sk-wrong", "Bearer sk-righ", "Bearer sk-right2", "Bearer sk-rïght"):
        err = refused(auth, header)
        assert auth.www_authenticate(err) == 'Bearer error="invalid_token"'
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


# --------------------------------------------------------------------------- JWT with a secret


@needs_jwt
def test_hs256_token_is_accepted_with_its_sub_as_subject() -> None:
    auth = auth_for("--jwt-secret", SECRET)
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert auth.authenticate(f"Bearer {token}") == Principal("jwt:alice", "jwt")


@needs_jwt
def test_jwt_secret_comes_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEDLLM_JWT_SECRET", SECRET)
    auth = auth_for()
    token = jwt.encode(claims(sub="bob"), SECRET, algorithm="HS256")
    assert auth.authenticate(f"bearer {token}").subject == "jwt:bob"


@needs_jwt
def test_api_keys_and_jwts_work_side_by_side() -> None:
    auth = auth_for("--api-key", "sk-k", "--jwt-secret", SECRET)
    assert auth.authenticate("Bearer sk-k").kind == "api_key"
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert auth.authenticate(f"Bearer {token}").kind == "jwt"
    refused(auth, "Bearer sk-other")


@needs_jwt
def test_expired_token_is_refused_saying_so() -> None:
    auth = auth_for("--jwt-secret", SECRET)
    now = int(time.time())
    token = jwt.encode(claims(iat=now - 7200, exp=now - 3600), SECRET, algorithm="HS256")
    err = refused(auth, f"Bearer {token}")
    assert "expired" in err.message
    assert auth.www_authenticate(err) == 'Bearer error="invalid_token"'


@needs_jwt
def test_clock_leeway_tolerates_slightly_stale_and_early_tokens() -> None:
    auth = auth_for("--jwt-secret", SECRET)
    now = int(time.time())
    stale = jwt.encode(claims(exp=now - 5), SECRET, algorithm="HS256")
    early = jwt.encode(claims(nbf=now + 5, iat=now + 5), SECRET, algorithm="HS256")
    assert auth.authenticate(f"Bearer {stale}").kind == "jwt"
    assert auth.authenticate(f"Bearer {early}").kind == "jwt"
    not_yet = jwt.encode(claims(nbf=now + 600), SECRET, algorithm="HS256")
    assert "not valid yet" in refused(auth, f"Bearer {not_yet}").message


@needs_jwt
def test_audience_is_required_and_checked_when_configured() -> None:
    auth = auth_for("--jwt-secret", SECRET, "--jwt-audience", "pagedllm")
    ok = jwt.encode(claims(aud="pagedllm"), SECRET, algorithm="HS256")
    assert auth.authenticate(f"Bearer {ok}").subject == "jwt:alice"
    wrong = jwt.encode(claims(aud="billing"), SECRET, algorithm="HS256")
    assert "audience" in refused(auth, f"Bearer {wrong}").message
    missing = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert "'aud'" in refused(auth, f"Bearer {missing}").message


@needs_jwt
def test_issuer_is_required_and_checked_when_configured() -> None:
    auth = auth_for("--jwt-secret", SECRET, "--jwt-issuer", "https://idp.example")
    ok = jwt.encode(claims(iss="https://idp.example"), SECRET, algorithm="HS256")
    assert auth.authenticate(f"Bearer {ok}").kind == "jwt"
    wrong = jwt.encode(claims(iss="https://evil.example"), SECRET, algorithm="HS256")
    assert "issuer" in refused(auth, f"Bearer {wrong}").message
    missing = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert "'iss'" in refused(auth, f"Bearer {missing}").message


@needs_jwt
@pytest.mark.parametrize("claim", ["sub", "exp"])
def test_sub_and_exp_are_required(claim: str) -> None:
    auth = auth_for("--jwt-secret", SECRET)
    payload = claims()
    del payload[claim]
    token = jwt.encode(payload, SECRET, algorithm="HS256")
    assert f"'{claim}'" in refused(auth, f"Bearer {token}").message


@needs_jwt
def test_token_signed_with_another_secret_is_refused() -> None:
    auth = auth_for("--jwt-secret", SECRET)
    token = jwt.encode(claims(), "x" * 40, algorithm="HS256")
    err = refused(auth, f"Bearer {token}")
    assert "signature" in err.message
    assert SECRET not in err.message


@needs_jwt
def test_garbage_token_is_refused() -> None:
    auth = auth_for("--jwt-secret", SECRET)
    assert "Malformed" in refused(auth, "Bearer aaa.bbb.ccc").message
    refused(auth, "Bearer not-a-jwt")


@needs_jwt
def test_alg_none_token_is_refused() -> None:
    auth = auth_for("--jwt-secret", SECRET)
    token = hand_made_token({"alg": "none", "typ": "JWT"}, claims(), None)
    assert "algorithm" in refused(auth, f"Bearer {token}").message
    assert "'none'" in build_error("--jwt-secret", SECRET, "--jwt-algorithms", "HS256,none")


@needs_jwt
def test_jwt_flag_validation_names_the_flag(tmp_path: Path) -> None:
    assert "--jwt-audience" in build_error("--jwt-audience", "x")
    assert "--jwt-issuer" in build_error("--api-key", "sk-k", "--jwt-issuer", "x")
    assert "--jwt-secret" in build_error("--jwt-secret", "short")
    assert "RS256" in build_error("--jwt-secret", SECRET, "--jwt-algorithms", "RS256")
    assert "unknown" in build_error("--jwt-secret", SECRET, "--jwt-algorithms", "HS257")
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN PUBLIC KEY-----\nnot base64 at all\n-----END PUBLIC KEY-----\n")
    assert "--jwt-public-key" in build_error("--jwt-public-key", str(junk))
    message = build_error("--jwt-secret", SECRET, "--jwt-public-key", str(junk))
    assert "mutually exclusive" in message


# --------------------------------------------------------------------------- JWT with public keys


@pytest.fixture(scope="module")
def rsa_key() -> Any:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(private_key: Any) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@needs_jwt
def test_rs256_token_is_verified_with_a_pem_public_key(rsa_key: Any, tmp_path: Path) -> None:
    pem = tmp_path / "idp.pem"
    pem.write_bytes(public_pem(rsa_key))
    auth = auth_for("--jwt-public-key", str(pem))
    token = jwt.encode(claims(sub="svc"), rsa_key, algorithm="RS256")
    assert auth.authenticate(f"Bearer {token}") == Principal("jwt:svc", "jwt")
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(claims(sub="svc"), other, algorithm="RS256")
    assert "signature" in refused(auth, f"Bearer {forged}").message


@needs_jwt
def test_private_key_given_as_public_key_is_a_startup_error(rsa_key: Any, tmp_path: Path) -> None:
    pem = tmp_path / "private.pem"
    pem.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    assert "private key" in build_error("--jwt-public-key", str(pem))


@needs_jwt
def test_algorithm_confusion_is_refused(rsa_key: Any, tmp_path: Path) -> None:
    pem_bytes = public_pem(rsa_key)
    pem = tmp_path / "idp.pem"
    pem.write_bytes(pem_bytes)
    # Start-up: an HMAC algorithm with a public key is refused outright.
    message = build_error("--jwt-public-key", str(pem), "--jwt-algorithms", "RS256,HS256")
    assert "algorithm confusion" in message
    # Request: a token "signed" with HS256 keyed by the (public) PEM is refused.
    auth = auth_for("--jwt-public-key", str(pem))
    forged = hand_made_token({"alg": "HS256", "typ": "JWT"}, claims(sub="root"), pem_bytes)
    assert "algorithm" in refused(auth, f"Bearer {forged}").message


def es256_jwks(tmp_path: Path, keys: dict[str, Any]) -> Path:
    entries = []
    for kid, private_key in keys.items():
        entry = jwt.algorithms.ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
        entries.append({**entry, "kid": kid, "use": "sig", "alg": "ES256"})
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": entries}))
    return path


@needs_jwt
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


@needs_jwt
def test_jwks_with_hmac_or_secret_keys_is_a_startup_error(tmp_path: Path) -> None:
    path = es256_jwks(tmp_path, {"a": ec.generate_private_key(ec.SECP256R1())})
    assert "algorithm confusion" in build_error(
        "--jwt-jwks-file", str(path), "--jwt-algorithms", "HS256"
    )
    oct_path = tmp_path / "oct.json"
    oct_path.write_text(json.dumps({"keys": [{"kty": "oct", "k": b64url(b"k" * 32)}]}))
    assert "--jwt-secret" in build_error("--jwt-jwks-file", str(oct_path))


# --------------------------------------------------------------------------- rate limits


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def limited(limiter: RateLimiter, subject: str) -> APIError:
    with pytest.raises(APIError) as info:
        limiter.check(subject)
    err = info.value
    assert err.status_code == 429
    assert err.code == "rate_limit_exceeded"
    assert err.type == "rate_limit_error"
    return err


def test_rate_limit_flags_build_a_limiter_and_are_validated() -> None:
    limiter = build_rate_limiter(
        parse("--rate-limit-requests-per-minute", "5", "--rate-limit-tokens-per-minute", "900")
    )
    assert limiter is not None
    assert (limiter.requests_per_minute, limiter.tokens_per_minute) == (5, 900)
    for flag in ("--rate-limit-requests-per-minute", "--rate-limit-tokens-per-minute"):
        with pytest.raises(ValueError, match=flag):
            build_rate_limiter(parse(flag, "0"))


def test_n_requests_pass_and_the_next_is_refused_until_retry_after() -> None:
    clock = FakeClock()
    limiter = RateLimiter(3, None, clock=clock)
    for _ in range(3):
        limiter.check("key:a")
    clock.now += 10
    err = limited(limiter, "key:a")
    assert 50 <= err.retry_after <= 51
    assert "3 requests per minute" in err.message
    limiter.check("key:b")  # other subjects are unaffected
    clock.now += err.retry_after - 1
    assert limited(limiter, "key:a").retry_after == 1
    clock.now += 1
    limiter.check("key:a")


def test_the_window_slides() -> None:
    clock = FakeClock()
    limiter = RateLimiter(3, None, clock=clock)
    limiter.check("s")
    limiter.check("s")
    clock.now += 30
    limiter.check("s")
    limited(limiter, "s")
    clock.now += 31  # the first two have left the window, the third has not
    limiter.check("s")
    limiter.check("s")
    err = limited(limiter, "s")
    assert 1 <= err.retry_after <= 30


def test_token_limit_applies_after_charge() -> None:
    clock = FakeClock()
    limiter = RateLimiter(None, 100, clock=clock)
    limiter.check("s")
    limiter.charge("s", 60)
    limiter.check("s")
    limiter.charge("s", 40)
    err = limited(limiter, "s")
    assert "100 tokens per minute" in err.message
    assert err.retry_after >= 1
    clock.now += err.retry_after
    limiter.check("s")


def test_refused_requests_are_not_counted() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1, None, clock=clock)
    limiter.check("s")
    for _ in range(50):
        clock.now += 1
        limited(limiter, "s")
    clock.now += 11  # 61 s after the only admitted request
    limiter.check("s")


def test_idle_subjects_are_forgotten() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10, 1000, clock=clock)
    for i in range(1000):
        limiter.check(f"jwt:user-{i}")
        limiter.charge(f"jwt:user-{i}", 5)
    assert len(limiter) == 1000
    clock.now += 62
    limiter.prune()
    assert len(limiter) == 0
    assert limiter._windows == {}


def test_a_flood_of_subjects_does_not_accumulate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10, None, clock=clock)
    for i in range(10_000):
        clock.now += 0.1
        limiter.check(f"key:{i}")
    # Only subjects seen in the last window (plus one sweep interval) are kept.
    assert len(limiter) <= (61 + RateLimiter.SWEEP_INTERVAL_S) / 0.1 + 1
