"""``pagedllm infer``: run a JSONL data set through a backend, and ``--compare`` two results.

Input rows hold ``messages`` (a chat, rendered with the model's chat template) or ``prompt``
(plain text); an ``id`` is carried over when present. Each output row holds the row's index
and id, the ``response`` text, ``usage`` (prompt and completion tokens), ``finish_reason``,
the backend and the batch's wall time per row (``latency_s``). Rows are written after every
batch, so an interrupted run resumes where it stopped: rows whose index is already in
``--output`` are skipped. ``--compare A.jsonl B.jsonl`` reports the exact-match rate of the
responses by index and the first differing rows, exiting 1 when any differ.

``--backend`` picks the engine (``infer_backends.py``); prompts are rendered and tokenized by
pagedllm for every backend, so differences are the engines', not the tokenizers'.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from pagedllm.entrypoints.infer_backends import BACKENDS, Settings


def read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from None
        if not isinstance(row, dict) or ("messages" in row) == ("prompt" in row):
            raise ValueError(f"{path}:{n}: a row needs exactly one of 'messages' or 'prompt'")
        rows.append(row)
    return rows


def done_indices(path: Path) -> set[int]:
    """Indices already answered in ``path`` (a partial last line, from a kill, is dropped)."""
    if not path.is_file():
        return set()
    done = set()
    lines = path.read_text().splitlines(keepends=True)
    good = []
    for line in lines:
        try:
            done.add(int(json.loads(line)["index"]))
            good.append(line)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            break
    if len(good) != len(lines):
        path.write_text("".join(good))
    return done


def _make_backend(args: argparse.Namespace) -> tuple[Any, Any]:
    from pagedllm.config import EngineConfig
    from pagedllm.config.cli_args import engine_kwargs_from_args
    from pagedllm.entrypoints import infer_backends as ib
    from pagedllm.entrypoints.model_source import check_architecture

    kwargs = engine_kwargs_from_args(args)
    kwargs["model"] = args.model or args.model_flag
    if args.backend == "openai" and kwargs["model"] is None and kwargs["tokenizer"] is None:
        raise ValueError(
            "--backend openai needs MODEL (or --tokenizer): prompts are tokenized here, with "
            "the served model's tokenizer and chat template"
        )
    config = EngineConfig(**kwargs)
    mc = config.model_config
    assert mc.model is not None and mc.tokenizer is not None
    template = args.chat_template
    if template is not None and Path(template).expanduser().is_file():
        template = Path(template).expanduser().read_text()
    tokenized = ib.Tokenized(mc.model, mc.tokenizer, template)
    if args.backend == "openai":
        if not args.base_url:
            raise ValueError("--backend openai needs --base-url")
        return tokenized, ib.OpenAIBackend(args.base_url, args.served_model, args.api_key)
    if args.base_url:
        raise ValueError(f"--base-url is for --backend openai, not {args.backend}")
    if args.backend == "transformers":
        return tokenized, ib.TransformersBackend(config, tokenized)
    check_architecture(config)
    return tokenized, ib.PagedLLMBackend(config)


def run_infer(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    rows = read_rows(Path(args.dataset))
    out_path = Path(args.output)
    done = done_indices(out_path)
    todo = [i for i in range(len(rows)) if i not in done]
    if not todo:
        print(f"{out_path}: all {len(rows)} rows already done", file=sys.stderr)
        return 0
    tokenized, backend = _make_backend(args)
    settings = Settings(args.temperature, args.top_p, args.max_tokens, args.sampling_seed)
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), unit="row", desc=args.backend)
    try:
        with out_path.open("a") as out:
            for start in range(0, len(todo), args.batch_size):
                batch = todo[start : start + args.batch_size]
                prompts = [tokenized.prompt_ids(rows[i]) for i in batch]
                t0 = time.perf_counter()
                answers = backend.run(prompts, settings)
                per_row = (time.perf_counter() - t0) / len(batch)
                for i, ids, ans in zip(batch, prompts, answers, strict=True):
                    record = {
                        "index": i,
                        "id": rows[i].get("id"),
                        "response": ans.text,
                        "finish_reason": ans.finish_reason,
                        "usage": {
                            "prompt_tokens": len(ids),
                            "completion_tokens": ans.completion_tokens,
                        },
                        "backend": args.backend,
                        "latency_s": round(per_row, 6),
                    }
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()
                bar.update(len(batch))
    finally:
        bar.close()
        backend.close()
    return 0


def compare(a: Path, b: Path, show: int = 5, out: Any = None) -> int:
    """Print the exact-match rate of two ``infer`` outputs and their first differences."""
    out = sys.stdout if out is None else out

    def load(p: Path) -> dict[int, str]:
        return {int(r["index"]): r["response"] for r in map(json.loads, p.read_text().splitlines())}

    ra, rb = load(a), load(b)
    common = sorted(set(ra) & set(rb))
    if not common:
        raise ValueError(f"{a} and {b} share no row index")
    diffs = [i for i in common if ra[i] != rb[i]]
    rate = 1 - len(diffs) / len(common)
    out.write(f"exact match: {len(common) - len(diffs)}/{len(common)} rows ({100 * rate:.1f}%)\n")
    only = set(ra) ^ set(rb)
    if only:
        out.write(f"rows in only one file: {len(only)}\n")
    for i in diffs[:show]:
        x, y = ra[i], rb[i]
        at = next((k for k in range(min(len(x), len(y))) if x[k] != y[k]), min(len(x), len(y)))
        out.write(f"row {i}: first difference at character {at}\n")
        out.write(f"  A: {x[max(0, at - 20) : at + 40]!r}\n  B: {y[max(0, at - 20) : at + 40]!r}\n")
    return 1 if diffs else 0


def infer_main(args: argparse.Namespace) -> int:
    if args.compare:
        return compare(Path(args.compare[0]), Path(args.compare[1]))
    if not args.dataset or not args.output:
        raise ValueError("infer needs --dataset IN.jsonl and --output OUT.jsonl (or --compare)")
    if args.batch_size < 1 or args.max_tokens < 1:
        raise ValueError("--batch-size and --max-tokens must be >= 1")
    return run_infer(args)


def add_infer_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from pagedllm.config.cli_args import add_engine_args
    from pagedllm.entrypoints.cli_compat import add_config_file_arg

    p = sub.add_parser(
        "infer",
        help="run a JSONL data set through a backend; compare two results",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("model", nargs="?", default=None, metavar="MODEL")
    g = p.add_argument_group("infer")
    g.add_argument("--dataset", default=None, help="input JSONL (rows with messages or prompt)")
    g.add_argument("--output", default=None, help="output JSONL (appended to: resumable)")
    g.add_argument("--backend", default="pagedllm", choices=BACKENDS)
    g.add_argument("--base-url", default=None, help="server of --backend openai")
    g.add_argument("--api-key", default=None, help="API key for --base-url")
    g.add_argument("--served-model", default=None, help="model name at --base-url")
    g.add_argument("--batch-size", type=int, default=64, help="rows per batch (default: 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="(default: 0, greedy)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--max-tokens", type=int, default=256, help="per row (default: 256)")
    g.add_argument("--sampling-seed", type=int, default=None)
    g.add_argument("--chat-template", default=None, help="Jinja chat template (file or text)")
    g.add_argument("--compare", nargs=2, metavar=("A.jsonl", "B.jsonl"), help="compare two outputs")
    add_config_file_arg(p)
    add_engine_args(p)
    p.set_defaults(func=infer_main)
