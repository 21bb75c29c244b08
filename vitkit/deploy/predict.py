"""`vitkit predict`: top-5 classes with probabilities for single images, from a checkpoint, an .onnx or a .pt2."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

from vitkit.data.folder import MAX_IMAGE_PIXELS, decode_rgb, read_bytes
from vitkit.deploy.infer import resolve_preprocessing
from vitkit.deploy.metadata import ModelCard
from vitkit.errors import VitkitError


@dataclasses.dataclass
class Prediction:
    image: str
    top: list[tuple[int, str, float]]  # (class index, class name, probability), most probable first

    def as_dict(self) -> dict:
        return {"image": self.image, "top5": [
            {"index": index, "label": name, "probability": probability} for index, name, probability in self.top
        ]}


class _Classifier:
    """Normalized float32 NCHW in, logits out; `side` is the input size it takes (None: any multiple of `patch`)."""

    card: ModelCard
    side: int | None
    num_classes: int | None
    source: str | None = None  # a checkpoint's source format ('npz', 'huggingface', ...); None for exported files

    def check(self, side: int) -> None:
        """A VitkitError unless the model takes side x side images."""

    def __call__(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class _OnnxClassifier(_Classifier):
    def __init__(self, path: str):
        from vitkit.deploy.onnx_runtime import OnnxModel

        self.model = OnnxModel(path)
        self.card = self.model.card
        self.side = None if self.model.dynamic_size else self.model.image_size[0]
        self.num_classes = self.model.num_classes

    def check(self, side: int) -> None:
        self.model.check_input_size(side)

    def __call__(self, images):
        return self.model(images)


class _TorchClassifier(_Classifier):
    """A checkpoint (built at the eval size, as `vitkit eval` does) or a torch.export program."""

    def __init__(self, path: str, cfg):
        from vitkit.deploy.export import PT2_CARD_FILE

        if path.lower().endswith(".pt2"):
            from vitkit.model.formats.pt2 import load_pt2_program

            # Checked first: torch.export.load alone would unpickle parts of the archive and exec its guards.
            program, extra = load_pt2_program(path)
            try:
                self.module = program.module()
            except Exception as exc:  # noqa: BLE001 - torch.export raises many types for a bad program
                raise VitkitError(f"'{path}' is not a readable .pt2 program ({' '.join(str(exc).split())[:160]})") from None
            self.card = ModelCard.from_json(extra.get(PT2_CARD_FILE, ""))
            self.side = None  # its range constraints check the size; the card's size is the one it was exported at
            self.num_classes = None
            return
        from vitkit.engine.checkpoint import newest_weights
        from vitkit.model.loading import model_for_config, read_weights

        overrides = {"image_size": cfg.eval.image_size} if cfg is not None else {}
        weights = read_weights(newest_weights(path))
        model, card = model_for_config(weights, cfg.model if cfg is not None else None, with_card=True, **overrides)
        model.eval()
        self.source = weights.source
        self.module = model
        self.side = model.arch.image_size
        self.num_classes = model.arch.num_classes
        # The class names and eval preprocessing saved with the weights (older files have none: the config's
        # preprocessing applies, else the original's at the model's size).
        self.card = card

    def check(self, side: int) -> None:
        if self.side is not None and side != self.side:
            raise VitkitError(f"the model takes {self.side}x{self.side} images, not {side}x{side}: set eval.image_size")

    def __call__(self, images):
        with torch.no_grad():
            try:
                return self.module(torch.from_numpy(images)).numpy()
            except Exception as exc:  # noqa: BLE001 - a .pt2 program's shape guards fail with their own types
                raise VitkitError(f"the model cannot run on input {tuple(images.shape)} ({' '.join(str(exc).split())[:160]})") from None


def open_classifier(path: str | os.PathLike, cfg=None) -> _Classifier:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VitkitError(f"model '{path}' does not exist: give a checkpoint, a run folder, an .onnx or a .pt2 file")
    if path.lower().endswith(".onnx"):
        return _OnnxClassifier(path)
    return _TorchClassifier(path, cfg)


def read_class_names(path: str | os.PathLike) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise VitkitError(f"cannot read class names from {path} ({exc}): give a text file with one name per line") from None
    names = [line.strip() for line in lines if line.strip()]
    if not names:
        raise VitkitError(f"{path} holds no class names: write one name per line, in class-index order")
    return names


def model_class_names(names, num_classes: int) -> list[str]:
    """One name per class: the model's own names (its training folders), then "class i" for each index they do not
    reach. A model trained with more outputs than folders (the original's class_num 1001 over ImageNet's 1000
    folders) holds fewer names than classes; its extra outputs were never trained on a class, so only an index
    can name them, in the form a model with no names at all gets for every class."""
    known = list(names or ())[:num_classes]
    return known + [f"class {index}" for index in range(len(known), num_classes)]


def load_image(path: str | os.PathLike, max_pixels: int | None = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """The decoded image, or a VitkitError naming the file: missing, not an image, or a header promising more than
    `max_pixels` pixels (checked before anything is decoded)."""
    if not os.path.isfile(path):
        raise VitkitError(f"image {path} does not exist" if not os.path.exists(path) else f"{path} is not a file")
    try:
        return decode_rgb(read_bytes(path), max_pixels=max_pixels)
    except ValueError as exc:  # UnreadableImage: neither decoder read it, or its header promises too many pixels
        raise VitkitError(f"{path} is not an image vitkit can read ({str(exc)[:300]})") from None
    except (OSError, MemoryError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise VitkitError(f"cannot read image {path} ({type(exc).__name__}: {reason})") from None


def prepare_image(path: str | os.PathLike, transform, max_pixels: int | None = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """transform(load_image(path)); an image the eval pipeline cannot resize (a 1 x 65500 strip: its shorter side
    would shrink to nothing under the resize's bound) or that runs out of memory is a VitkitError naming it."""
    image = load_image(path, max_pixels)
    try:
        return transform(image)
    except (MemoryError, RuntimeError, ValueError) as exc:
        height, width = image.shape[-2:]
        raise VitkitError(
            f"image {path} ({width}x{height}) cannot be prepared for the model "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}): give a photo-shaped image"
        ) from None


def predict(
    model_path: str | os.PathLike, images: list[str], cfg=None, class_names: list[str] | None = None, top: int = 5,
) -> list[Prediction]:
    classifier = open_classifier(model_path, cfg)
    card = classifier.card
    preprocessing = resolve_preprocessing(card.preprocessing, cfg, classifier.side)
    classifier.check(preprocessing.image_size)
    if classifier.source is not None:
        from vitkit.engine.build import warn_on_other_normalization

        warn_on_other_normalization(classifier.source, preprocessing.normalization, model_path)
    transform = preprocessing.transform()
    max_pixels = cfg.data.max_image_pixels if cfg is not None else MAX_IMAGE_PIXELS
    batch = torch.stack([prepare_image(path, transform, max_pixels) for path in images])
    logits = classifier(preprocessing.normalize(batch).numpy()).astype(np.float64)
    if class_names is not None and len(class_names) < logits.shape[1]:
        raise VitkitError(f"{len(class_names)} class names for {logits.shape[1]} classes: give one name per class")
    names = class_names or model_class_names(card.class_names, logits.shape[1])
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    results = []
    for path, row in zip(images, probabilities):
        order = np.argsort(-row, kind="stable")[: min(top, row.shape[0])]
        results.append(Prediction(path, [
            (int(i), names[i], float(row[i])) for i in order
        ]))
    return results
