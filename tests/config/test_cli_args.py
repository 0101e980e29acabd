"""The engine flags generated from the config fields, and how each command reads them back."""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pagedllm.bench.presets import bench_engine_kwargs
from pagedllm.config import DEMO_MODEL_DIR, EngineConfig
from pagedllm.config.cli_args import (
    add_config_args,
    add_engine_args,
    engine_kwargs_from_args,
    flag_names,
)
from pagedllm.config.engine import CONFIG_GROUPS
from pagedllm.config.utils import user_fields
from pagedllm.entrypoints.cli import build_parser, generate_engine_kwargs, main
from pagedllm.entrypoints.openai.cli_serve import serve_engine_kwargs

# Flags and the flat keywords they must give, in every engine command.
TOKENIZER_DIR = str(DEMO_MODEL_DIR)  # a directory: any other name is a hub id
FLAGS = shlex.split(
    "--device cpu --dtype half --max-model-len 100 --seed 3 --load-format dummy "
    f"--tokenizer {TOKENIZER_DIR} --download-dir /nonexistent/cache --hf-token hf_t "
    "--trust-remote-code --block-size 32 --gpu-memory-utilization 0.5 "
    "--num-gpu-blocks-override 12 --kv-cache-memory-bytes 4096 --no-enable-prefix-caching "
    "--max-num-seqs 8 --max-num-batched-tokens 300 --scheduling-policy priority "
    "--no-enable-chunked-prefill --async-scheduling --attention-backend torch_native "
    "--enforce-eager -tp 1 --data-parallel-size 1 --distributed-executor-backend mp "
    "--kv-cache-dtype auto --max-num-encoder-tokens 64 --limit-mm-per-prompt '{\"image\": 2}' "
    "--allowed-local-media-path /nonexistent/media"
)
EXPECTED: dict[str, Any] = {
    "device": "cpu",
    "dtype": "half",
    "max_model_len": 100,
    "seed": 3,
    "load_format": "dummy",
    "tokenizer": TOKENIZER_DIR,
    "quantization": None,  # must agree with a quantized checkpoint (tests/models)
    "revision": None,  # hub ids only (tests/config/test_hub.py)
    "tokenizer_revision": None,
    "download_dir": "/nonexistent/cache",
    "hf_token": "hf_t",
    "trust_remote_code": True,
    "block_size": 32,
    "gpu_memory_utilization": 0.5,
    "num_gpu_blocks": 12,
    "kv_cache_memory_bytes": 4096,
    "enable_prefix_caching": False,
    "max_num_seqs": 8,
    "max_num_batched_tokens": 300,
    "max_num_encoder_tokens": 64,
    "limit_mm_per_prompt": '{"image": 2}',
    "allowed_local_media_path": "/nonexistent/media",
    "scheduling_policy": "priority",
    "enable_chunked_prefill": False,
    "async_scheduling": True,
    "attention_backend": "torch_native",
    "enforce_eager": True,
    "tensor_parallel_size": 1,
    "data_parallel_size": 1,
    "distributed_executor_backend": "mp",
    "kv_cache_dtype": "auto",
}


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _check(kwargs: dict[str, Any], model: str) -> None:
    assert kwargs == {"model": model, **EXPECTED}
    assert EngineConfig(**kwargs) == EngineConfig(model=model, **EXPECTED)


def test_generate_flags(arch_dir: str) -> None:
    _check(generate_engine_kwargs(parse(["generate", arch_dir, "hi", *FLAGS])), arch_dir)
    _check(generate_engine_kwargs(parse(["generate", "hi", "--model", arch_dir, *FLAGS])), arch_dir)
    # MODEL before PROMPT wins over --model (as before the flags were generated).
    args = parse(["generate", arch_dir, "hi", "--model", "elsewhere", *FLAGS])
    _check(generate_engine_kwargs(args), arch_dir)


def test_serve_flags(arch_dir: str) -> None:
    _check(serve_engine_kwargs(parse(["serve", arch_dir, *FLAGS])), arch_dir)
    _check(serve_engine_kwargs(parse(["serve", "--model", arch_dir, *FLAGS])), arch_dir)
    args = parse(["serve", arch_dir, "--model", "elsewhere", *FLAGS])
    _check(serve_engine_kwargs(args), arch_dir)


@pytest.mark.parametrize("command", ["throughput", "latency"])
def test_bench_flags(command: str, arch_dir: str) -> None:
    _check(bench_engine_kwargs(parse(["bench", command, "--model", arch_dir, *FLAGS])), arch_dir)


def test_no_flags_give_the_field_defaults(arch_dir: str) -> None:
    kwargs = generate_engine_kwargs(parse(["generate", "hi"]))
    assert kwargs["model"] is None and kwargs["max_num_seqs"] == 256
    assert EngineConfig(**kwargs) == EngineConfig()
    assert EngineConfig(**serve_engine_kwargs(parse(["serve"]))) == EngineConfig()


def test_every_user_field_has_a_flag_with_help() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    by_dest = {a.dest: a for a in parser._actions}
    names = [f.name for cls in CONFIG_GROUPS.values() for f in user_fields(cls)]
    assert len(names) == len(set(names)) == len(EXPECTED) + 1
    for cls in CONFIG_GROUPS.values():
        for f in user_fields(cls):
            action = by_dest["model_flag" if f.name == "model" else f.name]
            assert set(flag_names(f)) <= set(action.option_strings)
            assert action.help and f.metadata["help"] in action.help and "(default: " in action.help
    spelled = {s for a in parser._actions for s in a.option_strings}
    for flag in ("--model", "--num-gpu-blocks-override", "-tp", "-dp", "--enforce-eager"):
        assert flag in spelled
    assert "--num-gpu-blocks" not in spelled and "--model-flag" not in spelled


