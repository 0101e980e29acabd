"""A bounded Schemathesis run of the native routes (``register_native_routes``) on a live app:
no 5xx, and every answer is one the OpenAPI document promises (as ``test_openapi_fuzz`` checks
for the OpenAI routes)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.lang.native_server import ThreadServer, serve_in_thread

EXAMPLES = int(os.environ.get("PAGEDLLM_FUZZ_EXAMPLES", "40"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
NATIVE_PATHS = (
    "/generate",
    "/get_model_info",
    "/get_server_info",
    "/server_info",
    "/health_generate",
    "/flush_cache",
)


@pytest.fixture(scope="module")
def fuzz_server(llama_dir: Path) -> Iterator[ThreadServer]:
    with serve_in_thread(llama_dir, api_key="fz", max_model_len=64, max_n=4) as server:
        yield server


def test_native_routes_answer_as_documented(fuzz_server: ThreadServer) -> None:
    headers = fuzz_server.headers
    schema = schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json", headers=headers)
    operations = [r.ok() for r in schema.get_all_operations()]
    native = [op for op in operations if op.path in NATIVE_PATHS]
    assert sorted({op.path for op in native}) == sorted(NATIVE_PATHS)
    failures: list[str] = []
    for operation in native:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def run(case: schemathesis.Case) -> None:
            case.call_and_validate(
                base_url=fuzz_server.base_url, headers=headers, checks=CHECKS, timeout=60
            )

        try:
            run()
        except Exception as e:  # keep going: report every route that fails
            failures.append(f"{operation.label}: {e}")
    assert not failures, "\n\n".join(failures)
