"""Runs one scheduled step on the device: builds flat inputs, runs the model, samples.

Owns the model, the KV cache tensors (allocated by the attention backend from the
``KVCacheSpec``), the sampler and the worker's copy of every live sequence
(``sequence_states.py``), which each step's plain-data diffs (``core/scheduler_output.py``)
keep current. Logits are computed only for the rows that are sampled or whose prompt logprobs
were asked for. One host sync per step reads back the sampled ids (and logprobs when asked).

A multimodal model (``model.multimodal``) also gets M-RoPE ids for its rotary and, in a step
whose spans reach image placeholder tokens, those rows' embeddings: images not yet in the
encoder cache (``multimodal/encoder_cache.py``) are encoded first, all in one vision-tower call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.config import EngineConfig
from pagedllm.core.scheduler_output import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from pagedllm.device_utils import h2d, h2d_packed
from pagedllm.distributed import get_tp_rank, get_tp_size
from pagedllm.layers.attention.backend import AttentionMetadata, get_backend_cls
from pagedllm.layers.attention.layer import Attention
from pagedllm.layers.fused import use_fused
from pagedllm.models.loader import load_model
from pagedllm.sample.metadata import SamplingMetadataCache, SamplingRow
from pagedllm.sample.sampler import Sampler, compute_logprobs
from pagedllm.worker.cuda_graph import DecodeGraphs
from pagedllm.worker.kv_cache_spec import bind_kv_caches, build_kv_cache_spec
from pagedllm.worker.kv_pool_size import determine_num_blocks
from pagedllm.worker.linear_tuning import tune_skinny_linears
from pagedllm.worker.sequence_states import SequenceStates
from pagedllm.worker.step_inputs import StepInputs, prepare_step_inputs
from pagedllm.worker.step_output import StepHandle, accept_drafts, logprob_rows

__all__ = ["ModelRunner", "ModelRunnerOutput", "StepHandle", "TokenLogprobs"]

logger = logging.getLogger(__name__)


def grammar_rows(
    sample_ids: list[str], structured_ids: list[str], bitmask: np.ndarray
) -> torch.Tensor:
    """The packed allowed-token mask of a step's sample rows: a constrained sequence's row of
    the step's grammar bitmask, every token for the others."""
    row_of = {sid: i for i, sid in enumerate(structured_ids)}
    mask = np.full((len(sample_ids), bitmask.shape[1]), -1, dtype=np.int32)
    for i, sid in enumerate(sample_ids):
        j = row_of.get(sid)
        if j is not None:
            mask[i] = bitmask[j]
    return torch.from_numpy(mask)


