"""GPTQ and AWQ checkpoints written by a real quantizer (GPTQModel) serve like transformers.

Two references, both in fp32 on CPU:

* what transformers (+ optimum + gptqmodel) computed from the same checkpoint directory,
  recorded when the checkpoint was made (``tests/fixtures/quantized_models.py``): greedy tokens
  equal token for token, log-probabilities close;
* an independent one computed here: the packed tensors dequantized by :func:`spec_dequantize`
  (numpy, written from the format descriptions, sharing no code with ``pagedllm``) into a plain
  transformers model of the same architecture.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedllm import LLM, SamplingParams
from tests.fixtures.quantized_models import (
    REF_NEW_TOKENS,
    REF_PROMPTS,
    REF_SEQUENCE,
    SPECS,
    load_reference,
    materialize,
)
from tests.fixtures.tiny_models import hf_greedy, hf_logprobs

NAMES = sorted(SPECS)
LOGPROB_ATOL = 2e-3
TOP = 5


@pytest.fixture(scope="module")
def quant_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Any:
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = materialize(name, tmp_path_factory.mktemp(name), tiny_tokenizer_dir)
        return built[name]

    return get


def _greedy_and_logprobs(model_dir: Path) -> tuple[list[list[int]], torch.Tensor]:
    """pagedllm's greedy tokens of REF_PROMPTS and the top-``TOP`` prompt logprobs of
    REF_SEQUENCE as a dense [len - 1, vocab] tensor (-inf where not returned)."""
    llm = LLM(str(model_dir), device="cpu", dtype="float32")
    greedy = SamplingParams(temperature=0.0, max_tokens=REF_NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in REF_PROMPTS], greedy, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=TOP)
    out = llm.generate([{"prompt_token_ids": REF_SEQUENCE}], params, use_tqdm=False)[0]
    assert out.prompt_logprobs is not None
    rows = torch.full((len(REF_SEQUENCE) - 1, 512), float("-inf"))
    for pos in range(1, len(REF_SEQUENCE)):
        entry = out.prompt_logprobs[pos]
        assert entry is not None
        for tok, lp in entry.items():
            rows[pos - 1, tok] = lp.logprob
    return tokens, rows


def _assert_logprobs_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Every logprob pagedllm returned equals the reference's; its top-TOP are the reference's."""
    got = torch.isfinite(ours)
    assert got.any(dim=1).all()
    torch.testing.assert_close(ours[got], ref[got], atol=LOGPROB_ATOL, rtol=0)
    for row in range(ours.shape[0]):
        ref_top = set(torch.topk(ref[row], TOP).indices.tolist())
        assert ref_top <= set(torch.nonzero(got[row]).flatten().tolist()), row


@pytest.mark.parametrize("name", NAMES)
def test_matches_transformers_with_gptqmodel(quant_dir: Any, name: str) -> None:
    ref = load_reference(name)
    tokens, logprobs = _greedy_and_logprobs(quant_dir(name))
    assert tokens == ref["greedy"].tolist()
    _assert_logprobs_close(logprobs, ref["logprobs"][:-1])


# ---------------------------------------------------------------- independent reference

AWQ_COLUMN_OF_VALUE = (0, 2, 4, 6, 1, 3, 5, 7)  # value i of a word is column AWQ_ORDER[i]


