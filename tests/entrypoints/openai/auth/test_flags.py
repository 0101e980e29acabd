"""``auth/flags.py``: the serve flags, their environment defaults and their start-up checks."""

from __future__ import annotations

from pathlib import Path

import jwt
import pytest

from pagedllm.entrypoints.openai.auth import build_auth, build_rate_limiter
from tests.entrypoints.openai.auth.conftest import (
    SECRET,
    auth_for,
    build_error,
    claims,
    parse,
    refused,
)


def test_no_flags_leave_the_server_open() -> None:
    assert build_auth(parse()) is None
    assert build_rate_limiter(parse()) is None


def test_api_key_from_env_is_the_default_and_a_flag_replaces_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PAGEDLLM_API_KEY", "sk-env")
    assert parse().api_key == ["sk-env"]
    assert parse("--api-key", "sk-flag").api_key == ["sk-flag"]
    assert parse("--api-key", "sk-1", "--api-key", "sk-2").api_key == ["sk-1", "sk-2"]
    refused(auth_for("--api-key", "sk-flag"), "Bearer sk-env")


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
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe")
    assert "UTF-8" in build_error("--api-key-file", str(binary))


def test_key_with_whitespace_or_non_ascii_is_a_startup_error(tmp_path: Path) -> None:
    assert "--api-key" in build_error("--api-key", "two words")
    assert "--api-key" in build_error("--api-key", "sk-rïght")
    path = tmp_path / "keys.txt"
    path.write_text("sk-ok\nsk-\tbad\n")
    assert f"{path}:2" in build_error("--api-key-file", str(path))


def test_jwt_secret_comes_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEDLLM_JWT_SECRET", SECRET)
    auth = auth_for()
    token = jwt.encode(claims(sub="bob"), SECRET, algorithm="HS256")
    assert auth.authenticate(f"bearer {token}").subject == "jwt:bob"


def test_jwt_flag_validation_names_the_flag(tmp_path: Path) -> None:
    assert "--jwt-audience" in build_error("--jwt-audience", "x")
    assert "--jwt-issuer" in build_error("--api-key", "sk-k", "--jwt-issuer", "x")
    assert "--jwt-audience" in build_error("--jwt-secret", SECRET, "--jwt-audience", " ")
    assert "--jwt-secret" in build_error("--jwt-secret", "short")
    assert "RS256" in build_error("--jwt-secret", SECRET, "--jwt-algorithms", "RS256")
    assert "unknown" in build_error("--jwt-secret", SECRET, "--jwt-algorithms", "HS257")
    assert "empty" in build_error("--jwt-secret", SECRET, "--jwt-algorithms", ",")
    assert "'none'" in build_error("--jwt-secret", SECRET, "--jwt-algorithms", "HS256,none")
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN PUBLIC KEY-----\nnot base64 at all\n-----END PUBLIC KEY-----\n")
    assert "--jwt-public-key" in build_error("--jwt-public-key", str(junk))
    assert "--jwt-public-key" in build_error("--jwt-public-key", str(tmp_path / "absent.pem"))
    message = build_error("--jwt-secret", SECRET, "--jwt-public-key", str(junk))
    assert "mutually exclusive" in message


def test_rate_limit_flags_build_a_limiter_and_are_validated() -> None:
    limiter = build_rate_limiter(
        parse("--rate-limit-requests-per-minute", "5", "--rate-limit-tokens-per-minute", "900")
    )
    assert limiter is not None
    assert (limiter.requests_per_minute, limiter.tokens_per_minute) == (5, 900)
    only_tokens = build_rate_limiter(parse("--rate-limit-tokens-per-minute", "10"))
    assert only_tokens is not None and only_tokens.requests_per_minute is None
    for flag in ("--rate-limit-requests-per-minute", "--rate-limit-tokens-per-minute"):
        with pytest.raises(ValueError, match=flag):
            build_rate_limiter(parse(flag, "0"))
