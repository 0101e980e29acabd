"""``pagedllm bench accuracy``: a candidate configuration's answers against a reference's.

The deployment study behind issue 12 judges a quantized / fp8 configuration by asking it and a
reference (transformers, or the unquantized model) the same questions and scoring each pair of
answers by the cosine similarity of their sentence embeddings (all-MiniLM-L6-v2,
``bench/similarity.py``): the mean, and the share of questions at or above 0.85. This command
does the same, plus each configuration's latency.

* The candidate is the engine configured by the usual engine flags (``--model``,
  ``--quantization``, ``--kv-cache-dtype``, ...).
* The reference is ``--reference pagedllm`` (default): the same flags, except those given again
  as ``--reference-<flag>`` (every engine flag has one; ``none`` sets an optional one to None),
  e.g. ``--quantization fp8 --reference-quantization none``; or ``--reference transformers``:
  Hugging Face ``generate`` on the candidate's model (or ``--reference-model``) in its dtype.
* Questions: a built-in customer-service set (``pagedllm/assets/bench/``, 30 questions), or
  ``--dataset FILE.jsonl`` with one ``{"question": ...}`` object per line (optional ``id``,
  ``system``). Each is one user turn through the model's chat template; answers are greedy,
  at most ``--max-tokens``, ending at EOS.
* Latency: requests run one at a time (batch 1, as a user waits for one answer) after one
  warm-up request; per-request wall time (mean, median, p90) and output tokens per second.

The configurations run one after the other, each freed before the next, so they share a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any

from pagedllm.bench import report

BUILTIN_DATASET = (
    Path(__file__).resolve().parent.parent / "assets" / "bench" / "customer_service_questions.json"
)
REFERENCES = ("pagedllm", "transformers")
REFERENCE_DEST = "reference__"  # argparse dest prefix of the --reference-<flag> overrides
# --reference transformers reads only these engine settings.
TRANSFORMERS_SETTINGS = ("model", "tokenizer", "dtype", "device")
_QUESTION_KEYS = {"id", "question", "prompt", "system"}


@dataclasses.dataclass
class Question:
    """One question of the set (asked as a user turn, after an optional system turn)."""

    id: str
    question: str
    system: str | None = None

    def messages(self) -> list[dict[str, str]]:
        turns = [{"role": "system", "content": self.system}] if self.system else []
        return [*turns, {"role": "user", "content": self.question}]


@dataclasses.dataclass
class Answer:
    """A configuration's answer to one question and how long it took."""

    text: str
    num_tokens: int
    latency_s: float


def load_questions(path: str | Path | None = None) -> list[Question]:
    """The built-in set (``path`` None), a ``.json`` file in its format, or a ``.jsonl`` file."""
    path = Path(path) if path is not None else BUILTIN_DATASET
    if path.suffix == ".json":
        rows = json.loads(path.read_text())["questions"]
    else:
        rows = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not a JSON object ({e.msg})") from e
    questions = []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: entry {i} is not a JSON object")
        unknown = sorted(set(row) - _QUESTION_KEYS)
        if unknown:
            raise ValueError(
                f"{path}: entry {i} has unsupported keys {unknown} (supported: id, question or "
                "prompt, system)"
            )
        text = row.get("question", row.get("prompt"))
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}: entry {i} needs a non-empty 'question' string")
        questions.append(Question(str(row.get("id", i)), text, row.get("system")))
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions


