"""``image_url`` content parts on ``/v1/chat/completions``: a Qwen2-VL server answers a base64
image with the same greedy tokens as the offline ``LLM.chat``; bad images, remote and file
URLs, unsupported ``detail`` and a text-only model are 400s naming the problem."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.engine.messages import AddRequest
from tests.entrypoints.openai.conftest import MODEL_NAME, ServerProc, launch
from tests.fixtures.tiny_vl_models import build_tiny_vl_model, make_image

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vl_model(tmp_path_factory.mktemp("tiny_qwen2_vl_server"))


@pytest.fixture(scope="module")
def vl_server(vl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    proc = launch("vl", vl_dir, tmp_path_factory.mktemp("vl_logs"))
    try:
        proc.wait_ready(time.monotonic() + 120)
        yield proc
    finally:
        proc.terminate()
        proc.wait_stopped()


@pytest.fixture(scope="module")
def vl_http(vl_server: ServerProc) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=vl_server.base_url, timeout=60) as client:
        yield client


def _data_url(img: Any) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _body(*parts: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": list(parts)}],
        "max_tokens": 6,
        "temperature": 0,
    }


def _image_part(url: str, **extra: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


def _error(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 400, r.text
    err: dict[str, Any] = r.json()["error"]
    return err


@pytest.mark.skipif(
    "mm_features" not in AddRequest.__dataclass_fields__,
    reason="the engine protocol (AddRequest) does not carry processed images yet",
)
def test_base64_image_equals_offline_chat(vl_http: httpx.Client, vl_dir: Path) -> None:
    img = make_image(56, 84, 40)
    text = {"type": "text", "text": "what is this? "}
    r = vl_http.post(CHAT, json=_body(text, _image_part(_data_url(img))))
    assert r.status_code == 200, r.text
    got = r.json()["choices"][0]["message"]["content"]
    llm = LLM(str(vl_dir), max_model_len=512)
    parts = [{"type": "text", "text": "what is this? "}, {"type": "image", "image": img}]
    params = SamplingParams(temperature=0, max_tokens=6)
    out = llm.chat([{"role": "user", "content": parts}], params, use_tqdm=False)[0]
    assert got == out.outputs[0].text
    assert r.json()["usage"]["prompt_tokens"] == len(out.prompt_token_ids)


@pytest.mark.parametrize(
    ("part", "match"),
    [
        (_image_part("data:image/png;base64,aGVsbG8="), "Image 0 could not be decoded"),
        (_image_part("data:image/png;base64,%%%"), "not valid base64"),
        (_image_part("https://example.com/cat.png"), "remote image URLs"),
        (_image_part("file:///etc/hosts"), "allowed-local-media-path"),
        (_image_part("data:image/png;base64,aGVsbG8=", detail="high"), "detail"),
        ({"type": "image_url"}, "image_url.url"),
        ({"type": "video_url", "video_url": {"url": "x"}}, "video_url"),
    ],
)
def test_bad_images_are_400(vl_http: httpx.Client, part: dict[str, Any], match: str) -> None:
    r = vl_http.post(CHAT, json=_body({"type": "text", "text": "hi"}, part))
    err = _error(r)
    assert match in err["message"]
    assert err["param"] == "messages"


@pytest.mark.skipif(
    "mm_features" in AddRequest.__dataclass_fields__,
    reason="the engine protocol carries processed images: the request is served",
)
def test_good_image_refused_until_the_engine_protocol_carries_it(vl_http: httpx.Client) -> None:
    r = vl_http.post(CHAT, json=_body(_image_part(_data_url(make_image(28, 28, 1)))))
    assert "not supported through the server yet" in _error(r)["message"]


def test_image_and_placeholder_counts_must_agree(vl_http: httpx.Client) -> None:
    # A placeholder typed as text is a placeholder without an image.
    text = {"type": "text", "text": "<|vision_start|><|image_pad|><|vision_end|>"}
    r = vl_http.post(CHAT, json=_body(text))
    assert r.status_code == 400, r.text
    assert "image placeholders" in r.json()["error"]["message"]


def test_text_only_model_refuses_image_parts(server: ServerProc) -> None:
    img = make_image(28, 28, 0)
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=60) as http:
        r = http.post(CHAT, json=_body(_image_part(_data_url(img))))
    err = _error(r)
    assert "text-only" in err["message"]
    assert err["param"] == "messages"
