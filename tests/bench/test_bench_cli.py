"""``pagedllm bench throughput|latency`` end to end on the tiny CPU model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pagedllm.entrypoints.cli import main

_CPU = ["--device", "cpu", "--disable-tqdm"]


def _load(path: Path) -> dict[str, Any]:
    assert path.with_suffix(".md").is_file() and path.with_suffix(".png").stat().st_size > 0
    return json.loads(path.read_text())


def _check_env(rep: dict[str, Any]) -> None:
    env = rep["env"]
    assert env["device_type"] == "cpu" and env["torch"] and env["date"] and env["git"]["commit"]
    assert rep["engine"]["weight_bytes"] > 0 and rep["engine"]["num_kv_blocks"] > 0


def test_throughput_with_transformers_baseline(llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tp.json"
    flags = "--num-prompts 6 --input-len 12 --output-len 4 --range-ratio 0.5"
    flags += " --baseline transformers --hf-batch-size 4"
    argv = ["bench", "throughput", "--model", str(llama_dir), *_CPU, *flags.split()]
    argv += ["--output-json", str(out)]
    assert main(argv) == 0
    rep = _load(out)
    _check_env(rep)
    assert rep["args"]["num_prompts"] == 6 and rep["args"]["baseline"] == "transformers"
    w = rep["workload"]
    assert w["num_requests"] == 6 and 6 <= w["input_len_min"] <= w["input_len_max"] <= 18
    assert 2 <= w["output_len_min"] <= w["output_len_max"] <= 6
    for name in ("pagedllm", "transformers"):
        res = rep["results"][name]
        assert res["num_requests"] == 6 and res["output_tokens"] == w["total_output_tokens"]
        for key in ("elapsed_s", "requests_per_s", "output_tokens_per_s", "total_tokens_per_s"):
            assert res[key] > 0
    assert rep["results"]["transformers"]["extra"]["batch_size"] == 4
    assert rep["results"]["pagedllm"]["extra"]["engine_stats"]["prefix_cache_hits"] == 0
    assert rep["ratio"]["total_tokens_per_s"] > 0
    assert "ratio pagedllm / transformers" in out.with_suffix(".md").read_text()


def test_throughput_sharegpt_and_len_ranges(llama_dir: Path, tmp_path: Path) -> None:
    conv = [{"from": "human", "value": "def add(a, b):\n    return a + b\n"},
            {"from": "gpt", "value": "This adds a and b."}]  # fmt: skip
    data = tmp_path / "sg.json"
    data.write_text(json.dumps([{"conversations": conv}] * 3))
    out = tmp_path / "sg"  # no suffix: .json/.md/.png are added
    argv = ["bench", "throughput", "--model", str(llama_dir), *_CPU, "--num-prompts", "2"]
    argv += ["--dataset-name", "sharegpt", "--dataset-path", str(data), "--output-json", str(out)]
    assert main(argv) == 0
    rep = _load(out.with_suffix(".json"))
    assert rep["workload"]["num_requests"] == 2 and rep["results"]["pagedllm"]["output_tokens"] > 0
    out2 = tmp_path / "ranges.json"
    flags = "--num-prompts 8 --input-len-range 5:9 --output-len-range 2:3"
    argv = ["bench", "throughput", "--model", str(llama_dir), *_CPU, *flags.split()]
    argv += ["--output-json", str(out2)]
    assert main(argv) == 0
    w = _load(out2)["workload"]
    assert 5 <= w["input_len_min"] <= w["input_len_max"] <= 9
    assert 2 <= w["output_len_min"] <= w["output_len_max"] <= 3


def test_throughput_rejects_bad_args_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(tmp_path))
    data = tmp_path / "sg.json"
    data.write_text("[]")
    preset_sharegpt = ["bench", "throughput", "--model-config", "llama-3-8b", *_CPU,
                       "--dataset-name", "sharegpt", "--dataset-path", str(data)]  # fmt: skip
    assert main(preset_sharegpt) == 1
    assert "real tokenizer" in capsys.readouterr().err
    assert main(["bench", "throughput", "--dataset-name", "sharegpt", *_CPU]) == 1
    assert "--dataset-path" in capsys.readouterr().err


def test_latency(llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "lat.json"
    flags = "--batch-sizes 1,3 --input-len 8 --output-len 4 --num-iters 2 --num-iters-warmup 1"
    flags += " --ttft-lens 8,32,4096 --copy-mib 8"
    argv = ["bench", "latency", "--model", str(llama_dir), *_CPU, *flags.split()]
    argv += ["--output-json", str(out)]
    assert main(argv) == 0
    rep = _load(out)
    _check_env(rep)
    roof = rep["roofline"]
    assert (
        roof["copy_bandwidth_Bps"] > 1e8 and roof["weight_bytes"] == rep["engine"]["weight_bytes"]
    )
    assert [b["batch_size"] for b in rep["batches"]] == [1, 3]
    for b in rep["batches"]:
        assert len(b["e2e_s"]["samples"]) == 2 and b["ttft_s"]["median"] > 0
        assert b["e2e_s"]["median"] > 0 and b["roofline_tok_s"] > 0
        assert b["roofline_kv_tok_s"] < b["roofline_tok_s"]
        if b["decode_tok_s"] is not None:  # None only if timing noise beat the decode time
            assert b["decode_tok_s"] > 0 and b["pct_roofline"] > 0
    assert rep["batches"][1]["roofline_tok_s"] == pytest.approx(
        3 * rep["batches"][0]["roofline_tok_s"]
    )
    assert [t["input_len"] for t in rep["ttft_by_len"]] == [8, 32]  # 4096 > max_model_len
    assert all(t["ttft_s"]["median"] > 0 for t in rep["ttft_by_len"])
    assert "% roofline" in out.with_suffix(".md").read_text()


def test_latency_rejects_one_token_output(llama_dir: Path) -> None:
    argv = ["bench", "latency", "--model", str(llama_dir), *_CPU, "--output-len", "1"]
    assert main(argv) == 1
