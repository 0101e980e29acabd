"""The ``pagedllm`` console script: ``pagedllm generate [MODEL] PROMPT [options]``."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from pagedllm.config import DEMO_MODEL_DIR, SCHEDULING_POLICIES


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine flags, spelled like vLLM's."""
    p.add_argument("--model", dest="model_flag", default=None, help="model directory")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument(
        "--scheduling-policy",
        default="fcfs",
        choices=list(SCHEDULING_POLICIES),
        help="fcfs: arrival order (requests with a priority are rejected); "
        "priority: lower priority value first, then arrival",
    )
    p.add_argument("--num-gpu-blocks-override", dest="num_gpu_blocks", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="schedule step N+1 while step N runs (default: on for CUDA)",
    )


def engine_kwargs(args: argparse.Namespace, model: str | None) -> dict:
    return dict(
        model=model,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        scheduling_policy=args.scheduling_policy,
        num_gpu_blocks=args.num_gpu_blocks,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching,
        enable_chunked_prefill=args.enable_chunked_prefill,
        load_format=args.load_format,
        seed=args.seed,
        async_scheduling=args.async_scheduling,
    )


def _generate(args: argparse.Namespace) -> int:
    from pagedllm import LLM, SamplingParams

    pos = args.args
    if len(pos) == 2:
        model, prompt = pos
    elif len(pos) == 1:
        model, prompt = args.model_flag, pos[0]
    else:
        print("usage: pagedllm generate [MODEL] PROMPT [options]", file=sys.stderr)
        return 2
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
    llm = LLM(**engine_kwargs(args, model))
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
    print(f"[{n_tok} tokens in {elapsed:.2f} s, {n_tok / elapsed:.1f} tok/s]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedllm", description="pagedllm LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate",
        help="complete one prompt",
        description=f"Complete PROMPT with MODEL (default: bundled demo model {DEMO_MODEL_DIR}).",
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
    add_engine_args(gen)
    gen.set_defaults(func=_generate)
    from pagedllm.entrypoints.openai.cli_serve import add_serve_parser

    add_serve_parser(sub)
    from pagedllm.bench.cli_bench import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
