"""``pagedllm bench {throughput,latency,serve}``: argparse registration (flags spelled like vLLM's).

Heavy imports (torch, transformers, matplotlib) happen only when a bench command runs.
"""

from __future__ import annotations

import argparse
from typing import Any

from pagedllm.bench.lang import add_lang_parser
from pagedllm.bench.presets import PRESETS
from pagedllm.bench.serve import add_serve_parser
from pagedllm.config.cli_args import add_engine_args

_THROUGHPUT_EPILOG = """\
examples:
  pagedllm bench throughput --model-config llama-3-8b --num-prompts 1000 \\
      --input-len 1024 --output-len 128 --baseline transformers
  # nano-vllm's workload: input and output lengths uniform in [101, 1023]
  pagedllm bench throughput --model-config qwen3-0.6b --num-prompts 256 \\
      --input-len-range 101:1023 --output-len-range 101:1023
"""

_LATENCY_EPILOG = """\
example:
  pagedllm bench latency --model-config llama-3-8b --batch-sizes 1 \\
      --input-len 512 --output-len 128
"""


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def _add_common(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    p.add_argument(
        "--model-config",
        choices=PRESETS,
        default=None,
        help="config-only preset with dummy weights and a synthetic tokenizer (instead of --model)",
    )
    p.add_argument(
        "--output-json",
        default=None,
        help="report path; .md and .png go beside it (default bench-results/<kind>-<time>.json)",
    )
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bars")
    p.add_argument("--disable-detokenize", action="store_true", help="skip detokenizing outputs")


def _throughput(args: argparse.Namespace) -> int:
    from pagedllm.bench import throughput

    return throughput.main(args)


def _latency(args: argparse.Namespace) -> int:
    from pagedllm.bench import latency

    return latency.main(args)


def _add_throughput(bsub: Any) -> None:
    tp = bsub.add_parser(
        "throughput",
        help="offline throughput (optionally vs transformers)",
        description="Offline throughput of LLM.generate on a random or ShareGPT workload.",
        epilog=_THROUGHPUT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(tp)
    tp.add_argument("--dataset-name", choices=["random", "sharegpt"], default="random")
    tp.add_argument("--dataset-path", default=None, help="ShareGPT JSON file")
    tp.add_argument("--num-prompts", type=int, default=1000)
    tp.add_argument("--input-len", type=int, default=None, help="random: prompt length (1024)")
    tp.add_argument(
        "--output-len",
        type=int,
        default=None,
        help="random: output length (128); sharegpt: fixed output length instead of the reply's",
    )
    tp.add_argument(
        "--range-ratio",
        "--random-range-ratio",
        dest="range_ratio",
        type=float,
        default=0.0,
        help="random: lengths uniform in [len*(1-r), len*(1+r)]",
    )
    tp.add_argument(
        "--input-len-range",
        default=None,
        metavar="LO:HI",
        help="random: prompt lengths uniform in [LO, HI] (overrides --input-len/--range-ratio)",
    )
    tp.add_argument(
        "--output-len-range",
        default=None,
        metavar="LO:HI",
        help="random: output lengths uniform in [LO, HI] (overrides --output-len/--range-ratio)",
    )
    tp.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="pagedllm sampling temperature (1.0, as vLLM's benchmark; the baseline is greedy)",
    )
    tp.add_argument("--baseline", choices=["transformers"], default=None)
    tp.add_argument(
        "--hf-batch-size", type=int, default=None, help="baseline batch (32 on CPU, 128 on GPU)"
    )
    tp.add_argument(
        "--hf-num-prompts",
        type=int,
        default=None,
        help="run the baseline on the first N requests only (ratios compare rates)",
    )
    tp.set_defaults(func=_throughput)


def _add_latency(bsub: Any) -> None:
    lat = bsub.add_parser(
        "latency",
        help="batch latency, decode tok/s vs the memory roofline, TTFT",
        description="End-to-end latency and decode speed per batch size, against the "
        "weights-read memory roofline; TTFT per prompt length at batch 1. Greedy, ignore_eos.",
        epilog=_LATENCY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(lat)
    lat.add_argument("--batch-sizes", type=_int_list, default=[1, 8, 32, 128])
    lat.add_argument("--input-len", type=int, default=512)
    lat.add_argument("--output-len", type=int, default=128)
    lat.add_argument("--num-iters", type=int, default=3)
    lat.add_argument("--num-iters-warmup", type=int, default=1)
    lat.add_argument(
        "--ttft-lens",
        type=_int_list,
        default=[128, 512, 1024, 2048],
        help="prompt lengths for batch-1 TTFT ('' to skip)",
    )
    lat.add_argument(
        "--copy-mib",
        type=int,
        default=None,
        help="size of the bandwidth-probe copy (default 1024 on GPU, 256 on CPU)",
    )
    lat.set_defaults(func=_latency)


def add_bench_parser(sub: Any) -> None:
    """Register ``bench`` with ``throughput``, ``latency`` and ``serve`` on the CLI's subparsers."""
    bench = sub.add_parser(
        "bench",
        help="offline and serving benchmarks",
        description="Offline benchmarks of pagedllm; serving benchmark of OpenAI-compatible URLs.",
    )
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    _add_throughput(bsub)
    _add_latency(bsub)
    add_serve_parser(bsub)
    add_lang_parser(bsub)
