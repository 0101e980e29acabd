"""LangChain's ``ChatOpenAI.with_structured_output`` against a real ``pagedllm serve`` (tiny
random model, CPU), both ways LangChain asks: ``method="json_schema"`` (OpenAI
``response_format``) and ``method="function_calling"`` (a forced tool call). Either way the
grammar makes the answer parse into the pydantic model. Skipped without ``langchain-openai``.
"""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field

from tests.entrypoints.openai.conftest import API_KEY, MODEL_NAME, ServerProc

langchain_openai = pytest.importorskip("langchain_openai")


class City(BaseModel):
    """A city the user asked about."""

    name: str = Field(max_length=8, description="the city's name")
    population_millions: int = Field(ge=0, le=99)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output(server: ServerProc, method: str) -> None:
    llm = langchain_openai.ChatOpenAI(
        base_url=f"{server.base_url}/v1",
        api_key=API_KEY,
        model=MODEL_NAME,
        temperature=0,
        max_tokens=120,
        max_retries=0,
    )
    structured = llm.with_structured_output(City, method=method)
    answer = structured.invoke("Name a large city.")
    assert isinstance(answer, City)
    assert len(answer.name) <= 8 and 0 <= answer.population_millions <= 99
