"""How many KV blocks to allocate: an explicit count, a byte budget, or a profiled GPU share.

Block sizes in bytes come from the ``KVCacheSpec`` (this rank's heads, the KV dtype), the same
numbers the backend allocates with, so the byte budget and the allocation always agree.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from pagedllm.config import EngineConfig
from pagedllm.core.kv_cache_spec import KVCacheSpec
from pagedllm.worker.kv_cache_spec import bind_kv_caches, unbind_kv_caches

if TYPE_CHECKING:
    from pagedllm.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

_CPU_DEFAULT_BYTES = 2 * 2**30


def _blocks_for_all_seqs(config: EngineConfig, spec: KVCacheSpec) -> int:
    assert config.model_config.max_model_len is not None
    per_seq = -(-config.model_config.max_model_len // spec.block_size)
    return per_seq * config.scheduler_config.max_num_seqs


def determine_num_blocks(config: EngineConfig, spec: KVCacheSpec, runner: ModelRunner) -> int:
    """Explicit ``num_gpu_blocks`` > ``kv_cache_memory_bytes`` > device-based default.

    On CUDA the default is ``gpu_memory_utilization`` of the card minus what the weights and a
    profiled forward pass of ``max_num_batched_tokens`` tokens take. On CPU it is 2 GiB, capped
    at what ``max_num_seqs`` full-length sequences could ever use. ``runner`` is only used
    for the CUDA profile (its model, attention layers and backend).
    """
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


def _profile_cuda(config: EngineConfig, spec: KVCacheSpec, runner: ModelRunner) -> int:
    from pagedllm.core.scheduler_output import (
        NewSequenceData,
        ScheduledSequence,
        SchedulerOutput,
    )
    from pagedllm.sampling_params import SamplingParams

    max_tokens = config.scheduler_config.max_num_batched_tokens
    max_len = config.model_config.max_model_len
    assert max_tokens is not None and max_len is not None
    device = config.device_config.torch_device
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    # A dummy step of max_num_batched_tokens tokens in sequences of at most max_model_len.
    seq_len = min(max_tokens, max_len)
    n_seqs = max(1, max_tokens // seq_len)
    blocks_per_seq = -(-seq_len // spec.block_size)
    bind_kv_caches(runner.attn_layers, runner.backend, spec, blocks_per_seq * n_seqs, device)
    step = SchedulerOutput()
    params = SamplingParams(temperature=0.0)
    for i in range(n_seqs):
        sid = f"profile-{i}"
        table = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
        step.new_sequences.append(NewSequenceData(sid, [0] * seq_len, params, None))
        step.scheduled.append(ScheduledSequence(sid, 0, seq_len, table, True, [], [sid]))
    runner.execute(step)
    runner.execute(SchedulerOutput(finished_seq_ids=[s.seq_id for s in step.scheduled]))
    torch.cuda.synchronize()
    unbind_kv_caches(runner.attn_layers)
    torch.cuda.empty_cache()
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
