"""vLLM launch commands, taken as they are: ``--config FILE.yaml`` and the flags we refuse.

Deployment guides, Helm charts and docker-compose files carry ``vllm serve`` command lines. A
flag we do not know made argparse answer ``unrecognized arguments`` with no hint whether the
flag is a typo or a feature we lack. So every common vLLM flag is either accepted with vLLM's
meaning (the engine and server flags) or listed in ``UNSUPPORTED_VLLM_FLAGS``: argparse knows
it, hides it from ``--help``, and refuses it with the reason, before anything is loaded.

``--config FILE.yaml`` is vLLM's config file: a mapping whose keys are long flag names without
the leading ``--`` (``max-model-len: 2048``; underscores also work) and whose values are what
the flag would take (a list: the flag repeated, or its values for a flag taking several, or
one JSON value for a flag whose type ``parses_json``); flags on the command line win.
``expand_config_file`` turns the file into flags placed right after the subcommand, so
argparse (last one wins) gives exactly that priority and checks every value as if typed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# vLLM flag -> why pagedllm refuses it (flags of features another issue adds are registered
# there; a flag some group already defines is skipped, see ``add_unsupported_vllm_args``).
UNSUPPORTED_VLLM_FLAGS: dict[str, str] = {
    "--pipeline-parallel-size": "pipeline parallelism is not implemented (one device per engine)",
    "-pp": "pipeline parallelism is not implemented (one device per engine)",
    "--enable-lora": "LoRA adapters are not implemented yet",
    "--lora-modules": "LoRA adapters are not implemented yet",
    "--max-loras": "LoRA adapters are not implemented yet",
    "--max-lora-rank": "LoRA adapters are not implemented yet",
    "--speculative-config": "speculative decoding ships no drafter yet",
    "--cpu-offload-gb": "weights are never offloaded to the CPU",
    "--swap-space": "preempted requests are recomputed, never swapped to the CPU",
    "--enable-sleep-mode": "sleep mode is not implemented",
    "--tokenizer-mode": "only Hugging Face tokenizers (vLLM's 'auto' mode) are supported",
    "--code-revision": "pagedllm never runs a repository's code (see --trust-remote-code)",
    "--hf-overrides": "config.json is read as it is; override it in a copy of the directory",
    "--reasoning-parser": "reasoning output parsing is not implemented",
    "--chat-template-content-format": "message content is passed to the template as given",
    "--response-role": "the assistant role is always 'assistant'",
    "--return-tokens-as-token-ids": "logprob tokens are always returned as text",
    "--enable-prompt-tokens-details": "usage has no prompt token details",
    "--middleware": "arbitrary ASGI middleware is not loaded (no code import from flags)",
    "--task": "only text generation is implemented (no pooling or embedding models)",
    "--runner": "only text generation is implemented (no pooling or embedding models)",
    "--compilation-config": "torch.compile is not used; CUDA graphs follow --enforce-eager",
    "-O": "torch.compile is not used; CUDA graphs follow --enforce-eager",
    "--enable-expert-parallel": "mixture-of-experts models are not implemented",
    "--disable-sliding-window": "models with a sliding window are capped at the window instead",
    "--logits-processors": "custom logits processors are not loaded from flags",
    "--guided-decoding-backend": "structured output always uses llguidance",
    "--structured-outputs-config": "structured output always uses llguidance",
    "--kv-transfer-config": "KV-cache transfer (disaggregated prefill) is not implemented",
    "--skip-tokenizer-init": "the server always tokenizes (token-id prompts also need it)",
    "--max-seq-len-to-capture": "CUDA graphs cover decode steps only (batch-size buckets)",
    "--cuda-graph-sizes": "CUDA graph batch sizes are fixed buckets up to --max-num-seqs",
    "--max-parallel-loading-workers": "weights are loaded in one pass by the engine process",
    "--num-scheduler-steps": "one scheduler step per forward pass (async scheduling overlaps)",
    "--preemption-mode": "preemption always recomputes (prefix caching finds most of it)",
    "--max-num-partial-prefills": "chunked prefill has no separate partial-prefill limits",
    "--long-prefill-token-threshold": "chunked prefill has no separate partial-prefill limits",
    "--scheduler-cls": "the scheduler is not pluggable from flags",
    "--worker-cls": "the worker is not pluggable from flags",
    "--model-impl": "models always run on pagedllm's own implementations",
    "--prefix-caching-hash-algo": "prefix-cache block hashes are always blake2b",
    "--logprobs-mode": "logprobs are always the raw model's log-softmax",
    "--otlp-traces-endpoint": "OpenTelemetry tracing is not implemented",
    "--api-server-count": "one API server process per engine",
    "--headless": "the engine always runs behind its own API server",
    "--disable-frontend-multiprocessing": "the engine always runs in its own process",
    "--enable-server-load-tracking": "load is exported as metrics (/metrics), not per request",
    "--h11-max-header-count": "the header limit is --h11-max-incomplete-event-size (bytes)",
    "--ignore-patterns": "hub downloads always take config, safetensors and tokenizer files",
    "--rope-scaling": "config.json is read as it is; override it in a copy of the directory",
    "--rope-theta": "config.json is read as it is; override it in a copy of the directory",
}


class _Refuse(argparse.Action):
    """Refuses its flag at parse time, naming the reason (whatever value follows it)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        parser.error(f"{option_string} is not supported: {getattr(self, 'reason', '')}.")


