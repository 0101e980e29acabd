"""Pydantic models of the OpenAI API requests the server reads (the answers are in
``protocol_responses.py``).

Types are strict, as OpenAI's API is: ``"max_tokens": "8"``, ``"echo": 0`` or
``"logprobs": "yes"`` are 400s, not silently coerced. Out-of-range values fail validation and
become 400 errors too. Besides OpenAI's own fields, the vLLM extensions users rely on are
accepted (``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``,
``stop_token_ids``, ``allowed_token_ids``, ``bad_words``, ...), structured output in all three
spellings clients send: OpenAI's ``response_format`` (``json_object``, ``json_schema``),
vLLM's ``structured_outputs`` object and its older ``guided_json`` / ``guided_regex`` /
``guided_choice`` / ``guided_grammar`` fields (``structured_outputs.py`` turns them into the
engine's ``StructuredOutputsParams``), and tool calling on chat (``tools``, ``tool_choice``,
``parallel_tool_calls``; ``tool_calls.py``).

A field we do not implement is never silently ignored: ``reject_unsupported`` answers 400
naming it (``chat_template_kwargs``, ``tools`` on text completions, ...; nested objects name
theirs as ``structured_outputs.structural_tag`` or ``tools[0].function.examples``), unless it
is listed in ``HARMLESS_FIELDS`` (bookkeeping fields that cannot change the output) or carries
its "off" value (``null``, ``[]`` as in ``tools: []``, ``tool_choice: "none"``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pagedllm.entrypoints.openai.errors import bad_request

_SEED_MAX = 2**63 - 1 - 1024  # seed + choice index must still fit torch's int64 seed

# Request fields accepted and ignored: they cannot change what is generated.
HARMLESS_FIELDS = frozenset(
    {"store", "metadata", "service_tier", "parallel_tool_calls", "prompt_cache_key",
     "safety_identifier"}
)  # fmt: skip
# Message fields clients send back from earlier responses; the chat template never reads them.
HARMLESS_MESSAGE_FIELDS = frozenset({"refusal", "annotations", "reasoning_content", "reasoning"})
# Fields that are unsupported unless they carry their "off" value.
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "tool_choice": ("none",),
}
# ``structured_outputs`` fields of vLLM's that cannot change the output here: there is one
# grammar backend, so there is nothing to fall back to.
HARMLESS_STRUCTURED_OUTPUTS_FIELDS = frozenset({"disable_fallback"})


class OpenAIModel(BaseModel):
    """Base of every request model: strict types; unknown fields are kept in ``model_extra``
    so that ``reject_unsupported`` can name them."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


def _is_off(name: str, value: Any) -> bool:
    """``null`` and ``[]`` turn a feature off; ``{}`` may turn one on (``web_search_options``)."""
    if value is None or (isinstance(value, list) and not value):
        return True
    return value in _OFF_VALUES.get(name, ())


def reject_unsupported(
    req: OpenAIModel, where: str = "", harmless: frozenset[str] = HARMLESS_FIELDS
) -> None:
    """400 naming the first field of ``req`` that we do not implement (see the module doc)."""
    for name, value in (req.model_extra or {}).items():
        if name in harmless or _is_off(name, value):
            continue
        param = f"{where}{name}"
        raise bad_request(
            f"Unsupported field {param!r}: this server does not implement it, and ignoring it "
            "would change what you asked for. Remove it from the request.",
            param,
            "unsupported_field",
        )


# ---- requests ----------------------------------------------------------------------------
class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk


class JsonSchemaFormat(OpenAIModel):
    """``response_format.json_schema``: OpenAI's named JSON schema. ``strict`` is accepted
    either way: the output always follows the schema."""

    name: str
    description: str | None = None
    # Optional here so that a missing schema is a 400 naming it (structured_outputs.py).
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    """OpenAI's ``response_format``: ``text`` (no constraint), ``json_object`` (any JSON
    object) or ``json_schema`` (with ``json_schema``)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(OpenAIModel):
    """vLLM's ``structured_outputs`` object: one of ``json`` (a JSON schema, or its text),
    ``regex``, ``choice``, ``grammar`` (Lark or GBNF) or ``json_object``, and the options that
    shape JSON output."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None


