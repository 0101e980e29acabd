"""Tool-call parsers: the model's text to OpenAI tool calls, whole or streamed.

``--tool-call-parser NAME`` picks one of ``TOOL_PARSERS`` (``hermes``, ``llama3_json``) for
``tool_choice: "auto"``; ``forced.py`` reads the outputs that ``"required"`` and a named
``tool_choice`` force with a grammar. ``abstract.py`` states the contract they share.
"""

from pagedllm.entrypoints.openai.tool_parsers.abstract import (
    TOOL_PARSERS,
    DeltaMessage,
    ToolCall,
    ToolCallDelta,
    ToolCallStreamer,
    ToolParser,
    accumulate,
    get_tool_parser,
    new_call_id,
    register_tool_parser,
)
from pagedllm.entrypoints.openai.tool_parsers.forced import (
    NamedCallParser,
    RequiredCallsParser,
    required_calls_schema,
)
from pagedllm.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from pagedllm.entrypoints.openai.tool_parsers.llama3_json import Llama3JsonToolParser

__all__ = [
    "TOOL_PARSERS",
    "DeltaMessage",
    "HermesToolParser",
    "Llama3JsonToolParser",
    "NamedCallParser",
    "RequiredCallsParser",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallStreamer",
    "ToolParser",
    "accumulate",
    "get_tool_parser",
    "new_call_id",
    "register_tool_parser",
    "required_calls_schema",
]
