"""``pagedllm bench throughput``: offline throughput, optionally against transformers.

All requests go to ``LLM.generate`` at once (the engine batches them continuously); the clock
covers that call only, after a short warm-up. Every request generates exactly its output
length (``ignore_eos``). Reported: requests/s, output tokens/s, total (prompt + output)
tokens/s and elapsed time, like vLLM's ``benchmark_throughput.py``.

``--baseline transformers`` then frees the engine and runs Hugging Face
``AutoModelForCausalLM.generate`` on the same requests in the same process: greedy, batched
``--hf-batch-size`` at a time with left padding, ``min_new_tokens = max_new_tokens``. Requests
are sorted by (output, prompt) length before batching so a batch wastes little on padding or
extra tokens; a batch generates its longest output length and only the requested tokens are
counted. Dummy models are built with ``from_config`` on the device and filled like pagedllm's
dummy loader (norm weights 1, everything else U(-1e-3, 1e-3)).
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pagedllm.bench import report
from pagedllm.bench.datasets import (
    BenchRequest,
    parse_len_range,
    ratio_range,
    sample_random,
    sample_sharegpt,
    special_token_ids,
    workload_summary,
)
from pagedllm.bench.presets import bench_engine_kwargs, is_synthetic_tokenizer
from pagedllm.config import EngineConfig

logger = logging.getLogger(__name__)

NUM_WARMUP_REQUESTS = 4


@dataclass
class RunResult:
    """One engine's timed run over the workload."""

    engine: str
    elapsed_s: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        out = asdict(self)
        out["requests_per_s"] = self.num_requests / self.elapsed_s
        out["output_tokens_per_s"] = self.output_tokens / self.elapsed_s
        out["total_tokens_per_s"] = (self.prompt_tokens + self.output_tokens) / self.elapsed_s
        return out


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def load_requests(args: argparse.Namespace, tokenizer: Any, config: EngineConfig) -> list:
    """The workload of ``--dataset-name`` (see :mod:`pagedllm.bench.datasets`)."""
    if args.dataset_name == "sharegpt":
        return sample_sharegpt(
            args.dataset_path,
            args.num_prompts,
            tokenizer,
            seed=args.seed,
            output_len=args.output_len,
            max_model_len=config.model_config.max_model_len,
        )
    in_range = (
        parse_len_range(args.input_len_range)
        if args.input_len_range
        else ratio_range(args.input_len or 1024, args.range_ratio)
    )
    out_range = (
        parse_len_range(args.output_len_range)
        if args.output_len_range
        else ratio_range(args.output_len or 128, args.range_ratio)
    )
    max_len = config.model_config.max_model_len
    assert max_len is not None
    if in_range[1] + out_range[1] > max_len:
        raise ValueError(
            f"Longest request ({in_range[1]} + {out_range[1]} tokens) exceeds max_model_len "
            f"({max_len})."
        )
    vocab = min(config.model_config.arch.vocab_size, len(tokenizer))
    return sample_random(
        args.num_prompts, in_range, out_range, vocab, special_token_ids(tokenizer), args.seed
    )


def check_dataset_args(args: argparse.Namespace, engine_kwargs: dict[str, Any]) -> None:
    """Fail before the engine loads: ShareGPT needs a file and a real tokenizer."""
    if args.dataset_name != "sharegpt":
        return
    if not args.dataset_path:
        raise ValueError("--dataset-name sharegpt needs --dataset-path FILE.json.")
    if not Path(args.dataset_path).is_file():
        raise FileNotFoundError(f"ShareGPT dataset {args.dataset_path} does not exist.")
    if is_synthetic_tokenizer(engine_kwargs.get("tokenizer") or ""):
        raise ValueError(
            "ShareGPT prompts need a real tokenizer, and this preset has a synthetic one: "
            "pass --tokenizer DIR (e.g. a model directory with tokenizer.json)."
        )


def run_pagedllm(llm: Any, requests: list[BenchRequest], args: argparse.Namespace) -> RunResult:
    """Warm up on a few reversed prompts, then time one ``generate`` over all requests."""
    from pagedllm import SamplingParams

    engine = llm.llm_engine
    device = engine.config.device_config.torch_device

    def params(n: int) -> SamplingParams:
        return SamplingParams(
            temperature=args.temperature,
            max_tokens=n,
            ignore_eos=True,
            detokenize=not args.disable_detokenize,
        )

    warm = requests[:NUM_WARMUP_REQUESTS]
    llm.generate(
        [{"prompt_token_ids": r.prompt_token_ids[::-1]} for r in warm],
        [params(min(r.output_len, 4)) for r in warm],
        use_tqdm=False,
    )
    engine.scheduler.kv.pool.reset_prefix_cache()
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    sync_device(device)
    start = time.perf_counter()
    outs = llm.generate(
        prompts, [params(r.output_len) for r in requests], use_tqdm=not args.disable_tqdm
    )
    sync_device(device)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    expected = sum(r.output_len for r in requests)
    if produced != expected:
        logger.warning("pagedllm generated %d tokens, %d were requested.", produced, expected)
    return RunResult(
        engine="pagedllm",
        elapsed_s=elapsed,
        num_requests=len(outs),
        prompt_tokens=sum(r.prompt_len for r in requests),
        output_tokens=produced,
        extra={"engine_stats": asdict(engine.stats())},
    )


