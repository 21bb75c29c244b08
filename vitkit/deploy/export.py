"""`vitkit export`: a checkpoint to ONNX (torch.onnx's dynamo exporter) or a torch.export .pt2, checked after writing.

The exported graph takes float32 (batch, 3, H, W) images already normalized on the 0-255 scale with the ImageNet
mean/std (what the original fed its MINDIR) or, with data.normalization=inception, mean/std 0.5, and returns logits;
the file's metadata records which. Before the file is moved into place it is run (ONNX Runtime, or the .pt2
program) beside the PyTorch model on the same random input; a largest logit difference above TOLERANCE is an error
and leaves no file behind.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from vitkit.deploy.infer import resolve_preprocessing
from vitkit.deploy.metadata import (
    INPUT_NAME, METADATA_KEY, OUTPUT_NAME, ModelCard, Preprocessing, normalization_name,
)
from vitkit.config import _FORMAT_SUFFIXES
from vitkit.engine.build import warn_on_other_normalization
from vitkit.engine.checkpoint import newest_weights
from vitkit.errors import VitkitError
from vitkit.fileio import atomic_path
from vitkit.model.loading import model_for_config, read_weights
from vitkit.model.formats.pt2 import load_pt2_program
from vitkit.model.vit import VisionTransformer

TOLERANCE = 1e-4
PT2_CARD_FILE = "vitkit_deploy.json"
# Op types that carry attention's softmax: one fused Attention node per block (opset >= 23), else the explicit
# MatMul -> Softmax -> MatMul of scaled_dot_product_attention's math form.
_FUSED_ATTENTION = ("Attention", "MultiHeadAttention")
_ONNX_SINGLE_FILE_LIMIT = 2 * 1024**3  # protobuf: larger models need external data files


@dataclasses.dataclass
class ExportResult:
    path: Path
    file_format: str
    input_shape: tuple  # ints, or axis names where dynamic
    num_classes: int
    max_abs_diff: float
    checked_inputs: list[tuple[int, ...]]
    op_counts: collections.Counter | None = None  # ONNX only
    opset: int | None = None
    normalization: str = "imagenet"  # data.normalization the input expects

    @property
    def input_normalization(self) -> str:
        """How the input is normalized, for the export's log line: 'ImageNet-normalized' as before the choice."""
        if self.normalization == "imagenet":
            return "ImageNet-normalized"
        return f"{self.normalization}-normalized ({normalization_name(self.normalization)})"

    @property
    def attention_summary(self) -> str:
        if self.op_counts is None:
            return ""
        fused = sum(self.op_counts[name] for name in _FUSED_ATTENTION)
        if fused:
            return f"{fused} fused ONNX Attention node(s), one per block"
        return f"MatMul -> Softmax -> MatMul per block ({self.op_counts['Softmax']} Softmax); opset 23+ fuses it"


def export_checkpoint(cfg) -> ExportResult:
    """Export the checkpoint the config names (export.ckpt_file, else model.pretrained) as export.* says."""
    export = cfg.export
    checkpoint = export.ckpt_file or cfg.model.pretrained
    if not checkpoint:
        raise VitkitError("no checkpoint to export: pass --model PATH (or set pretrained / ckpt_file)")
    overrides = {"image_size": export.image_size} if export.image_size else {}
    checkpoint = newest_weights(checkpoint)
    weights = read_weights(checkpoint)
    warn_on_other_normalization(weights.source, cfg.data.normalization, checkpoint, stacklevel=2)
    model, weights_card = model_for_config(weights, cfg.model, with_card=True, **overrides)
    model.eval()
    # The eval preprocessing saved with the weights, except what the config sets explicitly; at the export's size.
    preprocessing = resolve_preprocessing(weights_card.preprocessing, cfg, model.arch.image_size)
    if preprocessing.image_size != model.arch.image_size:
        preprocessing = dataclasses.replace(preprocessing, image_size=model.arch.image_size)
    card = ModelCard(preprocessing, weights_card.class_names, model.arch.patch_size)
    return export_model(
        model, export.file_name, export.file_format, card, batch_size=export.batch_size, opset=export.opset,
        dynamic_batch=export.dynamic_batch, dynamic_image_size=export.dynamic_image_size,
    )


