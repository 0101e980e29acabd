"""Runs one scheduled step on the device: builds flat inputs, runs the model, samples.

Owns the model, the KV cache tensors (one [2, num_blocks, block_size, Hkv, D] per layer) and
the sampler. Inputs are built from the scheduler's requests; logits are computed only for the
rows that are sampled or whose prompt logprobs were asked for. One host sync per step reads
back the sampled ids (and logprobs when asked).
"""

from __future__ import annotations

import logging
from itertools import chain

import numpy as np
import torch

from pagedllm.config import EngineConfig
from pagedllm.core.scheduler import SchedulerOutput
from pagedllm.device_utils import h2d
from pagedllm.layers.attention.backend import AttentionMetadata, get_backend_cls
from pagedllm.layers.attention.layer import Attention
from pagedllm.layers.fused import use_fused
from pagedllm.models.loader import load_model
from pagedllm.sample.metadata import SamplingMetadata, SamplingRow
from pagedllm.sample.sampler import Sampler, compute_logprobs
from pagedllm.worker.cuda_graph import DecodeGraphs
from pagedllm.worker.kv_cache_spec import bind_kv_caches, build_kv_cache_spec
from pagedllm.worker.kv_pool_size import determine_num_blocks
from pagedllm.worker.linear_tuning import tune_skinny_linears
from pagedllm.worker.step_output import (
    ModelRunnerOutput,
    StepHandle,
    TokenLogprobs,
    logprob_rows,
)

