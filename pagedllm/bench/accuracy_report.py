"""The Markdown table and PNG of a ``pagedllm bench accuracy`` report (``bench/accuracy.py``).

Markdown: the summary (mean similarity, share at or above the threshold, latency of both
configurations), then one row per question with its similarity and both answers' lengths and
times. PNG: the similarity of every question (sorted, with the threshold line) beside the
per-request latency of the two configurations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pagedllm.bench import report


def _snippet(text: str, width: int = 60) -> str:
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def markdown(rep: dict[str, Any]) -> str:
    s, cand, ref = rep["summary"], rep["candidate"], rep["reference"]
    extra = [
        f"candidate: {cand['label']}",
        f"reference ({ref['kind']}): {ref['label']}",
        f"questions: {len(rep['questions'])} from {rep['dataset']}; greedy, at most "
        f"{rep['args']['max_tokens']} tokens, one request at a time after a warm-up",
        f"similarity: cosine of {rep['embedding_name']} sentence embeddings "
        f"({rep['embedding_model']})",
    ]
    model = cand["engine"].get("model", "")
    text = report.header_lines("pagedllm bench accuracy", rep["env"], model, extra)
    text += report.markdown_table(
        ["mean similarity", f"share >= {s['threshold']}", "min similarity"],
        [[f"{s[k]:.4f}" for k in ("mean_similarity", "share_similar", "min_similarity")]],
    )
    rows = [
        [
            name,
            x["latency"]["mean_s"],
            x["latency"]["median_s"],
            x["latency"]["p90_s"],
            x["latency"]["output_tok_s"],
            x["latency"]["output_tokens"],
        ]
        for name, x in (("candidate", cand), ("reference", ref))
    ]
    text += "\n" + report.markdown_table(
        ["configuration", "mean s", "median s", "p90 s", "output tok/s", "output tokens"], rows
    )
    per_question = [
        [
            q["id"],
            round(q["similarity"], 3),
            q["candidate"]["num_tokens"],
            q["reference"]["num_tokens"],
            _snippet(q["candidate"]["text"]),
            _snippet(q["reference"]["text"]),
        ]
        for q in rep["questions"]
    ]
    text += "\n" + report.markdown_table(
        ["id", "similarity", "cand. tokens", "ref. tokens", "candidate", "reference"],
        per_question,
    )
    return text


def plot(path: Path, rep: dict[str, Any]) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = rep["summary"]
    sims = sorted(q["similarity"] for q in rep["questions"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(range(len(sims)), sims, color="tab:blue")
    left.axhline(s["threshold"], color="tab:red", linestyle="--", label=f"{s['threshold']}")
    left.set_ylim(min(0.0, min(sims)), 1.05)
    left.set_xlabel("question (sorted)")
    left.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    left.set_title(
        f"similarity: mean {s['mean_similarity']:.3f}, "
        f"{100 * s['share_similar']:.0f}% >= {s['threshold']}",
        fontsize=10,
    )
    left.legend(fontsize=8)
    names = ["candidate", "reference"]
    for i, name in enumerate(names):
        times = [q[name]["latency_s"] for q in rep["questions"]]
        right.boxplot(times, positions=[i], widths=0.5)
    right.set_xticks(range(len(names)))
    right.set_xticklabels([f"{n}\n{_snippet(rep[n]['label'], 40)}" for n in names], fontsize=8)
    right.set_ylabel("seconds per request")
    right.set_title("latency (batch 1)", fontsize=10)
    fig.suptitle(f"pagedllm bench accuracy on {rep['env']['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
