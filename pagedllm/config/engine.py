"""`EngineConfig`: every engine setting, as six groups built from flat keyword arguments.

Users (``LLM(**kwargs)``, ``AsyncLLM``, the CLI, tests) spell settings flat, like vLLM's
``EngineArgs``: ``EngineConfig(model=..., block_size=..., max_num_seqs=...)``. Each flat name is
a field of exactly one group (``ModelConfig``, ``LoadConfig``, ``CacheConfig``,
``SchedulerConfig``, ``DeviceConfig``, ``ParallelConfig``), so this class routes every keyword
to its group, lets each group check its own fields, and then resolves, once, what depends on
several groups:

* ``model`` / ``tokenizer`` given as Hugging Face hub ids: replaced by their snapshot
  directories (``config/hub.py``, downloading when needed) before ``ModelConfig`` is built,
  since it reads local directories only;
* ``model_config.torch_dtype``: ``dtype="auto"`` depends on the device;
* ``scheduler_config.async_scheduling`` unset: on for CUDA, off for CPU;
* ``scheduler_config.max_num_batched_tokens`` unset: derived from ``max_model_len`` (see
  ``default_max_num_batched_tokens``), and without chunked prefill it must hold a whole
  ``max_model_len`` prompt.

Code below the engine reads the group it needs (``config.cache_config.block_size``); the
scheduler gets only its groups, never the whole config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagedllm.config.cache import CacheConfig
from pagedllm.config.device import DeviceConfig
from pagedllm.config.hub import resolve_source
from pagedllm.config.load import LoadConfig
from pagedllm.config.model import ModelConfig, resolve_torch_dtype
from pagedllm.config.parallel import ParallelConfig
from pagedllm.config.scheduler import SchedulerConfig, default_max_num_batched_tokens
from pagedllm.config.utils import config_error, user_fields

# Attribute of EngineConfig -> its group's class, in the order the groups are built and shown.
CONFIG_GROUPS: dict[str, type] = {
    "model_config": ModelConfig,
    "load_config": LoadConfig,
    "cache_config": CacheConfig,
    "scheduler_config": SchedulerConfig,
    "device_config": DeviceConfig,
    "parallel_config": ParallelConfig,
}


def _field_owners() -> dict[str, str]:
    owners: dict[str, str] = {}
    for attr, cls in CONFIG_GROUPS.items():
        for f in user_fields(cls):
            if f.name in owners:
                raise TypeError(
                    f"Config field {f.name!r} is in two groups: {owners[f.name]}, {attr}."
                )
            owners[f.name] = attr
    return owners


# Flat keyword -> the EngineConfig attribute of the group that owns it.
FIELD_OWNERS: dict[str, str] = _field_owners()


@dataclass(init=False)
class EngineConfig:
    """All engine settings, grouped; built from flat keywords (see the module doc).

    ``EngineConfig(model="dir", max_num_seqs=64)``: every keyword is a field of one group; an
    unknown keyword raises TypeError, an invalid value ValueError. ``to_kwargs()`` gives the
    flat keywords back (with the values resolved so far).
    """

    model_config: ModelConfig
    load_config: LoadConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    device_config: DeviceConfig
    parallel_config: ParallelConfig

    def __init__(self, **kwargs: Any) -> None:
        unknown = [name for name in kwargs if name not in FIELD_OWNERS]
        if unknown:
            raise TypeError(
                f"EngineConfig got unexpected keyword argument(s) {', '.join(map(repr, unknown))}"
                f"; valid: {', '.join(sorted(FIELD_OWNERS))}."
            )
        by_group: dict[str, dict[str, Any]] = {attr: {} for attr in CONFIG_GROUPS}
        for name, value in kwargs.items():
            by_group[FIELD_OWNERS[name]][name] = value
        self.load_config = LoadConfig(**by_group["load_config"])
        self._resolve_sources(by_group["model_config"])
        for attr, cls in CONFIG_GROUPS.items():  # each group checks its own fields
            if attr != "load_config":
                setattr(self, attr, cls(**by_group[attr]))
        self._resolve_across_groups()

    def _resolve_sources(self, model_kwargs: dict[str, Any]) -> None:
        """Replace hub ids among ``model`` / ``tokenizer`` by their local snapshot directories
        (``config/hub.py``), before ``ModelConfig``, which reads directories only."""
        load = self.load_config
        model = model_kwargs.get("model")
        if model is not None:
            model_kwargs["model"] = resolve_source(model, load, revision=load.revision)
        elif load.revision is not None:
            raise config_error("revision needs a hub model id (the demo model has no revisions).")
        tokenizer = model_kwargs.get("tokenizer")
        if tokenizer is not None:
            model_kwargs["tokenizer"] = resolve_source(
                tokenizer,
                load,
                revision=load.tokenizer_revision,
                what="tokenizer",
                revision_flag="tokenizer_revision",
            )
        elif load.tokenizer_revision is not None:
            if model is None:
                raise config_error("tokenizer_revision needs a hub model or tokenizer id.")
            model_kwargs["tokenizer"] = resolve_source(
                model,
                load,
                revision=load.tokenizer_revision,
                what="tokenizer",
                revision_flag="tokenizer_revision",
            )

    def _resolve_across_groups(self) -> None:
        model, sched = self.model_config, self.scheduler_config
        device_type = self.device_config.torch_device.type
        model.torch_dtype = resolve_torch_dtype(model.dtype, model.arch.hf_dtype, device_type)
        if sched.async_scheduling is None:
            sched.async_scheduling = device_type == "cuda"
        max_model_len = model.max_model_len
        assert max_model_len is not None  # resolved by ModelConfig
        if sched.max_num_batched_tokens is None:
            sched.max_num_batched_tokens = default_max_num_batched_tokens(
                sched.max_num_seqs, max_model_len, sched.enable_chunked_prefill, device_type
            )
        self._check_tensor_parallel()
        if not sched.enable_chunked_prefill and sched.max_num_batched_tokens < max_model_len:
            raise config_error(
                f"max_num_batched_tokens ({sched.max_num_batched_tokens}) must be >= "
                f"max_model_len ({max_model_len}) when chunked prefill is disabled."
            )

    def _check_tensor_parallel(self) -> None:
        """The model must split evenly over the ranks (KV heads may be fewer: replicated)."""
        tp = self.parallel_config.tensor_parallel_size
        arch = self.model_config.arch
        for name in ("num_attention_heads", "intermediate_size"):
            value = getattr(arch, name)
            if value % tp:
                raise config_error(
                    f"tensor_parallel_size={tp} does not divide the model's {name} ({value})."
                )
        kv = arch.num_key_value_heads
        if kv % tp and tp % kv:
            raise config_error(
                f"tensor_parallel_size={tp} and the model's num_key_value_heads ({kv}) must "
                "divide one another (KV heads are split, or replicated when fewer than ranks)."
            )
        if tp > 1 and self.device_config.torch_device.type == "cuda":
            import torch

            visible = torch.cuda.device_count()
            if visible < tp:
                raise config_error(
                    f"tensor_parallel_size={tp} needs {tp} GPUs; {visible} are visible."
                )

    def to_kwargs(self) -> dict[str, Any]:
        """The flat keywords that rebuild this config (resolved values where resolved: the
        model path, max_model_len, ...; ``device`` stays as given, e.g. "auto")."""
        kwargs = {name: getattr(getattr(self, attr), name) for name, attr in FIELD_OWNERS.items()}
        # model / tokenizer are local directories now: the revisions that picked them are spent.
        kwargs["revision"] = kwargs["tokenizer_revision"] = None
        return kwargs
