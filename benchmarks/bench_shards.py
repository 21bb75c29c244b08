"""Training-input images/second from WebDataset shards against the same JPEGs as an image folder.

    .venv/bin/python benchmarks/make_jpegs.py data/bench-jpegs      # once: ImageNet-like JPEGs from real photos
    .venv/bin/python benchmarks/bench_shards.py data/bench-jpegs    # about 2 minutes on 2 cores

The folder is written as shards (`vitkit data shard`, 100 images a shard) into a temporary folder and, with
--remote, into a bucket on moto's S3 server on 127.0.0.1 (what a remote store costs in requests, not in network
distance). Each side is ImageFolderDataset with the training transform (RandomResizedCrop 224, flip) in the
DataLoader that build_loader makes, --workers workers, batches of --batch-size; only where the bytes come from
differs (a file each, a byte range of a local shard, a byte-range request). Each round times every side once, in
an order that reverses from round to round, so that all see the same machine load; the figures are the medians of
the per-round ratios, of images per wall second and of images per CPU second (main process and workers, which other
jobs on a shared machine disturb far less). Writes benchmarks/results/shards.json.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import Cycle, loader_rate, vitkit_transform  # noqa: E402
from benchmark_report import machine  # noqa: E402

from vitkit import storage  # noqa: E402
from vitkit.data.archives import list_labelled, write_shards  # noqa: E402
from vitkit.data.folder import ImageFolderDataset  # noqa: E402
from vitkit.data.loader import build_loader  # noqa: E402
from vitkit.fileio import atomic_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def start_loopback_bucket():
    """moto's S3 server on a free loopback port with a bucket, and the AWS_* variables that point vitkit at it."""
    from moto.server import ThreadedMotoServer
    import boto3

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    storage.configure("")
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
    return server, "s3://bench/shards"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="class folders of JPEGs (benchmarks/make_jpegs.py)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=320, help="images per timed pass")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--remote", action="store_true", help="also read the shards from a loopback S3 server")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "shards.json"))
    args = parser.parse_args()

    server = None
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as scratch:
        splits = {"folder": args.folder, "shards": os.path.join(scratch, "shards")}
        write_shards(args.folder, splits["shards"], shard_size=100)
        if args.remote:
            server, splits["remote shards"] = start_loopback_bucket()
            write_shards(args.folder, splits["remote shards"], shard_size=100)
        loaders = {}
        for side, split in splits.items():
            samples, _, source = list_labelled(split)
            dataset = ImageFolderDataset(samples, vitkit_transform("train"), seed=0, source=source)
            loaders[side] = build_loader(dataset, Cycle(len(dataset), args.images), args.batch_size, args.workers,
                                         drop_last=True)
            loader_rate(loaders[side])  # start the workers and warm the page cache outside the timing
        rounds = {side: [] for side in splits}
        for number in range(args.rounds):
            order = list(loaders) if number % 2 == 0 else list(reversed(loaders))
            for side in order:
                rounds[side].append(loader_rate(loaders[side]))
            print(f"round {number + 1}: " + ", ".join(f"{side} {values[-1][0]:.1f} img/s ({values[-1][1]:.1f} per "
                                                      "CPU s)" for side, values in rounds.items()), flush=True)
        del loaders
    if server is not None:
        server.stop()
    medians = {side: {"wall_img_s": statistics.median(wall for wall, _ in values),
                      "cpu_img_s": statistics.median(cpu for _, cpu in values)} for side, values in rounds.items()}
    ratios = {}
    for side in rounds:
        if side != "folder":
            pairs = list(zip(rounds[side], rounds["folder"]))
            ratios[f"{side} / folder"] = {"wall": statistics.median(ours[0] / theirs[0] for ours, theirs in pairs),
                                          "cpu": statistics.median(ours[1] / theirs[1] for ours, theirs in pairs)}
    for side, value in medians.items():
        print(f"{side:>14}: {value['wall_img_s']:7.1f} img/s, {value['cpu_img_s']:7.1f} per CPU s "
              f"(medians of {args.rounds})")
    for name, value in ratios.items():
        print(f"{name:>23}: {value['wall']:.3f} wall, {value['cpu']:.3f} CPU (median of per-round ratios)")
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
              "workers": args.workers, "batch_size": args.batch_size, "images_per_pass": args.images,
              "median_img_s": medians, "ratios": ratios, "rounds": rounds}
    with atomic_path(args.out) as temporary:
        temporary.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
