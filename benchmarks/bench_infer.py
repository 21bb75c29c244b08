"""Inference images/second on the CPU: vitkit's paths against timm's eager model of the same size, in one run.

    .venv/bin/python benchmarks/bench_infer.py                          # both models, batch 1 and 32 (~5 min on 2 cores)
    .venv/bin/python benchmarks/bench_infer.py --models vit_tiny_patch16 --rounds 5

For each model (random timm-style weights, 1000 classes, 224 px) and batch size it measures, in alternating
rounds so that a noisy machine hits every path alike: timm eager (the peer), vitkit eager, vitkit under
torch.compile, ONNX Runtime fp32 at opset 18 (MatMul/Softmax attention) and opset 23 (one Attention node per
block), and ONNX Runtime int8 (dynamic quantization of each of those two files). Each figure is the median over the
rounds; the ratios are against timm eager's median from the same run, and the median of the per-round ratios
(each path against timm eager in the same round). Writes benchmarks/results/infer.json with
the command, the machine, the versions and every round.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# As the vitkit command does (vitkit/cli.py): sleeping OpenMP waits, for timm and vitkit alike. Spinning waits
# collapse batch-1 eager speed on a small shared machine, where a spinning thread holds the core another needs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vitkit.deploy.export import export_model  # noqa: E402
from vitkit.deploy.onnx_runtime import OnnxModel, cpu_threads  # noqa: E402
from vitkit.deploy.quantize import quantize_int8  # noqa: E402
from vitkit.model.vit import create_model  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from benchmark_report import alternating_rounds, machine, median_round_ratio  # noqa: E402

TIMM_NAMES = {"vit_tiny_patch16": "vit_tiny_patch16_224", "vit_base_patch32": "vit_base_patch32_224"}
PEER = "timm eager"


def images_per_second(run, images, min_seconds: float) -> float:
    """Calls `run(images)` until min_seconds have passed (at least once) and returns images per second."""
    count, started = 0, time.perf_counter()
    while True:
        run(images)
        count += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return count * images.shape[0] / elapsed


def build_paths(name: str, folder: Path, compile_model: bool) -> dict:
    """Each way to run the model: a callable taking a float32 NCHW numpy batch."""
    import timm

    torch.manual_seed(0)
    peer = timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=1000).eval()
    model = create_model(name, num_classes=1000).eval()
    model.load_state_dict(peer.state_dict())  # the same weights, so the paths differ in execution only

    def torch_path(module):
        def run(images):
            with torch.inference_mode():
                return module(torch.from_numpy(images))
        return run

    paths = {PEER: torch_path(peer), "vitkit eager": torch_path(model)}
    if compile_model:
        paths["vitkit torch.compile"] = torch_path(torch.compile(model))
    started = time.perf_counter()
    export_model(model, folder / f"{name}_18.onnx", opset=18, dynamic_batch=True)
    export_model(model, folder / f"{name}_23.onnx", opset=23, dynamic_batch=True)
    quantize_int8(folder / f"{name}_18.onnx", folder / f"{name}_int8.onnx")
    quantize_int8(folder / f"{name}_23.onnx", folder / f"{name}_int8_23.onnx")
    print(f"  {name}: exports and int8 quantization took {time.perf_counter() - started:.0f}s", flush=True)
    paths["onnxruntime fp32 (opset 18)"] = OnnxModel(folder / f"{name}_18.onnx")
    paths["onnxruntime fp32 (opset 23)"] = OnnxModel(folder / f"{name}_23.onnx")
    paths["onnxruntime int8 (opset 18)"] = OnnxModel(folder / f"{name}_int8.onnx")
    paths["onnxruntime int8 (opset 23)"] = OnnxModel(folder / f"{name}_int8_23.onnx")
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(TIMM_NAMES), choices=list(TIMM_NAMES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument("--min-seconds", type=float, default=0.5, help="timing window per path and round")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (its warm-up is the slowest part)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "infer.json"))
    args = parser.parse_args()
    torch.set_num_threads(cpu_threads())
    started = time.perf_counter()
    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
               "machine": {**machine(), "load_average_1min_at_start": os.getloadavg()[0]},
               "peer": PEER, "image_size": 224, "num_classes": 1000, "runs": []}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            paths = build_paths(name, Path(tmp), not args.no_compile)
            for batch in args.batches:
                images = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
                for label, run in paths.items():  # warm-up: compilation, allocator and thread-pool start
                    run(images)
                rounds = alternating_rounds(
                    {label: functools.partial(images_per_second, run, images, args.min_seconds)
                     for label, run in paths.items()},
                    args.rounds,
                )
                peer = statistics.median(rounds[PEER])
                for label, values in rounds.items():
                    median = statistics.median(values)
                    paired = median_round_ratio(values, rounds[PEER])
                    results["runs"].append({"model": name, "batch": batch, "path": label, "images_per_s": median,
                                            "ratio_vs_timm_eager": median / peer,
                                            "median_round_ratio_vs_timm_eager": paired, "rounds": values})
                print(f"  {name} batch {batch} done at {time.perf_counter() - started:.0f}s", flush=True)
    results["wall_s"] = time.perf_counter() - started
    # Other processes on the machine show up here: a load well above the core count means noisy figures.
    results["machine"]["load_average_1min_at_end"] = os.getloadavg()[0]
    print(f"\n{'model':<18} {'batch':>5}  {'path':<28} {'images/s':>9} {'vs timm eager':>14} {'per round':>10}")
    for row in results["runs"]:
        print(f"{row['model']:<18} {row['batch']:>5}  {row['path']:<28} {row['images_per_s']:>9.1f} "
              f"{row['ratio_vs_timm_eager']:>13.2f}x {row['median_round_ratio_vs_timm_eager']:>9.2f}x")
    machine_info = results["machine"]
    print(f"\n{machine_info['cpu']}, {machine_info['cores']} cores, 1-min load average "
          f"{machine_info['load_average_1min_at_start']:.1f} at start and {machine_info['load_average_1min_at_end']:.1f} "
          f"at the end; {results['wall_s']:.0f}s in all")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
