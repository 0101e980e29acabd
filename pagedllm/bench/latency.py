"""``pagedllm bench latency``: end-to-end batch latency, decode speed vs the memory roofline.

For each batch size ``B`` (fresh random prompts of ``--input-len`` ids every iteration, so the
prefix cache never helps) it times ``generate`` twice over:

* TTFT: ``max_tokens=1``, i.e. prefilling the whole batch and sampling one token;
* end to end: ``max_tokens=--output-len`` (``ignore_eos``).

Decode time = median end-to-end - median TTFT (medians resist noisy iterations), covering the
``output_len - 1`` later steps, so decode tok/s = ``B * (output_len - 1) / decode time``. A
decode step must at least read every weight once: the roofline step time is weight bytes (sum
of the loaded parameters) divided by the measured device-to-device copy bandwidth (a large
``copy_``, bytes read + written), which caps decode at ``B / step time`` tok/s. A second
roofline adds the KV cache each step reads (``B`` sequences at their mean decode context).
TTFT per prompt length (``--ttft-lens``) is measured at batch 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from pagedllm.bench import report
from pagedllm.bench.datasets import sample_random, special_token_ids
from pagedllm.bench.presets import bench_engine_kwargs
from pagedllm.bench.throughput import free_device_memory, sync_device
from pagedllm.config import EngineConfig


def measure_copy_bandwidth(
    device: torch.device, nbytes: int | None = None, iters: int = 10
) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written.

    GPU: 1 GiB (or a quarter of free memory), timed with CUDA events over ``iters`` copies.
    CPU: 256 MiB, the best of ``iters`` copies.
    """
    if nbytes is None:
        nbytes = 256 * 2**20
        if device.type == "cuda":
            nbytes = min(2**30, torch.cuda.mem_get_info(device)[0] // 4)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages / warm up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize(device)
        seconds = start.elapsed_time(end) / 1e3 / iters
    else:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
        seconds = min(times)
    del src, dst
    free_device_memory(device)
    return 2 * nbytes / seconds


def _stats(samples: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)
    return {
        "mean": statistics.fmean(samples),
        "median": statistics.median(samples),
        "min": ordered[0],
        "max": ordered[-1],
        "samples": samples,
    }


class _Timer:
    """Times ``generate`` over fresh random batches; every prompt is new (no prefix hits)."""

    def __init__(self, llm: Any, args: argparse.Namespace, bar: Any) -> None:
        cfg: EngineConfig = llm.llm_engine.config
        tok = llm.get_tokenizer()
        self.llm, self.device, self.bar = llm, cfg.device_config.torch_device, bar
        self.vocab = min(cfg.model_config.arch.vocab_size, len(tok))
        self.special = special_token_ids(tok)
        self.seed = args.seed
        self.detokenize = not args.disable_detokenize

    def __call__(self, batch: int, input_len: int, max_tokens: int) -> float:
        from pagedllm import SamplingParams

        self.seed += 1
        reqs = sample_random(
            batch, (input_len, input_len), (1, 1), self.vocab, self.special, self.seed
        )
        params = SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=self.detokenize
        )
        prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
        sync_device(self.device)
        start = time.perf_counter()
        self.llm.generate(prompts, params, use_tqdm=False)
        sync_device(self.device)
        self.bar.update(1)
        return time.perf_counter() - start


