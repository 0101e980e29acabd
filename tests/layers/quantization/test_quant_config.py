"""``quantization``: detected from ``quantization_config``, checked torch-free before loading.

Every unsupported method, bit width or layout is an error that names the value and what is
supported; a user's ``quantization`` must agree with the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pagedllm.config import EngineConfig
from pagedllm.config.model import ModelConfig
from pagedllm.models.loader import load_model
from tests.fixtures.quantized_models import checkpoint_path


def _model_dir(tmp_path: Path, name: str, **changes: Any) -> Path:
    """A directory with checkpoint ``name``'s config.json, its quantization_config changed."""
    cfg = json.loads((checkpoint_path(name) / "config.json").read_text())
    section = cfg["quantization_config"]
    for key, value in changes.items():
        if value is None:
            section.pop(key, None)
        else:
            section[key] = value
    out = tmp_path / "m"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize(
    "name,method",
    [("gptq-llama-int4-g32-actorder", "gptq"), ("awq-qwen2-int4-g32", "awq")],
)
def test_detected_from_the_checkpoint_and_accepted_when_named(
    tmp_path: Path, name: str, method: str
) -> None:
    path = str(_model_dir(tmp_path, name))
    assert ModelConfig(model=path).quantization == method
    assert ModelConfig(model=path, quantization=method).quantization == method
    other = "awq" if method == "gptq" else "gptq"
    with pytest.raises(
        ValueError, match=f"quantization='{other}', but the checkpoint is .*'{method}'"
    ):
        ModelConfig(model=path, quantization=other)


def test_qwen_style_module_lists_are_accepted(tmp_path: Path) -> None:
    blocks = [
        ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"],
        ["self_attn.o_proj"],
        ["mlp.up_proj", "mlp.gate_proj"],
        ["mlp.down_proj"],
    ]
    path = _model_dir(tmp_path, "gptq-llama-int8-g64", modules_in_block_to_quantize=blocks)
    assert ModelConfig(model=str(path)).quantization == "gptq"


def test_plain_checkpoint(llama_dir: Path) -> None:
    assert ModelConfig(model=str(llama_dir)).quantization is None
    with pytest.raises(ValueError, match="quantization='gptq' needs a gptq checkpoint"):
        ModelConfig(model=str(llama_dir), quantization="gptq")
    with pytest.raises(
        ValueError, match="quantization must be one of gptq, awq, fp8, gguf; got 'fp4'"
    ):
        ModelConfig(model=str(llama_dir), quantization="fp4")


@pytest.mark.parametrize(
    "name,changes,message",
    [
        ("gptq-llama-int8-g64", {"bits": 3}, r"gptq checkpoint with bits=3 .*supported: 4, 8"),
        ("gptq-llama-int8-g64", {"group_size": 0}, r"group_size=0 .*positive group size, or -1"),
        (
            "gptq-llama-int8-g64",
            {"checkpoint_format": "gptq_v2"},
            r"checkpoint_format='gptq_v2' .*'gptq' \(v1 zero points\)",
        ),
        ("gptq-llama-int8-g64", {"checkpoint_format": "marlin"}, r"checkpoint_format='marlin'"),
        ("gptq-llama-int8-g64", {"pack_dtype": "int16"}, r"pack_dtype='int16' .*int32"),
        ("gptq-llama-int8-g64", {"lm_head": True}, r"lm_head=True .*unquantized lm_head"),
        ("gptq-llama-int8-g64", {"dynamic": {"-:.*mlp.*": {}}}, r"dynamic="),
        (
            "gptq-llama-int8-g64",
            {"modules_in_block_to_quantize": [["self_attn.q_proj", "self_attn.k_proj"]]},
            r"modules_in_block_to_quantize='without down_proj, gate_proj, o_proj, up_proj, "
            r"v_proj'",
        ),
        ("awq-qwen2-int4-g32", {"bits": 8}, r"awq checkpoint with bits=8 .*supported: 4\)"),
        ("awq-qwen2-int4-g32", {"version": "gemv"}, r"version='gemv' .*'gemm'"),
        ("awq-qwen2-int4-g32", {"zero_point": False}, r"zero_point=False"),
    ],
)
def test_unsupported_layouts_are_named(
    tmp_path: Path, name: str, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(model=str(_model_dir(tmp_path, name, **changes)))


def test_unknown_method_is_named_by_the_layer_registry(tmp_path: Path) -> None:
    path = _model_dir(tmp_path, "gptq-llama-int8-g64", quant_method="bitsandbytes")
    cfg = EngineConfig(model=str(path), device="cpu", load_format="dummy")
    assert cfg.model_config.quantization == "bitsandbytes"
    with pytest.raises(ValueError, match=r"'bitsandbytes'.*\(supported: awq, fp8, gptq\)"):
        load_model(cfg)


def test_cli_flag_is_generated() -> None:
    import argparse

    from pagedllm.config.cli_args import add_engine_args, engine_kwargs_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert (
        engine_kwargs_from_args(parser.parse_args(["--quantization", "awq"]))["quantization"]
        == "awq"
    )
    assert engine_kwargs_from_args(parser.parse_args([]))["quantization"] is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantization", "int3"])
