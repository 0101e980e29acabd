"""``pagedllm.lang``: LLM programs as Python functions, in the style of SGLang's frontend.

A program appends text, role blocks, generations and choices to a state; the runtime keeps the
multi-turn text, reuses its KV cache, runs forked branches in parallel and streams::

    from pagedllm import lang

    @lang.function
    def two_turns(s, q1, q2):
        s += lang.system("You are a helpful assistant.")
        s += lang.user(q1)
        s += lang.assistant(lang.gen("a1", max_tokens=64))
        s += lang.user(q2)
        s += lang.assistant(lang.gen("a2", max_tokens=64))

    state = two_turns.run(q1="...", q2="...", backend=lang.LocalBackend("path/to/model"))
    print(state["a1"], state.messages())

See ``docs/lang.md``.
"""

from pagedllm.lang.backend import Backend, Endpoint, LocalBackend, OpenAIBackend
from pagedllm.lang.function import LangFunction, function, set_default_backend
from pagedllm.lang.ir import (
    assistant,
    assistant_begin,
    assistant_end,
    gen,
    select,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
)
from pagedllm.lang.roles import RoleTemplate
from pagedllm.lang.state import ForkGroup, ProgramError, ProgramState

__all__ = [
    "Backend",
    "Endpoint",
    "ForkGroup",
    "LangFunction",
    "LocalBackend",
    "OpenAIBackend",
    "ProgramError",
    "ProgramState",
    "RoleTemplate",
    "assistant",
    "assistant_begin",
    "assistant_end",
    "function",
    "gen",
    "select",
    "set_default_backend",
    "system",
    "system_begin",
    "system_end",
    "user",
    "user_begin",
    "user_end",
]
