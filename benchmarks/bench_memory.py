"""Peak memory of one training step with and without activation checkpointing (model.grad_checkpointing).

    .venv/bin/python benchmarks/bench_memory.py                                    # CPU, ViT-B/16 and ViT-L/16, batch 4
    .venv/bin/python benchmarks/bench_memory.py --device cuda --batch 32 --models vit_base_patch16 vit_large_patch16

Each case runs in a fresh process, so that one case's peak cannot hide another's: it builds the model (1000
classes, 224 pixels, no dropout) and torch's AdamW, allocates AdamW's two moments with a step on zero gradients (as
every step after a run's first finds them), then takes one step on random images: forward, cross-entropy,
backward, optimizer step. On the CPU the peak is the process's peak resident set (getrusage's ru_maxrss), reported
beside the resident set just before the step (weights, moments, the allocator's pool, the interpreter), so that
their difference is what the step itself added: activations and gradients. On CUDA it is
torch.cuda.max_memory_allocated over the step. Writes benchmarks/results/memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MIB = 2**20


def _resident_mib() -> float:
    """The current resident set, from /proc (Linux); 0 where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def one_case(model_name: str, batch: int, checkpointing: bool, device_name: str) -> dict:
    """One training step in this process; what it measured."""
    import torch

    from vitkit.model.vit import create_model

    device = torch.device(device_name)
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=1000, style="timm").to(device).train()
    model.grad_checkpointing = checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    images = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    before = _resident_mib()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        allocated_before = torch.cuda.memory_allocated(device) / MIB
    started = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    result = {"model": model_name, "batch": batch, "grad_checkpointing": checkpointing, "device": device_name,
              "parameters": sum(param.numel() for param in model.parameters()), "step_seconds": round(seconds, 2),
              # ru_maxrss is in KiB on Linux
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "rss_before_step_mib": round(before, 1)}
    if device.type == "cuda":
        result["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated(device) / MIB, 1)
        result["cuda_before_step_mib"] = round(allocated_before, 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_base_patch16", "vit_large_patch16"])
    parser.add_argument("--batch", type=int, default=4, help="images per step (default 4)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory.json"))
    parser.add_argument("--case", nargs=3, metavar=("MODEL", "BATCH", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 1 <= args.batch <= 4096:
        parser.error("--batch must be between 1 and 4096")
    if args.case:  # a child: one case, one JSON line
        model_name, batch, checkpointing = args.case
        print(json.dumps(one_case(model_name, int(batch), checkpointing == "1", args.device)))
        return 0

    from benchmark_report import machine, write_report

    rows = []
    for model_name in args.models:
        for checkpointing in (False, True):
            command = [sys.executable, __file__, "--device", args.device, "--case", model_name, str(args.batch),
                       "1" if checkpointing else "0"]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ})
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                return 1
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            row = rows[-1]
            peak = row.get("cuda_peak_mib", row["peak_rss_mib"])
            before = row.get("cuda_before_step_mib", row["rss_before_step_mib"])
            print(f"{model_name:<20} batch {args.batch:>3}  checkpointing {'on ' if checkpointing else 'off'}  "
                  f"peak {peak:>9.1f} MiB  before step {before:>9.1f} MiB  step added {peak - before:>9.1f} MiB  "
                  f"step {row['step_seconds']:.2f} s", flush=True)
            write_report(args.out, {"machine": machine(), "rows": rows})  # after each case: a run cut short keeps them
    return 0


if __name__ == "__main__":
    sys.exit(main())
