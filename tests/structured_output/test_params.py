"""``StructuredOutputsParams``: exactly one constraint, checked shapes, a canonical cache key."""

from __future__ import annotations

import pytest

from pagedllm import SamplingParams
from pagedllm.structured_output import StructuredOutputsParams


@pytest.mark.parametrize(
    "kw",
    [
        {"json": {"type": "object"}},
        {"json": '{"type": "integer"}'},
        {"regex": "[a-z]+"},
        {"choice": ["x", "y"]},
        {"grammar": 'start: "a"'},
        {"json_object": True},
    ],
)
def test_one_kind(kw: dict) -> None:
    p = StructuredOutputsParams(**kw)
    assert p.kind == next(iter(kw))
    if "json" in kw:
        assert isinstance(p.json, dict)  # a JSON text is parsed once, here


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({}, "exactly one"),
        ({"regex": "a", "choice": ["a"]}, "choice, regex|regex, choice|exactly one"),
        ({"json_object": False}, "exactly one"),
        ({"json": "{not json"}, "not a valid JSON"),
        ({"json": [1, 2]}, "must be a JSON schema"),
        ({"choice": []}, "non-empty list"),
        ({"choice": ["a", 3]}, "non-empty list"),
        ({"regex": ""}, "non-empty string"),
    ],
)
def test_rejected(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StructuredOutputsParams(**kw)


def test_key_is_canonical() -> None:
    a = StructuredOutputsParams(json={"b": 1, "a": {"y": 2, "x": 3}})
    b = StructuredOutputsParams(json='{"a": {"x": 3, "y": 2}, "b": 1}')
    assert a.key() == b.key()
    assert a.key() != StructuredOutputsParams(json=a.json, disable_any_whitespace=True).key()


def test_sampling_params_take_a_dict_and_wait_for_host_tokens() -> None:
    p = SamplingParams(structured_outputs={"choice": ["yes", "no"]})
    assert isinstance(p.structured_outputs, StructuredOutputsParams)
    assert not p.needs_host_tokens  # constrained steps are sampled late instead (engine)
