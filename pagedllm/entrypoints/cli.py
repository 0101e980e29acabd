"""The ``pagedllm`` console script: ``generate``, ``serve``, ``bench``, ``chat``, ``infer``,
``router``.

Parsing imports neither torch nor transformers (``--help`` and a typo answer at once): each
command imports what it runs inside its function. ``--config FILE.yaml`` is expanded into flags
before parsing (``cli_compat.py``). MODEL is a Hugging Face model directory or hub id.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from pagedllm.config.cli_args import add_engine_args, engine_kwargs_from_args
from pagedllm.config.hub import looks_like_repo_id
from pagedllm.config.model import DEMO_MODEL_DIR
from pagedllm.entrypoints.cli_compat import add_config_file_arg, expand_config_file

_GENERATE_USAGE = "usage: pagedllm generate [MODEL] PROMPT [options]"


def generate_engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``generate``'s ``EngineConfig`` keywords: the flags, and MODEL when it precedes PROMPT
    (it wins over ``--model``)."""
    kwargs = engine_kwargs_from_args(args)
    if len(args.args) == 2:
        kwargs["model"] = args.args[0]
    return kwargs


def _looks_like_a_model(text: str) -> bool:
    """A lone positional that names a model directory or a namespaced hub id: the user most
    likely forgot the prompt (completing a path with the demo model helps nobody)."""
    return Path(text).expanduser().is_dir() or ("/" in text and looks_like_repo_id(text))


def _generate(args: argparse.Namespace) -> int:
    if len(args.args) not in (1, 2):
        print(_GENERATE_USAGE, file=sys.stderr)
        return 2
    if len(args.args) == 1 and args.model_flag is None and _looks_like_a_model(args.args[0]):
        print(
            f"error: no PROMPT given ({args.args[0]!r} looks like a model; "
            f'pagedllm generate {args.args[0]} "your prompt")\n{_GENERATE_USAGE}',
            file=sys.stderr,
        )
        return 2
    from pagedllm import LLM, SamplingParams
    from pagedllm.config import EngineConfig
    from pagedllm.entrypoints.model_source import check_architecture

    prompt = args.args[-1]
    params = SamplingParams(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.sampling_seed,
        max_tokens=args.max_tokens,
        stop=args.stop or None,
        ignore_eos=args.ignore_eos,
        repetition_penalty=args.repetition_penalty,
    )
    config = EngineConfig(**generate_engine_kwargs(args))  # downloads a hub id's snapshot
    check_architecture(config)
    llm = LLM(**config.to_kwargs())
    start = time.perf_counter()
    if args.chat:
        outs = llm.chat([{"role": "user", "content": prompt}], params, use_tqdm=False)
    else:
        outs = llm.generate(prompt, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    for comp in outs[0].outputs:
        if args.n > 1:
            print(f"--- completion {comp.index} ({comp.finish_reason}) ---")
        print(prompt + comp.text if args.echo else comp.text)
    n_tok = sum(len(c.token_ids) for c in outs[0].outputs)
    sys.stdout.flush()  # the text first, even when stdout is a pipe and stderr is not
    print(f"[{n_tok} tokens in {elapsed:.2f} s, {n_tok / elapsed:.1f} tok/s]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedllm", description="pagedllm LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate",
        help="complete one prompt",
        description="Complete PROMPT with MODEL (a Hugging Face model directory or hub id; "
        f"default: the bundled demo model {DEMO_MODEL_DIR}).",
    )
    gen.add_argument("args", nargs="+", metavar="[MODEL] PROMPT")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    gen.add_argument("-n", "--n", type=int, default=1, help="completions to return")
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    add_config_file_arg(gen)
    add_engine_args(gen)
    gen.set_defaults(func=_generate)
    from pagedllm.entrypoints.openai.cli_serve import add_serve_parser

    add_serve_parser(sub)
    from pagedllm.bench.cli_bench import add_bench_parser

    add_bench_parser(sub)
    from pagedllm.entrypoints.chat_repl import add_chat_parser

    add_chat_parser(sub)
    from pagedllm.entrypoints.infer import add_infer_parser

    add_infer_parser(sub)
    from pagedllm.router.cli import add_router_parser

    add_router_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(expand_config_file(parser, argv))
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
