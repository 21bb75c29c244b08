"""Images/second of vitkit's data pipeline against torchvision's standard one, on a folder of JPEGs, in one run.

    .venv/bin/python benchmarks/make_jpegs.py data/bench-jpegs      # once: ImageNet-like JPEGs from real photos
    .venv/bin/python benchmarks/bench_data.py data/bench-jpegs      # about 3 minutes on 2 cores

Pipelines, each from the encoded file to what the training step receives:
  torchvision  torchvision.datasets.ImageFolder (PIL decode), v2 RandomResizedCrop(224, scale 0.05-1) and flip
               [+ AutoAugment on the PIL image], ToImage, ToDtype(float32, scale), Normalize, all in the worker:
               the recipe in torchvision's references and most tutorials.
  vitkit       vitkit.data's ImageFolderDataset with train_transform / eval_transform (uint8 out of the worker,
               normalization on the device), in the DataLoader that build_loader makes.
Eval is resize 256 (the original's 224 / 0.875, rounded to 16) and center crop 224 for both.

Each case is timed in-process (one worker's rate: torch on one thread, dataset[i] in a loop) and through a
DataLoader with --workers workers (batch --batch-size, persistent workers, every batch consumed). Rounds alternate
torchvision and vitkit so that both see the same machine load; the figure is the ratio of the medians. Next to
images per wall second it reports images per CPU second (the main process and the workers, from /proc), which
other jobs on a shared machine disturb far less. Prints a table and writes benchmarks/results/data.json with the
command, the machine, the versions and every round.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import features as pil_features
import torch
from torch.utils.data import DataLoader, Sampler
from torchvision import datasets
from torchvision.transforms import v2

from vitkit.data.folder import ImageFolderDataset, list_image_folder
from vitkit.data.loader import build_loader
from vitkit.data.transforms import CROP_RATIO, eval_resize_size, eval_transform, train_transform
from vitkit.fileio import atomic_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_report import machine as report_machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 224
CROP_MIN = 0.05
CASES = ("train", "train+autoaugment", "eval")


def machine() -> dict:
    return {**report_machine(), "pillow_libjpeg_turbo": pil_features.check_feature("libjpeg_turbo"),
            "load_average_at_start": os.getloadavg()}


def torchvision_standard(case: str) -> v2.Compose:
    """What a torchvision user writes: PIL in, float32 normalized tensor out of the worker."""
    to_float = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])]
    if case == "eval":
        return v2.Compose([v2.Resize(eval_resize_size(IMAGE_SIZE)), v2.CenterCrop(IMAGE_SIZE), *to_float])
    stages = [v2.RandomResizedCrop(IMAGE_SIZE, scale=(CROP_MIN, 1.0), ratio=CROP_RATIO), v2.RandomHorizontalFlip()]
    if case == "train+autoaugment":
        stages.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
    return v2.Compose([*stages, *to_float])


def vitkit_transform(case: str):
    if case == "eval":
        return eval_transform(IMAGE_SIZE)
    return train_transform(IMAGE_SIZE, crop_min=CROP_MIN, augment="autoaugment" if case.endswith("autoaugment") else "none")


class Cycle(Sampler[int]):
    """`count` indices cycling through a shuffled dataset, so a timed pass can be longer than the folder."""

    def __init__(self, size: int, count: int, seed: int = 0):
        self.order = np.random.default_rng(seed).permutation(np.resize(np.arange(size), count)).tolist()

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def datasets_for(root: Path, case: str):
    samples, _ = list_image_folder(root)
    ours = ImageFolderDataset(samples, vitkit_transform(case), seed=0)
    theirs = datasets.ImageFolder(str(root), transform=torchvision_standard(case))
    return theirs, ours


def in_process_rate(dataset, count: int) -> tuple[float, float]:
    """One worker's (images per wall second, images per CPU second): what each DataLoader worker does, one thread."""
    order = Cycle(len(dataset), count, seed=1).order
    dataset[order[0]]  # warm caches and lazy imports outside the timing
    wall, cpu = time.perf_counter(), time.thread_time()
    for index in order:
        dataset[index]
    return count / (time.perf_counter() - wall), count / (time.thread_time() - cpu)


def _process_cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a live process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _loader_cpu_seconds(loader) -> float:
    """CPU seconds used so far by this process and the loader's persistent workers (private DataLoader field)."""
    workers = getattr(getattr(loader, "_iterator", None), "_workers", [])
    return time.process_time() + sum(_process_cpu_seconds(worker.pid) for worker in workers)