def add_unsupported_vllm_args(parser: argparse.ArgumentParser) -> None:
    """Register every flag of ``UNSUPPORTED_VLLM_FLAGS`` that ``parser`` does not define
    already, hidden from ``--help``; using one is a usage error (exit 2) giving the reason."""
    known = parser._option_string_actions
    for flag, reason in UNSUPPORTED_VLLM_FLAGS.items():
        if flag not in known:
            action = parser.add_argument(flag, nargs="?", action=_Refuse, help=argparse.SUPPRESS)
            action.reason = reason  # type: ignore[attr-defined]


def add_config_file_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE.yaml",
        default=None,
        help="read flags from a YAML file (keys: flag names without '--'); flags on the "
        "command line win over the file",
    )


def _config_path(argv: list[str]) -> tuple[str | None, list[str]]:
    """The ``--config`` value in ``argv`` and ``argv`` without it."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1], argv[:i] + argv[i + 2 :]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1 :]
    return None, argv


def _flags_for(key: str, value: Any, parser: argparse.ArgumentParser, path: str) -> list[str]:
    flag = "--" + str(key).replace("_", "-")
    action = parser._option_string_actions.get(flag)
    if action is None:
        raise SystemExit(f"error: {path}: unknown option {key!r} (no flag {flag}).")
    if isinstance(action, argparse.BooleanOptionalAction):
        return [flag] if value else ["--no-" + flag[2:]]
    if action.nargs == 0:  # store_true / store_false / store_const: the file says "on" or not
        return [flag] if value else []
    if isinstance(value, dict):
        return [flag, json.dumps(value)]
    if isinstance(value, list):
        if action.nargs in ("+", "*"):
            return [flag, *map(str, value)]
        if getattr(action.type, "parses_json", False):
            return [flag, json.dumps(value)]  # one value that is a JSON list
        return [s for v in value for s in (flag, str(v))]  # a repeatable flag
    return [flag, str(value)]


def expand_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with ``--config FILE`` replaced by the file's flags, placed right after the
    subcommand (``argv[0]``) so that flags on the command line override them."""
    path, rest = _config_path(argv)
    if path is None or not rest:
        return argv
    import yaml

    try:
        data = yaml.safe_load(Path(path).expanduser().read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SystemExit(f"error: cannot read --config {path}: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SystemExit(f"error: {path}: expected a mapping of flag names to values.")
    sub = _subparser(parser, rest[0])
    if sub is None:
        return argv  # argparse reports the unknown command
    flags = [s for k, v in data.items() for s in _flags_for(k, v, sub, path)]
    return [rest[0], *flags, *rest[1:]]


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser | None = action.choices.get(command)
            return found
    return None