def export_model(
    model: VisionTransformer,
    path: str | os.PathLike,
    file_format: str = "ONNX",
    card: ModelCard | None = None,
    *,
    batch_size: int = 1,
    opset: int = 23,
    dynamic_batch: bool = False,
    dynamic_image_size: bool = False,
) -> ExportResult:
    """Write `model` to `path` as ONNX or PT2, after checking the written file against the model. The export runs on
    the CPU in eval mode; the caller's model is then put back on its device and in its mode."""
    device = next(model.parameters()).device
    was_training, arch = model.training, model.arch
    try:
        if dynamic_image_size:
            _check_dynamic_size(arch)
            # The model's own any-size path (its forward resamples the position embedding), for the export only.
            model.arch = arch.replace(dynamic_img_size=True)
        return _export_on_cpu(model.cpu().eval(), path, file_format, card, batch_size, opset, dynamic_batch,
                              dynamic_image_size, arch)
    finally:
        model.arch = arch
        model.to(device).train(was_training)


def _check_dynamic_size(arch) -> None:
    if arch.pos_embed != "learn":
        raise VitkitError(
            f"export.dynamic_image_size resamples learned position embeddings, but this model's are {arch.pos_embed} "
            "(computed for each grid, not resampled): export at a fixed export.image_size instead"
        )


def _export_on_cpu(model: VisionTransformer, path, file_format: str, card: ModelCard | None, batch_size: int,
                   opset: int, dynamic_batch: bool, dynamic_image_size: bool, arch) -> ExportResult:
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if file_format == "ONNX" and weight_bytes >= _ONNX_SINGLE_FILE_LIMIT:
        raise VitkitError(
            f"the model's weights are {weight_bytes / 2**30:.1f} GiB, over ONNX's 2 GB single-file limit: "
            "export it as PT2 (export.file_format=PT2)"
        )
    card = card or ModelCard(Preprocessing(arch.image_size), None, arch.patch_size)
    module = model
    # A size-1 example would be specialised to a constant by torch.export, so a dynamic batch is traced with two.
    example_batch = max(batch_size, 2) if dynamic_batch else batch_size
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(example_batch, arch.in_chans, arch.image_size, arch.image_size, generator=generator)
    dynamic_shapes = _dynamic_shapes(arch.patch_size, dynamic_batch, dynamic_image_size)
    checks = [example]
    if dynamic_batch:
        checks.append(torch.randn(example_batch + 1, *example.shape[1:], generator=generator))
    if dynamic_image_size:
        bigger = arch.image_size + arch.patch_size
        checks.append(torch.randn(1, arch.in_chans, bigger, bigger + arch.patch_size, generator=generator))
    file_format = file_format.upper()
    path = with_format_suffix(path, file_format)
    with torch.no_grad():
        references = [module(images).numpy() for images in checks]
        if file_format == "ONNX":
            op_counts, diff = _export_onnx(module, example, dynamic_shapes, path, opset, card, checks, references)
        elif file_format == "PT2":
            op_counts, diff = None, _export_pt2(module, example, dynamic_shapes, path, card, checks, references)
        else:
            raise VitkitError(f"cannot export to {file_format}: choose ONNX or PT2")
    shape = (
        "batch" if dynamic_batch else batch_size, arch.in_chans,
        "height" if dynamic_image_size else arch.image_size, "width" if dynamic_image_size else arch.image_size,
    )
    normalization = card.preprocessing.normalization if card.preprocessing else "imagenet"
    return ExportResult(path, file_format, shape, arch.num_classes, diff, [tuple(c.shape) for c in checks], op_counts,
                        opset if file_format == "ONNX" else None, normalization)


