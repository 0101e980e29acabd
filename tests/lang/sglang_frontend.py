"""Load SGLang's own frontend language (``sglang.lang``) without its serving runtime.

SGLang's package initializer imports its whole server stack (torch with CUDA kernels, triton,
image and video decoders) before anything else; the frontend modules themselves need only
numpy, requests, aiohttp, msgspec, pybase64 and IPython. So the package is installed with
``pip install --no-deps sglang==<PINNED>`` and its modules are imported under a bare ``sglang``
package object, which skips that initializer; the frontend's code runs unmodified.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import types
from typing import Any

import pytest

PINNED = "0.5.23"


def load_sglang_frontend() -> Any:
    """``sglang.lang.api`` (plus ``RuntimeEndpoint`` and ``ChatTemplate`` on it), or skip."""
    try:
        installed = importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"sglang is not installed (pip install --no-deps sglang=={PINNED})")
    if installed != PINNED:
        pytest.skip(f"sglang {installed} is installed; these tests pin {PINNED}")
    if "sglang" not in sys.modules:
        spec = importlib.util.find_spec("sglang")
        assert spec is not None and spec.submodule_search_locations is not None
        package = types.ModuleType("sglang")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["sglang"] = package
    try:
        api = importlib.import_module("sglang.lang.api")
        endpoint = importlib.import_module("sglang.lang.backend.runtime_endpoint")
        templates = importlib.import_module("sglang.lang.chat_template")
    except ImportError as e:
        pytest.skip(f"sglang's frontend needs {e.name} (msgspec, pybase64, ipython)")
    api.RuntimeEndpoint = endpoint.RuntimeEndpoint
    api.ChatTemplate = templates.ChatTemplate
    api.register_chat_template = templates.register_chat_template
    return api
