"""`DeviceConfig`: where the model runs and how its kernels are picked.

``device="auto"`` is resolved to a ``torch.device`` when the config is built, in the process
that builds it: the engine process rebuilds its config (``EngineConfig.to_kwargs``) so that it
resolves "auto" against the GPUs it sees itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedllm.config.utils import check_choice, config_error

if TYPE_CHECKING:
    import torch


@dataclass
class DeviceConfig:
    """Device: the accelerator, the attention backend and CUDA graphs."""

    device: str = field(
        default="auto",
        metadata={
            "help": "auto: cuda when a GPU is available, else cpu",
            "choices": ("auto", "cpu", "cuda"),
        },
    )
    attention_backend: str = field(
        default="auto",
        metadata={
            "help": "attention implementation: triton (GPU), torch_native (the reference; "
            "CPU) or auto (the device's best)"
        },
    )
    enforce_eager: bool = field(
        default=False, metadata={"help": "never capture CUDA graphs (run every step eagerly)"}
    )
    # Derived:
    torch_device: torch.device = field(init=False)

    def __post_init__(self) -> None:
        import torch

        check_choice(self, "device")
        if self.device == "auto":
            self.torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            return
        if self.device == "cuda" and not torch.cuda.is_available():
            raise config_error("device='cuda' but no CUDA GPU is available.")
        self.torch_device = torch.device(self.device)
