"""Images inside chat messages: OpenAI ``image_url`` content parts (and ``image`` parts holding
a ``PIL.Image``, for the offline ``LLM.chat``), collected in order.

The chat template only needs to know where an image goes: each image part is handed to it as
``{"type": "image"}`` (templates such as Qwen2-VL's render it as the vision placeholder), and
the image itself (a URL string or a ``PIL.Image``) is returned separately, to be decoded and
checked by the input processor like any ``multi_modal_data`` image.
"""

from __future__ import annotations

from typing import Any

IMAGE_PART_TYPES = ("image_url", "image")


def extract_images(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """(messages with image parts reduced to ``{"type": "image"}``, the images in order).
    ValueError for an image part without its image."""
    images: list[Any] = []
    out: list[dict[str, Any]] = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in IMAGE_PART_TYPES:
                parts.append(part)
                continue
            value = part.get(kind)
            if kind == "image_url" and isinstance(value, dict):
                value = value.get("url")
            if value is None:
                raise ValueError(f"Image {len(images)}: a {kind!r} content part has no image.")
            images.append(value)
            parts.append({"type": "image"})
        out.append({**message, "content": parts})
    return out, images
