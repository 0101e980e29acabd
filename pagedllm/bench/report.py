"""Benchmark reports: environment facts, JSON, a Markdown table and a PNG plot per run.

A run writes ``FILE.json`` (everything: environment, all arguments, results), ``FILE.md``
(the table that is also printed) and ``FILE.png``; ``FILE`` defaults to
``bench-results/<kind>-<YYYYmmdd-HHMMSS>``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

_REPO_DIR = Path(__file__).resolve().parents[2]


def git_commit() -> dict[str, Any]:
    """The commit of the pagedllm checkout (``unknown`` outside git) and whether it is dirty."""

    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(
                ["git", *args], cwd=_REPO_DIR, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit or "unknown", "dirty": bool(status) if status is not None else None}


def device_name(device: torch.device) -> str:
    """Human-readable accelerator (or CPU) name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores)"


def env_info(device: torch.device) -> dict[str, Any]:
    """Date, device, library versions and git commit, for the report header."""
    import transformers

    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "hostname": platform.node(),
        "git": git_commit(),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        props = torch.cuda.get_device_properties(device)
        info["device_memory_gib"] = round(props.total_memory / 2**30, 2)
    return info


def output_paths(kind: str, output_json: str | None) -> tuple[Path, Path, Path]:
    """(json, md, png) paths; the default stem is ``bench-results/<kind>-<timestamp>``."""
    if output_json is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        output_json = f"bench-results/{kind}-{stamp}.json"
    path = Path(output_json)
    stem = path.with_suffix("") if path.suffix == ".json" else path
    return stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")


def jsonable(value: Any) -> Any:
    """Make arguments / results JSON-serialisable (paths, dtypes, devices -> strings)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: floats with thousands separators, ``-`` for missing values."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def header_lines(title: str, env: dict[str, Any], model: str, extra: Sequence[str]) -> str:
    """The Markdown preamble: title, device, software, commit, model, workload lines."""
    git = env["git"]
    commit = git["commit"][:12] + (" (dirty)" if git.get("dirty") else "")
    lines = [
        f"## {title}",
        "",
        f"- device: {env['device']}",
        f"- torch {env['torch']}, transformers {env['transformers']}, commit {commit}",
        f"- date: {env['date']}",
        f"- model: {model}",
        *[f"- {e}" for e in extra],
        "",
    ]
    return "\n".join(lines) + "\n"


def write_report(
    paths: tuple[Path, Path, Path],
    report: dict[str, Any],
    markdown: str,
    plot: Callable[[Path], None],
) -> None:
    """Write the JSON, Markdown and PNG files (creating the directory) and print the table."""
    json_path, md_path, png_path = paths
    json_path.parent.mkdir(parents=True, exist_ok=True)
    report["files"] = {"json": str(json_path), "markdown": str(md_path), "plot": str(png_path)}
    json_path.write_text(json.dumps(jsonable(report), indent=2) + "\n")
    md_path.write_text(markdown + "\n")
    plot(png_path)
    print(markdown)
    print(f"\nWrote {json_path}, {md_path}, {png_path}")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bars(
    path: Path, title: str, metrics: Sequence[str], series: dict[str, Sequence[float]]
) -> None:
    """Grouped bars: one group per metric, one bar per engine (``series`` name -> values)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 4), squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    names = list(series)
    for j, (ax, metric) in enumerate(zip(axes[0], metrics, strict=True)):
        values = [series[n][j] for n in names]
        bars = ax.bar(names, values, color=colors[: len(names)])
        ax.bar_label(bars, labels=[f"{v:,.1f}" for v in values], fontsize=8)
        ax.set_title(metric, fontsize=10)
        ax.margins(y=0.15)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_lines(
    path: Path,
    title: str,
    panels: Sequence[tuple[str, str, Sequence[float], dict[str, Sequence[float | None]]]],
) -> None:
    """Side-by-side line panels: (title, x label, x values, {series name: y values})."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (panel_title, xlabel, xs, series) in zip(axes[0], panels, strict=True):
        for name, ys in series.items():
            pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
            if pts:
                style = "--" if "roofline" in name else "-o"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
        if len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 8:
            ax.set_xscale("log", base=2)
        ys_all = [y for ys in series.values() for y in ys if y is not None]
        if ys_all and min(ys_all) > 0 and max(ys_all) / min(ys_all) >= 50:
            ax.set_yscale("log")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([str(x) for x in xs])
        ax.set_xlabel(xlabel)
        ax.set_title(panel_title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def describe_engine(llm: Any) -> dict[str, Any]:
    """The engine settings that shape a benchmark (after defaults were resolved)."""
    engine = llm.llm_engine
    cfg = engine.config
    runner = engine.runner
    backend = type(runner.attn_layers[0].backend).__name__ if runner.attn_layers else None
    mc, cache, sched = cfg.model_config, cfg.cache_config, cfg.scheduler_config
    return {
        "model": mc.model,
        "tokenizer": mc.tokenizer,
        "architecture": mc.arch.architecture,
        "load_format": mc.load_format,
        "dtype": str(mc.torch_dtype).removeprefix("torch."),
        "device": str(cfg.device_config.torch_device),
        "attention_backend": backend,
        "block_size": cache.block_size,
        "max_model_len": mc.max_model_len,
        "max_num_seqs": sched.max_num_seqs,
        "max_num_batched_tokens": sched.max_num_batched_tokens,
        "enable_prefix_caching": cache.enable_prefix_caching,
        "enable_chunked_prefill": sched.enable_chunked_prefill,
        "num_kv_blocks": runner.num_blocks,
        "kv_cache_gib": round(runner.num_blocks * runner.kv_spec.bytes_per_block / 2**30, 3),
        "weight_bytes": sum(p.numel() * p.element_size() for p in runner.model.parameters()),
    }
