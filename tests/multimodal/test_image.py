"""Image loading and checks: every accepted form decodes to the same pixels and content hash;
what is refused is a ValueError naming the image and the reason; ``--limit-mm-per-prompt``
parses vLLM's JSON."""

from __future__ import annotations

import base64
import io

import pytest

from pagedllm.multimodal import image as image_mod
from pagedllm.multimodal.image import image_hash, load_image
from pagedllm.multimodal.processor import parse_limit_mm_per_prompt
from tests.fixtures.tiny_vl_models import make_image


def _png(img: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # type: ignore[attr-defined]
    return buf.getvalue()


def test_forms_decode_to_the_same_image(tmp_path) -> None:  # type: ignore[no-untyped-def]
    img = make_image(28, 56, 3)
    data = _png(img)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    forms = [
        img,
        data,
        "data:image/png;base64," + base64.b64encode(data).decode(),
        path.as_uri(),
    ]
    hashes = {image_hash(load_image(f, 0, str(tmp_path))) for f in forms}
    assert hashes == {image_hash(img)}
    assert image_hash(make_image(28, 56, 4)) != image_hash(img)
    rgba = img.convert("RGBA")
    assert load_image(rgba).mode == "RGB"


def test_refusals_name_the_image(monkeypatch: pytest.MonkeyPatch) -> None:
    big = make_image(40, 40, 0)
    monkeypatch.setattr(image_mod, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="Image 2 is 40x40 pixels"):
        load_image(big, 2)
    monkeypatch.setattr(image_mod, "MAX_IMAGE_BYTES", 10)
    with pytest.raises(ValueError, match="Image 1 has .* bytes"):
        load_image(_png(make_image(4, 4, 0)), 1)
    with pytest.raises(ValueError, match="data URL must look like"):
        load_image("data:text/plain;base64,aGk=")
    with pytest.raises(ValueError, match="must be a PIL.Image"):
        load_image(3.5)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, {}), ('{"image": 2}', {"image": 2}), ({"image": 0}, {"image": 0})],
)
def test_limit_mm_per_prompt(value: object, expected: dict[str, int]) -> None:
    assert parse_limit_mm_per_prompt(value) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("{image: 2}", "must be JSON"),
        ('{"video": 1}', "'video' is not supported"),
        ('{"image": -1}', "integer >= 0"),
        ("[1]", "map a modality"),
    ],
)
def test_limit_mm_per_prompt_errors(value: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_limit_mm_per_prompt(value)
