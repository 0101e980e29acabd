"""``pagedllm infer``: the demo model through the pagedllm and transformers backends gives the
same greedy text row for row; output is resumable; ``--compare`` finds differences."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from pagedllm.config import DEMO_MODEL_DIR
from pagedllm.entrypoints.cli import main
from pagedllm.entrypoints.infer import compare, done_indices, read_rows

ROWS = [
    {"prompt": "def add(a, b):"},
    {"messages": [{"role": "user", "content": "Write a sort function."}], "id": "chat-1"},
    {"prompt": "import os\n"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}]},
]
FLAGS = ["--max-tokens", "16", "--device", "cpu", "--batch-size", "3"]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pagedllm_and_transformers_agree(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outs = {}
    for backend in ("pagedllm", "transformers"):
        out = tmp_path / f"{backend}.jsonl"
        argv = ["infer", "--dataset", str(dataset), "--output", str(out), "--backend", backend]
        assert main([*argv, *FLAGS]) == 0
        outs[backend] = out
        rows = _rows(out)
        assert [r["index"] for r in rows] == [0, 1, 2, 3]
        assert rows[1]["id"] == "chat-1" and rows[0]["id"] is None
        assert all(r["backend"] == backend and r["latency_s"] > 0 for r in rows)
        assert all(r["usage"]["completion_tokens"] <= 16 and r["response"] for r in rows)
    a, b = _rows(outs["pagedllm"]), _rows(outs["transformers"])
    assert [r["response"] for r in a] == [r["response"] for r in b]
    assert [r["usage"] for r in a] == [r["usage"] for r in b]
    capsys.readouterr()
    assert main(["infer", "--compare", str(outs["pagedllm"]), str(outs["transformers"])]) == 0
    assert "exact match: 4/4 rows (100.0%)" in capsys.readouterr().out


def test_resume_skips_done_rows(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    done = {"index": 2, "id": None, "response": "KEPT", "usage": {}}
    out.write_text(json.dumps(done) + "\n" + '{"index": 3, "resp')  # killed mid-line
    assert done_indices(out) == {2}
    assert out.read_text() == json.dumps(done) + "\n"  # the torn line is dropped
    assert main(["infer", "--dataset", str(dataset), "--output", str(out), *FLAGS]) == 0
    rows = _rows(out)
    assert sorted(r["index"] for r in rows) == [0, 1, 2, 3]
    assert rows[0]["response"] == "KEPT"
    before = out.read_text()
    assert main(["infer", "--dataset", str(dataset), "--output", str(out), *FLAGS]) == 0
    assert out.read_text() == before  # nothing left to do


def test_compare_reports_differences(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"index": 0, "response": "same"}\n{"index": 1, "response": "abcdef"}\n')
    b.write_text('{"index": 0, "response": "same"}\n{"index": 1, "response": "abcXef"}\n')
    out = io.StringIO()
    assert compare(a, b, out=out) == 1
    text = out.getvalue()
    assert "exact match: 1/2 rows (50.0%)" in text
    assert "row 1: first difference at character 3" in text and "'abcXef'" in text


@pytest.mark.parametrize(
    "text,needle",
    [
        ('{"prompt": "a", "messages": []}\n', "exactly one of 'messages' or 'prompt'"),
        ('{"text": "a"}\n', "exactly one of 'messages' or 'prompt'"),
        ("not json\n", "in.jsonl:1: not JSON"),
    ],
)
def test_bad_rows(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=needle):
        read_rows(path)


def test_flag_errors(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "o.jsonl")
    assert main(["infer", "--dataset", str(dataset)]) == 1
    assert "needs --dataset IN.jsonl and --output OUT.jsonl" in capsys.readouterr().err
    argv = ["infer", "--dataset", str(dataset), "--output", out, "--backend", "openai"]
    assert main(argv) == 1
    assert "--backend openai needs MODEL (or --tokenizer)" in capsys.readouterr().err
    assert main([*argv, "--tokenizer", str(DEMO_MODEL_DIR)]) == 1
    assert "--backend openai needs --base-url" in capsys.readouterr().err
    assert (
        main(["infer", "--dataset", str(dataset), "--output", out, "--base-url", "http://x"]) == 1
    )
    assert "--base-url is for --backend openai" in capsys.readouterr().err
