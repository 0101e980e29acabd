"""Model loading: Hugging Face names into fused / per-parameter loaders, precise errors,
sharded checkpoints, tied embeddings, the dummy format's fixed values, the quant hook."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from pagedllm.config import EngineConfig
from pagedllm.layers import quantization as quant
from pagedllm.models.loader import iter_checkpoint, load_model, load_weights
from tests.fixtures.tiny_models import ARCHES
from tests.layers.test_linear import _FakeConfig, _FakeMethod

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _cfg(path: Path, **kw: Any) -> EngineConfig:
    return EngineConfig(model=str(path), device="cpu", dtype="float32", **kw)


def _checkpoint(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("arch", ARCHES)
def test_every_parameter_equals_its_checkpoint_tensors(tiny_models: Any, arch: str) -> None:
    path = tiny_models(arch, sharded=True)  # several files + index.json
    assert (path / "model.safetensors.index.json").is_file()
    ckpt = _checkpoint(path)
    model = load_model(_cfg(path))
    for name, param in model.named_parameters():
        module, _, leaf_param = name.rpartition(".")
        prefix, _, leaf = module.rpartition(".")
        parts = [f"{prefix}.{p}.{leaf_param}" for p in FUSED[leaf]] if leaf in FUSED else [name]
        assert torch.equal(param, torch.cat([ckpt[p] for p in parts])), name
    tied = model.config.tie_word_embeddings
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    if not tied:
        assert torch.equal(model.lm_head.weight, ckpt["lm_head.weight"])


def _weights(path: Path, **changes: torch.Tensor | None) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in iter_checkpoint(path):
        if name in changes:
            new = changes.pop(name)
            if new is not None:
                yield name, new
            continue
        yield name, tensor
    yield from ((n, t) for n, t in changes.items() if t is not None)


@pytest.fixture
def llama(tiny_models: Any) -> tuple[Path, torch.nn.Module]:
    path = tiny_models("llama")
    return path, load_model(_cfg(path, load_format="dummy"))


def test_skipped_tensors(tiny_models: Any) -> None:
    path = tiny_models("qwen3")  # tied
    model = load_model(_cfg(path, load_format="dummy"))
    extra = {
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(16),
        "lm_head.weight": torch.zeros_like(model.lm_head.weight),
    }
    load_weights(model, _weights(path, **extra))
    assert torch.equal(
        model.model.embed_tokens.weight, _checkpoint(path)["model.embed_tokens.weight"]
    )


def test_unknown_tensor(llama: tuple[Path, torch.nn.Module]) -> None:
    path, model = llama
    extra = {"model.layers.0.self_attn.x_proj.weight": torch.ones(2)}
    msg = (
        r"tensor model\.layers\.0\.self_attn\.x_proj\.weight does not match any model parameter\.$"
    )
    with pytest.raises(ValueError, match=msg):
        load_weights(model, _weights(path, **extra))


def test_missing_tensors_are_named(llama: tuple[Path, torch.nn.Module]) -> None:
    path, model = llama
    drop = {"model.layers.1.self_attn.k_proj.weight": None, "model.norm.weight": None}
    with pytest.raises(ValueError) as err:
        load_weights(model, _weights(path, **drop))
    assert str(err.value) == (
        "Checkpoint is missing weights: model.layers.1.self_attn.k_proj.weight, model.norm.weight."
    )


def test_shape_mismatch_names_tensor_parameter_and_shapes(
    llama: tuple[Path, torch.nn.Module],
) -> None:
    path, model = llama
    k = "model.layers.0.self_attn.k_proj.weight"
    with pytest.raises(ValueError) as err:
        load_weights(model, _weights(path, **{k: torch.zeros(3, 64)}))
    shape = tuple(_checkpoint(path)[k].shape)
    assert str(err.value) == (
        f"Checkpoint tensor {k}: model.layers.0.self_attn.qkv_proj.weight (shard 'k') expects "
        f"shape {shape}, the checkpoint tensor has shape (3, 64)."
    )
    norm = "model.layers.0.input_layernorm.weight"
    with pytest.raises(ValueError, match=rf"^Checkpoint tensor {norm}: .*\(64,\).*\(65,\)\.$"):
        load_weights(model, _weights(path, **{norm: torch.zeros(65)}))


def test_missing_shard_file(tiny_models: Any, tmp_path: Path) -> None:
    path = shutil.copytree(tiny_models("llama", sharded=True), tmp_path / "m")
    next(path.glob("model-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="names missing shard files"):
        load_model(_cfg(path))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_dummy_init_values_and_parameter_order(tiny_models: Any, arch: str) -> None:
    """Benchmarks compare dummy-weight runs: parameter i keeps U(-1e-3, 1e-3) drawn with
    seed + i in this order (the order of the pre-refactor ``nn.Linear`` models)."""
    model = load_model(_cfg(tiny_models(arch), load_format="dummy", seed=5))
    names = [n for n, _ in model.named_parameters()]
    layer0 = [n.removeprefix("model.layers.0.") for n in names if n.startswith("model.layers.0.")]
    attn = ["self_attn.qkv_proj.weight"] + (["self_attn.qkv_proj.bias"] if arch == "qwen2" else [])
    attn += ["self_attn.o_proj.weight"]
    attn += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"] if arch == "qwen3" else []
    mlp = ["mlp.gate_up_proj.weight", "mlp.down_proj.weight"]
    assert layer0 == attn + mlp + ["input_layernorm.weight", "post_attention_layernorm.weight"]
    assert names[0] == "model.embed_tokens.weight"
    assert names[-1] == ("model.norm.weight" if arch == "qwen3" else "lm_head.weight")
    for i, (name, param) in enumerate(model.named_parameters()):
        if "norm" in name:
            assert bool((param == 1).all()), name
            continue
        gen = torch.Generator().manual_seed(5 + i)
        assert torch.equal(param, torch.empty_like(param).uniform_(-1e-3, 1e-3, generator=gen))


def _with_quant_config(src: Path, dst: Path, section: dict[str, Any]) -> Path:
    path = shutil.copytree(src, dst)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = section
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_quant_config_reaches_every_linear_layer(
    tiny_models: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _with_quant_config(tiny_models("llama"), tmp_path / "m", {"quant_method": "fake"})
    with pytest.raises(
        ValueError, match=r"quantization method 'fake'.*\(supported: awq, fp8, gptq\)"
    ):
        load_model(_cfg(path, load_format="dummy"))
    monkeypatch.setattr(quant, "QUANTIZATION_METHODS", {})
    quant.register_quantization_config("fake")(_FakeConfig)
    processed: list[Any] = []
    monkeypatch.setattr(
        _FakeMethod, "process_weights_after_loading", lambda self, layer: processed.append(layer)
    )
    model = load_model(_cfg(path, load_format="dummy"))
    fake = [m for m in model.modules() if isinstance(getattr(m, "quant_method", None), _FakeMethod)]
    per_layer = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert {m.prefix.rsplit(".", 1)[-1] for m in fake} == per_layer
    assert len(fake) == 4 * model.config.num_hidden_layers and processed == fake
    assert (
        fake[0].prefix == "model.layers.0.self_attn.qkv_proj"
        and fake[0].qweight.dtype == torch.int32
    )
    assert not fake[0].qweight.any()  # dummy init zero-fills integer parameters
    assert isinstance(model.lm_head.quant_method, quant.UnquantizedLinearMethod)
