"""What vitkit's tanh-GELU CPU kernel gains: the activation alone, and vitkit's training step with it on and off.

    .venv/bin/python benchmarks/bench_gelu.py                      # ViT-Ti/16 and ViT-B/32, ~5 min on 2 cores
    .venv/bin/python benchmarks/bench_gelu.py --models vit_tiny_patch16 --rounds 16

1. The activation on each model's MLP input at batch 16 (16 x tokens x MLP width, float32): forward, and forward
   plus backward, for torch's erf GELU (timm's), torch's tanh GELU and vitkit's tanh GELU (vitkit/model/gelu.py).
2. `Trainer._train_step` of bench_train.py (fp32, mixup, label smoothing, AdamW; vitkit's default numerics, whose
   GELU is the tanh form) with vitkit's kernel and with torch's, and timm's eager step, in alternating rounds (the
   order reversed every round). Reports the medians and the median of the per-round ratios: rounds next to each
   other in time share the machine's load. Writes benchmarks/results/gelu.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import TIMM_NAMES, TimmStep, VitkitStep, timed  # noqa: E402
from benchmark_report import alternating_rounds, machine, median_round_ratio, write_report  # noqa: E402

from vitkit.model import gelu  # noqa: E402
from vitkit.model.vit import make_arch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def milliseconds(run, repeats: int) -> float:
    """Median wall time of run() in ms, after two warm-up calls."""
    for _ in range(2):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def activation_times(shape: tuple[int, ...], repeats: int) -> dict:
    activations = {
        "torch erf": F.gelu,
        "torch tanh": lambda x: F.gelu(x, approximate="tanh"),
        "vitkit tanh": gelu.gelu_tanh,
    }
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))

    def forward(activation):
        def run():
            with torch.no_grad():
                activation(x)
        return run

    def forward_backward(activation):
        def run():
            torch.autograd.backward(activation(x), grad)
            x.grad = None  # an activation's gradient is handed on, not accumulated
        return run

    return {label: {"forward_ms": milliseconds(forward(fn), repeats),
                    "forward_backward_ms": milliseconds(forward_backward(fn), repeats)}
            for label, fn in activations.items()}


def step_rounds(name: str, batch: int, steps: int, rounds: int, scratch: Path) -> dict:
    torch.manual_seed(0)
    ours = VitkitStep(name, batch, 224, "cpu", "fp32", False, scratch / name)
    peer = TimmStep(name, batch, 224, ours.device, "fp32", False)

    def vitkit_with(kernel: bool):
        def run():
            gelu.KERNEL_AVAILABLE = kernel
            return timed(ours, steps)
        return run

    runs = {"timm eager": lambda: timed(peer, steps), "vitkit, vitkit's GELU": vitkit_with(True),
            "vitkit, torch's GELU": vitkit_with(False)}
    for run in runs.values():
        run()
    measured = alternating_rounds(runs, rounds)
    gelu.KERNEL_AVAILABLE = True
    return {label: {"img_s": statistics.median(values), "rounds": values,
                    "median_round_ratio_vs_timm": median_round_ratio(values, measured["timm eager"])}
            for label, values in measured.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_tiny_patch16", "vit_base_patch32"], choices=list(TIMM_NAMES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per setting")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls of the activation alone")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gelu.json"))
    args = parser.parse_args()
    if not gelu.KERNEL_AVAILABLE:
        print("vitkit's tanh-GELU kernel is not available here (not built, or no AVX2): nothing to compare")
        return 1

    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            arch = make_arch(name, num_classes=1000)
            shape = (args.batch, (arch.image_size // arch.patch_size) ** 2 + 1, arch.mlp_dim)
            activation = activation_times(shape, args.repeats)
            print(f"{name}: activation on {'x'.join(map(str, shape))}, ms (forward / forward+backward)")
            for label, row in activation.items():
                print(f"  {label:<12} {row['forward_ms']:7.2f} / {row['forward_backward_ms']:7.2f}")
            steps = step_rounds(name, args.batch, args.steps, args.rounds, Path(scratch))
            print(f"{name}: training step, batch {args.batch}, {args.rounds} alternating rounds")
            for label, row in steps.items():
                print(f"  {label:<22} {row['img_s']:6.2f} img/s, median round ratio vs timm eager "
                      f"{row['median_round_ratio_vs_timm']:.3f}x", flush=True)
            results.append({"model": name, "activation_shape": shape, "activation": activation, "step": steps})
    write_report(args.out, {"machine": machine(), "settings": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