def _repeat(fn: Callable[[], float], warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    return [fn() for _ in range(iters)]


def run_batches(
    timer: _Timer,
    args: argparse.Namespace,
    weight_bytes: int,
    kv_bytes_per_token: float,
    bandwidth: float,
) -> list[dict[str, Any]]:
    rows = []
    out_len, in_len = args.output_len, args.input_len
    warm, iters = args.num_iters_warmup, args.num_iters
    step_s = weight_bytes / bandwidth
    for b in args.batch_sizes:
        timer.bar.set_description(f"batch {b}")
        e2e = _repeat(lambda b=b: timer(b, in_len, out_len), warm, iters)
        ttft = _repeat(lambda b=b: timer(b, in_len, 1), warm, iters)
        decode_s = statistics.median(e2e) - statistics.median(ttft)
        decode_tok_s = b * (out_len - 1) / decode_s if decode_s > 0 else None
        kv_step_s = (weight_bytes + b * kv_bytes_per_token * (in_len + out_len / 2)) / bandwidth
        rows.append(
            {
                "batch_size": b,
                "ttft_s": _stats(ttft),
                "e2e_s": _stats(e2e),
                "decode_s": decode_s,
                "decode_step_ms": decode_s / (out_len - 1) * 1e3,
                "decode_tok_s": decode_tok_s,
                "roofline_step_ms": step_s * 1e3,
                "roofline_tok_s": b / step_s,
                "pct_roofline": 100 * decode_tok_s * step_s / b if decode_tok_s else None,
                "roofline_kv_step_ms": kv_step_s * 1e3,
                "roofline_kv_tok_s": b / kv_step_s,
                "pct_roofline_kv": 100 * decode_tok_s * kv_step_s / b if decode_tok_s else None,
            }
        )
    return rows


def _markdown(rep: dict[str, Any], model: str) -> str:
    a, r = rep["args"], rep["roofline"]
    headers = [
        "batch",
        "TTFT (ms)",
        "e2e latency (s)",
        "decode ms/step",
        "decode tok/s",
        "roofline tok/s",
        "% roofline",
        "roofline+KV tok/s",
        "% roofline+KV",
    ]
    rows = [
        [
            x["batch_size"],
            x["ttft_s"]["median"] * 1e3,
            x["e2e_s"]["median"],
            x["decode_step_ms"],
            x["decode_tok_s"],
            x["roofline_tok_s"],
            x["pct_roofline"],
            x["roofline_kv_tok_s"],
            x["pct_roofline_kv"],
        ]
        for x in rep["batches"]
    ]
    e = rep["engine"]
    extra = [
        f"workload: {a['input_len']} in / {a['output_len']} out, {a['num_iters']} iterations "
        f"after {a['num_iters_warmup']} warm-up, greedy, ignore_eos; times are medians",
        f"engine: {e['dtype']}, {e['attention_backend']}, block {e['block_size']}, "
        f"max_num_batched_tokens {e['max_num_batched_tokens']}, {e['num_kv_blocks']} KV blocks",
        f"roofline: weights {r['weight_bytes'] / 1e9:.3f} GB / copy bandwidth "
        f"{r['copy_bandwidth_Bps'] / 1e9:,.1f} GB/s = {r['min_step_ms']:.3f} ms per decode step",
    ]
    text = report.header_lines("pagedllm bench latency", rep["env"], model, extra)
    text += report.markdown_table(headers, rows)
    if rep["ttft_by_len"]:
        ttft_rows = [
            [
                t["input_len"],
                t["ttft_s"]["median"] * 1e3,
                t["ttft_s"]["mean"] * 1e3,
                t["input_len"] / t["ttft_s"]["median"],
            ]
            for t in rep["ttft_by_len"]
        ]
        text += "\n\nTTFT at batch 1:\n\n" + report.markdown_table(
            ["prompt len", "TTFT median (ms)", "TTFT mean (ms)", "prefill tok/s"], ttft_rows
        )
    return text


def main(args: argparse.Namespace) -> int:
    """Run the latency benchmark described by parsed CLI ``args``."""
    from pagedllm import LLM

    if args.output_len < 2:
        raise ValueError("--output-len must be >= 2 (decode speed needs steps after the first).")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        raise ValueError("--batch-sizes must list batch sizes >= 1.")
    if args.num_iters < 1 or args.num_iters_warmup < 0:
        raise ValueError("--num-iters must be >= 1 and --num-iters-warmup >= 0.")
    paths = report.output_paths("latency", args.output_json)
    kwargs = bench_engine_kwargs(args)
    kwargs["max_num_seqs"] = max(kwargs["max_num_seqs"], max(args.batch_sizes))
    device = EngineConfig(**kwargs).device_config.torch_device
    copy_bytes = args.copy_mib * 2**20 if args.copy_mib else None
    bandwidth = measure_copy_bandwidth(device, copy_bytes)  # before the KV cache takes memory
    llm = LLM(**kwargs)
    max_len = llm.llm_engine.config.model_config.max_model_len
    assert max_len is not None
    if args.input_len + args.output_len > max_len:
        raise ValueError(
            f"--input-len + --output-len ({args.input_len + args.output_len}) exceeds "
            f"max_model_len ({max_len})."
        )
    ttft_lens = [n for n in args.ttft_lens if n < max_len]
    if len(ttft_lens) < len(args.ttft_lens):
        print(f"Skipping TTFT lengths >= max_model_len ({max_len}).")
    engine_info = report.describe_engine(llm)
    weight_bytes = engine_info["weight_bytes"]
    kv_per_token = llm.llm_engine.runner.kv_spec.bytes_per_token
    runs_per_point = args.num_iters + args.num_iters_warmup
    n_calls = runs_per_point * (2 * len(args.batch_sizes) + len(ttft_lens))
    with tqdm(total=n_calls, disable=args.disable_tqdm, unit="run") as bar:
        timer = _Timer(llm, args, bar)
        batches = run_batches(timer, args, weight_bytes, kv_per_token, bandwidth)
        ttft_by_len = []
        for n in ttft_lens:
            bar.set_description(f"TTFT {n}")
            samples = _repeat(lambda n=n: timer(1, n, 1), args.num_iters_warmup, args.num_iters)
            ttft_by_len.append({"input_len": n, "ttft_s": _stats(samples)})
    engine_info["engine_stats"] = dataclasses.asdict(llm.llm_engine.stats())
    model = args.model_config or engine_info["model"]
    rep: dict[str, Any] = {
        "kind": "latency",
        "env": report.env_info(device),
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "engine": engine_info,
        "roofline": {
            "weight_bytes": weight_bytes,
            "kv_bytes_per_token": kv_per_token,
            "copy_bandwidth_Bps": bandwidth,
            "min_step_ms": weight_bytes / bandwidth * 1e3,
        },
        "batches": batches,
        "ttft_by_len": ttft_by_len,
    }
    bs = [x["batch_size"] for x in batches]
    panels: list[tuple[str, str, Any, dict[str, Any]]] = [
        (
            "decode tok/s",
            "batch size",
            bs,
            {
                "pagedllm": [x["decode_tok_s"] for x in batches],
                "roofline (weights)": [x["roofline_tok_s"] for x in batches],
                "roofline (weights + KV)": [x["roofline_kv_tok_s"] for x in batches],
            },
        )
    ]
    if ttft_by_len:
        lens = [t["input_len"] for t in ttft_by_len]
        ms = [t["ttft_s"]["median"] * 1e3 for t in ttft_by_len]
        panels.append(("TTFT at batch 1 (ms)", "prompt length", lens, {"pagedllm": ms}))
    title = f"{model} on {rep['env']['device']}"

    def plot(path: Any) -> None:
        report.plot_lines(path, title, panels)

    report.write_report(paths, rep, _markdown(rep, model), plot)
    return 0
