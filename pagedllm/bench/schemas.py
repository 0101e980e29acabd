"""JSON schemas the structured-output benchmarks constrain outputs to."""

from __future__ import annotations

from typing import Any

# A customer-service ticket (the deployment study's use case): nested objects, enums, an array
# and string patterns, with room for a long free-text summary.
TICKET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 60},
                "email": {"type": "string", "pattern": "^[a-z0-9.]{1,20}@[a-z0-9]{1,20}\\.com$"},
            },
            "required": ["name", "email"],
        },
        "category": {"enum": ["billing", "shipping", "returns", "technical", "other"]},
        "priority": {"enum": ["low", "medium", "high"]},
        "order_ids": {"type": "array", "items": {"type": "string", "pattern": "^[0-9]{8}$"}},
        "summary": {"type": "string", "maxLength": 600},
    },
    "required": ["customer", "category", "priority", "order_ids", "summary"],
    "additionalProperties": False,
}


def ticket_response_format(variant: int | None = None) -> dict[str, Any]:
    """OpenAI ``response_format`` asking for a ticket. A ``variant`` number makes the schema
    one no server has seen (the summary's ``maxLength`` becomes 600 + variant), so its grammar
    is compiled for that request: what a client with per-request schemas costs."""
    schema = TICKET_SCHEMA
    if variant is not None:
        summary = {**TICKET_SCHEMA["properties"]["summary"], "maxLength": 600 + variant}
        properties = {**TICKET_SCHEMA["properties"], "summary": summary}
        schema = {**TICKET_SCHEMA, "properties": properties}
    return {"type": "json_schema", "json_schema": {"name": "ticket", "schema": schema}}
