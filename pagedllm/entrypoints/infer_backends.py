"""The engines ``pagedllm infer`` can run a data set through, behind one interface.

Fair comparisons need identical inputs, so tokenization is never a backend's business: the
rows are rendered (chat template) and tokenized once, by pagedllm's tokenizer code
(``Tokenized``), and every backend receives token ids:

* ``pagedllm``: the in-process engine (``LLM.generate`` on ``prompt_token_ids``), a batch at
  a time so continuous batching works as in production;
* ``transformers``: Hugging Face ``generate`` one row at a time (no padding, so greedy output is
  the reference a correct engine must reproduce token for token), stopping on the same
  end-of-sequence ids, decoded by the same tokenizer;
* ``openai``: ``POST /v1/completions`` with the token ids as the prompt (accepted by
  pagedllm, vLLM and SGLang servers), so any server is compared on the same file.

Each backend returns one ``Answer`` per prompt, in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pagedllm.config import EngineConfig

BACKENDS = ("pagedllm", "transformers", "openai")


@dataclass
class Answer:
    text: str
    completion_tokens: int
    finish_reason: str | None


@dataclass
class Settings:
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None


class InferBackend(Protocol):
    def run(self, prompts: list[list[int]], settings: Settings) -> list[Answer]: ...

    def close(self) -> None: ...


class Tokenized:
    """pagedllm's rendering and tokenization of rows, shared by every backend."""

    def __init__(self, model_dir: str, tokenizer_dir: str, chat_template: str | None) -> None:
        from pagedllm.engine.tokenizer import load_generation_defaults, load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.eos_token_ids = sorted(
            load_generation_defaults(model_dir, self.tokenizer).eos_token_ids
        )
        self.chat_template = chat_template

    def prompt_ids(self, row: dict[str, Any]) -> list[int]:
        from pagedllm.engine.tokenizer import apply_chat_template

        if "messages" in row:
            return apply_chat_template(
                self.tokenizer, row["messages"], True, self.chat_template, row.get("tools")
            )
        return list(self.tokenizer.encode(row["prompt"]))


class PagedLLMBackend:
    def __init__(self, config: EngineConfig) -> None:
        from pagedllm import LLM

        self.llm = LLM(**config.to_kwargs())

    def run(self, prompts: list[list[int]], settings: Settings) -> list[Answer]:
        from pagedllm import SamplingParams

        params = SamplingParams(
            temperature=settings.temperature,
            top_p=settings.top_p,
            max_tokens=settings.max_tokens,
            seed=settings.seed,
        )
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [
            Answer(o.outputs[0].text, len(o.outputs[0].token_ids), o.outputs[0].finish_reason)
            for o in outs
        ]

    def close(self) -> None:
        pass


class TransformersBackend:
    def __init__(self, config: EngineConfig, tokenized: Tokenized) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        mc = config.model_config
        self.device = config.device_config.torch_device
        self.model = AutoModelForCausalLM.from_pretrained(mc.model, dtype=mc.torch_dtype)
        self.model.to(self.device).eval()
        self.tokenized = tokenized
        self.torch = torch

    def run(self, prompts: list[list[int]], settings: Settings) -> list[Answer]:
        torch = self.torch
        eos = self.tokenized.eos_token_ids
        answers = []
        for ids in prompts:
            kwargs: dict[str, Any] = {"do_sample": settings.temperature > 0}
            if kwargs["do_sample"]:
                if settings.seed is not None:
                    torch.manual_seed(settings.seed)
                kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
            inp = torch.tensor([ids], device=self.device)
            with torch.no_grad():
                out = self.model.generate(
                    inp,
                    attention_mask=torch.ones_like(inp),
                    max_new_tokens=settings.max_tokens,
                    eos_token_id=eos or None,
                    pad_token_id=eos[0] if eos else 0,
                    **kwargs,
                )
            new = out[0, len(ids) :].tolist()
            stopped = bool(new) and new[-1] in eos
            text_ids = new[:-1] if stopped else new
            text = self.tokenized.tokenizer.decode(text_ids, skip_special_tokens=True)
            answers.append(Answer(text, len(new), "stop" if stopped else "length"))
        return answers

    def close(self) -> None:
        pass


class OpenAIBackend:
    def __init__(self, base_url: str, model: str | None, api_key: str | None) -> None:
        from pagedllm.entrypoints.chat_backends import RemoteBackend

        self.remote = RemoteBackend(base_url, model, api_key)

    def run(self, prompts: list[list[int]], settings: Settings) -> list[Answer]:
        from concurrent.futures import ThreadPoolExecutor

        def one(ids: list[int]) -> Answer:
            body: dict[str, Any] = {
                "model": self.remote.model,
                "prompt": ids,
                "max_tokens": settings.max_tokens,
                "temperature": settings.temperature,
                "top_p": settings.top_p,
            }
            if settings.seed is not None:
                body["seed"] = settings.seed
            r = self.remote.client.post(self.remote.base + "/completions", json=body)
            if r.status_code != 200:
                raise ValueError(f"the server answered {r.status_code}: {r.text}")
            data = r.json()
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            return Answer(
                choice["text"], int(usage.get("completion_tokens", 0)), choice["finish_reason"]
            )

        with ThreadPoolExecutor(max(1, min(len(prompts), 32))) as pool:
            return list(pool.map(one, prompts))

    def close(self) -> None:
        self.remote.close()
