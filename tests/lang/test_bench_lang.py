"""``pagedllm bench lang`` on the tiny llama (CPU): both backends, every workload."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pagedllm.bench.lang import add_lang_parser, main, workload_args


def test_workloads_are_deterministic() -> None:
    for name in ("fewshot_select", "tree_of_thought", "multi_turn"):
        assert workload_args(name, 3, 4, seed=1) == workload_args(name, 3, 4, seed=1)
        assert workload_args(name, 3, 4, seed=1) != workload_args(name, 3, 4, seed=2)


def test_bench_lang_reports_both_backends(llama_dir: Path, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_lang_parser(parser.add_subparsers())
    out = tmp_path / "lang.json"
    argv = ["lang", "--model", str(llama_dir), "--device", "cpu", "--max-model-len", "512"]
    argv += ["--num-programs", "3", "--max-tokens", "2", "--disable-tqdm"]
    argv += ["--output-json", str(out)]
    args = parser.parse_args(argv)
    assert args.func is main
    assert main(args) == 0
    rep = json.loads(out.read_text())
    assert set(rep["results"]) == {"local", "http"}
    for backend in ("local", "http"):
        per = rep["results"][backend]
        assert set(per) == {"fewshot_select", "tree_of_thought", "multi_turn"}
        for r in per.values():
            assert r["programs"] == 3 and r["programs_per_s"] > 0
        # The forks' shared text and the earlier turns are found in the prefix cache. (select
        # asks for prompt logprobs, which the engine computes without the cache today.)
        assert per["tree_of_thought"]["prefix_cache_hit_rate"] > 0.5
        assert per["multi_turn"]["prefix_cache_hit_rate"] > 0.3
    # In process, a fork's branches are in the engine together.
    assert rep["results"]["local"]["tree_of_thought"]["peak_requests_in_flight"] >= 2
    assert (tmp_path / "lang.md").exists()


def test_registering_the_command_imports_no_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; import pagedllm.bench.lang; "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