def reference_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The engine settings given as ``--reference-<flag>`` (absent ones are the candidate's)."""
    return {
        k.removeprefix(REFERENCE_DEST): v
        for k, v in vars(args).items()
        if k.startswith(REFERENCE_DEST)
    }


def _prompt_ids(tokenizer: Any, question: Question) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the model's tokenizer has no chat template (questions are chat turns)")
    ids = tokenizer.apply_chat_template(
        question.messages(), add_generation_prompt=True, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_pagedllm(
    kwargs: dict[str, Any], questions: list[Question], max_tokens: int, bar: Any
) -> tuple[list[Answer], dict[str, Any]]:
    """Each question's greedy answer from ``LLM(**kwargs)``, one request at a time."""
    from pagedllm import LLM, SamplingParams

    llm = LLM(**kwargs)
    engine = report.describe_engine(llm)
    device = llm.llm_engine.config.device_config.torch_device
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    prompts = [_prompt_ids(tokenizer, q) for q in questions]
    llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)  # warm-up
    answers = []
    for ids in prompts:
        _sync(device)
        start = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0].outputs[0]
        _sync(device)
        answers.append(Answer(out.text, len(out.token_ids), time.perf_counter() - start))
        bar.update(1)
    shutdown = getattr(llm.llm_engine, "shutdown", None)
    if shutdown is not None:
        shutdown()
    del llm
    _free(device)
    return answers, engine


def run_transformers(
    settings: dict[str, Any], questions: list[Question], max_tokens: int, bar: Any
) -> tuple[list[Answer], dict[str, Any]]:
    """Each question's greedy answer from transformers' ``generate`` (batch 1)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pagedllm.config import EngineConfig

    cfg = EngineConfig(**settings)
    mc, device = cfg.model_config, cfg.device_config.torch_device
    where: dict[str, Any] = {}
    model_path = Path(str(mc.model))
    if mc.gguf_file is not None:
        model_path, where = model_path.parent, {"gguf_file": model_path.name}
    tok_dir = settings.get("tokenizer")
    tok_kw = where if tok_dir is None else {}
    tokenizer = AutoTokenizer.from_pretrained(tok_dir or str(model_path), **tok_kw)
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=mc.torch_dtype, **where)
    model.to(device).eval()
    eos = tokenizer.eos_token_id
    prompts = [_prompt_ids(tokenizer, q) for q in questions]

    def generate(ids: list[int]) -> list[int]:
        x = torch.tensor([ids], device=device)
        with torch.no_grad():
            out = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )
        new = out[0, x.shape[1] :].tolist()
        return new[: new.index(eos) + 1] if eos in new else new

    generate(prompts[0])  # warm-up
    answers = []
    for ids in prompts:
        _sync(device)
        start = time.perf_counter()
        new = generate(ids)
        _sync(device)
        text = tokenizer.decode(new, skip_special_tokens=True)
        answers.append(Answer(text, len(new), time.perf_counter() - start))
        bar.update(1)
    info = {"model": str(mc.model), "dtype": str(mc.torch_dtype).removeprefix("torch.")}
    info["device"] = str(device)
    return answers, info  # the model is freed by the caller's _free, once this frame is gone


def _free(device: Any) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def latency_summary(answers: list[Answer]) -> dict[str, float]:
    """Per-request latency (mean, median, p90, total) and output tokens per second."""
    times = sorted(a.latency_s for a in answers)
    total = sum(times)
    return {
        "mean_s": statistics.fmean(times),
        "median_s": statistics.median(times),
        "p90_s": times[min(len(times) - 1, int(0.9 * len(times)))],
        "total_s": total,
        "output_tokens": sum(a.num_tokens for a in answers),
        "output_tok_s": sum(a.num_tokens for a in answers) / total if total > 0 else 0.0,
    }


def score(similarities: list[float], threshold: float) -> dict[str, float]:
    """Mean similarity and the share of answers at or above ``threshold``."""
    n = len(similarities)
    return {
        "mean_similarity": statistics.fmean(similarities),
        "min_similarity": min(similarities),
        "share_similar": sum(s >= threshold for s in similarities) / n,
        "threshold": threshold,
    }


def describe_difference(candidate: dict[str, Any], reference: dict[str, Any]) -> tuple[str, str]:
    """Short labels of the two configurations: the settings in which they differ."""
    keys = [k for k in candidate if candidate.get(k) != reference.get(k)]
    cand = ", ".join(f"{k}={candidate[k]}" for k in keys) or "candidate"
    ref = ", ".join(f"{k}={reference.get(k)}" for k in keys) or "reference"
    return cand, ref


def _configurations(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(candidate engine keywords, reference engine keywords or transformers settings)."""
    from pagedllm.bench.presets import bench_engine_kwargs

    candidate = bench_engine_kwargs(args)
    overrides = reference_overrides(args)
    reference = {**candidate, **overrides}
    if "model" in overrides and "tokenizer" not in overrides:
        reference["tokenizer"] = None  # the reference model's own tokenizer
    for name, kw in (("candidate", candidate), ("reference", reference)):
        if kw.get("load_format") == "dummy":
            raise ValueError(f"the {name} has dummy weights: accuracy needs real weights")
    if args.reference == "transformers":
        unused = sorted(set(overrides) - set(TRANSFORMERS_SETTINGS))
        if unused:
            flags = ", ".join("--reference-" + k.replace("_", "-") for k in unused)
            raise ValueError(
                f"--reference transformers reads only the model, tokenizer, dtype and device; "
                f"{flags} would be ignored"
            )
        return candidate, {k: reference.get(k) for k in TRANSFORMERS_SETTINGS}
    if reference == candidate:
        raise ValueError(
            "the reference configuration equals the candidate's: give the settings it differs "
            "in as --reference-<flag> (e.g. --reference-quantization none), or use "
            "--reference transformers"
        )
    return candidate, reference