def with_format_suffix(path: str | os.PathLike, file_format: str) -> Path:
    """`path` with the format's suffix appended unless it ends in it already (any case), as MindSpore's export
    names its files: 'model' becomes 'model.onnx', 'vit.b32' 'vit.b32.onnx'."""
    path = Path(path)
    suffix = _FORMAT_SUFFIXES.get(file_format.upper())
    if suffix is None or path.name.lower().endswith(suffix):
        return path
    return path.with_name(path.name + suffix)


def _dynamic_shapes(patch: int, dynamic_batch: bool, dynamic_image_size: bool):
    axes = {}
    if dynamic_batch:
        axes[0] = torch.export.Dim("batch", min=1, max=65536)
    if dynamic_image_size:
        # Sides are whole patches: a derived dimension keeps `side // patch` exact in the traced graph.
        axes[2] = patch * torch.export.Dim("patch_rows", min=1, max=1024)
        axes[3] = patch * torch.export.Dim("patch_cols", min=1, max=1024)
    return ({**axes},) if axes else None


def _check(kind: str, outputs: list[np.ndarray], references: list[np.ndarray], checks) -> float:
    diff = max(float(np.abs(out - ref).max()) for out, ref in zip(outputs, references))
    if not np.isfinite(diff) or diff > TOLERANCE:
        shapes = ", ".join(str(tuple(c.shape)) for c in checks)
        raise VitkitError(
            f"the exported {kind} model's logits differ from PyTorch's by {diff:.3g} (> {TOLERANCE:g}) on inputs "
            f"{shapes}: nothing was written; report this with the checkpoint and torch/onnxruntime versions"
        )
    return diff


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx prints progress lines and opset-conversion warnings; a failure still raises with its message."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _export_onnx(module, example, dynamic_shapes, path: Path, opset: int, card: ModelCard, checks, references):
    try:
        import onnx  # noqa: F401 - the exporter needs it; a clear message beats its ImportError
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise VitkitError(f"ONNX export needs {exc.name}: pip install 'vitkit[deploy]'") from None
    from vitkit.deploy.onnx_runtime import OnnxModel, require_opset

    require_opset(opset)  # before the export: the written file is checked in ONNX Runtime
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                module, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_shapes=dynamic_shapes, optimize=True, verbose=False,
            )
    except Exception as exc:  # noqa: BLE001 - the exporter's failures have many types; the reason is what matters
        raise VitkitError(f"ONNX export failed ({' '.join(str(exc).split())[:300]})") from None
    program.model.metadata_props[METADATA_KEY] = card.to_json()
    op_counts = collections.Counter(node.op_type for node in program.model_proto.graph.node)
    with atomic_path(path) as tmp:
        with _quiet_exporter():
            # Weights stay inside the file: export_model refuses models over protobuf's 2 GB limit.
            program.save(str(tmp), external_data=False)
        runtime = OnnxModel(tmp)
        diff = _check("ONNX", [runtime(c.numpy()) for c in checks], references, checks)
    return op_counts, diff


def _export_pt2(module, example, dynamic_shapes, path: Path, card: ModelCard, checks, references) -> float:
    try:
        program = torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes)
    except Exception as exc:  # noqa: BLE001 - torch.export's failures have many types
        raise VitkitError(f"torch.export failed ({' '.join(str(exc).split())[:300]})") from None
    # Through memory: torch.export wants a '.pt2' name, and atomic_path's temporary file has another.
    archive = io.BytesIO()
    torch.export.save(program, archive, extra_files={PT2_CARD_FILE: card.to_json()})
    with atomic_path(path) as tmp:
        tmp.write_bytes(archive.getvalue())
        # Read back the way `vitkit predict` reads any .pt2, so every export is proven to pass its checks.
        loaded = load_pt2_program(tmp)[0].module()
        outputs = [loaded(c).detach().numpy() for c in checks]
        diff = _check("PT2", outputs, references, checks)
    return diff
