"""Structured output: constrain a request's tokens to a JSON schema, regex, choice or grammar.

``params.py`` holds the request-side description (plain data, travels with
``SamplingParams``); ``backend.py`` the grammar-backend interface and registry, with
llguidance as the backend (``llguidance_backend.py``); ``manager.py`` the engine-side state of
every constrained sequence and the per-step allowed-token bitmask.
"""

from pagedllm.structured_output.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
