"""Qwen2-VL and Qwen2.5-VL end to end on CPU in fp32: greedy tokens equal transformers' for
prompts with 0, 1 and 2 images of different sizes (both architectures, also when chunked
prefill cuts through image tokens; the vision towers' outputs equal transformers'), and for
Qwen2-VL also when the prefix cache serves a repeated image (and not a different one), under
preemption and under a small encoder budget; bad inputs are ValueErrors naming the problem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pagedllm import LLM, SamplingParams
from tests.fixtures.tiny_vl_models import (
    VL_ARCHES,
    build_tiny_vl_model,
    hf_vl_greedy,
    make_image,
)

MAX_NEW = 8
IMG = "<|vision_start|><|image_pad|><|vision_end|>"


_BUILT: dict[str, Path] = {}


def _model(arch: str, factory: pytest.TempPathFactory) -> Path:
    if arch not in _BUILT:
        _BUILT[arch] = build_tiny_vl_model(factory.mktemp(f"tiny_{arch}"), arch=arch)
    return _BUILT[arch]


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _model("qwen2_vl", tmp_path_factory)


@pytest.fixture(scope="module", params=VL_ARCHES)
def any_vl_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _model(request.param, tmp_path_factory)


def _chat(text: str) -> str:
    """The prompt as the engine takes it (it adds <|bos|> itself)."""
    return f"<|user|>\n{text}<|end|>\n<|assistant|>\n"


# (prompt text, images as (height, width, seed)): 0, 1 and 2 images of different sizes.
CASES: list[tuple[str, list[tuple[int, int, int]]]] = [
    (_chat("plain text, no image at all"), []),
    (_chat(f"describe {IMG} please"), [(56, 84, 0)]),
    (_chat(f"{IMG} versus {IMG}: which one?"), [(28, 56, 1), (84, 56, 2)]),
    (_chat(f"small {IMG} then text"), [(28, 28, 3)]),
    (_chat(f"a tall one {IMG}"), [(112, 84, 4)]),  # several Qwen2.5-VL windows
]


def _expect(vl_dir: Path, text: str, images: list[Any]) -> tuple[list[int], list[int]]:
    return hf_vl_greedy(vl_dir, "<|bos|>" + text, images, MAX_NEW)


def _prompt(text: str, images: list[Any]) -> Any:
    return {"prompt": text, "multi_modal_data": {"image": images}} if images else text


def _greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_NEW)


def _check(llm: LLM, vl_dir: Path, cases: list[tuple[str, list[tuple[int, int, int]]]]) -> list:
    prompts, expected = [], []
    for text, specs in cases:
        images = [make_image(*s) for s in specs]
        expected.append(_expect(vl_dir, text, images))
        prompts.append(_prompt(text, images))
    outs = llm.generate(prompts, _greedy(), use_tqdm=False)
    for out, (ids, new) in zip(outs, expected, strict=True):
        assert out.prompt_token_ids == ids
        assert list(out.outputs[0].token_ids) == new
    return outs


def test_matches_transformers_batched(any_vl_dir: Path) -> None:
    llm = LLM(str(any_vl_dir), max_model_len=256)
    _check(llm, any_vl_dir, CASES)


def test_chunked_prefill_cuts_through_images(any_vl_dir: Path) -> None:
    # 5 tokens per step: every image's 2..12 placeholder tokens are split over steps.
    llm = LLM(
        str(any_vl_dir), max_model_len=256, max_num_batched_tokens=5, max_num_seqs=2, block_size=4
    )
    _check(llm, any_vl_dir, CASES)


@torch.no_grad()
def test_vision_tower_equals_transformers(any_vl_dir: Path) -> None:
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    images = [make_image(112, 84, 4), make_image(28, 56, 1), make_image(56, 84, 0)]
    vis = AutoImageProcessor.from_pretrained(any_vl_dir)(images=images, return_tensors="pt")
    hf = AutoModelForImageTextToText.from_pretrained(any_vl_dir, dtype=torch.float32).eval()
    ref = hf.model.visual(vis["pixel_values"], grid_thw=vis["image_grid_thw"]).pooler_output
    llm = LLM(str(any_vl_dir), max_model_len=256)
    model = llm.llm_engine.runner.model
    grids = [tuple(int(x) for x in g) for g in vis["image_grid_thw"]]
    got = torch.cat(model.encode_images(vis["pixel_values"], grids))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_small_encoder_budget(vl_dir: Path) -> None:
    # 12 encoder tokens per step: the batch's images (6, 2 + 6, 1, 12 tokens) take several
    # steps, and prompt spans stop before the images that do not fit.
    llm = LLM(str(vl_dir), max_model_len=256, max_num_encoder_tokens=12)
    _check(llm, vl_dir, CASES)
    with pytest.raises(ValueError, match="max_num_encoder_tokens"):
        llm.generate(_prompt(_chat(IMG), [make_image(112, 112, 9)]), _greedy(), use_tqdm=False)


def test_prefix_cache_keys_images_by_content(vl_dir: Path) -> None:
    llm = LLM(str(vl_dir), max_model_len=256, block_size=4, enable_prefix_caching=True)
    text = _chat(f"look at {IMG} and say something long enough")
    first = make_image(56, 84, 10)
    other = make_image(56, 84, 11)  # same size: the same placeholder ids
    (a,) = _check(llm, vl_dir, [(text, [(56, 84, 10)])])
    assert a.num_cached_tokens == 0
    (b,) = _check(llm, vl_dir, [(text, [(56, 84, 10)])])
    image_end = a.prompt_token_ids.index(7)  # <|vision_end|> follows the placeholders
    assert b.num_cached_tokens > image_end  # blocks holding the image were hits
    (c,) = _check(llm, vl_dir, [(text, [(56, 84, 11)])])
    image_start = a.prompt_token_ids.index(8)
    assert 0 < c.num_cached_tokens <= image_start  # only blocks before the image
    assert first.tobytes() != other.tobytes()


def test_preemption(vl_dir: Path) -> None:
    # Chunks of 8 tokens admit several prompts at once; 12 blocks of 4 cannot hold them all.
    llm = LLM(
        str(vl_dir),
        max_model_len=64,
        block_size=4,
        num_gpu_blocks=12,
        max_num_seqs=4,
        max_num_batched_tokens=8,
    )
    _check(llm, vl_dir, CASES + CASES)
    assert llm.llm_engine.scheduler.num_preemptions > 0


def test_chat_with_image_parts(vl_dir: Path) -> None:
    import base64
    import io

    img = make_image(56, 56, 20)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    llm = LLM(str(vl_dir), max_model_len=256)
    content = [
        {"type": "text", "text": "what is "},
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": " and "},
        {"type": "image", "image": make_image(28, 56, 21)},
    ]
    out = llm.chat([{"role": "user", "content": content}], _greedy(), use_tqdm=False)[0]
    ids, new = _expect(vl_dir, _chat(f"what is {IMG} and {IMG}"), [img, make_image(28, 56, 21)])
    assert out.prompt_token_ids == ids
    assert list(out.outputs[0].token_ids) == new


def test_bad_inputs_are_value_errors(vl_dir: Path, llama_dir: Path) -> None:
    llm = LLM(str(vl_dir), max_model_len=256, limit_mm_per_prompt='{"image": 1}')
    img = make_image(28, 28, 0)
    cases = [
        (_prompt(_chat(f"{IMG} {IMG}"), [img]), "2 image placeholders"),
        (_chat(f"no image given {IMG}"), "1 image placeholders"),
        (_prompt(_chat(f"{IMG} {IMG}"), [img, img]), "at most 1"),
        (_prompt(_chat(IMG), [b"not an image"]), "Image 0 could not be decoded"),
        (_prompt(_chat(IMG), ["https://example.com/a.png"]), "remote image URLs"),
        (_prompt(_chat(IMG), ["file:///etc/passwd"]), "allowed-local-media-path"),
        ({"prompt": "x", "multi_modal_data": {"video": [img]}}, "takes only 'image'"),
    ]
    for prompt, match in cases:
        with pytest.raises(ValueError, match=match):
            llm.generate(prompt, _greedy(), use_tqdm=False)
    text_llm = LLM(str(llama_dir))
    with pytest.raises(ValueError, match="does not take images"):
        text_llm.generate(_prompt("hi", [img]), _greedy(), use_tqdm=False)


def test_local_files_only_inside_the_allowed_directory(vl_dir: Path, tmp_path: Path) -> None:
    img = make_image(28, 56, 30)
    inside = tmp_path / "media" / "a.png"
    inside.parent.mkdir()
    img.save(inside)
    llm = LLM(str(vl_dir), max_model_len=256, allowed_local_media_path=str(inside.parent))
    out = llm.generate(_prompt(_chat(IMG), [inside.as_uri()]), _greedy(), use_tqdm=False)[0]
    ids, new = _expect(vl_dir, _chat(IMG), [img])
    assert out.prompt_token_ids == ids and list(out.outputs[0].token_ids) == new
    outside = tmp_path / "b.png"
    img.save(outside)
    with pytest.raises(ValueError, match="outside --allowed-local-media-path"):
        llm.generate(_prompt(_chat(IMG), [outside.as_uri()]), _greedy(), use_tqdm=False)


def test_n2_siblings_share_the_image(vl_dir: Path) -> None:
    # The siblings fork onto the prompt's full blocks and recompute its last partial block,
    # which here holds image tokens: they read the leader's encoder output.
    llm = LLM(str(vl_dir), max_model_len=256, block_size=4)
    text = f"twice {IMG}"
    img = make_image(56, 84, 50)
    ids, new = _expect(vl_dir, text, [img])
    last_full = len(ids) // 4 * 4
    assert ids[last_full] == 8  # the recomputed tail starts inside the image
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, n=2)
    out = llm.generate(_prompt(text, [img]), params, use_tqdm=False)[0]
    assert out.prompt_token_ids == ids
    assert [list(c.token_ids) for c in out.outputs] == [new, new]


def test_transformers_5_layout(tmp_path: Path, vl_dir: Path) -> None:
    """Nested text_config and model.language_model.* / model.visual.* tensor names load to
    the same model as the hub layout."""
    v5 = build_tiny_vl_model(tmp_path / "v5", layout="v5")
    llm = LLM(str(v5), max_model_len=256)
    _check(llm, vl_dir, CASES[:3])  # same weights (same seed): the hub model's reference
