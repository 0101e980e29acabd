"""Check a resolved model before an engine starts: is its architecture one pagedllm implements?

``EngineConfig`` resolves a hub id to a directory and reads its ``config.json``; the model class
is only looked up when the engine loads the weights (under ``serve``: in the engine process,
whose failure reaches the user as "the engine process failed to start"). The commands call
``check_architecture`` first, so an unsupported model is one clear line naming the
architecture, the supported ones, and what ``--trust-remote-code`` can and cannot do here.
"""

from __future__ import annotations

from pagedllm.config import EngineConfig


def unsupported_architecture_message(config: EngineConfig) -> str | None:
    """None when the model's architecture is implemented, else the error message."""
    from pagedllm.models.registry import MODEL_REGISTRY

    mc = config.model_config
    arch = mc.arch.architecture
    if arch in MODEL_REGISTRY:
        return None
    msg = (
        f"The model {mc.model} is a {arch}, which pagedllm does not implement; supported "
        f"architectures: {', '.join(sorted(MODEL_REGISTRY))}."
    )
    if "auto_map" in mc.arch.raw or config.load_config.trust_remote_code:
        msg += (
            " --trust-remote-code does not change this: pagedllm runs its own model code and "
            "never the code a repository ships."
        )
    return msg


def check_architecture(config: EngineConfig) -> None:
    """ValueError (see ``unsupported_architecture_message``) for an unsupported model."""
    msg = unsupported_architecture_message(config)
    if msg is not None:
        raise ValueError(msg)
