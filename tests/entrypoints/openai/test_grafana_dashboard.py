"""``docs/grafana-dashboard.json`` queries only metrics a real server exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx

from tests.entrypoints.openai.conftest import MODEL_NAME, ServerProc

DASHBOARD = Path(__file__).resolve().parents[3] / "docs" / "grafana-dashboard.json"


def test_every_queried_metric_is_exported(server: ServerProc) -> None:
    body = {"model": MODEL_NAME, "prompt": "hello", "max_tokens": 4, "stream": True}
    with httpx.stream(
        "POST", f"{server.base_url}/v1/completions", json=body, headers=server.headers
    ) as r:
        assert r.status_code == 200 and list(r.iter_lines())
    text = httpx.get(f"{server.base_url}/metrics", headers=server.headers).text
    exported = {re.split(r"[{ ]", line)[0] for line in text.splitlines() if line and line[0] != "#"}
    assert f'model_name="{MODEL_NAME}"' in text
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    queried = {m for e in exprs for m in re.findall(r"pagedllm:[a-z0-9_]+", e)}
    assert len(queried) >= 12
    missing = sorted(queried - exported)
    assert not missing, f"the dashboard queries metrics /metrics does not export: {missing}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert all('model_name=~"$model_name"' in e for e in exprs)
