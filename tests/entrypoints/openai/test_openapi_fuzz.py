"""A bounded Schemathesis run of every route against a live server: no 5xx, and every answer
(status, content type, body) is one the OpenAPI document promises.

``PAGEDLLM_FUZZ_EXAMPLES`` sets the cases per route (default 40: about 400 in all, well inside
the CI budget); raise it for a deeper local run.
"""

from __future__ import annotations

import os
import time
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

from tests.entrypoints.openai.conftest import ServerProc, launch

EXAMPLES = int(os.environ.get("PAGEDLLM_FUZZ_EXAMPLES", "40"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def fuzz_server(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    log_dir = tmp_path_factory.mktemp("fuzz_logs")
    server = launch(
        "fuzz", llama_dir, log_dir, "--max-model-len", "64", "--max-n", "4", "--api-key", "fz"
    )
    try:
        server.wait_ready(time.monotonic() + 120)
        yield server
    finally:
        server.terminate()
        server.wait_stopped()


def test_every_route_answers_as_documented(fuzz_server: ServerProc) -> None:
    headers = {"Authorization": "Bearer fz"}
    schema = schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json", headers=headers)
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9, [op.label for op in operations]
    # SGLang's native routes are part of every app (native_routes.py): fuzzed here too.
    native = ("/generate", "/get_model_info", "/get_server_info", "/health_generate")
    assert {*native, "/flush_cache"} <= {op.path for op in operations}
    for operation in operations:

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
