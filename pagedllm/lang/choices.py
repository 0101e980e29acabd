"""``select``: score every choice after the program's text in one batched call, then decide.

The choice's tokens are those of ``text + choice`` after the longest token prefix it shares
with ``text`` alone, so a choice that merges with the text's last token (``"Answer:"`` +
``" yes"`` vs ``"Answer: yes"``) is scored on the tokens the model would really see; each
token's logprob is conditioned on everything before it.

Methods: ``token_length_normalized`` (mean logprob of the choice's tokens), ``greedy`` (highest
logprob at the first token, ties broken at the next ones; a shorter choice continues with its
mean) and ``unconditional_normalized`` (mean of each token's logprob minus its logprob after
only what tokenizing an empty text gives, e.g. BOS: how much the context raises the choice).
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedllm.lang.backend.base import Backend, ScoredPrompt


@dataclass
class SelectDecision:
    """The chosen index and each choice's numbers (kept as the variable's meta info)."""

    index: int
    scores: list[float]
    token_logprobs: list[list[float]]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _choice_tokens(prefix_ids: list[int], full: ScoredPrompt, choice: str) -> int:
    """Where the choice's own tokens start in ``full``."""
    start = max(_common_prefix(prefix_ids, full.token_ids), 1)
    if start >= len(full.token_ids):
        raise ValueError(f"The choice {choice!r} adds no token to the text.")
    return start


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _greedy(rows: list[list[float]]) -> int:
    width = max(len(r) for r in rows)
    padded = [r + [_mean(r)] * (width - len(r)) for r in rows]
    remaining = list(range(len(rows)))
    for col in range(width):
        best = max(padded[i][col] for i in remaining)
        remaining = [i for i in remaining if padded[i][col] == best]
        if len(remaining) == 1:
            break
    return remaining[0]


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def decide(backend: Backend, text: str, choices: list[str], method: str) -> SelectDecision:
    """Score ``choices`` after ``text`` on ``backend`` and pick one by ``method``."""
    if not backend.can_score:
        raise ValueError(
            f"select needs the logprobs of prompt tokens, which {type(backend).__name__} "
            "cannot get from its server; use LocalBackend or Endpoint."
        )
    prefix_ids = backend.tokenize(text)
    # The text's tokens need no logprobs: all but its last two may come from the prefix cache
    # (a choice can merge with the text's last token; one more token of margin).
    skip = max(len(prefix_ids) - 3, 0)
    fulls = backend.score([text + c for c in choices], skip)
    starts = [_choice_tokens(prefix_ids, f, c) for f, c in zip(fulls, choices, strict=True)]
    if min(starts) <= skip:  # a choice reaches further back into the text: score it all
        fulls = backend.score([text + c for c in choices])
    rows: list[list[float]] = []
    for f, s in zip(fulls, starts, strict=True):
        rows.append([float(lp) for lp in f.logprobs[s:] if lp is not None])
    if method == "greedy":
        return SelectDecision(_greedy(rows), [_mean(r) for r in rows], rows)
    if method == "token_length_normalized":
        scores = [_mean(r) for r in rows]
        return SelectDecision(_argmax(scores), scores, rows)
    if method != "unconditional_normalized":
        raise ValueError(f"Unknown choices_method {method!r}.")
    head = backend.empty_prompt_ids()
    alone = backend.score([head + f.token_ids[s:] for f, s in zip(fulls, starts, strict=True)])
    scores = []
    for row, a in zip(rows, alone, strict=True):
        uncond = a.logprobs[len(head) :]
        pairs = [(c, u) for c, u in zip(row, uncond, strict=True) if u is not None]
        if not pairs:
            raise ValueError(
                "unconditional_normalized needs a model whose prompts start "
                "with a BOS token (or a choice of two tokens or more)."
            )
        scores.append(_mean([c - u for c, u in pairs]))
    return SelectDecision(_argmax(scores), scores, rows)
