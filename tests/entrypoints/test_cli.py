"""The ``pagedllm`` command line: fast torch-free parsing, vLLM command lines (accepted flags,
refused flags with reasons, ``--config FILE.yaml``), ``generate`` with hub ids and without a
prompt, and its stats line."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest

from pagedllm.config import DEMO_MODEL_DIR
from pagedllm.entrypoints.cli import build_parser, main
from pagedllm.entrypoints.cli_compat import UNSUPPORTED_VLLM_FLAGS, expand_config_file
from pagedllm.entrypoints.openai.cli_serve import serve_engine_kwargs
from tests.config.hub_cache import fill_hub_cache

_REPO_ROOT = Path(__file__).resolve().parents[2]
_ENV = dict(os.environ, PYTHONPATH=str(_REPO_ROOT), OMP_NUM_THREADS="1")


def _parse(argv: list[str]) -> object:
    parser = build_parser()
    return parser.parse_args(expand_config_file(parser, argv))


def test_help_is_fast_and_imports_no_torch() -> None:
    code = (
        "import sys, contextlib, io\n"
        "from pagedllm.entrypoints.cli import main\n"
        "for cmd in (['serve', '--help'], ['generate', '--help'], ['serve', '--no-such-flag']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()), "
        "contextlib.redirect_stderr(io.StringIO()):\n"
        "        main(cmd)\n"
        "bad = [m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=_ENV, timeout=60)
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", "--help"],
        env=_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - start
    assert out.returncode == 0 and "--allowed-origins" in out.stdout
    assert elapsed < 2.0, f"pagedllm serve --help took {elapsed:.2f} s"


# A launch command as deployment guides write it for vLLM: every flag must parse.
VLLM_COMMAND = (
    "serve Qwen/Qwen2.5-0.5B-Instruct --trust-remote-code --max-logprobs 20 "
    "--disable-log-stats --generation-config vllm --enable-log-requests --max-log-len 100 "
    "--download-dir /models --revision main --tokenizer-revision main --hf-token hf_x "
    '--allowed-origins \'["https://a.example"]\' --allowed-methods \'["GET", "POST"]\' '
    "--allowed-headers '[\"*\"]' --allow-credentials --root-path /api --uds /tmp/v.sock "
    "--disable-fastapi-docs --kv-cache-memory-bytes 1000000 --dtype half --port 9000 "
    "--max-model-len 2048 --gpu-memory-utilization 0.8 --enable-prefix-caching "
    "--served-model-name qwen --uvicorn-log-level warning --enable-request-id-headers "
    "--override-generation-config '{\"temperature\": 0.5}' --enable-tokenizer-info-endpoint "
    "--disable-uvicorn-access-log --api-key k --seed 1 --max-num-seqs 64 --enforce-eager"
)


def test_a_vllm_launch_command_parses() -> None:
    args = _parse(shlex.split(VLLM_COMMAND))
    kw = serve_engine_kwargs(args)  # type: ignore[arg-type]
    assert kw["model"] == "Qwen/Qwen2.5-0.5B-Instruct" and kw["trust_remote_code"] is True
    assert (kw["download_dir"], kw["revision"], kw["hf_token"]) == ("/models", "main", "hf_x")
    assert kw["dtype"] == "half" and kw["kv_cache_memory_bytes"] == 1_000_000
    assert args.allowed_origins == ["https://a.example"]  # type: ignore[attr-defined]
    assert args.allowed_methods == ["GET", "POST"]  # type: ignore[attr-defined]
    assert args.disable_log_stats and args.root_path == "/api"  # type: ignore[attr-defined]


@pytest.mark.parametrize("flag", sorted(UNSUPPORTED_VLLM_FLAGS))
def test_unsupported_vllm_flags_are_refused_with_the_reason(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        _parse(["serve", flag, "1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag} is not supported: {UNSUPPORTED_VLLM_FLAGS[flag]}" in err


def test_refused_flags_hide_from_help_and_never_shadow_real_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        _parse(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--enable-lora" not in out and "--allowed-origins" in out
    # Each refused flag is refused, not shadowed by (nor shadowing) a real one: a feature that
    # lands takes its flag out of UNSUPPORTED_VLLM_FLAGS.
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    serve_parser = sub.choices["serve"]
    for flag in UNSUPPORTED_VLLM_FLAGS:
        assert serve_parser._option_string_actions[flag].__class__.__name__ == "_Refuse", flag


def test_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(
        "port: 9000\n"
        "max_model_len: 100\n"
        "enable-prefix-caching: false\n"
        "enforce-eager: true\n"
        "disable-log-stats: true\n"
        "served-model-name: [a, b/c]\n"
        "allowed-origins: ['https://x.example']\n"
        "api-key: [k1, k2]\n"
        "model: org/model\n"
    )
    args = _parse(["serve", "--config", str(cfg), "--port", "9001"])
    kw = serve_engine_kwargs(args)  # type: ignore[arg-type]
    assert args.port == 9001  # type: ignore[attr-defined]  # the command line wins
    assert kw["max_model_len"] == 100 and kw["enable_prefix_caching"] is False
    assert kw["enforce_eager"] is True and kw["model"] == "org/model"
    assert args.served_model_name == ["a", "b/c"]  # type: ignore[attr-defined]
    assert args.allowed_origins == ["https://x.example"]  # type: ignore[attr-defined]
    assert args.api_key == ["k1", "k2"] and args.disable_log_stats  # type: ignore[attr-defined]
    # A positional MODEL on the command line wins over the file's model.
    assert serve_engine_kwargs(_parse(["serve", "other/m", f"--config={cfg}"]))["model"] == (  # type: ignore[arg-type]
        "other/m"
    )


@pytest.mark.parametrize(
    "text,needle",
    [
        ("no-such-flag: 1\n", "unknown option 'no-such-flag'"),
        ("- a list\n", "expected a mapping"),
        ("port: [unclosed\n", "cannot read --config"),
    ],
)
def test_bad_config_files(tmp_path: Path, text: str, needle: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(SystemExit, match=needle):
        _parse(["serve", "--config", str(cfg)])
    with pytest.raises(SystemExit):  # the file's values are checked as typed flags
        cfg.write_text("max-model-len: many\n")
        _parse(["serve", "--config", str(cfg)])


def test_generate_without_a_prompt_is_a_usage_error(
    llama_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for model in (str(llama_dir), "Qwen/Qwen2.5-0.5B-Instruct"):
        assert main(["generate", model]) == 2
        err = capsys.readouterr().err
        assert f"error: no PROMPT given ({model!r} looks like a model" in err
        assert "usage: pagedllm generate [MODEL] PROMPT" in err
    # With --model given, the lone positional is the prompt, whatever it looks like.
    args = _parse(["generate", "--model", str(llama_dir), "a/b"])
    assert args.args == ["a/b"]  # type: ignore[attr-defined]


def test_generate_output_then_stats_line() -> None:
    """stdout and stderr into one pipe (stdout block-buffered): the text comes first and the
    stats line stands on its own line after it."""
    out = subprocess.run(
        [sys.executable, "-m", "pagedllm.entrypoints.cli", "generate", "def f(x):"]
        + ["--max-tokens", "12", "--device", "cpu"],
        env={k: v for k, v in _ENV.items() if k != "PYTHONUNBUFFERED"},  # buffered, as usual
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout
    lines = out.stdout.rstrip("\n").split("\n")
    assert lines[-1].startswith("[12 tokens in ") and lines[-1].endswith(" tok/s]")
    assert all("tokens in" not in line for line in lines[:-1])
    assert "".join(lines[:-1]).strip()  # some generated text before it


def test_generate_from_the_hub_cache_offline(
    llama_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cache = tmp_path / "hub"
    fill_hub_cache(cache, "org/tiny-llama", llama_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    flags = ["--max-tokens", "8", "--device", "cpu", "--max-model-len", "64"]
    assert main(["generate", str(llama_dir), "hello", *flags]) == 0
    local = capsys.readouterr().out
    hub = ["generate", "org/tiny-llama", "hello", "--download-dir", str(cache), *flags]
    assert main(hub) == 0
    assert capsys.readouterr().out == local
    assert main(["generate", "org/absent", "hello", "--download-dir", str(cache)]) == 1
    err = capsys.readouterr().err
    assert "error: Invalid EngineConfig: The model 'org/absent' is not in " in err
    assert "HF_HUB_OFFLINE is set" in err


def test_unsupported_architecture_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    cfg["architectures"] = ["FancyForCausalLM"]
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_fancy.FancyForCausalLM"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["generate", str(tmp_path), "hi", "--trust-remote-code"]) == 1
    err = capsys.readouterr().err
    assert "is a FancyForCausalLM, which pagedllm does not implement" in err
    assert "LlamaForCausalLM" in err and "--trust-remote-code does not change this" in err
    # serve says the same before it starts an engine process.
    assert main(["serve", str(tmp_path), "--device", "cpu"]) == 1
    assert "is a FancyForCausalLM, which pagedllm does not implement" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--ssl-keyfile", "k.pem"], "--ssl-keyfile and --ssl-certfile go together"),
        (["--enable-log-requests", "--disable-log-requests"], "contradict each other"),
        (["--root-path", "api"], "--root-path must start with '/'"),
        (["--max-logprobs", "-2"], "--max-logprobs must be >= 0"),
        (["--generation-config", "/no/such/dir"], "--generation-config must be auto, vllm or"),
        (["--override-generation-config", '{"max_new_tokens": 5}'], "unsupported key"),
        (["--override-generation-config", '{"temperature": "hot"}'], "must be a number"),
        (["--log-stats-interval", "0"], "--log-stats-interval must be > 0"),
    ],
)
def test_serve_flag_errors_come_before_loading(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--model", "/no/such/model", *argv]) == 1
    assert needle in capsys.readouterr().err


def test_uvicorn_options_of_the_http_flags(tmp_path: Path) -> None:
    from pagedllm.entrypoints.openai.cli_http import check_http_args, uvicorn_kwargs

    key, cert, ca = (tmp_path / n for n in ("k.pem", "c.pem", "ca.pem"))
    for f in (key, cert, ca):
        f.write_text("x")
    argv = ["serve", "--ssl-keyfile", str(key), "--ssl-certfile", str(cert)]
    argv += ["--ssl-ca-certs", str(ca), "--ssl-cert-reqs", "2", "--uds", "/tmp/p.sock"]
    argv += ["--disable-uvicorn-access-log", "--root-path", "/llm", "--log-config-file", str(ca)]
    args = _parse(argv)
    check_http_args(args)  # type: ignore[arg-type]
    assert uvicorn_kwargs(args) == {  # type: ignore[arg-type]
        "access_log": False,
        "uds": "/tmp/p.sock",
        "root_path": "/llm",
        "log_config": str(ca),
        "ssl_keyfile": str(key),
        "ssl_certfile": str(cert),
        "ssl_ca_certs": str(ca),
        "ssl_cert_reqs": 2,
    }
    assert uvicorn_kwargs(_parse(["serve"])) == {"access_log": True}  # type: ignore[arg-type]