@dataclass
class ForwardOutput:
    """A step between its forward pass and its sampling: its inputs (None: nothing was
    scheduled) and the logits of its sampled and prompt-logprob rows (None: no such row)."""

    inputs: StepInputs | None
    logits: torch.Tensor | None


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.device_config.torch_device
        self.model = load_model(config)
        mc = config.model_config.arch
        self.vocab_size = mc.vocab_size
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.kv_spec = build_kv_cache_spec(config, self.attn_layers, get_tp_rank(), get_tp_size())
        self.block_size = self.kv_spec.block_size
        first = self.attn_layers[0]
        self.backend = get_backend_cls(config.device_config.attention_backend, self.device)(
            first.num_heads, first.num_kv_heads, first.head_dim, first.scale
        )
        for layer in self.attn_layers:
            layer.backend = self.backend
        self.sampler = Sampler()
        self.sampling_cache = SamplingMetadataCache(self.vocab_size, self.device)
        self.graphs: DecodeGraphs | None = None
        self._last_sampled: torch.Tensor | None = None  # the last step's sampled ids (device)
        self._last_rows: dict[str, int] = {}  # sequence id -> row in _last_sampled
        self.multimodal = bool(getattr(self.model, "multimodal", False))
        merge = getattr(self.model, "spatial_merge_size", None) if self.multimodal else None
        self.states = SequenceStates(self.device, merge)  # every live sequence, from the steps
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
        use_graphs = self.device.type == "cuda" and not config.device_config.enforce_eager
        if use_graphs and not self.backend.supports_cuda_graphs:
            logger.info("Attention backend %r runs without CUDA graphs.", self.backend.name)
        elif use_graphs:
            assert config.model_config.max_model_len is not None
            self.graphs = DecodeGraphs(
                self._forward,
                self.backend.build_metadata,
                max_batch=min(config.scheduler_config.max_num_seqs, 512),
                max_blocks_per_seq=-(-config.model_config.max_model_len // self.block_size),
                max_seq_len=config.model_config.max_model_len,
                pad_block=self.num_blocks,
                block_size=self.block_size,
                device=self.device,
            )
            self.graphs.capture()

    def _forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        mm: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if mm is None:
            return self.model(input_ids, positions, meta)
        return self.model(input_ids, positions, meta, *mm)

    def _image_rows(self, inp: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(input rows, their image embeddings) of the step; encodes the images that the
        encoder cache does not hold yet, in one call."""
        cache = self.states.encoder_cache
        todo = {}
        for f, *_ in inp.mm_spans:
            if cache.get(f.content_hash) is None:
                todo.setdefault(f.content_hash, f)
        if todo:
            feats = list(todo.values())
            pixels = torch.from_numpy(np.concatenate([f.pixel_values for f in feats]))
            out = self.model.encode_images(
                pixels.to(self.device), [tuple(f.grid_thw) for f in feats]
            )
            for f, emb in zip(feats, out, strict=True):
                cache.put(f.content_hash, emb)
        parts, rows = [], []
        for f, lo, hi, row in inp.mm_spans:
            emb = cache.get(f.content_hash)
            if emb is None:  # encoded above but held by nobody: cannot happen for a live span
                raise RuntimeError("image embeddings missing from the encoder cache")
            parts.append(emb[lo:hi])
            rows.extend(range(row, row + hi - lo))
        return h2d(rows, torch.int64, self.device), torch.cat(parts)

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and wait for its results."""
        return self.execute_async(sched).get()

    def execute_async(self, step: SchedulerOutput) -> StepHandle:
        """Apply the step's diffs, enqueue its forward pass and its sampling (with the step's
        own grammar bitmask); the returned handle's ``get()`` waits for the results."""
        return self.sample_tokens(
            self.execute_model(step), step.structured_seq_ids, step.grammar_bitmask
        )

    @torch.inference_mode()
    def execute_model(self, step: SchedulerOutput) -> ForwardOutput:
        """Apply the step's diffs to the sequence states and enqueue the forward pass up to
        the logits (prepare -> run, eager or a CUDA graph). Sampling is a separate call so that
        a grammar's mask for this step can be computed on the host while this runs."""
        self.states.apply(step)
        if not step.scheduled:
            return ForwardOutput(None, None)
        inp = prepare_step_inputs(step, self.states, self.block_size, self._last_rows)
        fixups = None
        if inp.fix_rows:
            assert self._last_sampled is not None
            src = self._last_sampled[h2d(inp.fix_src, torch.int64, self.device)]
            fixups = (h2d(inp.fix_rows, torch.int64, self.device), src)
        hidden = self._run_model(inp, fixups)
        rows = inp.logit_rows
        if not rows:
            return ForwardOutput(inp, None)
        if len(rows) == hidden.shape[0] and rows[-1] == len(rows) - 1:
            logits = self.model.compute_logits(hidden)  # decode: every row samples
        else:
            logits = self.model.compute_logits(hidden[h2d(rows, torch.int64, self.device)])
        return ForwardOutput(inp, logits)

    @torch.inference_mode()
    def sample_tokens(
        self,
        fwd: ForwardOutput,
        structured_seq_ids: list[str] | None = None,
        grammar_bitmask: np.ndarray | None = None,
    ) -> StepHandle:
        """Enqueue the sampling (and prompt logprobs) of a step whose forward pass
        ``execute_model`` enqueued; ``grammar_bitmask`` rows constrain ``structured_seq_ids``.
        The handle's ``get()`` waits for the results."""
        handle = StepHandle(self.device)
        inp, logits = fwd.inputs, fwd.logits
        if inp is None:
            return handle
        if logits is None:
            return handle.seal()
        if inp.sample_rows:
            mask = None
            if grammar_bitmask is not None:
                mask = grammar_rows(inp.sample_ids, structured_seq_ids or [], grammar_bitmask)
            self._sample(
                logits, inp.sample_rows, inp.sample_src, inp.sample_ids, inp.drafts, handle, mask
            )
        if inp.prompt_spans:
            self._prompt_logprobs(
                logits[h2d(inp.prompt_rows, torch.int64, self.device)],
                inp.prompt_spans,
                inp.prompt_targets,
                handle,
            )
        return handle.seal()

    def _run_model(
        self, inp: StepInputs, fixups: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        num_seqs = inp.seq_lens.shape[0]
        rope = inp.positions if inp.rope_positions is None else inp.rope_positions
        if (
            self.graphs is not None
            and inp.is_decode
            and num_seqs <= self.graphs.max_batch
            and rope.ndim == 1
            and not inp.mm_spans
        ):
            return self.graphs.run(
                inp.input_ids, rope, inp.slot_mapping, inp.seq_lens, inp.block_tables, fixups
            )
        dev = self.device
        ids, positions, slots = h2d_packed(
            [inp.input_ids, rope, inp.slot_mapping], torch.int64, dev
        )
        query_start, seq_lens, tables = h2d_packed(
            [inp.query_start, inp.seq_lens, inp.block_tables], torch.int32, dev
        )
        query_start_cpu = inp.query_start.tolist()
        seq_lens_cpu = inp.seq_lens.tolist()
        common = AttentionMetadata(
            slot_mapping=slots,
            query_start_loc=query_start,
            seq_lens=seq_lens,
            block_tables=tables,
            max_query_len=int(np.diff(inp.query_start).max()),
            max_seq_len=max(seq_lens_cpu),
            query_start_loc_cpu=query_start_cpu,
            seq_lens_cpu=seq_lens_cpu,
        )
        meta = self.backend.build_metadata(common)
        if fixups is not None:
            ids[fixups[0]] = fixups[1]
        mm = self._image_rows(inp) if inp.mm_spans else None
        return self._forward(ids, positions, meta, mm)

    def _sample(
        self,
        logits: torch.Tensor,
        rows: list[SamplingRow],
        src: list[int],
        ids: list[str],
        drafts: dict[str, list[int]],
        handle: StepHandle,
        allowed_mask: torch.Tensor | None = None,
    ) -> None:
        if src == list(range(logits.shape[0])):
            row_logits = logits
        else:
            row_logits = logits[h2d(src, torch.int64, self.device)]
        meta = self.sampling_cache.get(rows, ids, allowed_mask)
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
            for seq_id, token in zip(ids, tokens.tolist(), strict=True):
                out.sampled.setdefault(seq_id, []).append(token)
            for seq_id, proposed in drafts.items():
                out.sampled[seq_id] = accept_drafts(proposed, out.sampled[seq_id])
            if lp is None:
                return
            entries = logprob_rows(*lp, ks)
            for seq_id, k, entry in zip(ids, ks, entries, strict=True):
                if k >= 0:
                    out.logprobs[seq_id] = [entry]

        handle.on_ready(finish)

    def _prompt_logprobs(
        self,
        logits: torch.Tensor,
        spans: list[tuple[str, int, int, int]],
        targets: list[int],
        handle: StepHandle,
    ) -> None:
        """``logits`` row j predicts ``targets[j]``, the prompt token after that position;
        ``spans`` are (sequence id, first position, count, k)."""
        num_top = max(k for *_, k in spans)
        res = compute_logprobs(logits, h2d(targets, torch.int64, self.device), num_top)
        host = [handle.to_host(t) for t in res]
        ks = [k for _, _, n, k in spans for _ in range(n)]

        def finish(out: ModelRunnerOutput) -> None:
            entries = logprob_rows(*host, ks)
            pos = 0
            for sid, start, n, _ in spans:
                out.prompt_logprobs[sid] = (start, entries[pos : pos + n])
                pos += n

        handle.on_ready(finish)