__all__ = ["ModelRunner", "ModelRunnerOutput", "StepHandle", "TokenLogprobs"]

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.torch_device
        self.model = load_model(config)
        mc = config.model_config
        self.vocab_size = mc.vocab_size
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.kv_spec = build_kv_cache_spec(config, self.attn_layers)
        self.block_size = self.kv_spec.block_size
        first = self.attn_layers[0]
        self.backend = get_backend_cls(config.attention_backend, self.device)(
            first.num_heads, first.num_kv_heads, first.head_dim, first.scale
        )
        for layer in self.attn_layers:
            layer.backend = self.backend
        self.sampler = Sampler()
        self.graphs: DecodeGraphs | None = None
        self._last_sampled: torch.Tensor | None = None  # the last step's sampled ids (device)
        self._last_rows: dict[str, int] = {}  # sequence id -> row in _last_sampled
        if use_fused(next(self.model.parameters())):  # CUDA, fused kernels enabled
            tune_skinny_linears(self.model)
        self.num_blocks = determine_num_blocks(config, self.kv_spec, self)
        # One extra physical block past the pool: scratch for CUDA-graph padding rows.
        self.kv_caches = bind_kv_caches(
            self.attn_layers, self.backend, self.kv_spec, self.num_blocks + 1, self.device
        )
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB, %s)",
            self.num_blocks,
            self.block_size,
            self.num_blocks * self.block_size,
            self.num_blocks * self.kv_spec.bytes_per_block / 2**20,
            self.kv_spec.dtype,
        )
        use_graphs = self.device.type == "cuda" and not config.enforce_eager
        if use_graphs and not self.backend.supports_cuda_graphs:
            logger.info("Attention backend %r runs without CUDA graphs.", self.backend.name)
        elif use_graphs:
            assert config.max_model_len is not None
            self.graphs = DecodeGraphs(
                self._forward,
                self.backend.build_metadata,
                max_batch=min(config.max_num_seqs, 512),
                max_blocks_per_seq=-(-config.max_model_len // self.block_size),
                max_seq_len=config.max_model_len,
                pad_block=self.num_blocks,
                block_size=self.block_size,
                device=self.device,
            )
            self.graphs.capture()

    def _forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and wait for its results."""
        return self.execute_async(sched).get()

    @torch.inference_mode()
    def execute_async(self, sched: SchedulerOutput) -> StepHandle:
        """Enqueue one step on the device; the returned handle's ``get()`` waits for it.

        With async scheduling a request's last input token may still be on the device (sampled
        by the previous step, not yet read back): it is taken from that step's sampled ids.
        """
        handle = StepHandle(self.device)
        if not sched.scheduled:
            return handle
        bs = self.block_size
        fix_flat: list[int] = []  # input rows whose token is the previous step's sample
        fix_src: list[int] = []
        ids_parts: list[list[int]] = []
        pos_parts: list[np.ndarray] = []
        slot_parts: list[np.ndarray] = []
        query_start = [0]
        seq_lens: list[int] = []
        block_tables: list[list[int]] = []
        logit_rows: list[int] = []  # hidden rows whose logits are needed
        sample_rows: list[SamplingRow] = []
        sample_src: list[int] = []  # index into logit_rows for each sample row
        sample_ids: list[str] = []
        prompt_lp: list[tuple[str, int, int]] = []  # sequence id, first position, count
        prompt_rows: list[int] = []  # index into logit_rows per prompt position
        prompt_targets: list[int] = []
        for s in sched.scheduled:
            req = s.request
            start, end = s.start, s.end
            row0 = query_start[-1]
            ids = req.all_token_ids[start:end]
            if len(ids) < end - start:  # the last token is still on the device
                ids = ids + [0]
                fix_flat.append(row0 + end - start - 1)
                fix_src.append(self._last_rows[req.request_id])
            ids_parts.append(ids)
            pos = np.arange(start, end, dtype=np.int64)
            table = np.asarray(s.block_ids, dtype=np.int64)
            pos_parts.append(pos)
            slot_parts.append(table[pos // bs] * bs + pos % bs)
            query_start.append(row0 + end - start)
            seq_lens.append(end)
            block_tables.append(s.block_ids)
            k = req.params.prompt_logprobs
            if k is not None and req.index == 0 and start < req.num_prompt_tokens - 1:
                stop = min(end, req.num_prompt_tokens - 1)
                prompt_lp.append((req.request_id, start, stop - start))
                prompt_rows.extend(range(len(logit_rows), len(logit_rows) + stop - start))
                logit_rows.extend(range(row0, row0 + stop - start))
                prompt_targets.extend(req.prompt_token_ids[start + 1 : stop + 1])
            if s.samples:
                logit_rows.append(query_start[-1] - 1)
                for seq in (req, *req.pending_forks):
                    sample_rows.append(
                        SamplingRow(
                            seq.params, seq.prompt_token_ids, seq.output_token_ids, seq.generator
                        )
                    )
                    sample_src.append(len(logit_rows) - 1)
                    sample_ids.append(seq.request_id)

        fixups = None
        if fix_flat:
            assert self._last_sampled is not None
            src = self._last_sampled[h2d(fix_src, torch.int64, self.device)]
            fixups = (h2d(fix_flat, torch.int64, self.device), src)
        hidden = self._run_model(
            ids_parts, pos_parts, slot_parts, query_start, seq_lens, block_tables, fixups
        )
        if not logit_rows:
            return handle.seal()
        dev = self.device
        if len(logit_rows) == hidden.shape[0] and logit_rows[-1] == len(logit_rows) - 1:
            logits = self.model.compute_logits(hidden)  # decode: every row samples
        else:
            logits = self.model.compute_logits(hidden[h2d(logit_rows, torch.int64, dev)])
        if sample_rows:
            self._sample(logits, sample_rows, sample_src, sample_ids, handle)
        if prompt_lp:
            self._prompt_logprobs(
                logits[h2d(prompt_rows, torch.int64, dev)],
                prompt_lp,
                prompt_targets,
                sched,
                handle,
            )
        return handle.seal()

    def _run_model(
        self,
        ids_parts: list[list[int]],
        pos_parts: list[np.ndarray],
        slot_parts: list[np.ndarray],
        query_start: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        fixups: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        input_ids = torch.from_numpy(np.fromiter(chain.from_iterable(ids_parts), np.int64))
        positions = torch.from_numpy(np.concatenate(pos_parts))
        slots = torch.from_numpy(np.concatenate(slot_parts))
        width = max(len(t) for t in block_tables)
        table = np.zeros((len(block_tables), width), dtype=np.int32)
        for i, t in enumerate(block_tables):
            table[i, : len(t)] = t
        tables = torch.from_numpy(table)
        lens = torch.tensor(seq_lens, dtype=torch.int32)
        num_seqs = len(seq_lens)
        decode = query_start[-1] == num_seqs
        if self.graphs is not None and decode and num_seqs <= self.graphs.max_batch:
            return self.graphs.run(input_ids, positions, slots, lens, tables, fixups)
        dev = self.device
        common = AttentionMetadata(
            slot_mapping=h2d(slots, torch.int64, dev),
            query_start_loc=h2d(query_start, torch.int32, dev),
            seq_lens=h2d(lens, torch.int32, dev),
            block_tables=h2d(tables, torch.int32, dev),
            max_query_len=max(b - a for a, b in zip(query_start, query_start[1:], strict=False)),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=query_start,
            seq_lens_cpu=seq_lens,
        )
        meta = self.backend.build_metadata(common)
        ids_dev = h2d(input_ids, torch.int64, dev)
        if fixups is not None:
            ids_dev[fixups[0]] = fixups[1]
        return self._forward(ids_dev, h2d(positions, torch.int64, dev), meta)

    def _sample(
        self,
        logits: torch.Tensor,
        rows: list[SamplingRow],
        src: list[int],
        ids: list[str],
        handle: StepHandle,
    ) -> None:
        if src == list(range(logits.shape[0])):
            row_logits = logits
        else:
            row_logits = logits[h2d(src, torch.int64, self.device)]
        meta = SamplingMetadata.build(rows, self.vocab_size, self.device)
        res = self.sampler(row_logits, meta)
        self._last_sampled = res.sampled_token_ids
        self._last_rows = {seq_id: i for i, seq_id in enumerate(ids)}
        tokens = handle.to_host(res.sampled_token_ids)
        lp = None
        if res.logprob_token_ids is not None:
            assert res.logprobs is not None and res.sampled_token_ranks is not None
            lp = tuple(
                handle.to_host(t)
                for t in (res.logprob_token_ids, res.logprobs, res.sampled_token_ranks)
            )
        ks = [r.params.logprobs if r.params.logprobs is not None else -1 for r in rows]

        def finish(out: ModelRunnerOutput) -> None:
            out.sampled.update(zip(ids, tokens.tolist(), strict=True))
            if lp is None:
                return
            entries = logprob_rows(*lp, ks)
            for seq_id, k, entry in zip(ids, ks, entries, strict=True):
                if k >= 0:
                    out.logprobs[seq_id] = entry

        handle.on_ready(finish)

    def _prompt_logprobs(
        self,
        logits: torch.Tensor,
        spans: list[tuple[str, int, int]],
        targets: list[int],
        sched: SchedulerOutput,
        handle: StepHandle,
    ) -> None:
        """``logits`` row j predicts ``targets[j]``, the prompt token after that position."""
        k_of = {s.request.request_id: s.request.params.prompt_logprobs for s in sched.scheduled}
        num_top = max(k or 0 for k in k_of.values())
        res = compute_logprobs(logits, h2d(targets, torch.int64, self.device), num_top)
        host = [handle.to_host(t) for t in res]
        ks = [k_of[sid] or 0 for sid, _, n in spans for _ in range(n)]

        def finish(out: ModelRunnerOutput) -> None:
            entries = logprob_rows(*host, ks)
            pos = 0
            for sid, start, n in spans:
                out.prompt_logprobs[sid] = (start, entries[pos : pos + n])
                pos += n

        handle.on_ready(finish)