def main(args: argparse.Namespace) -> int:
    """Run the accuracy benchmark described by parsed CLI ``args``."""
    from tqdm.auto import tqdm

    from pagedllm.bench.accuracy_report import markdown, plot
    from pagedllm.bench.similarity import SentenceEmbedder
    from pagedllm.config import EngineConfig

    if args.max_tokens < 1:
        raise ValueError("--max-tokens must be >= 1")
    if not 0.0 < args.threshold <= 1.0:
        raise ValueError("--threshold must be in (0, 1]")
    questions = load_questions(args.dataset)
    if args.num_questions is not None:
        if args.num_questions < 1:
            raise ValueError("--num-questions must be >= 1")
        questions = questions[: args.num_questions]
    candidate, reference = _configurations(args)
    paths = report.output_paths("accuracy", args.output_json)
    device = EngineConfig(**candidate).device_config.torch_device
    labels = describe_difference(candidate, reference)
    if args.reference == "transformers":
        labels = (labels[0] if labels[0] != "candidate" else "pagedllm", "transformers")
    with tqdm(total=2 * len(questions), disable=args.disable_tqdm, unit="answer") as bar:
        bar.set_description("candidate")
        cand_answers, cand_engine = run_pagedllm(candidate, questions, args.max_tokens, bar)
        bar.set_description("reference")
        runner = run_transformers if args.reference == "transformers" else run_pagedllm
        ref_answers, ref_engine = runner(reference, questions, args.max_tokens, bar)
    _free(device)
    embedder = SentenceEmbedder(args.embedding_model, device=str(device))
    sims = embedder.similarities([a.text for a in cand_answers], [a.text for a in ref_answers])
    rep: dict[str, Any] = {
        "kind": "accuracy",
        "env": report.env_info(device),
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "dataset": str(args.dataset or BUILTIN_DATASET),
        "embedding_model": str(embedder.model_dir),
        "embedding_name": embedder.name,
        "summary": score(sims, args.threshold),
        "candidate": {
            "label": labels[0],
            "settings": candidate,
            "engine": cand_engine,
            "latency": latency_summary(cand_answers),
        },
        "reference": {
            "kind": args.reference,
            "label": labels[1],
            "settings": reference,
            "engine": ref_engine,
            "latency": latency_summary(ref_answers),
        },
        "questions": [
            {
                "id": q.id,
                "question": q.question,
                "similarity": s,
                "candidate": dataclasses.asdict(c),
                "reference": dataclasses.asdict(r),
            }
            for q, s, c, r in zip(questions, sims, cand_answers, ref_answers, strict=True)
        ],
    }
    report.write_report(paths, rep, markdown(rep), lambda path: plot(path, rep))
    return 0
