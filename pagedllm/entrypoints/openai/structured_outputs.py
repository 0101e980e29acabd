"""A request's structured-output constraint, from whichever spelling the client used.

Clients constrain the output in three ways, and a request may use exactly one of them:

* OpenAI's ``response_format``: ``{"type": "json_object"}`` (any JSON object) or
  ``{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}``;
  ``{"type": "text"}`` constrains nothing;
* vLLM's ``structured_outputs`` object: one of ``json``, ``regex``, ``choice``, ``grammar``,
  ``json_object``, plus the JSON options ``disable_any_whitespace``,
  ``disable_additional_properties`` and ``whitespace_pattern``;
* vLLM's older fields ``guided_json``, ``guided_regex``, ``guided_choice`` and
  ``guided_grammar`` (``guided_whitespace_pattern`` is an option; ``guided_decoding_backend``
  may only name the backend we have).

A ``structured_outputs`` object with options only is allowed beside another spelling: its
options then shape that constraint (``response_format`` has no way to ask for compact JSON).
Two constraints at once are a 400 naming both.

The API process has no grammar backend, so it only checks the shape here; whether the
constraint compiles is decided by the engine when the request reaches it
(``LLMEngine.add_request``). Its ``ValueError`` comes back through ``AsyncLLM`` and
``engine_constraint_error`` turns it into a 400 naming the field the client used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagedllm.entrypoints.openai.errors import APIError, bad_request
from pagedllm.entrypoints.openai.protocol import SamplingFields
from pagedllm.structured_output.params import KINDS, StructuredOutputsParams

# guided_decoding_backend values we honour: ours is llguidance (vLLM calls it "guidance").
ACCEPTED_BACKENDS = ("auto", "llguidance", "guidance")
# How the engine's structured-output errors begin (llguidance_backend.py, manager.py): a
# ValueError of the engine that starts so is about the request's constraint.
ENGINE_ERROR_PREFIX = "structured outputs"
_GUIDED = (
    ("guided_json", "json"),
    ("guided_regex", "regex"),
    ("guided_choice", "choice"),
    ("guided_grammar", "grammar"),
)


@dataclass(frozen=True)
class Constraint:
    """The engine's constraint and the request field it came from (named by later errors)."""

    params: StructuredOutputsParams
    field: str


def _is_set(value: Any) -> bool:
    """``null``, ``false`` (``json_object``) and ``[]`` set nothing, as elsewhere in the API."""
    return value is not None and value is not False and value != []


def _response_format(req: SamplingFields) -> dict[str, Any] | None:
    rf = req.response_format
    if rf is None:
        return None
    if rf.type != "json_schema" and rf.json_schema is not None:
        raise bad_request(
            f"response_format.json_schema is only allowed with type 'json_schema', not "
            f"{rf.type!r}.",
            "response_format.json_schema",
        )
    if rf.type == "text":
        return None
    if rf.type == "json_object":
        return {"json_object": True}
    if rf.json_schema is None:
        raise bad_request(
            "response_format of type 'json_schema' needs a 'json_schema' object "
            '({"name": ..., "schema": {...}}).',
            "response_format.json_schema",
        )
    if rf.json_schema.schema_ is None:
        raise bad_request(
            "response_format.json_schema.schema is missing: give the JSON schema the output "
            "must follow.",
            "response_format.json_schema.schema",
        )
    return {"json": rf.json_schema.schema_}


def _options(req: SamplingFields) -> dict[str, Any]:
    """The JSON options, from ``structured_outputs`` and ``guided_whitespace_pattern``."""
    so = req.structured_outputs
    options: dict[str, Any] = {}
    if so is not None:
        options = {
            "disable_any_whitespace": so.disable_any_whitespace,
            "disable_additional_properties": so.disable_additional_properties,
            "whitespace_pattern": so.whitespace_pattern,
        }
    pattern = req.guided_whitespace_pattern
    if pattern is not None:
        if options.get("whitespace_pattern") not in (None, pattern):
            raise bad_request(
                "guided_whitespace_pattern and structured_outputs.whitespace_pattern differ; "
                "give one of them.",
                "guided_whitespace_pattern",
            )
        options["whitespace_pattern"] = pattern
    return options


def request_constraint(req: SamplingFields) -> Constraint | None:
    """The request's constraint (None when it has none); a 400 naming the field for a
    malformed one, for two at once, or for a ``guided_decoding_backend`` we do not have."""
    backend = req.guided_decoding_backend
    if backend is not None and backend not in ACCEPTED_BACKENDS:
        raise bad_request(
            f"guided_decoding_backend {backend!r} is not available: this server constrains "
            "output with llguidance ('llguidance', 'guidance' or 'auto').",
            "guided_decoding_backend",
        )
    sources: list[tuple[str, dict[str, Any]]] = []  # (request field, its constraint)
    rf = _response_format(req)
    if rf is not None:
        sources.append(("response_format", rf))
    so = req.structured_outputs
    if so is not None:
        kinds = {k: getattr(so, "json_" if k == "json" else k) for k in KINDS}
        kinds = {k: v for k, v in kinds.items() if _is_set(v)}
        if len(kinds) > 1:
            names = " and ".join(f"structured_outputs.{k}" for k in kinds)
            raise bad_request(
                f"structured_outputs sets {names}; give exactly one way of constraining the "
                "output.",
                "structured_outputs",
            )
        if kinds:
            sources.append(("structured_outputs", kinds))
    for name, kind in _GUIDED:
        value = getattr(req, name)
        if _is_set(value):
            sources.append((name, {kind: value}))
    if len(sources) > 1:
        names = ", ".join(name for name, _ in sources)
        raise bad_request(
            f"The output can be constrained one way at a time, but this request uses {names}; "
            "keep one of them.",
            sources[1][0],
        )
    options = _options(req)
    if not sources:
        if so is not None:
            raise bad_request(
                "structured_outputs needs exactly one of " + ", ".join(KINDS) + ".",
                "structured_outputs",
            )
        return None
    field, kind = sources[0]
    try:
        params = StructuredOutputsParams(**kind, **options)
    except ValueError as e:
        raise bad_request(str(e), field) from e
    return Constraint(params, field)


def engine_constraint_error(exc: ValueError, constraint: Constraint | None) -> APIError | None:
    """The 400 for an engine ``ValueError`` about the request's constraint (it did not
    compile), naming the field the client used; None for any other error."""
    if constraint is None or not str(exc).startswith(ENGINE_ERROR_PREFIX):
        return None
    return bad_request(str(exc), constraint.field)
