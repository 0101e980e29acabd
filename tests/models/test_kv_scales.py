"""Checkpoint KV-cache scales: every naming vLLM accepts reaches the right ``Attention`` layer
with an fp8 KV cache; without one they are skipped with a log line, never silently."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pagedllm import LLM, SamplingParams
from pagedllm.config import EngineConfig
from pagedllm.layers.attention.layer import Attention
from pagedllm.models.kv_scales import is_unused_attention_scale, kv_scale_target
from pagedllm.models.loader import load_model

P = "model.layers.{}.self_attn"


@pytest.mark.parametrize(
    "name,target",
    [
        ("model.layers.0.self_attn.k_scale", ("model.layers.0.self_attn", "k")),
        ("model.layers.3.self_attn.attn.v_scale", ("model.layers.3.self_attn", "v")),
        ("model.layers.1.self_attn.kv_scale", ("model.layers.1.self_attn", "kv")),
        ("model.layers.1.self_attn.k_proj.output_scale", ("model.layers.1.self_attn", "k")),
        ("model.layers.1.self_attn.v_proj.v_scale", ("model.layers.1.self_attn", "v")),
        ("model.layers.1.self_attn.k_proj.v_scale", None),
        ("model.layers.1.self_attn.k_proj.weight_scale", None),
        ("model.layers.1.self_attn.k_proj.input_scale", None),
        ("model.layers.1.self_attn.q_scale", None),
    ],
)
def test_names(name: str, target: tuple[str, str] | None) -> None:
    assert kv_scale_target(name) == target


def test_query_scales_are_recognised_as_unused() -> None:
    assert is_unused_attention_scale("model.layers.0.self_attn.q_scale")
    assert is_unused_attention_scale("model.layers.0.self_attn.attn.prob_scale")
    assert is_unused_attention_scale("model.layers.0.self_attn.q_proj.output_scale")
    assert not is_unused_attention_scale("model.layers.0.self_attn.k_scale")


def _with_scales(src: Path, dst: Path, tensors: dict[str, torch.Tensor]) -> Path:
    shutil.copytree(src, dst)
    save_file(tensors, str(dst / "kv_scales.safetensors"))
    return dst


def _scales(model_dir: Path, kv_cache_dtype: str) -> list[tuple[list[float], str]]:
    model = load_model(
        EngineConfig(model=str(model_dir), device="cpu", kv_cache_dtype=kv_cache_dtype)
    )
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    return [(layer.kv_scale.tolist(), layer.kv_scale_source) for layer in layers]


def test_every_naming_reaches_its_layer(
    llama_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    compressed = _with_scales(
        llama_dir,
        tmp_path / "a",
        {
            f"{P.format(0)}.k_scale": torch.tensor(0.5),  # compressed-tensors
            f"{P.format(0)}.v_scale": torch.tensor([0.25]),
            f"{P.format(1)}.k_proj.output_scale": torch.tensor(0.125),  # Quark
            f"{P.format(1)}.v_proj.output_scale": torch.tensor(2.0),
            f"{P.format(1)}.q_scale": torch.tensor(3.0),  # fp8 attention: never used
        },
    )
    assert _scales(compressed, "fp8") == [([0.5, 0.25], "checkpoint"), ([0.125, 2.0], "checkpoint")]
    other = _with_scales(
        llama_dir,
        tmp_path / "b",
        {
            f"{P.format(0)}.kv_scale": torch.tensor(0.75),  # deprecated: both
            f"{P.format(1)}.k_proj.k_scale": torch.tensor([0.1, 0.3]),  # ModelOpt, per head
            f"{P.format(1)}.attn.v_scale": torch.tensor(0.0625),  # vLLM's own
        },
    )
    assert _scales(other, "fp8_e5m2") == [
        ([0.75, 0.75], "checkpoint"),
        ([pytest.approx(0.3), 0.0625], "checkpoint"),
    ]
    with caplog.at_level(logging.INFO, logger="pagedllm.models.kv_scales"):
        assert _scales(compressed, "auto") == [([1.0, 1.0], "default")] * 2
    assert "Skipped 5 attention scale tensors" in caplog.text
    assert "they need --kv-cache-dtype fp8" in caplog.text


def test_half_a_pair_is_an_error(llama_dir: Path, tmp_path: Path) -> None:
    model_dir = _with_scales(
        llama_dir, tmp_path / "m", {f"{P.format(1)}.k_scale": torch.tensor(1.0)}
    )
    with pytest.raises(
        ValueError, match=r"has a k_scale for model.layers.1.self_attn but no v_scale"
    ):
        _scales(model_dir, "fp8")
    bad = _with_scales(
        llama_dir,
        tmp_path / "z",
        {f"{P.format(0)}.k_scale": torch.tensor(0.0), f"{P.format(0)}.v_scale": torch.tensor(1.0)},
    )
    with pytest.raises(ValueError, match="k_scale must be a positive finite number, got 0.0"):
        _scales(bad, "fp8")


def test_engine_uses_checkpoint_scales(
    llama_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the engine: the checkpoint's scales stay (no calibration, no 1.0 fallback)."""
    tensors = {}
    for i in range(2):
        tensors[f"{P.format(i)}.k_scale"] = torch.tensor(0.03 + i / 100)
        tensors[f"{P.format(i)}.v_scale"] = torch.tensor(0.02)
    model_dir = _with_scales(llama_dir, tmp_path / "m", tensors)
    with caplog.at_level(logging.INFO):
        llm = LLM(str(model_dir), device="cpu", kv_cache_dtype="fp8")
    layers = llm.llm_engine.runner.attn_layers
    assert [a.kv_scale_source for a in layers] == ["checkpoint", "checkpoint"]
    assert torch.allclose(layers[1].kv_scale, torch.tensor([0.04, 0.02]))
    assert "scales of 2 layers from the checkpoint, 0 calibrated" in caplog.text
    assert "no profiling pass ran" not in caplog.text
    out = llm.generate(
        [{"prompt_token_ids": list(range(5, 30))}],
        SamplingParams(temperature=0.0, max_tokens=8),
        use_tqdm=False,
    )
    assert len(out[0].outputs[0].token_ids) == 8
