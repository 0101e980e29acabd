"""Engine settings: ``EngineConfig``, built from flat keywords, holding six groups.

* ``load.py`` ``LoadConfig``: where a model comes from (hub id or local path, revision,
  download directory, token); ``hub.py`` turns a hub id into a snapshot directory first.
* ``model.py`` ``ModelConfig``: model directory, tokenizer, dtype, max_model_len, load format,
  quantization;
  ``architecture.py`` ``ArchitectureConfig``: what the model's config.json says (``.arch``).
* ``cache.py`` ``CacheConfig``: the paged KV cache.
* ``scheduler.py`` ``SchedulerConfig``: per-step limits and scheduling policy.
* ``device.py`` ``DeviceConfig``: device, attention backend, CUDA graphs.
* ``parallel.py`` ``ParallelConfig``: tensor / data parallel sizes (1 for now).
* ``engine.py`` ``EngineConfig``: routes flat keywords to the groups, resolves what spans them.
* ``cli_args.py``: the ``pagedllm`` flags, generated from the groups' fields.

Importing this package does not import torch (the CLI's ``--help`` and ``core/`` import it).
"""

from pagedllm.config.architecture import ArchitectureConfig
from pagedllm.config.cache import CacheConfig
from pagedllm.config.device import DeviceConfig
from pagedllm.config.engine import EngineConfig
from pagedllm.config.load import LoadConfig
from pagedllm.config.model import DEMO_MODEL_DIR, ModelConfig
from pagedllm.config.parallel import ParallelConfig
from pagedllm.config.scheduler import SCHEDULING_POLICIES, SchedulerConfig

__all__ = [
    "DEMO_MODEL_DIR",
    "SCHEDULING_POLICIES",
    "ArchitectureConfig",
    "CacheConfig",
    "DeviceConfig",
    "EngineConfig",
    "LoadConfig",
    "ModelConfig",
    "ParallelConfig",
    "SchedulerConfig",
]
