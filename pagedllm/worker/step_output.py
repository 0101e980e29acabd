"""A step's results: what the engine reads back, and the handle that defers the read.

``StepHandle`` starts the device-to-host copies right after the step's sampling is enqueued
(into pinned memory, behind a CUDA event), so the engine can launch the next step first and
only then wait for these results: the one host sync per step no longer stalls the GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pagedllm.core.scheduler_output import ModelRunnerOutput, TokenLogprobs


def logprob_rows(
    ids: torch.Tensor, lps: torch.Tensor, ranks: torch.Tensor, ks: list[int]
) -> list[TokenLogprobs]:
    ids_l, lps_l, ranks_l = ids.tolist(), lps.tolist(), ranks.tolist()
    return [
        TokenLogprobs(ids_l[i][: 1 + k], lps_l[i][: 1 + k], ranks_l[i]) for i, k in enumerate(ks)
    ]


def accept_drafts(drafts: list[int], samples: list[int]) -> list[int]:
    """The tokens a speculative span yields: ``samples[i]`` was sampled after the sequence's
    tokens and ``drafts[:i]``, so it stands while every earlier draft matched its sample; the
    drafts that match, then the first sample that differs (or the one past the last draft).
    This is sampling token by token, just several positions per step: lossless for any
    temperature."""
    n = 0
    while n < len(drafts) and samples[n] == drafts[n]:
        n += 1
    return samples[: n + 1]


class StepHandle:
    """Device results of one step; ``get()`` waits for them and builds the output."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._finalizers: list[Callable[[ModelRunnerOutput], None]] = []
        self._event: torch.cuda.Event | None = None

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """Start copying ``t`` to the host; valid once ``get()`` has waited."""
        if self.device.type != "cuda":
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    def on_ready(self, fn: Callable[[ModelRunnerOutput], None]) -> None:
        self._finalizers.append(fn)

    def seal(self) -> StepHandle:
        """Mark the end of this step's copies on the stream."""
        if self.device.type == "cuda" and self._finalizers:
            self._event = torch.cuda.Event()
            self._event.record()
        return self

    def get(self) -> ModelRunnerOutput:
        if self._event is not None:
            self._event.synchronize()
        out = ModelRunnerOutput()
        for fn in self._finalizers:
            fn(out)
        return out