class FunctionDefinition(OpenAIModel):
    """A tool's function: ``parameters`` is the JSON schema of its arguments object (none: no
    arguments). ``strict`` is accepted either way: forced calls always follow the schema."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(OpenAIModel):
    """One entry of ``tools``: only function tools exist here."""

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    """``tool_choice`` naming the function the model must call."""

    type: Literal["function"]
    function: NamedFunction


def reject_unsupported_tools(tools: list[ChatTool] | None) -> None:
    """400 naming the first unsupported field of a tool definition."""
    for i, tool in enumerate(tools or []):
        reject_unsupported(tool, f"tools[{i}].", frozenset())
        reject_unsupported(tool.function, f"tools[{i}].function.", frozenset())


class SamplingFields(OpenAIModel):
    """Sampling fields shared by chat and text completions."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(default=None, ge=-_SEED_MAX, le=_SEED_MAX)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0
    user: str | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    allowed_token_ids: list[int] | None = None  # vLLM: sample only these token ids
    bad_words: list[str] | None = None  # vLLM: words never to generate
    # Structured output (at most one way of constraining; see structured_outputs.py).
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    guided_json: dict[str, Any] | str | None = None  # vLLM's older spellings
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    guided_decoding_backend: str | None = None

    def reject_unsupported(self) -> None:
        """400 naming the first unsupported field of the request."""
        reject_unsupported(self)
        if self.stream_options is not None:
            reject_unsupported(self.stream_options, "stream_options.")
        if self.response_format is not None:
            reject_unsupported(self.response_format, "response_format.", frozenset())
            if self.response_format.json_schema is not None:
                reject_unsupported(
                    self.response_format.json_schema, "response_format.json_schema.", frozenset()
                )
        if self.structured_outputs is not None:
            reject_unsupported(
                self.structured_outputs,
                "structured_outputs.",
                HARMLESS_STRUCTURED_OUTPUTS_FIELDS,
            )


class ImageURL(OpenAIModel):
    """An ``image_url`` part's image: a ``data:image/...;base64,`` URL (``file://`` inside
    ``--allowed-local-media-path``; remote URLs are refused)."""

    url: str
    detail: str | None = None


class TextContentPart(OpenAIModel):
    """A content part: text (``text`` / ``input_text``), or an image (``image_url``) for a
    model that takes images."""

    type: str
    text: str | None = None
    image_url: ImageURL | None = None


class FunctionCall(OpenAIModel):
    """A call of an earlier assistant turn: ``arguments`` as OpenAI sends them (JSON text), or
    already an object."""

    name: str
    arguments: str | dict[str, Any]


class MessageToolCall(OpenAIModel):
    """An entry of an assistant message's ``tool_calls`` (its other fields, such as the
    ``index`` of accumulated stream snapshots, are history the template never reads)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[MessageToolCall] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ChatTool] | None = None
    # Unset: "auto" when tools are given, else "none" (see tool_calls.py).
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def reject_unsupported(self) -> None:
        super().reject_unsupported()
        for i, m in enumerate(self.messages):
            reject_unsupported(m, f"messages[{i}].", HARMLESS_MESSAGE_FIELDS)
        reject_unsupported_tools(self.tools)
        if isinstance(self.tool_choice, NamedToolChoice):
            reject_unsupported(self.tool_choice, "tool_choice.", frozenset())
            reject_unsupported(self.tool_choice.function, "tool_choice.function.", frozenset())

    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    add_generation_prompt: bool = True


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)


class TokenizeRequest(OpenAIModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ChatTool] | None = None  # with messages: rendered by the chat template
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]
