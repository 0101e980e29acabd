"""Engine-side state of structured output: compiled grammars, one matcher per sequence, and
the allowed-token bitmask of each step.

The grammar backend reads the whole vocabulary when it is built, which takes a while, so the
manager builds it in a background thread when the engine starts; the first constrained request
waits for it only if it comes sooner. Compiled grammars are kept in an LRU cache keyed by the
constraint's canonical text, so a client that sends the same schema again compiles nothing.

Per step: constrained sequences run ahead under async scheduling like any other, but the
engine enqueues such a step in two halves (``LLMEngine.step``): the forward pass first, then,
once the previous step's tokens have reached the host and ``advance`` has fed them to the
matchers, ``fill_step`` writes each constrained row of the bitmask and the sampling is
enqueued with it. ``advance`` reports the sequences whose grammar is complete (they finish
with ``stop``) or broken.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from pagedllm.core.scheduler_output import SchedulerOutput
from pagedllm.structured_output.backend import (
    CompiledGrammar,
    GrammarBackend,
    GrammarMatcher,
    bitmask_width,
    get_backend,
)
from pagedllm.structured_output.params import StructuredOutputsParams

CACHE_SIZE = 256  # distinct compiled grammars kept
# Longest the engine waits for one constraint to compile (llguidance takes milliseconds for
# ordinary schemas and bounds its own work; this is the backstop for pathological input).
COMPILE_TIMEOUT_S = 5.0


class StructuredOutputManager:
    """Compiles constraints, keeps one matcher per constrained sequence (see the module doc)."""

    def __init__(
        self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int], backend: str = "llguidance"
    ) -> None:
        self.vocab_size = vocab_size
        self.width = bitmask_width(vocab_size)
        self._backend: GrammarBackend | None = None
        self._backend_error: BaseException | None = None
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        # Compilations run here so that the engine can stop waiting for one; an abandoned one
        # keeps its thread until it ends, the others stay free for the next requests.
        self._compiler = concurrent.futures.ThreadPoolExecutor(4, "grammar-compile")
        self._matchers: dict[str, GrammarMatcher] = {}
        self.compile_timeout_s = COMPILE_TIMEOUT_S

        def build() -> None:
            try:
                self._backend = get_backend(backend, tokenizer, vocab_size, eos_token_ids)
            except BaseException as e:  # reported to the first request that needs it
                self._backend_error = e

        self._builder = threading.Thread(target=build, name="grammar-backend", daemon=True)
        self._builder.start()

    @property
    def backend(self) -> GrammarBackend:
        self._builder.join()
        if self._backend is None:
            raise ValueError(f"structured outputs are unavailable: {self._backend_error}")
        return self._backend

    def compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        """The compiled constraint (cached); ValueError if it does not compile, or not within
        ``compile_timeout_s`` (the engine waits no longer; the compilation is abandoned)."""
        future = self.compile_async(params)
        concurrent.futures.wait((future,), timeout=self.compile_timeout_s)
        return self.compiled(params, future)

    def compile_async(
        self, params: StructuredOutputsParams
    ) -> concurrent.futures.Future[CompiledGrammar]:
        """Start compiling ``params`` on the compile threads; the future is done at once when
        the constraint is cached. Pass it to ``compiled`` once done or out of time."""
        grammar = self._cache.get(params.key())
        if grammar is not None:
            done: concurrent.futures.Future[CompiledGrammar] = concurrent.futures.Future()
            done.set_result(grammar)
            return done
        return self._compiler.submit(self.backend.compile, params)

    def compiled(
        self, params: StructuredOutputsParams, future: concurrent.futures.Future[CompiledGrammar]
    ) -> CompiledGrammar:
        """The result of ``compile_async``, now cached: ValueError if it failed, or if it is
        not done yet (out of time: the compilation is abandoned)."""
        if not future.done():
            raise ValueError(
                f"structured outputs ({params.kind}): compiling the constraint took longer "
                f"than {self.compile_timeout_s:g} s; simplify it."
            )
        try:
            grammar = future.result()  # the backend's ValueError, if it did not compile
        except ValueError:
            raise
        except Exception as e:  # a backend failure is still this request's, never the engine's
            raise ValueError(
                f"structured outputs ({params.kind}): compiling the constraint failed: {e!r}"
            ) from e
        key = params.key()
        self._cache[key] = grammar
        self._cache.move_to_end(key)
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return grammar

    # ---- sequences ---------------------------------------------------------------------
    def add_sequence(self, seq_id: str, params: StructuredOutputsParams) -> None:
        self._matchers[seq_id] = self.backend.matcher(self.compile(params))

    def remove_sequence(self, seq_id: str) -> None:
        self._matchers.pop(seq_id, None)

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._matchers

    def __len__(self) -> int:
        return len(self._matchers)

    def constrains(self, step: SchedulerOutput) -> bool:
        """The step samples a constrained sequence."""
        matchers = self._matchers
        return bool(matchers) and any(
            sid in matchers for s in step.scheduled for sid in s.sample_seq_ids
        )

    def fill_step(self, step: SchedulerOutput) -> None:
        """Attach the allowed-token bitmask of the step's constrained sample rows. A sequence
        that finished meanwhile (its sample will be dropped) is left unconstrained."""
        if not self._matchers:
            return
        ids = [
            sid
            for s in step.scheduled
            for sid in s.sample_seq_ids
            if sid in self._matchers and not self._matchers[sid].is_finished
        ]
        if not ids:
            return
        bitmask = np.zeros((len(ids), self.width), dtype=np.int32)
        self.backend.fill_bitmasks([self._matchers[sid] for sid in ids], bitmask)
        step.structured_seq_ids = ids
        step.grammar_bitmask = bitmask

    def advance(self, seq_id: str, tokens: list[int]) -> str | None:
        """Feed the tokens ``seq_id`` kept; "finished" if its grammar is now complete,
        "rejected" if the grammar refused a token, else None."""
        matcher = self._matchers.get(seq_id)
        if matcher is None or not tokens:
            return None
        if not matcher.accept(tokens):
            return "rejected"
        return "finished" if matcher.is_finished else None
