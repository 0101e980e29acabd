"""Train the tiny code-completion demo model that ships in ``pagedllm/assets/demo-model``.

The corpus is the ``.py`` source of the standard library of the Python running this script
(``sysconfig.get_paths()["stdlib"]``, ``site-packages``/``dist-packages`` skipped), plus short
chat-formatted examples derived from documented functions in it ("write a function that ...").
About 3% of the files, chosen by a hash of their relative path, are held out for validation.

Steps: train a byte-level BPE tokenizer (``tokenizers``), train a ``LlamaForCausalLM`` from
scratch (bf16 autocast on GPU, AdamW, cosine schedule), keep the weights with the best held-out
loss, and save a normal Hugging Face model directory (fp16 ``model.safetensors``, ``config.json``,
``tokenizer.json``, ``tokenizer_config.json``, ``generation_config.json``) plus
``training_log.json``.  The defaults reproduce the shipped model::

    python3 tools/train_demo_model.py --out pagedllm/assets/demo-model
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import multiprocessing
import platform
import shlex
import sys
import sysconfig
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import jinja2
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

EOS, BOS, PAD = "<|endoftext|>", "<|bos|>", "<|pad|>"
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
SPECIAL_TOKENS = [EOS, BOS, PAD, *CHAT_TOKENS]  # ids 0..6, in this order
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_TEMPLATE = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(CHAT_TEMPLATE)
SYSTEM_PROMPT = "You are a helpful Python coding assistant."
SAMPLE_PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\n\ndef list_python_files(root):\n",
    "class Stack:\n    def __init__(self):\n",
]
SAMPLE_CHAT = [{"role": "user", "content": "Write a Python function `is_prime(n)`: "
                "Return True if n is a prime number."}]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("pagedllm/assets/demo-model"))
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-windows", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=896)
    p.add_argument("--val-percent", type=int, default=3)
    p.add_argument("--max-files", type=int, default=0, help="use only the first N files (smoke)")
    p.add_argument("--max-train-seconds", type=float, default=360.0,
                   help="safety stop for the training loop; logged if it triggers")
    return p.parse_args()


def read_corpus(max_files: int) -> tuple[Path, list[tuple[str, str]]]:
    """(relative path, text) for every UTF-8 ``.py`` file of the stdlib, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    paths = sorted(
        p for p in root.rglob("*.py")
        if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
    )
    docs: list[tuple[str, str]] = []
    for path in paths[: max_files or None]:
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip() and len(text) < 500_000:
            docs.append((path.relative_to(root).as_posix(), text))
    return root, docs


def is_val(rel: str, percent: int) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 100 < percent


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """Render with the same Jinja settings Hugging Face uses; the BOS id is added separately."""
    return _TEMPLATE.render(
        messages=messages, bos_token="", add_generation_prompt=add_generation_prompt
    )


