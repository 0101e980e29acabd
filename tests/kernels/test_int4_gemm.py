"""GPU: the weight-only int4 / int8 GEMM against dequantize-then-matmul, and GPTQ / AWQ layers
and checkpoints running through it.

Run: ``python -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_int4_gemm.py -s``
(``-s`` shows the decode bandwidth of Qwen2.5-14B's shapes).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")

from pagedllm.kernels.int4_dispatch import pick_config  # noqa: E402
from pagedllm.kernels.int4_gemm import int_weight_linear  # noqa: E402
from pagedllm.layers.quantization.weight_only import canonicalize  # noqa: E402


def _random(
    k: int, n: int, bits: int, group: int, act_order: bool, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, ...]:
    """Packed weight (the kernel's layout) and its fp32 dequantized ``[K, N]`` reference."""
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group == -1 else k // group
    q = torch.randint(0, 1 << bits, (k, n), generator=gen)
    z = torch.randint(0, 1 << bits, (groups, n), generator=gen)
    s = (torch.rand(groups, n, generator=gen) / 30 + 1e-3).to(dtype)
    g = torch.arange(k) // (k if group == -1 else group)
    if act_order:
        g = g[torch.randperm(k, generator=gen)]
    w = (q - z[g]).float() * s.float()[g]
    packed, perm = canonicalize(q, g, bits, group, "test")
    dev = "cuda"
    return (
        packed.to(dev),
        z.to(torch.uint8).to(dev),
        s.to(dev),
        None if perm is None else perm.to(dev),
        w.to(dev),
    )


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 16, 37, 200])
@pytest.mark.parametrize(
    "k,n,bits,group,act_order",
    [
        (4096, 4096, 4, 128, False),
        (5120, 1000, 4, 128, True),  # act-order, N not a multiple of the tile
        (1280, 520, 4, 64, True),
        (1024, 3000, 4, 32, False),
        (136, 72, 4, -1, False),  # one group, K not a multiple of BLOCK_K
        (2048, 512, 8, 128, True),
        (192, 40, 4, 24, False),  # group size that no power-of-two block divides
    ],
)
def test_kernel_matches_dequantize_then_matmul(m, k, n, bits, group, act_order, dtype) -> None:  # type: ignore[no-untyped-def]
    packed, zeros, scales, perm, w = _random(k, n, bits, group, act_order, dtype, seed=m + k)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    ref = x.float() @ w + bias.float()
    out = int_weight_linear(x, packed, zeros, scales, perm, bits, group, bias)
    assert out.shape == (m, n) and out.dtype == dtype
    assert _rel_err(out, ref) < 1e-2


