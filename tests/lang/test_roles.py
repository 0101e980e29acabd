"""Role text split out of chat templates: concatenating the pieces reproduces what the
template itself renders, for templates shaped like the common families (a default system
prompt, a system block that is always there, no system role at all)."""

from __future__ import annotations

from typing import Any

import pytest

from pagedllm.lang.roles import RoleTemplate, derive_role_template

CHATML_DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ALWAYS_SYSTEM = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set sys = messages[0]['content'] %}{% set rest = messages[1:] %}"
    "{% else %}{% set sys = '' %}{% set rest = messages %}{% endif %}"
    "<|start|>system<|sep|>\n\nToday: 1 Jan.\n\n{{ sys }}<|eot|>"
    "{% for m in rest %}<|start|>{{ m['role'] }}<|sep|>\n\n{{ m['content'] }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant<|sep|>\n\n{% endif %}"
)
NO_SYSTEM = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def _roles(tok: Any, template: str) -> tuple[RoleTemplate, Any]:
    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return str(
            tok.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                chat_template=template,
            )
        )

    auto = tok.decode(tok.encode(""))
    return derive_role_template(render, auto), render


def _pieces(roles: RoleTemplate, conversation: list[dict[str, str]]) -> str:
    text = ""
    for i, m in enumerate(conversation):
        text += roles.begin(m["role"], i == 0) + m["content"] + roles.end(m["role"])
    return text + roles.begin("assistant", not conversation)


@pytest.mark.parametrize(
    ("template", "first"),
    [(CHATML_DEFAULT_SYSTEM, "system"), (CHATML_DEFAULT_SYSTEM, "user"),
     (ALWAYS_SYSTEM, "system"), (ALWAYS_SYSTEM, "user"), (NO_SYSTEM, "user")],
)  # fmt: skip
def test_pieces_rebuild_the_template(tiny_tokenizer: Any, template: str, first: str) -> None:
    roles, render = _roles(tiny_tokenizer, template)
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello?"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "More."},
    ]
    if first == "user":
        conversation = conversation[1:]
    want = render(conversation, True).removeprefix(tiny_tokenizer.bos_token)
    assert _pieces(roles, conversation) == want


def test_a_template_without_system_role(tiny_tokenizer: Any) -> None:
    roles, _ = _roles(tiny_tokenizer, NO_SYSTEM)
    with pytest.raises(ValueError, match="no 'system' role"):
        roles.begin("system", True)
    assert roles.end("assistant") == tiny_tokenizer.eos_token