def chat_examples(doc: tuple[str, str]) -> list[str]:
    """Turn documented functions into 'user asks, assistant writes the function' chats."""
    rel, text = doc
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError):
        return []
    lines = text.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node)
        src = textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno])).rstrip()
        if not doc or node.name.startswith("test") or not 80 <= len(src) <= 2000:
            continue
        summary = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
        signature = f"{node.name}({ast.unparse(node.args)})"
        h = int(hashlib.sha1(f"{rel}:{node.lineno}".encode()).hexdigest(), 16)
        user = (f"Write a Python function `{signature}`: {summary}" if h % 2 == 0
                else f"{summary}\nImplement it as `{node.name}` in Python.")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": src}]
        if h % 3 == 0:
            messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
        out.append(render_chat(messages))
    return out


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def encode_stream(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    """One long id stream: ``<|bos|> doc <|endoftext|>`` for each document."""
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.append(bos)
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


def lm_loss(model: LlamaForCausalLM, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    batch = batch.to(device, dtype=torch.long, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, val: torch.Tensor, args: argparse.Namespace,
             device: torch.device) -> float:
    n = min(args.eval_windows, (len(val) - 1) // args.seq_len)
    windows = val[: n * args.seq_len + 1].unfold(0, args.seq_len + 1, args.seq_len)
    model.eval()
    losses = [lm_loss(model, windows[i : i + args.batch_size], device).item() * len(
        windows[i : i + args.batch_size]) for i in range(0, n, args.batch_size)]
    model.train()
    return sum(losses) / n


def train(model: LlamaForCausalLM, train_ids: torch.Tensor, val_ids: torch.Tensor,
          args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda",
    )
    gen = torch.Generator().manual_seed(args.seed)
    offsets = torch.arange(args.seq_len + 1)
    best: dict[str, Any] = {"val_loss": float("inf"), "step": -1, "state": None}
    history: list[dict[str, float]] = []
    recent: list[float] = []
    start = time.time()
    step = 0
    stopped_early = False
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, args)
        starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch_size,),
                               generator=gen)
        loss = lm_loss(model, train_ids[starts[:, None] + offsets], device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = [*recent[-49:], loss.item()]
        elapsed = time.time() - start
        out_of_time = elapsed > args.max_train_seconds
        if step % args.eval_every == 0 or step == args.steps or out_of_time:
            val_loss = evaluate(model, val_ids, args, device)
            train_loss = sum(recent) / len(recent)
            history.append({"step": step, "train_loss": round(train_loss, 4),
                            "val_loss": round(val_loss, 4), "elapsed_s": round(elapsed, 1)})
            print(f"step {step:5d}  lr {lr_at(step - 1, args):.2e}  train {train_loss:.4f}  "
                  f"val {val_loss:.4f}  ppl {math.exp(val_loss):.2f}  {elapsed:6.1f}s", flush=True)
            if val_loss < best["val_loss"]:
                state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                best = {"val_loss": val_loss, "step": step, "state": state}
        if out_of_time:
            stopped_early = True
            print(f"stopping: --max-train-seconds {args.max_train_seconds} reached", flush=True)
            break
    model.load_state_dict(best.pop("state"))
    return {"steps_run": step, "stopped_early": stopped_early,
            "train_seconds": round(time.time() - start, 1), "history": history,
            "best_step": best["step"], "best_val_loss": best["val_loss"]}


def save_tokenizer(tok: Tokenizer, out: Path, max_len: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None,
        "additional_special_tokens": CHAT_TOKENS,
        "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {"content": t, "special": True, "lstrip": False,
                                      "rstrip": False, "normalized": False, "single_word": False}
            for t in SPECIAL_TOKENS
        },
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def sample_completions(out: Path, device: torch.device) -> list[dict[str, str]]:
    """Greedy completions from the *saved* directory (fp32), proving it loads."""
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device).eval()
    chat_prompt = tokenizer.apply_chat_template(SAMPLE_CHAT, add_generation_prompt=True,
                                                tokenize=False)
    assert chat_prompt == BOS + render_chat(SAMPLE_CHAT, add_generation_prompt=True)
    samples = []
    for prompt, special in [*((p, True) for p in SAMPLE_PROMPTS), (chat_prompt, False)]:
        ids = tokenizer(prompt, add_special_tokens=special, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids.to(device), max_new_tokens=96, do_sample=False)
        completion = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=False)
        samples.append({"prompt": prompt, "completion": completion})
        print(f"--- prompt ---\n{prompt}\n--- greedy completion ---\n{completion}\n", flush=True)
    return samples


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    t0 = time.time()

    root, files = read_corpus(args.max_files)
    train_files = [(r, t) for r, t in files if not is_val(r, args.val_percent)]
    val_files = [(r, t) for r, t in files if is_val(r, args.val_percent)]
    # ast parsing is the slow part: spread it over processes (map keeps the order)
    with ProcessPoolExecutor(mp_context=multiprocessing.get_context("spawn")) as pool:
        train_chat = [c for cs in pool.map(chat_examples, train_files, chunksize=8) for c in cs]
        val_chat = [c for cs in pool.map(chat_examples, val_files, chunksize=8) for c in cs]
    train_texts = [t for _, t in train_files] + train_chat
    val_texts = [t for _, t in val_files] + val_chat
    print(f"Python {platform.python_version()} stdlib at {root}: {len(train_files)} train files, "
          f"{len(val_files)} val files, {len(train_chat)}+{len(val_chat)} chat examples, "
          f"{sum(map(len, train_texts)) / 1e6:.1f}M train chars", flush=True)

    tok = train_tokenizer(train_texts, args.vocab_size)
    train_ids, val_ids = encode_stream(tok, train_texts), encode_stream(tok, val_texts)
    print(f"tokenizer: vocab {tok.get_vocab_size()}, {len(train_ids) / 1e6:.2f}M train tokens, "
          f"{len(val_ids) / 1e6:.3f}M val tokens ({time.time() - t0:.1f}s)", flush=True)

    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=ids[BOS], eos_token_id=ids[EOS],
        pad_token_id=ids[PAD], initializer_range=0.02,
    )
    model = LlamaForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters on {device}", flush=True)

    stats = train(model, train_ids, val_ids, args, device)
    last = stats["history"][-1]
    print(f"best val loss {stats['best_val_loss']:.4f} (ppl {math.exp(stats['best_val_loss']):.2f})"
          f" at step {stats['best_step']}; training took {stats['train_seconds']}s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=[ids[EOS], ids["<|end|>"]], pad_token_id=ids[PAD],
        do_sample=True, temperature=0.7, top_p=0.95, max_new_tokens=256,
    )
    model.to(torch.float16).save_pretrained(args.out, safe_serialization=True)
    cfg_path = args.out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["torch_dtype"] = cfg["dtype"] = "float16"  # both spellings, for old and new readers
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_tokenizer(tok, args.out, config.max_position_embeddings)

    samples = sample_completions(args.out, device)
    log = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seed": args.seed,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "corpus": {"stdlib": str(root), "train_files": len(train_files),
                   "val_files": len(val_files), "train_chat_examples": len(train_chat),
                   "val_chat_examples": len(val_chat), "train_tokens": len(train_ids),
                   "val_tokens": len(val_ids)},
        "parameters": n_params,
        **{k: v for k, v in stats.items() if k != "history"},
        "final_train_loss": last["train_loss"],
        "final_val_loss": last["val_loss"],
        "best_val_perplexity": round(math.exp(stats["best_val_loss"]), 3),
        "total_seconds": round(time.time() - t0, 1),
        "history": stats["history"],
        "samples": samples,
    }
    (args.out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    sizes = {p.name: p.stat().st_size for p in sorted(args.out.iterdir())}
    print(json.dumps(sizes, indent=2), f"total {sum(sizes.values()) / 2**20:.2f} MiB", flush=True)
    assert max(sizes.values()) < 15 * 2**20, "a file is over 15 MiB"
    expected = {"config.json", "generation_config.json", "model.safetensors",
                "tokenizer.json", "tokenizer_config.json", "training_log.json"}
    assert set(sizes) == expected, f"unexpected files: {sorted(set(sizes) ^ expected)}"


if __name__ == "__main__":
    main()