def _dummy_fill(model: torch.nn.Module, seed: int) -> None:
    """pagedllm's dummy init: norm weights 1, all other parameters U(-1e-3, 1e-3)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                gen = torch.Generator(device=param.device).manual_seed(seed)
                param.uniform_(-1e-3, 1e-3, generator=gen)
                seed += 1


def load_hf_model(config: EngineConfig) -> torch.nn.Module:
    """The transformers model of ``config``, on its device and dtype (dummy: random)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    mc, device = config.model_config, config.device_config.torch_device
    assert mc.model is not None
    if mc.load_format == "dummy":
        hf_cfg = AutoConfig.from_pretrained(mc.model)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_cfg, dtype=mc.torch_dtype)
        _dummy_fill(model, mc.seed)
    else:
        model = AutoModelForCausalLM.from_pretrained(mc.model, dtype=mc.torch_dtype)
        model = model.to(device)
    return model.eval()


def run_transformers(
    config: EngineConfig, requests: list[BenchRequest], batch_size: int, use_tqdm: bool
) -> RunResult:
    """Batched, left-padded, greedy ``generate`` over ``requests`` (see the module doc)."""
    from transformers import GenerationConfig

    device = config.device_config.torch_device
    in_use = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    model = load_hf_model(config)
    pad = 0
    order = sorted(requests, key=lambda r: (r.output_len, r.prompt_len))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def generate(batch: list[BenchRequest], new_tokens: int) -> int:
        width = max(r.prompt_len for r in batch)
        ids = [[pad] * (width - r.prompt_len) + r.prompt_token_ids for r in batch]
        mask = [[0] * (width - r.prompt_len) + [1] * r.prompt_len for r in batch]
        gen_cfg = GenerationConfig(
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            eos_token_id=None,
            pad_token_id=pad,
        )
        with torch.inference_mode():
            out = model.generate(
                input_ids=torch.tensor(ids, device=device),
                attention_mask=torch.tensor(mask, device=device),
                generation_config=gen_cfg,
            )
        return int(out.shape[1] - width)

    generate([BenchRequest(order[0].prompt_token_ids[:16], 2)], 2)  # warm-up
    sync_device(device)
    start = time.perf_counter()
    for batch in tqdm(batches, desc="transformers batches", disable=not use_tqdm):
        longest = max(r.output_len for r in batch)
        made = generate(batch, longest)
        if made != longest:
            logger.warning("transformers generated %d tokens, %d were requested.", made, longest)
    sync_device(device)
    elapsed = time.perf_counter() - start
    return RunResult(
        engine="transformers",
        elapsed_s=elapsed,
        num_requests=len(requests),
        prompt_tokens=sum(r.prompt_len for r in requests),
        output_tokens=sum(r.output_len for r in requests),
        extra={
            "batch_size": batch_size,
            "device_bytes_in_use_before_load": in_use,
            "generated_tokens_incl_batch_padding": sum(
                max(r.output_len for r in b) * len(b) for b in batches
            ),
        },
    )


_RATES = ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s")
_HEADERS = "engine|requests|prompt tok|output tok|elapsed (s)|req/s|output tok/s|total tok/s"


def _markdown(rep: dict[str, Any]) -> str:
    cols = ("num_requests", "prompt_tokens", "output_tokens", "elapsed_s", *_RATES)
    rows: list[list[Any]] = [[n, *(m[c] for c in cols)] for n, m in rep["results"].items()]
    if rep.get("ratio"):
        ratios = (f"{rep['ratio'][r]:.2f}x" for r in _RATES)
        rows.append(["ratio pagedllm / transformers", *[""] * 4, *ratios])
    w, e = rep["workload"], rep["engine"]
    extra = [
        f"workload: {rep['args']['dataset_name']}, {w['num_requests']} requests, input "
        f"{w['input_len_min']}-{w['input_len_max']} (mean {w['input_len_mean']}), output "
        f"{w['output_len_min']}-{w['output_len_max']} (mean {w['output_len_mean']})",
        f"engine: {e['dtype']}, {e['attention_backend']}, block {e['block_size']}, "
        f"max_num_seqs {e['max_num_seqs']}, max_num_batched_tokens "
        f"{e['max_num_batched_tokens']}, {e['num_kv_blocks']} KV blocks ({e['kv_cache_gib']} GiB)",
    ]
    model = rep["args"].get("model_config") or e["model"]
    head = report.header_lines("pagedllm bench throughput", rep["env"], model, extra)
    return head + report.markdown_table(_HEADERS.split("|"), rows)


def main(args: argparse.Namespace) -> int:
    """Run the throughput benchmark described by parsed CLI ``args``."""
    from pagedllm import LLM

    paths = report.output_paths("throughput", args.output_json)
    kwargs = bench_engine_kwargs(args)
    check_dataset_args(args, kwargs)
    llm = LLM(**kwargs)
    config = llm.llm_engine.config
    device = config.device_config.torch_device
    requests = load_requests(args, llm.get_tokenizer(), config)
    engine_info = report.describe_engine(llm)
    results = {"pagedllm": run_pagedllm(llm, requests, args).metrics()}
    del llm
    free_device_memory(device)
    ratio = None
    if args.baseline == "transformers":
        hf_requests = requests[: args.hf_num_prompts] if args.hf_num_prompts else requests
        batch = args.hf_batch_size or (128 if device.type == "cuda" else 32)
        hf = run_transformers(config, hf_requests, batch, not args.disable_tqdm).metrics()
        free_device_memory(device)
        results["transformers"] = hf
        ratio = {k: results["pagedllm"][k] / hf[k] for k in _RATES}
    rep: dict[str, Any] = {
        "kind": "throughput",
        "env": report.env_info(device),
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "engine": engine_info,
        "workload": workload_summary(requests),
        "results": results,
        "ratio": ratio,
    }
    series = {name: [m[k] for k in _RATES] for name, m in results.items()}
    title = f"{args.model_config or engine_info['model']} on {rep['env']['device']}"

    def plot(path: Any) -> None:
        report.plot_bars(path, title, ["req/s", "output tok/s", "total tok/s"], series)

    report.write_report(paths, rep, _markdown(rep), plot)
    return 0
