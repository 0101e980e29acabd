"""Sweep the weight-only int4 kernels on Qwen2.5-14B's layer shapes; one H200, < 3.5 minutes.

python benchmarks/int4_sweep.py OUT.json [--budget-s 190] [--jobs 12] [--dtype float16]
python benchmarks/int4_sweep.py --emit-table OUT.json   # the dispatch table it implies

For every shape (qkv, o, gate_up, down; group 128) and M in 1..256, a focused list of
candidates (``candidates``) is timed: the GEMV (tiles, K split, warps, register prefetch, how
split-K slices are added), the tensor-core kernel (tiles, split, swapped operands) and
dequantize + cuBLAS. Each timing replays a CUDA graph of calls that cycle over enough copies
of the weight that none stays in the 50 MB L2 between its uses (as in a model, where every
layer has its own weights); the median of several replays is kept. Each result is checked
against dequantize-then-matmul in fp32 (``max_abs_err``, ``rel_err``).

Compiling is most of the time, so worker processes first run every candidate once (filling
Triton's on-disk cache in parallel); the timing process then only loads the kernels. Work past
``--budget-s`` is skipped and says so. Prints one JSON line per (shape, M, config), then the
best per (shape, M); writes them all to OUT.json.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {"qkv": (7168, 5120), "o": (5120, 5120), "gate_up": (27648, 5120), "down": (5120, 13824)}
MS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
GROUP = 128
L2_BYTES = 50 << 20


def _split(tiles: int, k: int, block_k: int, target: int) -> int:
    from pagedllm.kernels.int4_dispatch import split_for

    return split_for(tiles, -(-k // block_k), target)


def candidates(m: int, n: int, k: int, sms: int) -> list[dict[str, Any]]:
    """The configurations tried at this (shape, M); ``SPLIT_K`` is sized from a target number
    of programs per SM so one list serves every shape. GEMV tiles keep 16-32 words per thread
    (more spills registers: checked offline in the SASS)."""
    out: list[dict[str, Any]] = []

    def gemv(bm, bn, bk, warps, per_sm, prefetch=True, reduce="serial"):  # type: ignore[no-untyped-def]
        tiles = -(-m // bm) * -(-n // bn)
        out.append({
            "KERNEL": "gemv", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
            "SPLIT_K": _split(tiles, k, bk, per_sm * sms), "REDUCE": reduce,
            "PREFETCH": prefetch, "num_warps": warps, "num_stages": 1,
        })  # fmt: skip

    def dot(bm, bn, bk, warps, stages, per_sm, swap=False, reduce="serial"):  # type: ignore[no-untyped-def]
        tiles = -(-m // bm) * -(-n // bn)
        out.append({
            "KERNEL": "dot", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
            "SPLIT_K": _split(tiles, k, bk, per_sm * sms) if per_sm else 1, "REDUCE": reduce,
            "SWAP_AB": swap, "num_warps": warps, "num_stages": stages,
        })  # fmt: skip

    def tiles(bm: int, max_words: int) -> list[tuple[int, int, int]]:
        """(BLOCK_N, BLOCK_K, warps) with 8..max_words words per thread (a 1 KiB K block)."""
        return [
            (bn, bk, warps)
            for bn in (128, 256, 512, 1024)
            for bk in (32, 64, 128)
            for warps in (2, 4, 8)
            if 8 <= bk // 8 * bn // (32 * warps) <= max_words and bn // 32 >= 4 * warps // 4
        ]

    if m == 1:
        for bn, bk, warps in tiles(1, 32):
            for per_sm in (2, 4, 8):
                gemv(1, bn, bk, warps, per_sm)
            gemv(1, bn, bk, warps, 4, prefetch=False)
        gemv(1, 512, 32, 2, 16)
        gemv(1, 256, 64, 4, 16)
        for reduce in ("twopass", "atomic"):
            gemv(1, 512, 32, 2, 4, reduce=reduce)
            gemv(1, 256, 64, 4, 4, reduce=reduce)
    elif m in (2, 4):
        for bn, bk, warps in tiles(m, 16 if m == 2 else 8):
            for per_sm in (4, 8):
                gemv(m, bn, bk, warps, per_sm)
        gemv(m, 256, 64, 4, 4, reduce="atomic")
        gemv(m, 256, 64, 4, 4, reduce="twopass")
        if m == 4:
            for bn, bk, warps in tiles(2, 16):
                gemv(2, bn, bk, warps, 4)
            dot(16, 64, 128, 4, 3, 4, swap=True)
            dot(16, 128, 128, 4, 3, 4, swap=True)
    elif m == 8:
        for bn, bk, warps in tiles(4, 8):
            for per_sm in (4, 8):
                gemv(4, bn, bk, warps, per_sm)
        gemv(2, 512, 32, 4, 4)
        gemv(2, 256, 64, 4, 4)
        for swap in (False, True):
            for per_sm in (2, 4):
                dot(16, 64, 128, 4, 3, per_sm, swap)
        dot(16, 128, 128, 4, 3, 4, swap=True)
        dot(16, 128, 128, 4, 3, 2, swap=True)
    elif m <= 64:
        bm = m
        for bn, bk, warps, stages in [
            (64, 128, 4, 3),
            (128, 64, 4, 3),
            (64, 64, 4, 4),
            (128, 128, 4, 3),
        ]:
            for per_sm in (2, 4):
                dot(bm, bn, bk, warps, stages, per_sm)
        for bn in (64, 128):
            for per_sm in (1, 2, 4):
                dot(bm, bn, 128, 4, 3, per_sm, swap=True)
        dot(bm, 128, 128, 4, 4, 2, swap=True)
        dot(bm, 64, 128, 4, 5, 2, swap=True)
        dot(bm, 256, 128, 8, 3, 2, swap=True)
        dot(bm, 128, 64, 4, 4, 2, swap=True)
        dot(bm, 128, 64, 4, 3, 2, reduce="twopass")
        dot(bm, 128, 64, 4, 3, 2, reduce="atomic")
        if m == 16:
            gemv(4, 256, 32, 4, 4)
            gemv(4, 128, 64, 4, 4)
        out.append({"KERNEL": "dequant"})
    else:
        for bm, bn, bk, warps, stages in [
            (128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 256, 64, 8, 3),
            (128, 128, 128, 8, 3), (64, 256, 64, 8, 3), (128, 64, 64, 4, 4),
        ]:  # fmt: skip
            dot(bm, bn, bk, warps, stages, 0)
        dot(64, 128, 64, 4, 4, 2)
        dot(128, 128, 64, 8, 3, 2)
        out.append({"KERNEL": "dequant"})
    return out


def _weights(n: int, k: int, dtype: torch.dtype, copies: int, seed: int = 0) -> list[tuple]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    groups = k // GROUP
    res = []
    for _ in range(copies):
        packed = torch.randint(
            -(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda", generator=gen
        )
        zeros = torch.randint(0, 16, (groups, n), dtype=torch.uint8, device="cuda", generator=gen)
        scales = (torch.rand(groups, n, device="cuda", generator=gen) / 50 + 1e-3).to(dtype)
        res.append((packed, zeros, scales))
    return res


def _reference(
    x: torch.Tensor, packed: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    from pagedllm.layers.quantization.packing import unpack_rows

    q = unpack_rows(packed, 4)
    g = torch.arange(q.shape[0], device=q.device) // GROUP
    w = (q - zeros[g].to(torch.int32)).float() * scales[g].float()
    return x.float() @ w


def _tasks(dtype: torch.dtype, sms: int, shapes: dict, ms: tuple) -> list[tuple[str, int, dict]]:
    tasks, seen = [], set()
    for m in ms:
        for name, (n, k) in shapes.items():
            for cfg in candidates(m, n, k, sms):
                key = (name, m, json.dumps(cfg, sort_keys=True))
                if key not in seen:  # a capped K split can make two candidates one
                    seen.add(key)
                    tasks.append((name, m, cfg))
    return tasks


def _variant(cfg: dict[str, Any]) -> str:
    """What Triton compiles separately (the tiles and switches; not the K split's size)."""
    key = {k: v for k, v in cfg.items() if k != "SPLIT_K"}
    key["split"] = cfg.get("SPLIT_K", 1) > 1
    return json.dumps(key, sort_keys=True)


def _compile_worker(args: tuple) -> dict[int, str]:
    """Run each task once (compiles into Triton's cache). Returns the index of a task that
    broke the CUDA context (an illegal address, ...) with its error, and stops there: the
    timing process skips that task instead of losing its own context to it."""
    tasks, dtype_name = args
    from pagedllm.kernels.int4_gemm import int_weight_linear

    dtype = getattr(torch, dtype_name)
    weights = {name: _weights(n, k, dtype, 1)[0] for name, (n, k) in SHAPES.items()}
    for index, name, m, cfg in tasks:
        packed, zeros, scales = weights[name]
        x = torch.randn(m, SHAPES[name][1], device="cuda", dtype=dtype)
        try:
            int_weight_linear(x, packed, zeros, scales, None, 4, GROUP, None, cfg)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - compile errors are reported by the timing pass
            try:
                torch.cuda.synchronize()
                torch.zeros(1, device="cuda").item()
            except Exception:  # noqa: BLE001 - the context is gone: this task did it
                return {index: f"{type(e).__name__}: {str(e)[:300]}"}
    return {}


def _time_us(fn_for_copy: Any, copies: int, replays: int = 5) -> float:
    """Per-call µs: one CUDA graph of calls over every weight copy (twice), replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(copies):
            fn_for_copy(i)
    torch.cuda.current_stream().wait_stream(stream)
    calls = 2 * copies
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn_for_copy(i % copies)
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(times)


def emit_table(results_path: str) -> str:
    """``int4_dispatch.MEASURED`` as Python source, from a sweep's OUT.json: per shape, the
    fastest correct configuration with a deterministic reduction at each measured M (the
    bucket up to that M)."""
    data = json.loads(Path(results_path).read_text())
    best: dict[tuple[int, int, int], dict] = {}
    for row in data["results"]:
        cfg = row["config"]
        if not row.get("ok") or (cfg.get("REDUCE") == "atomic" and cfg.get("SPLIT_K", 1) > 1):
            continue  # atomic slices add in a varying order: results would not repeat
        key = (row["n"], row["k"], row["m"])
        if key not in best or row["time_us"] < best[key]["time_us"]:
            best[key] = row
    table: dict[tuple[int, int], list[tuple[int, dict]]] = {}
    for (n, k, m), row in best.items():
        table.setdefault((n, k), []).append((m, row["config"]))
    lines = [f"# benchmarks/int4_sweep.py on {data['meta']['gpu']} ({data['meta']['dtype']})"]
    lines.append("MEASURED: dict[tuple[int, int], list[tuple[int, dict[str, Any]]]] = {")
    for key in sorted(table):
        lines.append(f"    {key}: [")
        for m, cfg in sorted(table[key], key=lambda e: e[0]):
            lines.append(f"        ({m}, {cfg!r}),")
        lines.append("    ],")
    lines.append("}")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--emit-table":
        print(emit_table(sys.argv[2]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--budget-s", type=float, default=190.0)
    ap.add_argument("--jobs", type=int, default=14)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    args = ap.parse_args()
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    from pagedllm.kernels.int4_dispatch import num_sms
    from pagedllm.kernels.int4_gemm import int_weight_linear

    dtype = getattr(torch, args.dtype)
    shapes = {s: SHAPES[s] for s in args.shapes.split(",")}
    ms = tuple(int(v) for v in args.ms.split(","))
    sms = num_sms(torch.device("cuda"))
    tasks = _tasks(dtype, sms, shapes, ms)
    meta = {"gpu": torch.cuda.get_device_name(), "sms": sms, "dtype": args.dtype,
            "torch": torch.__version__, "tasks": len(tasks)}  # fmt: skip
    fatal: dict[int, str] = {}
    if args.jobs > 1:  # parallel compile into the on-disk Triton cache
        # Tasks of one kernel variant go to one worker, so each variant compiles once.
        groups: dict[str, list] = {}
        for i, (name, m, cfg) in enumerate(tasks):
            groups.setdefault(_variant(cfg), []).append((i, name, m, cfg))
        chunks: list[list] = [[] for _ in range(args.jobs)]
        for j, group in enumerate(groups.values()):
            chunks[j % args.jobs].extend(group)
        ctx = mp.get_context("spawn")
        with ctx.Pool(args.jobs) as pool:
            res = pool.map_async(_compile_worker, [(c, args.dtype) for c in chunks])
            try:
                for worker_fatal in res.get(timeout=max(10.0, 0.55 * args.budget_s)):
                    fatal.update(worker_fatal)
                meta["compile"] = "done"
            except mp.TimeoutError:
                meta["compile"] = "timeout"
                pool.terminate()
            except Exception as e:  # noqa: BLE001 - timing compiles what is missing
                meta["compile"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
                pool.terminate()
    meta["fatal"] = len(fatal)
    meta["compile_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps({"meta": meta}), flush=True)

    results: list[dict[str, Any]] = []
    skipped = 0
    weights_cache: dict[str, list[tuple]] = {}
    inputs: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for index, (name, m, cfg) in enumerate(tasks):
        n, k = shapes[name]
        if index in fatal:  # it broke a worker's CUDA context; it would break ours
            row = {"shape": name, "m": m, "config": cfg, "ok": False, "error": fatal[index]}
            results.append(row)
            print(json.dumps(row), flush=True)
            continue
        if time.perf_counter() > deadline:
            skipped += 1
            continue
        if name not in weights_cache:
            wbytes = k * n // 2
            copies = max(2, math.ceil(3 * L2_BYTES / wbytes))
            weights_cache[name] = _weights(n, k, dtype, copies, seed=1)
        ws = weights_cache[name]
        if (name, m) not in inputs:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            inputs[(name, m)] = (x, _reference(x, *ws[0]))
        x, ref = inputs[(name, m)]
        row: dict[str, Any] = {"shape": name, "n": n, "k": k, "m": m, "config": cfg}
        try:
            out = int_weight_linear(x, *ws[0], None, 4, GROUP, None, cfg)
            row["max_abs_err"] = (out.float() - ref).abs().max().item()
            row["rel_err"] = ((out.float() - ref).norm() / ref.norm()).item()
            t = _time_us(
                lambda i, x=x, cfg=cfg, ws=ws: int_weight_linear(
                    x, *ws[i], None, 4, GROUP, None, cfg
                ),
                len(ws),
            )
            nbytes = (
                ws[0][0].numel() * 4 + ws[0][1].numel() + ws[0][2].numel() * ws[0][2].element_size()
            )
            row["time_us"] = round(t, 2)
            row["tb_s"] = round(nbytes / (t * 1e-6) / 1e12, 3)
            row["tflops"] = round(2 * m * n * k / (t * 1e-6) / 1e12, 1)
            row["ok"] = row["rel_err"] < 1e-2
        except Exception as e:  # noqa: BLE001 - a config that fails is a result too
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            row["ok"] = False
        results.append(row)
        print(json.dumps(row), flush=True)

    best: dict[str, dict[str, Any]] = {}
    for row in results:
        if not row.get("ok"):
            continue
        key = f"{row['shape']}/M={row['m']}"
        if key not in best or row["time_us"] < best[key]["time_us"]:
            best[key] = row
    meta["skipped_over_budget"] = skipped
    meta["total_s"] = round(time.perf_counter() - t_start, 1)
    print("# best per (shape, M)")
    for key, row in best.items():
        cfg = json.dumps(row["config"])
        print(f"{key:16s} {row['time_us']:9.2f} us {row['tb_s']:6.3f} TB/s {cfg}")
    print(json.dumps({"meta": meta}), flush=True)
    Path(args.out).write_text(
        json.dumps({"meta": meta, "results": results, "best": best}, indent=1)
    )


if __name__ == "__main__":
    main()