def loader_for(dataset, which: str, batch_size: int, workers: int, count: int):
    if which == "vitkit":
        return build_loader(dataset, Cycle(len(dataset), count), batch_size, workers, drop_last=True)
    return DataLoader(dataset, batch_size=batch_size, sampler=Cycle(len(dataset), count), num_workers=workers,
                      drop_last=True, pin_memory=torch.cuda.is_available(), persistent_workers=True)


def loader_rate(loader) -> tuple[float, float]:
    """(images per wall second, images per CPU second of main process and workers) over one pass, from asking
    for the first batch to holding the last. The CPU rate barely moves when other jobs share the cores."""
    images = 0
    cpu = _loader_cpu_seconds(loader)
    wall = time.perf_counter()
    for batch in loader:
        images += len(batch[0])
    return images / (time.perf_counter() - wall), images / (_loader_cpu_seconds(loader) - cpu)


def summarize(by_pipeline: dict[str, list[tuple[float, float]]]) -> dict:
    wall = {which: statistics.median(rate for rate, _ in rounds) for which, rounds in by_pipeline.items()}
    cpu = {which: statistics.median(rate for _, rate in rounds) for which, rounds in by_pipeline.items()}
    return {
        "torchvision_img_s": wall["torchvision"], "vitkit_img_s": wall["vitkit"],
        "ratio": wall["vitkit"] / wall["torchvision"],
        "torchvision_img_per_cpu_s": cpu["torchvision"], "vitkit_img_per_cpu_s": cpu["vitkit"],
        "cpu_ratio": cpu["vitkit"] / cpu["torchvision"],
        "rounds_wall_and_cpu": by_pipeline,
    }


def run(args) -> dict:
    results = {}
    print(f"{'case':<18} {'mode':<10} {'torchvision':>11} {'vitkit':>8} {'ratio':>6}   "
          f"{'per CPU-s: tv':>13} {'vitkit':>8} {'ratio':>6}")
    for case in args.cases:
        theirs, ours = datasets_for(args.folder, case)
        pipelines = (("torchvision", theirs), ("vitkit", ours))
        rounds = {"in_process": {"torchvision": [], "vitkit": []}, "loader": {"torchvision": [], "vitkit": []}}
        torch.set_num_threads(1)
        for _ in range(args.rounds):
            for which, dataset in pipelines:
                rounds["in_process"][which].append(in_process_rate(dataset, args.in_process_images))
        torch.set_num_threads(args.threads)
        loaders = {which: loader_for(dataset, which, args.batch_size, args.workers, args.loader_images)
                   for which, dataset in pipelines}
        for loader in loaders.values():
            loader_rate(loader)  # starts the persistent workers; the start-up is not what is measured
        for _ in range(args.rounds):
            for which, loader in loaders.items():
                rounds["loader"][which].append(loader_rate(loader))
        del loaders
        results[case] = {}
        for mode, by_pipeline in rounds.items():
            row = results[case][mode] = summarize(by_pipeline)
            print(f"{case:<18} {mode:<10} {row['torchvision_img_s']:>11.1f} {row['vitkit_img_s']:>8.1f} "
                  f"{row['ratio']:>5.2f}x   {row['torchvision_img_per_cpu_s']:>13.1f} "
                  f"{row['vitkit_img_per_cpu_s']:>8.1f} {row['cpu_ratio']:>5.2f}x", flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="ImageFolder of JPEGs (benchmarks/make_jpegs.py makes one)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per pipeline; the median is kept")
    parser.add_argument("--in-process-images", type=int, default=160)
    parser.add_argument("--loader-images", type=int, default=512)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads of the main process while loaders run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "data.json")
    args = parser.parse_args()
    if not args.folder.is_dir():
        sys.exit(f"bench_data: {args.folder} is not a folder; make one with benchmarks/make_jpegs.py {args.folder}")
    # torchvision 0.29 warns that its decoders move to TorchCodec; the warning is not the benchmark's business.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    started = time.perf_counter()
    machine_at_start = machine()
    print(f"images/second (wall, then per CPU-second), medians of {args.rounds} alternating rounds; "
          f"ratio = vitkit / torchvision; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    results = run(args)
    summary = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_at_start,
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "images_in_folder": len(list_image_folder(args.folder)[0]),
        "wall_s": round(time.perf_counter() - started, 1),
        "results": results,
    }
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out} ({summary['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
