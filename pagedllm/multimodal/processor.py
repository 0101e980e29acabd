"""A prompt's images: their pixels through the model's own image processor, and its image
placeholder expanded to one token per image embedding.

The model directory's ``preprocessor_config.json`` is loaded with transformers'
``AutoImageProcessor`` (resizing, normalization and patch order are the model's, not ours). For
Qwen2-VL, one image of ``(t, h, w)`` patches becomes ``t*h*w / merge**2`` embeddings, so its
single ``<|image_pad|>`` token in the prompt becomes that many. A token prompt may also arrive
already expanded (each run of placeholder tokens exactly as long as its image needs); any other
count is an error, as is a placeholder without an image or an image without a placeholder. The
result is the expanded token ids and one ``MultiModalFeature`` per image (plain data, see
``core/scheduler_output.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pagedllm.core.scheduler_output import MultiModalFeature
from pagedllm.multimodal.image import image_hash, load_image

# Architectures that take images (their placeholder token is config.json's image_token_id).
MULTIMODAL_ARCHITECTURES = (
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
)


def is_multimodal(raw_config: dict[str, Any]) -> bool:
    archs = raw_config.get("architectures") or []
    return bool(archs) and archs[0] in MULTIMODAL_ARCHITECTURES


def parse_limit_mm_per_prompt(value: str | dict[str, int] | None) -> dict[str, int]:
    """vLLM's ``--limit-mm-per-prompt``: JSON like ``{"image": 2}`` (or that dict)."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(
                f'limit_mm_per_prompt must be JSON such as {{"image": 2}}, got {value!r}.'
            ) from e
    if not isinstance(value, dict):
        raise ValueError(f"limit_mm_per_prompt must map a modality to a count, got {value!r}.")
    out: dict[str, int] = {}
    for key, n in value.items():
        if key != "image":
            raise ValueError(f"limit_mm_per_prompt: modality {key!r} is not supported (image).")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"limit_mm_per_prompt[{key!r}] must be an integer >= 0, got {n!r}.")
        out[key] = n
    return out


class ImageProcessor:
    """Images of one model's prompts (see the module doc)."""

    def __init__(
        self,
        model_dir: str,
        raw_config: dict[str, Any],
        max_images: int | None = None,
        allowed_local_media_path: str | None = None,
    ) -> None:
        self.model_dir = model_dir
        self.architecture = (raw_config.get("architectures") or ["?"])[0]
        self.image_token_id = int(raw_config["image_token_id"])
        self.video_token_id = raw_config.get("video_token_id")
        vision = raw_config.get("vision_config") or {}
        self.merge = int(vision.get("spatial_merge_size", 2)) ** 2
        self.max_images = max_images
        self.allowed_local_media_path = allowed_local_media_path
        self._hf: Any = None

    @property
    def hf_processor(self) -> Any:
        if self._hf is None:
            from transformers import AutoImageProcessor

            if not (Path(self.model_dir) / "preprocessor_config.json").is_file():
                raise ValueError(f"{self.model_dir} has no preprocessor_config.json.")
            self._hf = AutoImageProcessor.from_pretrained(self.model_dir)
        return self._hf

    def load_images(self, images: Any) -> list[Any]:
        """Decoded, checked images from one image or a list of them; ValueError naming the bad
        one or the count over ``--limit-mm-per-prompt``."""
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if self.max_images is not None and len(items) > self.max_images:
            raise ValueError(
                f"The prompt has {len(items)} images; at most {self.max_images} are allowed "
                "per prompt (--limit-mm-per-prompt)."
            )
        return [load_image(x, i, self.allowed_local_media_path) for i, x in enumerate(items)]

    def features(self, images: list[Any]) -> list[MultiModalFeature]:
        """One feature per decoded image (offsets unset: -1)."""
        out = []
        for i, img in enumerate(images):
            try:
                res = self.hf_processor(images=[img], return_tensors="np")
            except Exception as e:  # the image processor's own refusal (e.g. a tiny image)
                raise ValueError(f"Image {i} could not be processed: {e}") from e
            grid = tuple(int(g) for g in res["image_grid_thw"][0])
            t, h, w = grid
            out.append(
                MultiModalFeature(
                    offset=-1,
                    length=t * h * w // self.merge,
                    content_hash=image_hash(img),
                    pixel_values=np.ascontiguousarray(res["pixel_values"], dtype=np.float32),
                    grid_thw=(t, h, w),
                )
            )
        return out

    def expand(self, prompt_ids: list[int], features: list[MultiModalFeature]) -> list[int]:
        """``prompt_ids`` with each image placeholder run as long as its image needs; sets each
        feature's ``offset``. ValueError when placeholders and images do not match."""
        tok = self.image_token_id
        if self.video_token_id is not None and int(self.video_token_id) in prompt_ids:
            raise ValueError("Video inputs are not supported yet (the prompt has a video token).")
        runs: list[tuple[int, int]] = []
        i, n = 0, len(prompt_ids)
        while i < n:
            if prompt_ids[i] == tok:
                j = i
                while j < n and prompt_ids[j] == tok:
                    j += 1
                runs.append((i, j - i))
                i = j
            else:
                i += 1
        if len(runs) != len(features):
            raise ValueError(
                f"The prompt has {len(runs)} image placeholders (token id {tok}) but "
                f"{len(features)} images were given; {self.architecture} needs one placeholder "
                "per image."
            )
        out: list[int] = []
        prev = 0
        for k, ((start, count), feat) in enumerate(zip(runs, features, strict=True)):
            if count not in (1, feat.length):
                raise ValueError(
                    f"Image {k}'s placeholder has {count} tokens; it needs 1 (expanded here) or "
                    f"exactly {feat.length}."
                )
            out.extend(prompt_ids[prev:start])
            feat.offset = len(out)
            out.extend([tok] * feat.length)
            prev = start + count
        out.extend(prompt_ids[prev:])
        return out

    def check_features(self, prompt_ids: list[int], features: list[MultiModalFeature]) -> None:
        """Already-processed features (sent by the API process) against their prompt."""
        tok = self.image_token_id
        covered = 0
        for k, f in enumerate(features):
            span = prompt_ids[f.offset : f.end] if f.offset >= 0 else []
            t, h, w = f.grid_thw
            if (
                len(span) != f.length
                or any(x != tok for x in span)
                or f.length * self.merge != (t * h * w)
            ):
                raise ValueError(f"Image {k}'s placeholder span does not match the prompt.")
            covered += f.length
        if sum(1 for x in prompt_ids if x == tok) != covered:
            raise ValueError("The prompt has image placeholder tokens without an image.")
