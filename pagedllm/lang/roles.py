"""Role blocks as text: the model's own chat template, split into per-role prefixes/suffixes.

A program's state is text, so ``user("hi")`` must become the exact text the model's chat
template would render for that message. ``derive_role_template`` finds it by rendering small
conversations around a marker and cutting at the marker: the text before it is the role's
prefix, the text after its suffix. The first message gets its own prefix (templates that add
a default system prompt put it there), the assistant's prefix is the template's generation
prompt (what the model is trained to answer after), and text the tokenizer adds by itself
(BOS) is dropped, since the prompt is tokenized with it anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pagedllm.lang.ir import ROLES

Render = Callable[[list[dict[str, str]], bool], str]  # (messages, add_generation_prompt)
_MARK = "PAGEDLLMLANGMARK"


@dataclass(frozen=True)
class RoleTemplate:
    """Text around a message of each role; ``first_prefix`` when it opens the conversation."""

    prefix: dict[str, str]
    suffix: dict[str, str]
    first_prefix: dict[str, str]

    def begin(self, role: str, first: bool) -> str:
        table = self.first_prefix if first else self.prefix
        if role not in table:
            raise ValueError(f"The chat template has no {role!r} role.")
        return table[role]

    def end(self, role: str) -> str:
        return self.suffix[role]


def _split(text: str, what: str) -> tuple[str, str]:
    if text.count(_MARK) != 1:
        raise ValueError(f"The chat template does not render {what} as one piece of text.")
    before, after = text.split(_MARK)
    return before, after


def derive_role_template(render: Render, auto_prefix: str) -> RoleTemplate:
    """Split the template that ``render`` applies; ``auto_prefix`` is what tokenizing adds."""

    def strip_auto(text: str) -> str:
        return text[len(auto_prefix) :] if auto_prefix and text.startswith(auto_prefix) else text

    prefix: dict[str, str] = {}
    suffix: dict[str, str] = {}
    first: dict[str, str] = {}
    for role in ROLES:
        try:
            rendered = render([{"role": role, "content": _MARK}], False)
        except Exception:  # e.g. a template that refuses a system message
            continue
        before, suffix[role] = _split(rendered, f"a {role} message")
        first[role] = strip_auto(before)
        prefix[role] = first[role]
    # A message after others: the text it adds to the rendering of those before it.
    history = {
        "user": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        "assistant": [{"role": "user", "content": "a"}],
    }
    for role, before_msgs in history.items():
        try:
            head = render(before_msgs, False)
            whole = render([*before_msgs, {"role": role, "content": _MARK}], False)
        except Exception:
            continue
        if whole.startswith(head):
            prefix[role] = _split(whole[len(head) :], f"a {role} message")[0]
    try:
        convo = [{"role": "user", "content": "a"}]
        head = render(convo, False)
        with_prompt = render(convo, True)
        if with_prompt.startswith(head) and len(with_prompt) > len(head):
            prefix["assistant"] = with_prompt[len(head) :]
    except Exception:
        pass
    if "user" not in prefix or "assistant" not in prefix:
        raise ValueError("The chat template cannot render user and assistant messages.")
    return RoleTemplate(prefix, suffix, first)


def plain_role_template() -> RoleTemplate:
    """For models without a chat template: ``ROLE: text`` lines."""
    prefix = {r: f"{r.upper()}: " for r in ROLES}
    return RoleTemplate(prefix, {r: "\n" for r in ROLES}, dict(prefix))
