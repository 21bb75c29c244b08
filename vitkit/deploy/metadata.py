"""What an exported model carries about itself: the eval preprocessing it expects and its class names.

Written into the ONNX file's metadata_props (and a .pt2 archive's extra files) at export, so that `vitkit infer` and
`vitkit predict` preprocess exactly as `vitkit eval` did without being handed the training config again.
"""
from __future__ import annotations

import dataclasses
import json

import torch

from vitkit.data.transforms import eval_resize_size, eval_transform, normalize_batch

METADATA_KEY = "vitkit.deploy"
# The exported input is what the original fed its MINDIR: float32 NCHW, already (x - mean) / std on the 0-255 scale,
# with the card's normalization (the original's ImageNet statistics unless data.normalization said inception).
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
# How log lines and descriptions name each data.normalization choice.
NORMALIZATION_NAMES = {"imagenet": "ImageNet mean/std", "inception": "mean/std 0.5"}


def normalization_name(normalization: str) -> str:
    return NORMALIZATION_NAMES.get(normalization, f"{normalization} normalization")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """vitkit's eval transform: shorter side to resize_size, center crop image_size, then normalize.

    A card written before `normalization` existed lacks it and means the ImageNet statistics, its only choice then.
    """

    image_size: int
    resize_size: int = 0  # 0 = the original's image_size / 0.875 rounded to 16
    interpolation: str = "BILINEAR"
    normalization: str = "imagenet"

    @property
    def effective_resize(self) -> int:
        return self.resize_size or eval_resize_size(self.image_size)

    def transform(self):
        return eval_transform(self.image_size, self.interpolation, resize_size=self.resize_size or None)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images after transform() as the float32 input the exported model takes."""
        return normalize_batch(images, normalization=self.normalization)

    def describe(self) -> str:
        return (f"resize shorter side to {self.effective_resize} ({self.interpolation}), "
                f"center crop {self.image_size}, normalize with {normalization_name(self.normalization)}")


@dataclasses.dataclass(frozen=True)
class ModelCard:
    preprocessing: Preprocessing | None = None
    class_names: tuple[str, ...] | None = None
    patch_size: int = 0

    def to_json(self) -> str:
        return json.dumps({
            "preprocessing": dataclasses.asdict(self.preprocessing) if self.preprocessing else None,
            "class_names": list(self.class_names) if self.class_names is not None else None,
            "patch_size": self.patch_size,
        })

    @classmethod
    def from_json(cls, text: str | None) -> "ModelCard":
        """The card in `text`; a model exported by something else (no card, or an unreadable one) has an empty card."""
        if not text:
            return cls()
        try:
            data = json.loads(text)
            preprocessing = Preprocessing(**data["preprocessing"]) if data.get("preprocessing") else None
            names = tuple(str(name) for name in data["class_names"]) if data.get("class_names") is not None else None
            return cls(preprocessing, names, int(data.get("patch_size") or 0))
        except (ValueError, TypeError, KeyError):
            return cls()
