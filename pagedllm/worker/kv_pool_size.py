"""How many KV blocks to allocate (an explicit count, a byte budget, or a profiled GPU share),
and the fp8 KV cache's start-up calibration, which rides on the same profiling pass.

Block sizes in bytes come from the ``KVCacheSpec`` (this rank's heads, the KV dtype), the same
numbers the backend allocates with, so the byte budget and the allocation always agree. Every
tensor-parallel rank must allocate the same number of blocks (the scheduler hands out one
block id space for all of them), so each rank's count is reduced to the minimum over the ranks.

An fp8 cache needs per-layer K and V scales (``layers/attention/kv_quant.py``). Without
checkpoint scales they are calibrated here: the CUDA profiling pass (a dummy step of
``max_num_batched_tokens`` random tokens, run anyway to measure the activation peak) writes
into a cache of the model's dtype, whose per-layer amax of K and V over the fp8 dtype's
largest value becomes the scales. Where no profiling pass runs (``num_gpu_blocks``,
``kv_cache_memory_bytes``, the CPU) the scales stay 1.0, and a log line says so.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import torch

from pagedllm.config import EngineConfig
from pagedllm.core.kv_cache_spec import KVCacheSpec
from pagedllm.distributed import get_tp_group
from pagedllm.layers.attention.kv_quant import FP8_TORCH_DTYPES, scale_from_amax
from pagedllm.worker.kv_cache_spec import bind_kv_caches, unbind_kv_caches

if TYPE_CHECKING:
    from pagedllm.layers.attention.layer import Attention
    from pagedllm.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

_CPU_DEFAULT_BYTES = 2 * 2**30


def _blocks_for_all_seqs(config: EngineConfig, spec: KVCacheSpec) -> int:
    assert config.model_config.max_model_len is not None
    per_seq = -(-config.model_config.max_model_len // spec.block_size)
    return per_seq * config.scheduler_config.max_num_seqs


def determine_num_blocks(config: EngineConfig, spec: KVCacheSpec, runner: ModelRunner) -> int:
    """Explicit ``num_gpu_blocks`` > ``kv_cache_memory_bytes`` > device-based default, then
    the minimum over the tensor-parallel ranks.

    On CUDA the default is ``gpu_memory_utilization`` of the card minus what the weights and a
    profiled forward pass of ``max_num_batched_tokens`` tokens take (that pass also calibrates
    an fp8 cache's scales). On CPU it is 2 GiB, capped at what ``max_num_seqs`` full-length
    sequences could ever use. ``runner`` is only used for the CUDA profile (its model,
    attention layers and backend) and for its layers' fp8 scales.
    """
    n = _local_num_blocks(config, spec, runner)
    if spec.is_fp8:
        _log_kv_scales(spec, runner.attn_layers)
    return min_over_tp_ranks(n, config.device_config.torch_device)


def min_over_tp_ranks(n: int, device: torch.device) -> int:
    """``n`` reduced to its minimum over the tensor-parallel group (itself at one rank).

    The collective runs on the group's backend: NCCL (a CUDA tensor) when the device is CUDA,
    gloo (a CPU tensor) otherwise.
    """
    group = get_tp_group()
    t = torch.tensor([n], dtype=torch.int64, device=device if device.type == "cuda" else "cpu")
    least = int(group.all_reduce(t, op="min").item())
    if least != n:
        logger.info("KV blocks: %d on this rank, %d on the smallest rank: using those", n, least)
    return least


def _local_num_blocks(config: EngineConfig, spec: KVCacheSpec, runner: ModelRunner) -> int:
    per_block = spec.bytes_per_block
    cache = config.cache_config
    if cache.num_gpu_blocks is not None:
        return cache.num_gpu_blocks
    if cache.kv_cache_memory_bytes is not None:
        n = cache.kv_cache_memory_bytes // per_block
        if n < 1:
            raise ValueError(
                f"kv_cache_memory_bytes={cache.kv_cache_memory_bytes} is less than one KV block "
                f"({per_block} bytes)."
            )
        return n
    if config.device_config.torch_device.type != "cuda":
        return max(1, min(_CPU_DEFAULT_BYTES // per_block, _blocks_for_all_seqs(config, spec)))
    return _profile_cuda(config, spec, runner)


def _needs_calibration(spec: KVCacheSpec, attn_layers: list[Attention]) -> bool:
    return spec.is_fp8 and any(a.kv_scale_source == "default" for a in attn_layers)


def run_profile_step(
    config: EngineConfig, spec: KVCacheSpec, runner: ModelRunner
) -> list[torch.Tensor]:
    """One dummy step of ``max_num_batched_tokens`` random tokens (sequences of at most
    ``max_model_len``) into a fresh cache of ``spec`` bound to the layers; returns that cache,
    still bound, holding every K and V the step wrote (zeros elsewhere)."""
    from pagedllm.core.scheduler_output import (
        NewSequenceData,
        ScheduledSequence,
        SchedulerOutput,
    )
    from pagedllm.sampling_params import SamplingParams

    max_tokens = config.scheduler_config.max_num_batched_tokens
    max_len = config.model_config.max_model_len
    assert max_tokens is not None and max_len is not None
    seq_len = min(max_tokens, max_len)
    n_seqs = max(1, max_tokens // seq_len)
    blocks_per_seq = -(-seq_len // spec.block_size)
    device = config.device_config.torch_device
    caches = bind_kv_caches(
        runner.attn_layers, runner.backend, spec, blocks_per_seq * n_seqs, device
    )
    # Random ids rather than one repeated token: the K/V it writes calibrate fp8 scales.
    gen = torch.Generator().manual_seed(0)
    vocab = config.model_config.arch.vocab_size
    ids = torch.randint(vocab, (n_seqs, seq_len), generator=gen).tolist()
    step = SchedulerOutput()
    params = SamplingParams(temperature=0.0)
    for i in range(n_seqs):
        sid = f"profile-{i}"
        table = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
        step.new_sequences.append(NewSequenceData(sid, ids[i], params, None))
        step.scheduled.append(ScheduledSequence(sid, 0, seq_len, table, True, [], [sid]))
    runner.execute(step)
    runner.execute(SchedulerOutput(finished_seq_ids=[s.seq_id for s in step.scheduled]))
    return caches


def calibrate_kv_scales(
    attn_layers: list[Attention], caches: list[torch.Tensor], kv_dtype: str
) -> None:
    """Per layer, (k_scale, v_scale) = amax of the K and V in ``caches`` (unquantized, of the
    model's dtype) over the largest value of fp8 ``kv_dtype``; layers whose scales came from
    the checkpoint keep them."""
    fp8 = FP8_TORCH_DTYPES[kv_dtype]
    for layer, cache in zip(attn_layers, caches, strict=True):
        if layer.kv_scale_source != "default":
            continue
        amax = cache.flatten(1).abs().amax(dim=1)  # [2]: K, V
        scale = scale_from_amax(amax, fp8).tolist()
        layer.set_kv_scale(scale[0], scale[1], "calibrated")


def _log_kv_scales(spec: KVCacheSpec, attn_layers: list[Attention]) -> None:
    sources = [a.kv_scale_source for a in attn_layers]
    scales = torch.stack([a.kv_scale.float().cpu() for a in attn_layers])  # [L, 2]
    logger.info(
        "fp8 KV cache (%s): scales of %d layers from the checkpoint, %d calibrated on the "
        "profiling pass; k_scale %.3g..%.3g, v_scale %.3g..%.3g",
        spec.dtype,
        sources.count("checkpoint"),
        sources.count("calibrated"),
        scales[:, 0].min().item(),
        scales[:, 0].max().item(),
        scales[:, 1].min().item(),
        scales[:, 1].max().item(),
    )
    if "default" in sources:
        logger.info(
            "fp8 KV cache: %d layers have no checkpoint scales and no profiling pass ran "
            "(num_gpu_blocks / kv_cache_memory_bytes set, or not on CUDA): their "
            "k_scale = v_scale = 1.0",
            sources.count("default"),
        )


def _profile_cuda(config: EngineConfig, spec: KVCacheSpec, runner: ModelRunner) -> int:
    calibrate = _needs_calibration(spec, runner.attn_layers)
    profile_spec = spec
    if calibrate:  # the profile cache keeps K/V unquantized, to measure them
        model_dtype = str(config.model_config.torch_dtype).removeprefix("torch.")
        profile_spec = dataclasses.replace(spec, dtype=model_dtype)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    caches = run_profile_step(config, profile_spec, runner)
    torch.cuda.synchronize()
    if calibrate:
        calibrate_kv_scales(runner.attn_layers, caches, spec.dtype)
    del caches
    unbind_kv_caches(runner.attn_layers)
    torch.cuda.empty_cache()
    # The peak includes the profile step's own cache (in the model's dtype when calibrating,
    # so both KV dtypes count the same bytes): a margin, as before fp8 existed.
    peak = torch.cuda.max_memory_allocated()
    free, total = torch.cuda.mem_get_info()
    non_torch = total - free - torch.cuda.memory_reserved()
    per_block = spec.bytes_per_block
    budget = total * config.cache_config.gpu_memory_utilization - peak - max(non_torch, 0)
    n = int(budget // per_block)
    logger.info(
        "GPU memory: total %.2f GiB, utilization %.2f, weights+activations peak %.2f GiB, "
        "other %.2f GiB -> %d KV blocks (%.2f GiB)",
        total / 2**30,
        config.cache_config.gpu_memory_utilization,
        peak / 2**30,
        non_torch / 2**30,
        n,
        n * per_block / 2**30,
    )
    if n < 1:
        raise ValueError(
            "No GPU memory left for the KV cache: raise gpu_memory_utilization or lower "
            "max_num_batched_tokens / max_model_len."
        )
    return n
