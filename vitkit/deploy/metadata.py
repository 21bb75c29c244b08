"""What an exported model carries about itself: the eval preprocessing it expects and its class names.

Written into the ONNX file's metadata_props (and a .pt2 archive's extra files) at export, so that `vitkit infer` and
`vitkit predict` preprocess exactly as `vitkit eval` did without being handed the training config again.
"""
from __future__ import annotations

import dataclasses
import json

import torch

from vitkit.data.transforms import INTERPOLATIONS, NORMALIZATIONS, eval_resize_size, eval_transform, normalize_batch
from vitkit.errors import VitkitError

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

    @classmethod
    def from_metadata(cls, fields, where: str) -> "Preprocessing | None":
        """The preprocessing a weights file states (None when it states none), each field checked: a file's word
        sizes the eval resize, so a hostile one gets a one-line VitkitError, not a huge allocation."""
        if fields is None:
            return None
        # Imported here: vitkit.model's package imports the loader, which imports this module.
        from vitkit.model.vit import MAX_IMAGE_SIDE

        def bad(why: str) -> VitkitError:
            return VitkitError(f"{where} {why}: the file is damaged or not vitkit's")

        if not isinstance(fields, dict):
            raise bad("is not a JSON object of preprocessing fields")
        known = {item.name for item in dataclasses.fields(cls)}
        if set(fields) - known or "image_size" not in fields:
            raise bad(f"has fields {sorted(map(str, fields))}, not image_size and some of {sorted(known - {'image_size'})}")
        for name, low, high in (("image_size", 1, MAX_IMAGE_SIDE), ("resize_size", 0, 2 * MAX_IMAGE_SIDE)):
            value = fields.get(name, 0)
            if type(value) is not int or not low <= value <= high:
                raise bad(f"has {name} {value!r}, not a whole number in [{low}, {high}]")
        for name, choices in (("interpolation", INTERPOLATIONS), ("normalization", NORMALIZATIONS)):
            value = fields.get(name, getattr(cls, name))
            if not isinstance(value, str) or value not in choices:
                raise bad(f"has {name} {str(value)[:40]!r}, not one of {', '.join(choices)}")
        return cls(**fields)

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
