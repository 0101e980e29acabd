"""``@function``: a Python function whose first argument is the program's state, and the ways
to run it: ``run`` (one program, optionally streamed) and ``run_batch`` (many, concurrently, so
the engine batches their calls).

Sampling options given to ``run``/``run_batch`` are the defaults of every ``gen`` of the
program; a ``gen``'s own options win.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pagedllm.lang.backend.base import Backend
from pagedllm.lang.ir import DEFAULT_GEN_PARAMS, GenParams
from pagedllm.lang.state import ProgramError, ProgramState

_default_backend: Backend | None = None


def set_default_backend(backend: Backend | None) -> None:
    """The backend ``run``/``run_batch`` use when none is passed."""
    global _default_backend
    _default_backend = backend


SAMPLING_OPTIONS = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "stop",
    "ignore_eos",
)


def _defaults(options: dict[str, Any]) -> GenParams:
    """The program's ``gen`` defaults from ``run``'s sampling options."""
    values = {("max_tokens" if k == "max_new_tokens" else k): v for k, v in options.items()}
    return GenParams(**values).merged(DEFAULT_GEN_PARAMS)


class LangFunction:
    """A program. Call ``run(**arguments)`` or ``run_batch([arguments, ...])``."""

    def __init__(self, func: Callable[..., Any], bound: dict[str, Any] | None = None) -> None:
        params = list(inspect.signature(func).parameters)
        if not params:
            raise TypeError(f"{func.__name__} must take the program state as first argument.")
        self.func = func
        self.arg_names = params[1:]
        self.bound = dict(bound or {})
        functools.update_wrapper(self, func)

    def bind(self, **kwargs: Any) -> LangFunction:
        """This program with some arguments fixed."""
        unknown = set(kwargs) - set(self.arg_names)
        if unknown:
            raise TypeError(f"{self.func.__name__} has no argument(s) {sorted(unknown)}.")
        return LangFunction(self.func, {**self.bound, **kwargs})

    def _split(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], GenParams]:
        """Program arguments and ``gen`` defaults; an argument of the program wins a name
        it shares with a sampling option (``stop``, ...)."""
        program: dict[str, Any] = {}
        options: dict[str, Any] = {}
        for name, value in kwargs.items():
            if name in self.arg_names:
                program[name] = value
            elif name in SAMPLING_OPTIONS:
                options[name] = value
            else:
                raise TypeError(
                    f"{self.func.__name__} has no argument {name!r} and it is no sampling "
                    f"option ({', '.join(SAMPLING_OPTIONS)})."
                )
        return program, _defaults(options)

    def _backend(self, backend: Backend | None) -> Backend:
        backend = backend or _default_backend
        if backend is None:
            raise ValueError("No backend: pass backend=... or call set_default_backend().")
        return backend

    def _call(self, state: ProgramState, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.func(state, *args, **{**self.bound, **kwargs})
        if state._role is not None:
            raise ProgramError(f"{self.func.__name__} ended inside an open {state._role[0]} block.")

    def run(
        self,
        *args: Any,
        backend: Backend | None = None,
        stream: bool = False,
        **kwargs: Any,
    ) -> ProgramState:
        """Run the program. Without ``stream`` it returns when the program has ended (and
        raises ``ProgramError`` if a call failed); with ``stream`` at once, the program running
        in the background: read it with ``text_iter()`` / ``text_async_iter()``."""
        kwargs, defaults = self._split(kwargs)
        state = ProgramState(self._backend(backend), defaults, stream=stream)
        if not stream:
            self._call(state, args, kwargs)
            return state

        def body() -> None:
            state._program_thread = threading.get_ident()
            error: BaseException | None = None
            try:
                self._call(state, args, kwargs)
            except BaseException as e:
                error = e
            state._finish_stream(error)

        threading.Thread(target=body, daemon=True, name="lang-stream").start()
        return state

    def run_batch(
        self,
        batch_kwargs: list[dict[str, Any]],
        *,
        backend: Backend | None = None,
        num_threads: int | str = "auto",
        progress_bar: bool = False,
        **sampling: Any,
    ) -> list[ProgramState]:
        """Run one program per argument dict, ``num_threads`` at a time ("auto": all of them,
        up to 256), and return their states in order. A failed program does not stop the
        others: its state raises its ``ProgramError`` when read (see ``state.error``)."""
        backend = self._backend(backend)
        if num_threads == "auto":
            threads = max(1, min(len(batch_kwargs), 256))
        elif isinstance(num_threads, int) and num_threads >= 1:
            threads = num_threads
        else:
            raise ValueError(f"num_threads must be 'auto' or an int >= 1, got {num_threads!r}.")
        unknown = sorted(set(sampling) - set(SAMPLING_OPTIONS))
        if unknown:
            raise TypeError(f"run_batch got unknown option(s) {unknown}.")
        defaults = _defaults(sampling)

        def one(kwargs: dict[str, Any]) -> ProgramState:
            state = ProgramState(backend, defaults)
            try:
                self._call(state, (), self._split(kwargs)[0])
            except ProgramError as e:
                state._error = e
            except Exception as e:
                state._error = ProgramError(f"{self.func.__name__} raised {e!r}")
                state._error.__cause__ = e
            return state

        from tqdm.auto import tqdm

        bar = tqdm(total=len(batch_kwargs), disable=not progress_bar, desc=self.func.__name__)
        states: list[ProgramState] = []
        with ThreadPoolExecutor(threads, thread_name_prefix="lang-batch") as pool:
            for state in pool.map(one, batch_kwargs):
                states.append(state)
                bar.update(1)
        bar.close()
        return states

    def __call__(self, *args: Any, **kwargs: Any) -> ProgramState:
        """Calling the program runs it (``run``)."""
        return self.run(*args, **kwargs)


def function(func: Callable[..., Any]) -> LangFunction:
    """Decorator: make ``func(s, ...)`` a program."""
    return LangFunction(func)
