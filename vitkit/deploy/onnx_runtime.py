"""ONNX Runtime sessions for exported ViTs: tuned CPU options, one-line errors, fixed batches padded."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vitkit.deploy.metadata import METADATA_KEY, ModelCard
from vitkit.errors import VitkitError


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise VitkitError("onnxruntime is not installed: pip install 'vitkit[deploy]'") from None
    return onnxruntime


def require_opset(opset: int) -> None:
    """A one-line error when the installed ONNX Runtime is older than 1.23, the first to run opset 23's Attention."""
    ort = import_onnxruntime()
    installed = tuple(int(part) if part.isdigit() else 0 for part in ort.__version__.split(".")[:2])
    if opset >= 23 and installed < (1, 23):
        raise VitkitError(
            f"ONNX opset {opset} needs onnxruntime >= 1.23, but {ort.__version__} is installed: upgrade it "
            "(pip install -U onnxruntime) or export with export.opset=18"
        )


def cpu_threads() -> int:
    """The cores this process may run on (a container's or taskset's share, not the host's count)."""
    return max(1, len(os.sched_getaffinity(0)))


def session_options(threads: int = 0):
    """Every graph optimization (constant folding, LayerNorm/GELU/MatMul fusions) and one intra-op thread per core.

    Inter-op parallelism stays off: a ViT is one chain of ops, so a second pool would only compete for the cores.
    """
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or cpu_threads()
    options.inter_op_num_threads = 1
    # Idle pool threads sleep instead of spinning, like the CLI's OMP_WAIT_POLICY=PASSIVE for torch: on a small
    # shared CPU a spinning thread steals the core another thread needs, most of
    # all on a loaded machine with few cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise to a user
    return options


class OnnxModel:
    """An exported classifier: float32 normalized NCHW images in, logits out, any number of images per call."""

    def __init__(self, path: str | os.PathLike, threads: int = 0):
        ort = import_onnxruntime()
        self.path = Path(path)
        if not self.path.exists():
            raise VitkitError(f"model file '{self.path}' does not exist: check the path (vitkit export writes one)")
        if self.path.is_dir():
            raise VitkitError(f"'{self.path}' is a folder: give the .onnx file inside it")
        try:
            self.session = ort.InferenceSession(str(self.path), session_options(threads), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types for every load failure
            reason = " ".join(str(exc).split())[:200]
            raise VitkitError(f"'{self.path}' is not a usable ONNX model ({reason}): re-export it with vitkit export") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or len(outputs) < 1:
            raise VitkitError(
                f"'{self.path}' is not an image classifier with one (batch, 3, height, width) input: "
                "export it with vitkit export"
            )
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        batch, _, height, width = (dim if isinstance(dim, int) else None for dim in inputs[0].shape)
        self.batch_size = batch  # None: any batch
        self.image_size = (height, width)  # None where the side is dynamic
        last = outputs[0].shape[-1]
        self.num_classes = last if isinstance(last, int) else None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.card = ModelCard.from_json(meta.get(METADATA_KEY))

    @property
    def dynamic_size(self) -> bool:
        return None in self.image_size

    def check_input_size(self, side: int) -> None:
        """A VitkitError unless the model takes side x side images."""
        height, width = self.image_size
        if not self.dynamic_size and (height, width) != (side, side):
            raise VitkitError(
                f"{self.path} takes {height}x{width} images, not {side}x{side}: set the eval image size to {height} "
                "or re-export with export.dynamic_image_size=true"
            )
        patch = self.card.patch_size
        if self.dynamic_size and patch and side % patch:
            raise VitkitError(
                f"{self.path} takes image sides that are multiples of its patch {patch}, not {side}: "
                f"use e.g. {max(patch, round(side / patch) * patch)}"
            )

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Logits (N, classes) for float32 images (N, 3, H, W); a fixed-batch model gets chunks, the last zero-padded."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        count = images.shape[0]
        if self.batch_size is None or self.batch_size == count:
            return self._run(images)
        outputs = []
        for start in range(0, count, self.batch_size):
            chunk = images[start : start + self.batch_size]
            short = self.batch_size - chunk.shape[0]
            if short:
                chunk = np.concatenate([chunk, np.zeros((short, *chunk.shape[1:]), dtype=np.float32)])
            outputs.append(self._run(chunk)[: self.batch_size - short])
        return np.concatenate(outputs)

    def _run(self, images: np.ndarray) -> np.ndarray:
        try:
            return self.session.run([self.output_name], {self.input_name: images})[0]
        except Exception as exc:  # noqa: BLE001 - shape and type mismatches arrive as onnxruntime's own exceptions
            reason = " ".join(str(exc).split())[:200]
            raise VitkitError(f"{self.path} cannot run on input {tuple(images.shape)} ({reason})") from None