# Odd shapes, every group size and act-order, for each kernel variant of int4_gemm.py.
LAYOUTS = [
    (4096, 4096, 4, 128, False),
    (5120, 1000, 4, 128, True),  # act-order, N not a multiple of any tile
    (1280, 520, 4, 64, True),
    (1024, 3000, 4, 32, False),
    (136, 72, 4, -1, False),  # one group, K not a multiple of BLOCK_K
    (2048, 512, 8, 128, True),
    (192, 40, 4, 24, False),  # group size that no power-of-two block >= 16 divides
]
VARIANTS = {
    "gemv-m1": {"KERNEL": "gemv", "BLOCK_M": 1, "BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 1},
    "gemv-m1-serial": {"KERNEL": "gemv", "BLOCK_M": 1, "BLOCK_N": 512, "BLOCK_K": 32,
                       "SPLIT_K": 5, "REDUCE": "serial", "PREFETCH": True, "num_warps": 2},
    "gemv-m2-twopass": {"KERNEL": "gemv", "BLOCK_M": 2, "BLOCK_N": 256, "BLOCK_K": 64,
                        "SPLIT_K": 3, "REDUCE": "twopass", "PREFETCH": True},
    "gemv-m4-atomic": {"KERNEL": "gemv", "BLOCK_M": 4, "BLOCK_N": 128, "BLOCK_K": 64,
                       "SPLIT_K": 4, "REDUCE": "atomic", "num_stages": 3},
    "gemv-m4-serial": {"KERNEL": "gemv", "BLOCK_M": 4, "BLOCK_N": 64, "BLOCK_K": 64,
                       "SPLIT_K": 2, "REDUCE": "serial", "PREFETCH": True, "num_stages": 1},
    "dot": {"KERNEL": "dot", "BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 1},
    "dot-serial": {"KERNEL": "dot", "BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 64,
                   "SPLIT_K": 3, "REDUCE": "serial"},
    "dot-swap-twopass": {"KERNEL": "dot", "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128,
                         "SPLIT_K": 2, "REDUCE": "twopass", "SWAP_AB": True},
    "dot-swap-atomic": {"KERNEL": "dot", "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64,
                        "SPLIT_K": 2, "REDUCE": "atomic", "SWAP_AB": True, "num_warps": 8},
    "dot-large": {"KERNEL": "dot", "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64,
                  "SPLIT_K": 1, "num_warps": 8},
    "dequant": {"KERNEL": "dequant"},
}  # fmt: skip


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("k,n,bits,group,act_order", LAYOUTS)
def test_every_kernel_variant_matches_dequantize_then_matmul(  # type: ignore[no-untyped-def]
    variant, k, n, bits, group, act_order
) -> None:
    # Variants alternate fp16 / bf16 (compiles are the cost).
    dtype = torch.float16 if list(VARIANTS).index(variant) % 2 == 0 else torch.bfloat16
    packed, zeros, scales, perm, w = _random(k, n, bits, group, act_order, dtype, seed=k + n)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    cfg = VARIANTS[variant]
    for m in (1, 3, 6) if cfg["KERNEL"] == "gemv" else (1, 5, 37, 130):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = x.float() @ w + bias.float()
        for _ in range(2):  # the serial reduction's tile counters must be reset for a second call
            out = int_weight_linear(x, packed, zeros, scales, perm, bits, group, bias, cfg)
            assert out.shape == (m, n) and out.dtype == dtype
            assert _rel_err(out, ref) < 1e-2, (variant, m)


def test_serial_split_k_is_deterministic_and_graph_safe() -> None:
    """The serial reduction adds the slices in one order: eager calls and CUDA-graph replays
    give the same bits."""
    packed, zeros, scales, perm, _ = _random(5120, 1536, 4, 128, False, torch.float16, seed=3)
    x = torch.randn(1, 5120, device="cuda", dtype=torch.float16)
    cfg = {**VARIANTS["gemv-m1-serial"], "SPLIT_K": 8}
    first = int_weight_linear(x, packed, zeros, scales, perm, 4, 128, None, cfg)
    graph = torch.cuda.CUDAGraph()
    int_weight_linear(x, packed, zeros, scales, perm, 4, 128, None, cfg)
    with torch.cuda.graph(graph):
        captured = int_weight_linear(x, packed, zeros, scales, perm, 4, 128, None, cfg)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, first)
        assert torch.equal(
            int_weight_linear(x, packed, zeros, scales, perm, 4, 128, None, cfg), first
        )


def test_serial_reduction_past_its_tile_counters_becomes_two_pass() -> None:
    from pagedllm.kernels.int4_splitk import LOCKS, split_k_buffers

    dev = torch.device("cuda")
    assert split_k_buffers("serial", 2, LOCKS, 4, 8, torch.float16, dev)[0] == "serial"
    assert split_k_buffers("serial", 2, LOCKS + 1, 4, 8, torch.float16, dev)[0] == "twopass"
    assert split_k_buffers("serial", 1, 10, 4, 8, torch.float16, dev)[0] == "none"


@pytest.mark.parametrize("m", [1, 2, 4, 8, 16, 64, 256])
def test_default_dispatch_on_a_qwen_shape(m: int) -> None:
    """Whatever ``pick_config`` chooses (measured table or heuristic) is right."""
    packed, zeros, scales, perm, w = _random(5120, 7168, 4, 128, False, torch.float16, seed=m)
    x = torch.randn(m, 5120, device="cuda", dtype=torch.float16)
    out = int_weight_linear(x, packed, zeros, scales, perm, 4, 128)
    assert _rel_err(out, x.float() @ w) < 1e-2


@pytest.mark.parametrize("split_k", [1, 2, 4, 8])
def test_every_k_split_agrees(split_k: int) -> None:
    packed, zeros, scales, perm, w = _random(4096, 768, 4, 128, True, torch.bfloat16, seed=1)
    x = torch.randn(2, 4096, device="cuda", dtype=torch.bfloat16)
    cfg = {**pick_config(2, 768, 4096, 128, 4, x.device), "SPLIT_K": split_k}
    out = int_weight_linear(x, packed, zeros, scales, perm, 4, 128, None, cfg)
    assert _rel_err(out, x.float() @ w) < 1e-2


@pytest.mark.parametrize(
    "name",
    ["gptq-llama-int4-g32-actorder", "gptq-qwen2-int4-asym-g-1", "gptq-llama-int8-g64",
     "awq-qwen2-int4-g32"],
)  # fmt: skip
def test_checkpoint_layers_on_cuda_match_the_cpu_path(
    name: str, tmp_path: Path, tiny_tokenizer_dir: Path
) -> None:
    from pagedllm.config import EngineConfig
    from pagedllm.models.loader import load_model
    from tests.fixtures.quantized_models import materialize

    path = materialize(name, tmp_path / name, tiny_tokenizer_dir)
    cpu = load_model(EngineConfig(model=str(path), device="cpu", dtype="float32"))
    gpu = load_model(EngineConfig(model=str(path), device="cuda", dtype="bfloat16"))
    for attr in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        ref_layer = cpu.model.layers[0].get_submodule(attr)
        layer = gpu.model.layers[0].get_submodule(attr)
        x = torch.randn(5, ref_layer.input_size)
        ref = ref_layer(x)
        out = layer(x.to("cuda", torch.bfloat16))
        assert _rel_err(out.cpu(), ref) < 1e-2, attr


def test_llm_serves_a_gptq_checkpoint_on_cuda(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    from pagedllm import LLM, SamplingParams
    from tests.fixtures.quantized_models import REF_PROMPTS, materialize

    path = materialize("gptq-llama-int4-g32-actorder", tmp_path / "m", tiny_tokenizer_dir)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in REF_PROMPTS]
    # A fixed small pool: several engines share the GPU (as in tests/engine/test_gpu_e2e.py).
    graphs = LLM(str(path), device="cuda", num_gpu_blocks=256)
    with_graphs = [o.outputs[0].token_ids for o in graphs.generate(prompts, params, use_tqdm=False)]
    eager = LLM(str(path), device="cuda", num_gpu_blocks=256, enforce_eager=True)
    without = [o.outputs[0].token_ids for o in eager.generate(prompts, params, use_tqdm=False)]
    assert with_graphs == without and all(len(t) == 8 for t in without)


def test_decode_bandwidth_report() -> None:
    """Batch-1 time of Qwen2.5-14B-Instruct-GPTQ-Int4's layer shapes (group 128), printed."""
    shapes = {
        "qkv": (5120, 7168),
        "o": (5120, 5120),
        "gate_up": (5120, 27648),
        "down": (13824, 5120),
    }
    for name, (k, n) in shapes.items():
        packed, zeros, scales, perm, _ = _random(k, n, 4, 128, False, torch.bfloat16, seed=0)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            int_weight_linear(x, packed, zeros, scales, perm, 4, 128)
        torch.cuda.synchronize()
        iters = 50
        start = time.perf_counter()
        for _ in range(iters):
            int_weight_linear(x, packed, zeros, scales, perm, 4, 128)
        torch.cuda.synchronize()
        sec = (time.perf_counter() - start) / iters
        nbytes = packed.numel() * 4 + zeros.numel() + scales.numel() * 2
        cfg = pick_config(1, n, k, 128, 4, x.device)
        print(f"{name} K={k} N={n}: {sec * 1e6:.1f} us, {nbytes / sec / 1e12:.2f} TB/s {cfg}")
        assert sec > 0
