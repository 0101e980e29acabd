"""``auth/jwt_keys.py``: the key material and algorithms refused (or chosen) at start-up."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from pagedllm.entrypoints.openai.auth import Principal
from tests.entrypoints.openai.auth.conftest import (
    auth_for,
    b64url,
    build_error,
    claims,
    hand_made_token,
    public_pem,
    refused,
)


def write(tmp_path: Path, name: str, data: bytes | str) -> str:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


def jwk_of(private_key: Any, **extra: Any) -> dict[str, Any]:
    jwk = jwt.algorithms.ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    return {**jwk, **extra}


def test_private_key_given_as_public_key_is_a_startup_error(rsa_key: Any, tmp_path: Path) -> None:
    private_pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert "private key" in build_error("--jwt-public-key", write(tmp_path, "k.pem", private_pem))


def test_algorithm_confusion_is_refused(rsa_key: Any, tmp_path: Path) -> None:
    pem_bytes = public_pem(rsa_key)
    pem = write(tmp_path, "idp.pem", pem_bytes)
    # Start-up: an HMAC algorithm with a public key is refused outright.
    message = build_error("--jwt-public-key", pem, "--jwt-algorithms", "RS256,HS256")
    assert "algorithm confusion" in message
    # Request: a token "signed" with HS256 keyed by the (public) PEM is refused.
    auth = auth_for("--jwt-public-key", pem)
    forged = hand_made_token({"alg": "HS256", "typ": "JWT"}, claims(sub="root"), pem_bytes)
    assert "algorithm" in refused(auth, f"Bearer {forged}").message


def test_a_certificate_is_as_good_as_its_public_key(rsa_key: Any, tmp_path: Path) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp.example")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(rsa_key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(rsa_key, hashes.SHA256())
    )
    pem = write(tmp_path, "cert.pem", cert.public_bytes(serialization.Encoding.PEM))
    token = jwt.encode(claims(sub="svc"), rsa_key, algorithm="RS256")
    assert auth_for("--jwt-public-key", pem).authenticate(f"Bearer {token}") == Principal(
        "jwt:svc", "jwt"
    )


def test_an_ec_key_defaults_to_the_algorithm_of_its_curve(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    auth = auth_for("--jwt-public-key", write(tmp_path, "p384.pem", public_pem(key)))
    token = jwt.encode(claims(), key, algorithm="ES384")
    assert auth.authenticate(f"Bearer {token}").subject == "jwt:alice"
    message = build_error(
        "--jwt-public-key", str(tmp_path / "p384.pem"), "--jwt-algorithms", "ES256"
    )
    assert "does not fit" in message


def test_rsa_and_pss_can_both_be_accepted(rsa_key: Any, tmp_path: Path) -> None:
    pem = write(tmp_path, "idp.pem", public_pem(rsa_key))
    auth = auth_for("--jwt-public-key", pem, "--jwt-algorithms", "RS256,PS256")
    for alg in ("RS256", "PS256"):
        token = jwt.encode(claims(), rsa_key, algorithm=alg)
        assert auth.authenticate(f"Bearer {token}").kind == "jwt"


def test_a_short_rsa_key_is_a_startup_error(tmp_path: Path) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    message = build_error("--jwt-public-key", write(tmp_path, "weak.pem", public_pem(weak)))
    assert "--jwt-public-key" in message and "2048" in message


def test_jwks_with_hmac_or_secret_keys_is_a_startup_error(tmp_path: Path) -> None:
    good = {"keys": [jwk_of(ec.generate_private_key(ec.SECP256R1()), kid="a")]}
    path = write(tmp_path, "jwks.json", json.dumps(good))
    assert "algorithm confusion" in build_error(
        "--jwt-jwks-file", path, "--jwt-algorithms", "HS256"
    )
    oct_keys = {"keys": [{"kty": "oct", "k": b64url(b"k" * 32)}]}
    assert "--jwt-secret" in build_error(
        "--jwt-jwks-file", write(tmp_path, "oct.json", json.dumps(oct_keys))
    )


def test_unusable_jwks_files_are_startup_errors(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    private = jwt.algorithms.ECAlgorithm.to_jwk(key, as_dict=True)
    cases = {
        "not valid JSON": "{",
        "expected a JWKS": json.dumps({"keys": []}),
        "private key material": json.dumps({"keys": [private]}),
        "share the kid": json.dumps({"keys": [jwk_of(key, kid="x"), jwk_of(key, kid="x")]}),
        "no signing key": json.dumps({"keys": [jwk_of(key, kid="x", use="enc")]}),
    }
    for expected, text in cases.items():
        message = build_error("--jwt-jwks-file", write(tmp_path, "jwks.json", text))
        assert "--jwt-jwks-file" in message and expected in message, message
