"""Test top-1 against wall-clock on Fashion-MNIST: trains each recipe with `vitkit train` and reads its metrics.

    .venv/bin/python benchmarks/bench_fashion_mnist.py                       # the demo recipe (~10 min budget)
    .venv/bin/python benchmarks/bench_fashion_mnist.py configs/fashion_mnist_vit_long.yml
    .venv/bin/python benchmarks/bench_fashion_mnist.py configs/fashion_mnist_vit_92.yml --set max_epoch=12  # a variant

Prints a table (epoch, cumulative seconds of training plus evaluation, top-1, top-5) per recipe and writes
benchmarks/results/fashion_mnist.json with the command, the machine and the numbers. Needs the image folder from
`vitkit data fashion-mnist data/fashion-mnist` (the Makefile's demo target makes it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "threads": torch.get_num_threads(),
    }


def run_recipe(config: str, out_dir: Path, overrides: list[str]) -> list[dict]:
    command = [sys.executable, "-m", "vitkit", "train", "--config_path", config, *(f"--{item}" for item in overrides),
               f"--checkpoint.output_dir={out_dir}", "--checkpoint.overwrite=true", "--logging.progress=plain"]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    elapsed = 0.0
    for record in records:
        elapsed += record["epoch_time"] + record.get("eval_cost", 0.0)
        record["elapsed"] = elapsed
    return [{"command": " ".join(command[1:]), "process_wall_s": wall, "epochs": records}]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", default=["configs/fashion_mnist_vit.yml"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every recipe, e.g. --set max_epoch=12 (repeatable)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fashion_mnist.json"))
    args = parser.parse_args()
    results = {"machine": machine(), "recipes": {}}
    for config in args.configs:
        out_dir = ROOT / "outputs" / "bench" / Path(config).stem
        (run,) = run_recipe(config, out_dir, args.set)
        results["recipes"][config] = run
        print(f"\n{config}  (process wall {run['process_wall_s']:.0f}s, start-up and data listing included)")
        print(f"{'epoch':>5} {'elapsed s':>10} {'top-1':>8} {'top-5':>8} {'img/s':>8}")
        for record in run["epochs"]:
            top1 = record.get("accuracy", float("nan"))
            top5 = record.get("top5", float("nan"))
            print(f"{record['epoch']:>5} {record['elapsed']:>10.1f} {top1:>8.4f} {top5:>8.4f} {record['fps']:>8.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
