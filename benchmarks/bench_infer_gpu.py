"""Inference images/second on a GPU: vitkit against timm's model of the same size, eager and compiled, in one run.

    python benchmarks/bench_infer_gpu.py --batch 1024 512 --models vit_base_patch32 vit_base_patch16

Random timm-style weights, 1000 classes, 224 px, bf16 autocast under inference_mode, the batch already on the device.
vitkit eager against timm eager, then vitkit compiled against timm compiled, each pair in alternating rounds so that
drift hits both alike; each figure is the median over the rounds. Every model runs eager before any is compiled.
ONNX Runtime joins the eager pair when its CUDA provider is installed (the `onnxruntime-gpu` package; `onnxruntime`
runs on the CPU only). `--device cpu --precision fp32` is the smoke mode of benchmarks/gpu_check.sh. Writes the JSON
after every (model, mode), so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from benchmark_report import alternating_rounds, batch_per_model, machine, median_round_ratio, write_report  # noqa: E402
from bench_train import TIMM_NAMES  # noqa: E402
from vitkit.model.vit import create_model  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rate(forward, images: torch.Tensor, steps: int) -> float:
    _sync(images.device)
    started = time.perf_counter()
    for _ in range(steps):
        forward(images)
    _sync(images.device)
    return steps * images.shape[0] / (time.perf_counter() - started)


def onnx_cuda_forward(model: torch.nn.Module, images: torch.Tensor, scratch: Path):
    """A forward through ONNX Runtime's CUDA provider (fp32 file, I/O bound to the device), or None without it."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, "onnxruntime is not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None, f"onnxruntime {ort.__version__} has no CUDA provider (install onnxruntime-gpu)"
    from vitkit.deploy.export import export_model

    path = scratch / "model.onnx"
    export_model(model, path, "ONNX", batch_size=images.shape[0])
    session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
    binding = session.io_binding()
    output = torch.empty((images.shape[0], model.arch.num_classes), device=images.device)
    name_in, name_out = session.get_inputs()[0].name, session.get_outputs()[0].name

    def forward(batch: torch.Tensor) -> None:
        binding.bind_input(name_in, "cuda", images.device.index or 0, 1, tuple(batch.shape), batch.data_ptr())
        binding.bind_output(name_out, "cuda", images.device.index or 0, 1, tuple(output.shape), output.data_ptr())
        session.run_with_iobinding(binding)

    return forward, "CUDAExecutionProvider, fp32"


def bench_model(name: str, batch: int, mode: str, args, scratch: Path) -> dict:
    """vitkit against timm in one mode (eager or compiled), alternating rounds; ONNX Runtime after the eager pair."""
    import timm

    device, dtype = torch.device(args.device), DTYPES[args.precision]
    images = torch.randn(batch, 3, args.image_size, args.image_size, device=device)
    ours = create_model(name, num_classes=1000, image_size=args.image_size).to(device).eval()
    peer = timm.create_model(TIMM_NAMES[name], num_classes=1000, img_size=args.image_size).to(device).eval()
    wrap = torch.compile if mode == "compile" else (lambda model: model)
    models = {f"timm {mode}": wrap(peer), f"vitkit {mode}": wrap(ours)}
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def run(model, batch):
        with torch.inference_mode(), autocast:
            return model(batch)

    warm = {}
    for label, model in models.items():
        started = time.perf_counter()
        for _ in range(args.warmup):  # compiles
            run(model, images)
        _sync(device)
        warm[label] = time.perf_counter() - started
    runs = {label: (lambda model=model: timed_rate(lambda batch: run(model, batch), images, args.steps))
            for label, model in models.items()}
    rounds = alternating_rounds(runs, args.rounds)
    img_s = {label: statistics.median(values) for label, values in rounds.items()}
    result = {"model": name, "batch": batch, "mode": mode, "precision": args.precision, "device": str(device),
              "warmup_s": warm, "rounds": rounds, "img_s": img_s,
              "ratio": img_s[f"vitkit {mode}"] / img_s[f"timm {mode}"],
              "median_round_ratio": median_round_ratio(rounds[f"vitkit {mode}"], rounds[f"timm {mode}"])}
    if device.type == "cuda" and mode == "eager":
        forward, note = onnx_cuda_forward(ours, images, scratch)
        result["onnxruntime"] = note
        if forward is not None:
            forward(images)
            result["img_s"]["onnxruntime cuda fp32"] = statistics.median(
                timed_rate(forward, images, args.steps) for _ in range(args.rounds))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_base_patch32", "vit_base_patch16"], choices=list(TIMM_NAMES))
    parser.add_argument("--batch", type=int, nargs="+", default=[256], help="one for all models, or one per model")
    parser.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16", choices=list(DTYPES))
    parser.add_argument("--warmup", type=int, default=3, help="untimed forwards first (compilation happens here)")
    parser.add_argument("--steps", type=int, default=10, help="forwards per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "infer_gpu.json"))
    args = parser.parse_args()
    batches = batch_per_model(parser, args.models, args.batch)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        # Every model eager before any compiles: a run cut short by its time limit keeps the eager figures.
        for mode in sorted(set(args.modes), key=["eager", "compile"].index):
            for name in args.models:
                result = bench_model(name, batches[name], mode, args, Path(scratch))
                results.append(result)
                rates = ", ".join(f"{label} {value:.0f}" for label, value in result["img_s"].items())
                print(f"{name} {mode} batch {batches[name]}: {rates} img/s; vitkit/timm {result['ratio']:.2f}x "
                      f"(per round {result['median_round_ratio']:.2f}x)", flush=True)
                write_report(args.out, {"machine": machine(), "settings": vars(args), "results": results}, quiet=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
