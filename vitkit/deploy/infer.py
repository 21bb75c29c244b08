"""`vitkit infer`: ONNX Runtime over an image folder with vitkit's eval transform; the original's accuracy and latency lines.

The images go through exactly `vitkit eval`'s pipeline (the same dataset class, transform, loader and
normalization), so on the same checkpoint and folder the top-1/top-5 counts are the same.
"""
from __future__ import annotations

import dataclasses
import os
import time
import warnings
from pathlib import Path

from vitkit.data.archives import list_inference_input
from vitkit.data.folder import MAX_IMAGE_PIXELS, ImageFolderDataset, list_flat_folder, list_image_folder
from vitkit.data.loader import ShardSampler, build_loader, usable_workers
from vitkit.deploy.metadata import Preprocessing, normalization_name
from vitkit.deploy.onnx_runtime import OnnxModel
from vitkit.deploy.postprocess import Accuracy, count_hits
from vitkit.deploy.result_files import check_unique_stems, write_result
from vitkit.errors import VitkitError
from vitkit.progress import progress_bar


@dataclasses.dataclass
class InferResult:
    images: int  # images that ran
    skipped: int  # unreadable images, skipped
    seconds: float  # inside ONNX Runtime only, as the original timed Predict
    accuracy: Accuracy | None  # None for a flat folder: no labels

    def latency_line(self) -> str:
        """The original's time_Result line: mean milliseconds per image over every image that ran."""
        average = 1000.0 * self.seconds / self.images if self.images else 0.0
        return f"NN inference cost average time: {average} ms of infer_count {self.images}"


def resolve_preprocessing(card_preprocessing: Preprocessing | None, cfg, model_side: int | None) -> Preprocessing:
    """The eval pipeline to use: what the model was exported with, except what the config (file or overrides)
    sets explicitly; all of the config's for a model that carries nothing.

    A model exported by something other than vitkit carries nothing: its fixed input size, the original's
    resize rule and normalization then apply, and a dynamic-size one needs a config. A config whose normalization
    differs from the exported model's is followed, with a warning: the logits are then off.
    """
    if cfg is not None:
        chosen = Preprocessing(cfg.eval.image_size, cfg.eval.resize_size, cfg.data.interpolation,
                               cfg.data.normalization)
        if card_preprocessing is None:
            return chosen
        keys = {"image_size": "eval.image_size", "resize_size": "eval.resize_size",
                "interpolation": "data.interpolation", "normalization": "data.normalization"}
        chosen = dataclasses.replace(card_preprocessing, **{
            field: getattr(chosen, field) for field, key in keys.items() if key in cfg.explicit_keys})
        if card_preprocessing.normalization != chosen.normalization:
            warnings.warn(
                f"the model was exported for {normalization_name(card_preprocessing.normalization)} inputs but the "
                f"config normalizes with {normalization_name(chosen.normalization)}: set "
                f"data.normalization={card_preprocessing.normalization} unless the export was wrong",
                stacklevel=2,
            )
        return chosen
    if card_preprocessing is not None:
        return card_preprocessing
    if model_side is None:
        raise VitkitError(
            "the model takes any image size and carries no preprocessing: pass --config_path (eval.image_size, "
            "eval.resize_size, data.interpolation)"
        )
    return Preprocessing(model_side)


def list_samples(data_dir: str | os.PathLike, num_classes: int | None) -> tuple[list[tuple[str, int]], bool, object]:
    """The images under `data_dir`, whether they have labels (class subfolders do, a flat folder does not) and
    where their bytes lie (None: each is a file; a .tar or shards: vitkit.data.archives)."""
    archived = list_inference_input(os.fspath(data_dir), num_classes)
    if archived is not None:
        return archived
    path = Path(data_dir)
    if not path.exists():
        raise VitkitError(f"data folder {path} does not exist: check the path")
    if not path.is_dir():
        raise VitkitError(f"{path} is a file, not a folder: give the folder of images (vitkit predict takes single images)")
    has_classes = any(entry.is_dir() and not entry.name.startswith(".") for entry in path.iterdir())
    if has_classes:
        samples, _ = list_image_folder(path, num_classes)
        return samples, True, None
    return list_flat_folder(path), False, None


def infer_folder(
    model: OnnxModel,
    data_dir: str | os.PathLike,
    preprocessing: Preprocessing,
    batch_size: int = 32,
    num_workers: int = 1,
    save_logits: str | os.PathLike | None = None,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> InferResult:
    model.check_input_size(preprocessing.image_size)
    samples, labelled, source = list_samples(data_dir, model.num_classes)
    paths = [path for path, _ in samples]
    out_dir = None
    if save_logits is not None:
        check_unique_stems(paths)
        out_dir = Path(save_logits)
        out_dir.mkdir(parents=True, exist_ok=True)
    dataset = ImageFolderDataset(samples, preprocessing.transform(), max_image_pixels=max_image_pixels, source=source)
    sampler = ShardSampler(len(samples), rank=0, world_size=1, shuffle=False, pad=False)
    loader = build_loader(dataset, sampler, batch_size, usable_workers(num_workers), drop_last=False, pin_memory=False)
    hits1 = hits5 = images = skipped = 0
    seconds = 0.0
    bar = progress_bar(len(loader), "infer")
    for batch, labels, indices, failed in loader:
        bar.update(1)
        skipped += failed
        if not batch.shape[0]:
            continue
        inputs = preprocessing.normalize(batch).numpy()
        started = time.perf_counter()
        logits = model(inputs)
        seconds += time.perf_counter() - started
        images += logits.shape[0]
        if labelled:
            correct1, correct5 = count_hits(logits, labels.numpy())
            hits1 += correct1
            hits5 += correct5
        if out_dir is not None:
            for row, index in zip(logits, indices.tolist()):
                write_result(out_dir, paths[index], row)
    bar.close()
    if not images:
        raise VitkitError(f"none of the {skipped} images in {data_dir} could be read: check the files")
    return InferResult(images, skipped, seconds, Accuracy(hits1, hits5, images) if labelled else None)