def test_generate_help_shows_groups_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for cls in CONFIG_GROUPS.values():
        assert f"{cls.__name__}:" in out
    assert "--block-size BLOCK_SIZE tokens per KV-cache block (a power of two) (default: 16)" in out
    assert "--max-num-seqs MAX_NUM_SEQS" in out and "(default: 256)" in out
    assert "--model MODEL Hugging Face model directory (default: the bundled demo model)" in out


@pytest.mark.parametrize("flag,value", [("", True), ("--enable-prefix-caching", True)])
def test_prefix_caching_on(flag: str, value: bool) -> None:
    args = parse(["generate", "hi", *([flag] if flag else [])])
    assert engine_kwargs_from_args(args)["enable_prefix_caching"] is value


def test_prefix_caching_off() -> None:
    args = parse(["generate", "hi", "--no-enable-prefix-caching"])
    assert engine_kwargs_from_args(args)["enable_prefix_caching"] is False


def test_async_scheduling_has_three_states() -> None:
    def value(*flags: str) -> bool | None:
        return engine_kwargs_from_args(parse(["generate", "hi", *flags]))["async_scheduling"]

    assert (value(), value("--async-scheduling"), value("--no-async-scheduling")) == (
        None,
        True,
        False,
    )


@pytest.mark.parametrize("dtype", ["auto", "float32", "float", "bfloat16", "float16", "half"])
def test_dtype_choices(dtype: str) -> None:
    assert engine_kwargs_from_args(parse(["generate", "hi", "--dtype", dtype]))["dtype"] == dtype


@pytest.mark.parametrize(
    "argv",
    [
        ["--dtype", "int8"],
        ["--device", "tpu"],
        ["--scheduling-policy", "lifo"],
        ["--load-format", "pickle"],
        ["--block-size", "sixteen"],
        ["--gpu-memory-utilization", "most"],
    ],
)
def test_flag_values_checked_by_argparse(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse(["generate", "hi", *argv])


def test_tensor_parallel_is_a_clear_error(
    arch_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        engine_kwargs_from_args(parse(["generate", "hi", "-tp", "2"]))["tensor_parallel_size"] == 2
    )
    assert main(["generate", arch_dir, "hi", "--device", "cpu", "-tp", "3"]) == 1
    err = capsys.readouterr().err
    assert "error: Invalid EngineConfig: tensor_parallel_size=3 does not divide" in err
    assert main(["generate", arch_dir, "hi", "--device", "cpu", "-dp", "2"]) == 1
    assert "data_parallel_size=2: data parallelism is a pagedllm serve option" in (
        capsys.readouterr().err
    )


def test_serve_takes_tokenizer_and_enforce_eager_once() -> None:
    args = parse(["serve", "--tokenizer", "tok", "--enforce-eager", "--tokenizer-pool-size", "2"])
    kwargs = serve_engine_kwargs(args)
    assert (kwargs["tokenizer"], kwargs["enforce_eager"], args.tokenizer_pool_size) == (
        "tok",
        True,
        2,
    )


def test_bench_model_config_preset_and_tokenizer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(tmp_path))
    args = parse(["bench", "latency", "--model-config", "qwen3-0.6b", "--tokenizer", "real-tok"])
    kwargs = bench_engine_kwargs(args)
    assert kwargs["tokenizer"] == "real-tok" and kwargs["load_format"] == "dummy"
    assert Path(kwargs["model"]).parent.parent == tmp_path


@dataclass
class _Toy:
    """Toy: fields of every supported kind."""

    count: int = field(default=2, metadata={"help": "how many"})
    ratio: float | None = field(default=None, metadata={"help": "a ratio", "default_help": "1/2"})
    name: str = field(default="a", metadata={"help": "a name", "choices": ("a", "b")})
    on: bool = field(default=True, metadata={"help": "a switch", "flag": "--switch"})


def test_types_from_annotations() -> None:
    parser = argparse.ArgumentParser()
    add_config_args(parser, _Toy)
    args = parser.parse_args(["--count", "3", "--ratio", "0.25", "--name", "b", "--no-switch"])
    assert (args.count, args.ratio, args.name, args.on) == (3, 0.25, "b", False)
    assert parser.parse_args([]).ratio is None
    assert "a ratio (default: 1/2)" in " ".join(parser.format_help().split())


@pytest.mark.parametrize(
    "annotation,bad,needle",
    [
        ("int | None", field(default=None, metadata={"help": "h"}), "no default_help"),
        ("int", field(default=1, metadata={}), "needs a default and a help"),
        ("list[int]", field(default_factory=list, metadata={"help": "h"}), "No CLI flag"),
    ],
)
def test_undocumented_or_untyped_fields_are_refused(annotation: str, bad: Any, needle: str) -> None:
    toy = dataclass(type("Bad", (), {"__annotations__": {"x": annotation}, "x": bad}))
    with pytest.raises(TypeError, match=f"'x'.*{needle}|{needle}.*'x'"):
        add_config_args(argparse.ArgumentParser(), toy)
