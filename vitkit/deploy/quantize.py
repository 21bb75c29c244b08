"""int8 dynamic quantization of an exported ONNX model: int8 weights, activations quantized per batch at run time."""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from vitkit.errors import VitkitError
from vitkit.fileio import atomic_path


def int8_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}.int8{path.suffix}")


def quantize_int8(source: str | Path, target: str | Path | None = None) -> Path:
    """Write an int8 copy of the ONNX model at `source` (default name `<stem>.int8.onnx`) and return its path.

    Only MatMul and Gemm, where a ViT spends its time, are quantized (weights per channel): the patch
    convolution would become ConvInteger, which ONNX Runtime runs slower than float on CPU, and LayerNorm,
    Softmax and GELU stay float, as quantizing them costs accuracy for no speed.
    """
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise VitkitError("int8 quantization needs onnxruntime: pip install 'vitkit[deploy]'") from None
    source = Path(source)
    target = Path(target) if target else int8_path(source)
    quiet = logging.getLogger()
    level = quiet.level
    with atomic_path(target) as tmp:
        try:
            quiet.setLevel(logging.ERROR)  # the quantizer logs advice about pre-processing at WARNING
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_dynamic(
                    str(source), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=["MatMul", "Gemm"],
                )
        except Exception as exc:  # noqa: BLE001 - the quantizer's failures have many types
            raise VitkitError(f"int8 quantization of {source} failed ({' '.join(str(exc).split())[:200]})") from None
        finally:
            quiet.setLevel(level)
    return target


def logit_difference(fp32_path: str | Path, int8_path: str | Path) -> float:
    """Largest logit difference between two ONNX models on one seeded random input of the first one's shape."""
    import numpy as np

    from vitkit.deploy.onnx_runtime import OnnxModel

    fp32, int8 = OnnxModel(fp32_path), OnnxModel(int8_path)
    side = fp32.image_size[0] or (fp32.card.preprocessing.image_size if fp32.card.preprocessing else 224)
    images = np.random.default_rng(0).standard_normal((fp32.batch_size or 1, 3, side, side)).astype(np.float32)
    return float(np.abs(fp32(images) - int8(images)).max())
