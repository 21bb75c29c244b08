"""The parts of `data.decode_on=device`, each alone: the workers' planning loader, and on a GPU nvJPEG's batched
decode and the whole decode_batch (decode, crop, resize, flip).

    .venv/bin/python benchmarks/make_jpegs.py data/bench-jpegs
    .venv/bin/python benchmarks/bench_device_decode.py data/bench-jpegs --workers 2 --batch 512

The folder's JPEGs are listed `--repeat` times, so that an epoch is long enough to time. Writes
benchmarks/results/device_decode.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from benchmark_report import machine, write_report  # noqa: E402
from vitkit.data.device_decode import EncodedCropDataset, collate_encoded, decode_batch  # noqa: E402
from vitkit.data.folder import list_image_folder  # noqa: E402
from vitkit.data.loader import ShardSampler, build_loader  # noqa: E402
from vitkit.data.transforms import train_transform  # noqa: E402


def loader_rates(dataset, args) -> list[float]:
    """Images/s of the workers' planning loader, one figure per epoch (the first includes starting the workers)."""
    sampler = ShardSampler(len(dataset), seed=0)
    loader = build_loader(dataset, sampler, args.batch, args.workers, drop_last=True, collate_fn=collate_encoded,
                          pin_memory=torch.cuda.is_available())
    rates = []
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        started, count = time.perf_counter(), 0
        for _, labels, _, _ in loader:
            count += len(labels)
        rates.append(count / (time.perf_counter() - started))
    return rates


def device_rates(dataset, args) -> dict:
    """On CUDA: images/s of nvJPEG's batched decode alone and of decode_batch, over one batch, median of rounds."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device("cuda")
    batch, labels, _, _ = collate_encoded([dataset[i] for i in range(args.batch)])
    streams = list(torch.split(batch.data.pin_memory(), batch.lengths.tolist()))

    def timed(run) -> float:
        run()  # the first call creates nvJPEG's handles
        rounds = []
        for _ in range(args.rounds):
            torch.cuda.synchronize()
            started = time.perf_counter()
            run()
            torch.cuda.synchronize()
            rounds.append(args.batch / (time.perf_counter() - started))
        return statistics.median(rounds)

    return {
        "nvjpeg_img_s": timed(lambda: decode_jpeg(streams, mode=ImageReadMode.RGB, device=device)),
        "decode_batch_img_s": timed(lambda: decode_batch(batch, labels, device, (args.size, args.size))),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="class folders of JPEGs (benchmarks/make_jpegs.py)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=16, help="list every file this many times")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "device_decode.json"))
    args = parser.parse_args()
    samples, _ = list_image_folder(args.folder)
    dataset = EncodedCropDataset(samples * args.repeat, train_transform(args.size, augment="none"), seed=0)
    result = {"paths": len(dataset), "loader_img_s": loader_rates(dataset, args)}
    print(f"planning loader, {args.workers} workers, batch {args.batch}: "
          + ", ".join(f"{rate:.0f}" for rate in result["loader_img_s"]) + " img/s by epoch")
    if torch.cuda.is_available():
        result.update(device_rates(dataset, args))
        print(f"nvJPEG alone {result['nvjpeg_img_s']:.0f} img/s, decode_batch {result['decode_batch_img_s']:.0f} img/s")
    write_report(args.out, {"machine": machine(), "settings": vars(args), "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
