"""Turn a model or tokenizer name into a local directory: as given, or from the Hugging Face hub.

``ModelConfig`` reads directories only. A name that is not an existing directory but is
spelled like a hub repository id (``gpt2``, ``Qwen/Qwen2.5-0.5B-Instruct``) is fetched with
``huggingface_hub.snapshot_download`` into the standard cache (or ``--download-dir``), so the
cache is shared with transformers, vLLM and the ``hf`` CLI, the usual environment
(``HF_HUB_CACHE``, ``HF_HOME``, ``HF_TOKEN``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``) applies, and a
snapshot already in the cache loads without network (huggingface_hub falls back to it when the
hub cannot be reached, and goes straight to it under ``HF_HUB_OFFLINE=1``). Only the files the
engine reads are downloaded: JSON (config, generation config, tokenizer, safetensors index),
safetensors weights and tokenizer vocabularies, never ``*.bin`` / ``*.pth`` / ONNX / GGUF copies.

Every failure is a ``ValueError`` that says what was tried and what to do; huggingface_hub is
imported only here, when a hub id is actually resolved (``--help`` never imports it).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pagedllm.config.load import LoadConfig
from pagedllm.config.utils import config_error

# A hub repository id: "name" or "namespace/name" (letters, digits, "-", "_", "."; no "..").
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")

# What the engine reads from a model repository (weights included) ...
MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja")
# ... and from a tokenizer-only repository.
TOKENIZER_FILES = ("*.json", "*.model", "*.tiktoken", "*.txt", "*.jinja")


def looks_like_repo_id(name: str) -> bool:
    """Whether ``name`` is spelled like a hub repository id (it may still not exist)."""
    return bool(_REPO_ID.match(name)) and ".." not in name and not name.endswith(".")


def is_offline() -> bool:
    """Whether huggingface_hub's offline mode is on (``HF_HUB_OFFLINE`` or
    ``TRANSFORMERS_OFFLINE``, as huggingface_hub itself reads them)."""
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)  # newer huggingface_hub
    return bool(check() if check is not None else constants.HF_HUB_OFFLINE)


def resolve_source(
    name: str,
    load: LoadConfig,
    *,
    revision: str | None,
    what: str = "model",
    revision_flag: str = "revision",
) -> str:
    """The local directory of model / tokenizer ``name``: the directory itself, or the hub
    snapshot of repository ``name`` at ``revision`` (downloaded when missing)."""
    path = Path(os.path.expanduser(name))
    if path.exists():  # a directory, or a file (a .gguf model): ModelConfig reads it
        if revision is not None:
            raise config_error(
                f"{revision_flag}={revision!r} applies to Hugging Face hub ids, but the {what} "
                f"{name!r} is on the local disk; drop {revision_flag} or pass the hub id."
            )
        return str(path) if path.is_dir() else name
    if not looks_like_repo_id(name):
        raise config_error(
            f"The {what} {name!r} is not a local directory and not a Hugging Face hub id "
            "(such as 'Qwen/Qwen2.5-0.5B-Instruct')."
        )
    return _snapshot(name, load, revision, what)


def _snapshot(repo_id: str, load: LoadConfig, revision: str | None, what: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision!r}" if revision else ""
    where = load.download_dir or "the Hugging Face cache ($HF_HUB_CACHE)"
    try:
        return str(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=load.download_dir,
                token=load.hf_token,
                allow_patterns=list(MODEL_FILES if what == "model" else TOKENIZER_FILES),
            )
        )
    except GatedRepoError as e:
        raise config_error(
            f"The {what} {repo_id!r} is gated on the Hugging Face hub: accept its license on "
            "huggingface.co, then pass --hf-token (or set HF_TOKEN). "
            f"({_first_line(e)})"
        ) from None
    except RevisionNotFoundError:
        raise config_error(
            f"The hub repository {repo_id!r} has no revision {revision!r}."
        ) from None
    except RepositoryNotFoundError:
        raise config_error(
            f"The {what} {repo_id!r} is not a local directory, and the Hugging Face hub has no "
            "repository of that name (or it is private: pass --hf-token or set HF_TOKEN)."
        ) from None
    except LocalEntryNotFoundError:
        how = (
            "HF_HUB_OFFLINE is set" if is_offline() else "the Hugging Face hub could not be reached"
        )
        raise config_error(
            f"The {what} {repo_id!r}{at} is not in {where} and {how}. Download it once with "
            f"network access (`pagedllm serve {repo_id}` or `hf download {repo_id}`), or pass "
            "a local model directory."
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise config_error(
            f"Could not download the {what} {repo_id!r}{at} from the Hugging Face hub: "
            f"{_first_line(e)}"
        ) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