def _values(words: torch.Tensor, bits: int) -> np.ndarray:
    """[..., W] int32 words -> [..., W, 32 / bits] unsigned values, lowest bits first."""
    u = words.numpy().view(np.uint32).astype(np.int64)
    return np.stack([(u >> (bits * i)) & ((1 << bits) - 1) for i in range(32 // bits)], -1)


def spec_dequantize(
    kind: str, tensors: dict[str, torch.Tensor], bits: int, group_size: int
) -> torch.Tensor:
    """The nn.Linear ``weight`` [N, K] of one quantized layer, from the format descriptions."""
    scales = tensors["scales"].float().numpy()
    if kind == "gptq":
        q = _values(tensors["qweight"], bits)  # [K/pf, N, pf]: value i is input row r*pf + i
        q = q.transpose(0, 2, 1).reshape(-1, q.shape[1])  # [K, N]
        # v1: the writer stored pack(zeros) - 0x1111..., as int32 words (borrows included).
        offset = sum(1 << (bits * i) for i in range(32 // bits))
        words = (tensors["qzeros"].numpy().view(np.uint32).astype(np.int64) + offset) % (1 << 32)
        z = _values(torch.from_numpy(words.astype(np.uint32).view(np.int32)), bits)
        z = z.reshape(z.shape[0], -1)  # [G, N], natural order
        g = tensors["g_idx"].numpy().astype(np.int64)
    else:

        def cols(words: torch.Tensor) -> np.ndarray:
            v = _values(words, 4)  # [R, N/8, 8]
            out = np.empty_like(v)
            for i, col in enumerate(AWQ_COLUMN_OF_VALUE):
                out[:, :, col] = v[:, :, i]
            return out.reshape(v.shape[0], -1)

        q, z = cols(tensors["qweight"]), cols(tensors["qzeros"])
        k = q.shape[0]
        g = np.arange(k) // (k if group_size == -1 else group_size)
    w = (q - z[g]).astype(np.float32) * scales[g]  # [K, N]
    return torch.from_numpy(np.ascontiguousarray(w.T))


def _dense_twin(quantized: Path, out: Path) -> Path:
    """A plain fp32 transformers checkpoint with ``quantized``'s layers spec-dequantized."""
    out.mkdir()
    cfg = json.loads((quantized / "config.json").read_text())
    section = cfg.pop("quantization_config")
    kind, bits, group = section["quant_method"], section["bits"], section["group_size"]
    ckpt = load_file(str(quantized / "model.safetensors"))
    layers = {n.rsplit(".", 1)[0] for n in ckpt if n.endswith(".qweight")}
    dense: dict[str, torch.Tensor] = {}
    for name, tensor in ckpt.items():
        module, _, leaf = name.rpartition(".")
        if module not in layers:
            dense[name] = tensor.float()
        elif leaf == "qweight":
            parts = {
                k: ckpt[f"{module}.{k}"]
                for k in ("qweight", "qzeros", "scales", "g_idx")
                if f"{module}.{k}" in ckpt
            }
            dense[f"{module}.weight"] = spec_dequantize(kind, parts, bits, group)
        elif leaf == "bias":
            dense[name] = tensor.float()
    cfg["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg))
    save_file(dense, str(out / "model.safetensors"))
    for file in quantized.iterdir():
        if file.name.startswith("tokenizer") or file.name == "special_tokens_map.json":
            (out / file.name).write_bytes(file.read_bytes())
    return out


@pytest.mark.parametrize("name", NAMES)
def test_matches_spec_dequantized_dense_transformers(
    quant_dir: Any, name: str, tmp_path: Path
) -> None:
    dense = _dense_twin(quant_dir(name), tmp_path / "dense")
    tokens, logprobs = _greedy_and_logprobs(quant_dir(name))
    assert tokens == hf_greedy(dense, REF_PROMPTS, REF_NEW_TOKENS)
    _assert_logprobs_close(logprobs, hf_logprobs(dense, REF_SEQUENCE)[:-1])


@pytest.mark.parametrize("name", NAMES)
def test_recorded_reference_is_what_transformers_computes(
    quant_dir: Any, name: str, tmp_path: Path
) -> None:
    """The recorded outputs are reproducible (only where gptqmodel + optimum are installed:
    ``pip install --no-deps gptqmodel optimum`` plus the packages the fixture module names).
    In a subprocess: importing gptqmodel patches transformers and the environment."""
    if importlib.util.find_spec("gptqmodel") is None or importlib.util.find_spec("optimum") is None:
        pytest.skip("gptqmodel / optimum are not installed")
    out = tmp_path / "live.safetensors"
    code = (
        "import sys; from pathlib import Path; from safetensors.torch import save_file; "
        "from tests.fixtures.quantized_models import transformers_reference; "
        "save_file(transformers_reference(Path(sys.argv[1])), sys.argv[2])"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run(
        [sys.executable, "-c", code, str(quant_dir(name)), str(out)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root), "GPTQMODEL_CPU_WORKERS": "2"},
        check=True,
        capture_output=True,
        timeout=600,
    )
    live, recorded = load_file(str(out)), load_reference(name)
    assert torch.equal(live["greedy"], recorded["greedy"])
    torch.testing.assert_close(live["logprobs"], recorded["logprobs"], atol=1e-4, rtol=0)
