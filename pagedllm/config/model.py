"""`ModelConfig`: which model to run and how its weights are loaded.

The user names a Hugging Face directory; everything the directory itself says (layers, heads,
context limit, the checkpoint's dtype) is read once into ``arch`` (``ArchitectureConfig``).
``max_model_len`` is resolved here against that context limit. ``torch_dtype`` is derived too,
but ``dtype="auto"`` depends on the device, so ``EngineConfig`` resolves it, with
``resolve_torch_dtype``, once both groups exist.

``quantization`` is detected from the checkpoint's ``quantization_config`` (or named by the user,
then it must agree with the checkpoint); ``fp8`` on a plain checkpoint quantizes its linear
layers at load. The scheme's parameters that pagedllm cannot serve (a
bit width, a packing layout, a quantized ``lm_head``) are rejected here, torch-free and before any
weight is read, with a message naming the value and what is supported; the layer-side config
(``layers/quantization``) then builds the per-layer methods from the same section.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagedllm.config.architecture import ArchitectureConfig
from pagedllm.config.utils import DTYPE_NAMES, check_choice, config_error, torch_dtype_of

if TYPE_CHECKING:
    import torch

DEMO_MODEL_DIR = Path(__file__).parent.parent / "assets" / "demo-model"

LOAD_FORMATS = ("auto", "safetensors", "dummy")

# Weight quantization methods pagedllm serves (``quant_method`` of ``quantization_config``).
QUANTIZATION_METHODS = ("gptq", "awq", "fp8", "gguf")
GPTQ_BITS = (4, 8)
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_BITS = (4,)
FP8_ACTIVATION_SCHEMES = ("dynamic", "static")


@dataclass
class ModelConfig:
    """Model: the checkpoint directory, its tokenizer, dtype and context length."""

    model: str | None = field(
        default=None,
        metadata={
            "help": "Hugging Face model directory",
            "default_help": "the bundled demo model",
            "dest": "model_flag",  # `generate` and `serve` also take MODEL as a positional
        },
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "tokenizer directory", "default_help": "the model's directory"},
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "weights and activations; auto: float32 on CPU, on GPU the checkpoint's "
            "float16 / bfloat16 (bfloat16 for float32 checkpoints)",
            "choices": ("auto", *DTYPE_NAMES),
        },
    )
    max_model_len: int | None = field(
        default=None,
        metadata={
            "help": "longest sequence (prompt + output) in tokens",
            "default_help": "the model's context limit, capped by its sliding window",
        },
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "seed of the random weights of --load-format dummy (requests seed their "
            "own sampling)"
        },
    )
    load_format: str = field(
        default="auto",
        metadata={
            "help": "auto / safetensors: the checkpoint's weights; dummy: random weights of "
            "the real shapes (benchmarks)",
            "choices": LOAD_FORMATS,
        },
    )
    quantization: str | None = field(
        default=None,
        metadata={
            "help": "weight quantization method of the checkpoint; must agree with its "
            "config.json quantization_config (gguf: the model is a .gguf file, dequantized at "
            "load; fp8 on a plain bf16/fp16/fp32 checkpoint or a .gguf file: its linear weights "
            "quantized to fp8 e4m3 at load, per output channel, activations per token)",
            "default_help": "detected from config.json's quantization_config",
            "choices": QUANTIZATION_METHODS,
        },
    )
    # Derived:
    arch: ArchitectureConfig = field(init=False, repr=False)
    # The GGUF file the weights are read from when ``model`` is one (None otherwise).
    gguf_file: str | None = field(init=False, default=None)
    # Set by EngineConfig (dtype "auto" depends on the device); None on a ModelConfig alone.
    torch_dtype: torch.dtype = field(init=False, default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = str(DEMO_MODEL_DIR)
        path = Path(os.path.expanduser(self.model))
        if path.is_file() and path.suffix == ".gguf":
            # A GGUF file: its metadata as a Hugging Face directory (config/gguf_file.py); the
            # weights are read from the file itself at load.
            from pagedllm.config.gguf_file import gguf_model_dir

            self.gguf_file = str(path)
            self.model = str(path)
            gguf_dir = gguf_model_dir(path)
            if self.tokenizer is None:
                self.tokenizer = str(gguf_dir)
            self._finish(gguf_dir)
            return
        if not path.is_dir():
            raise ValueError(
                f"Model {self.model!r} is not a local directory. pagedllm loads Hugging Face "
                "model directories from disk (config.json, *.safetensors, tokenizer files)."
            )
        self.model = str(path)
        if self.tokenizer is None:
            self.tokenizer = self.model
        self._finish(path)

    def _finish(self, path: Path) -> None:
        """Read the architecture of model directory ``path``; check the remaining fields."""
        self.arch = ArchitectureConfig.from_dir(path)
        check_choice(self, "dtype")
        limit = self.arch.context_limit
        if self.max_model_len is None:
            self.max_model_len = limit
        elif not 1 <= self.max_model_len <= limit:
            raise config_error(
                f"max_model_len must be in [1, {limit}] (the model's context limit), "
                f"got {self.max_model_len}."
            )
        check_choice(self, "load_format")
        if self.gguf_file is not None:
            if self.quantization not in (None, "gguf", "fp8"):
                raise config_error(
                    f"quantization={self.quantization!r}, but the model is a GGUF file "
                    "(supported: gguf, or fp8 to quantize its dequantized weights at load)."
                )
            self.quantization = self.quantization or "gguf"
            return
        self.quantization = resolve_quantization(self.quantization, self.arch.raw)


def resolve_quantization(requested: str | None, raw: dict[str, Any]) -> str | None:
    """The quantization method of a checkpoint whose ``config.json`` is ``raw``.

    ``requested`` (the user's ``quantization``) must match the checkpoint's ``quant_method``;
    on a plain checkpoint only ``fp8`` can be requested (quantized at load). A ``quant_method``
    other than gptq / awq / fp8 is returned as it is: the layers' registry
    (``layers/quantization``) is the judge of those and names what it supports.
    """
    if requested is not None and requested not in QUANTIZATION_METHODS:
        raise config_error(
            f"quantization must be one of {', '.join(QUANTIZATION_METHODS)}; got {requested!r}."
        )
    if requested == "gguf":
        raise config_error("quantization='gguf' needs a .gguf model file.")
    section = raw.get("quantization_config") or None
    if section is None:
        if requested == "fp8":
            return "fp8"  # quantized at load
        if requested is not None:
            raise config_error(
                f"quantization={requested!r} needs a {requested} checkpoint (a config.json "
                "quantization_config); a plain checkpoint can only be quantized at load to "
                "fp8 (quantization='fp8')."
            )
        return None
    method = str(section.get("quant_method", "")).lower()
    if requested is not None and requested != method:
        raise config_error(
            f"quantization={requested!r}, but the checkpoint is quantized with {method!r}."
        )
    if method == "gptq":
        _check_gptq(section)
    elif method == "awq":
        _check_awq(section)
    elif method == "fp8":
        _check_fp8(section)
    return method or None


def _unsupported(method: str, what: str, value: Any, supported: str) -> ValueError:
    return config_error(
        f"{method} checkpoint with {what}={value!r} is not supported (supported: {supported})."
    )


def _check_group_size(method: str, section: dict[str, Any]) -> None:
    group = section.get("group_size", -1)
    if not isinstance(group, int) or isinstance(group, bool) or (group <= 0 and group != -1):
        raise _unsupported(method, "group_size", group, "a positive group size, or -1")


def _check_gptq(section: dict[str, Any]) -> None:
    """GPTQ: 4 / 8 bits, the v1 ``gptq`` layout in int32 words, linear layers only."""
    bits = section.get("bits")
    if bits not in GPTQ_BITS:
        raise _unsupported("gptq", "bits", bits, ", ".join(map(str, GPTQ_BITS)))
    _check_group_size("gptq", section)
    fmt = section.get("checkpoint_format", section.get("format", "gptq"))
    if str(fmt).lower() != "gptq":
        raise _unsupported("gptq", "checkpoint_format", fmt, "'gptq' (v1 zero points)")
    pack = section.get("pack_dtype", "int32")
    if str(pack) not in ("int32", "torch.int32"):
        raise _unsupported("gptq", "pack_dtype", pack, "int32")
    if section.get("lm_head"):
        raise _unsupported("gptq", "lm_head", True, "an unquantized lm_head")
    if section.get("dynamic"):
        raise _unsupported("gptq", "dynamic", "per-module overrides", "one setting for all")
    blocks = section.get("modules_in_block_to_quantize")
    if blocks:
        listed = {name.rsplit(".", 1)[-1] for group in blocks for name in group}
        left_dense = sorted(set(_PROJECTIONS) - listed)
        if left_dense:
            raise _unsupported(
                "gptq",
                "modules_in_block_to_quantize",
                f"without {', '.join(left_dense)}",
                "every attention and MLP projection quantized",
            )


def _check_awq(section: dict[str, Any]) -> None:
    """AWQ: 4 bits, the GEMM layout, with zero points."""
    bits = section.get("bits", section.get("w_bit"))
    if bits not in AWQ_BITS:
        raise _unsupported("awq", "bits", bits, ", ".join(map(str, AWQ_BITS)))
    if "group_size" not in section and "q_group_size" in section:
        section = {**section, "group_size": section["q_group_size"]}
    _check_group_size("awq", section)
    version = section.get("version", section.get("format", "gemm"))
    if str(version).lower() != "gemm":
        raise _unsupported("awq", "version", version, "'gemm'")
    if not section.get("zero_point", True):
        raise _unsupported("awq", "zero_point", False, "zero_point=true")


def _check_fp8(section: dict[str, Any]) -> None:
    """fp8: e4m3 weights with per-tensor or per-channel scales; dynamic or static activations."""
    scheme = section.get("activation_scheme", "dynamic")
    if scheme not in FP8_ACTIVATION_SCHEMES:
        raise _unsupported("fp8", "activation_scheme", scheme, ", ".join(FP8_ACTIVATION_SCHEMES))
    block = section.get("weight_block_size")
    if block is not None:
        raise _unsupported(
            "fp8", "weight_block_size", block, "per-tensor or per-channel weight scales (null)"
        )
    fmt = section.get("fmt", "e4m3")
    if str(fmt).lower() != "e4m3":
        raise _unsupported("fp8", "fmt", fmt, "'e4m3'")


def resolve_torch_dtype(dtype: str, hf_dtype: torch.dtype | None, device_type: str) -> torch.dtype:
    """The torch dtype for a ``dtype`` setting on a device of type ``device_type``.

    ``auto``: float32 on CPU (the reference path); on a GPU the checkpoint's dtype, except that
    float32 (or unknown) checkpoints run in bfloat16.
    """
    import torch

    if dtype != "auto":
        return torch_dtype_of(dtype)
    if device_type == "cpu":
        return torch.float32
    return torch.bfloat16 if hf_dtype in (None, torch.float32) else hf_dtype
