"""Shared helpers for the ``pagedllm.entrypoints.openai.auth`` tests.

No server: flags are parsed by a real ``argparse`` parser (as users spell them), then
``build_auth`` / ``build_rate_limiter`` and the resulting objects are exercised directly.
Credentials in the environment are removed for every test, so only the flags count.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from pagedllm.entrypoints.openai.auth import Authenticator, add_auth_args, build_auth
from pagedllm.entrypoints.openai.errors import APIError

SECRET = "s" * 40  # >= 32 bytes, as HS256 requires


@pytest.fixture(autouse=True)
def _no_env_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PAGEDLLM_API_KEY", raising=False)
    monkeypatch.delenv("PAGEDLLM_JWT_SECRET", raising=False)


@pytest.fixture(scope="package")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_auth_args(parser.add_argument_group("auth"))
    return parser.parse_args(list(argv))


def auth_for(*argv: str) -> Authenticator:
    auth = build_auth(parse(*argv))
    assert auth is not None
    return auth


def refused(auth: Authenticator, header: str | None) -> APIError:
    """The 401 ``auth`` answers ``header`` with."""
    with pytest.raises(APIError) as info:
        auth.authenticate(header)
    err = info.value
    assert err.status_code == 401
    assert err.code == "invalid_api_key"
    return err


def build_error(*argv: str) -> str:
    """The start-up error of these flags."""
    with pytest.raises(ValueError) as info:
        build_auth(parse(*argv))
    return str(info.value)


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "alice", "iat": now, "exp": now + 600, **extra}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made_token(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None) -> str:
    """A JWT built without PyJWT (which refuses to sign the attacks these tests try)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    if hmac_key is None:
        return signing_input + "."
    sig = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(sig)}"


def public_pem(private_key: Any) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
