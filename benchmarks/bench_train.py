"""Training-step images/second: vitkit's real step against timm's model with torch.optim.AdamW, in one run.

    .venv/bin/python benchmarks/bench_train.py                                   # CPU fp32, eager and compile
    .venv/bin/python benchmarks/bench_train.py --device cuda --precision bf16 --batch 256 --models vit_base_patch32 vit_base_patch16

One step is what a training loop does per batch on synthetic data: forward, mixup (alpha 0.2) with label smoothing
0.1, backward, AdamW (weight decay 0.05). vitkit's step is `Trainer._train_step` itself (uint8 images in,
normalization and mixup on the device, its AdamW parameter groups); the peer is timm's model of the same size with
timm's Mixup and SoftTargetCrossEntropy and torch.optim.AdamW (fused on CUDA as vitkit's), fed already-normalized floats.
Dropout and stochastic depth are off in both (timm's defaults). Eager against eager and torch.compile against
torch.compile, in alternating rounds so that a noisy machine hits both alike; each figure is the median over the
rounds, beside the median of the per-round ratios. On CUDA it also reports MFU against the card's dense bf16 peak.
Writes benchmarks/results/train.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the vitkit command sets it; both sides get it

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from benchmark_report import batch_per_model, machine, median_round_ratio, write_report  # noqa: E402
from vitkit.config import load_config  # noqa: E402
from vitkit.engine.trainer import Trainer  # noqa: E402
from vitkit.model.summary import count_macs  # noqa: E402
from vitkit.model.vit import make_arch  # noqa: E402

TIMM_NAMES = {"vit_tiny_patch16": "vit_tiny_patch16_224", "vit_small_patch16": "vit_small_patch16_224",
              "vit_base_patch32": "vit_base_patch32_224", "vit_base_patch16": "vit_base_patch16_224"}
# Dense bf16 tensor-core peak in FLOP/s, for MFU (NVIDIA's data sheets, SXM parts).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
MIXUP, SMOOTHING, WEIGHT_DECAY, LR = 0.2, 0.1, 0.05, 1e-4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class VitkitStep:
    """A Trainer built over a one-image folder; only its step function is timed."""

    def __init__(self, name: str, batch: int, image_size: int, device: str, precision: str, compile_model: bool,
                 scratch: Path):
        from PIL import Image

        for split in ("train", "val"):
            folder = scratch / split / "class_a"
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (image_size, image_size)).save(folder / "blank.png")
        overrides = [
            f"--backbone={name}", "--class_num=1000", f"--train_image_size={image_size}", "--batch_size=1",
            f"--dataset_path={scratch / 'train'}", f"--eval_path={scratch / 'val'}", f"--train.device={device}",
            f"--save_checkpoint_path={scratch / 'out'}", f"--train.precision={precision}",
            f"--mixup={MIXUP}", "--loss_name=ce_smooth_mixup", "--use_label_smooth=1",
            f"--label_smooth_factor={SMOOTHING}", f"--weight_decay={WEIGHT_DECAY}", f"--lr_max={LR}",
            f"--train.compile={str(compile_model).lower()}", "--train_num_workers=0", "--eval_num_workers=0",
            "--model.drop_rate=0", "--model.proj_drop_rate=0", "--model.mlp_drop_rate=0",
            "--model.attn_drop_rate=0", "--model.drop_path_rate=0", "--logging.progress=plain",
            "--checkpoint.overwrite=true",
        ]
        self.trainer = Trainer(load_config(None, overrides))
        self.trainer.train_model.train()
        self.device = self.trainer.device
        # A batch as the loader hands it over: uint8 in host memory, pinned where there is a GPU to copy it to.
        self.images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8)
        self.labels = torch.randint(0, 1000, (batch,))
        if self.device.type == "cuda":
            self.images, self.labels = self.images.pin_memory(), self.labels.pin_memory()

    def step(self) -> None:
        self.trainer._train_step(self.images, self.labels)


class TimmStep:
    def __init__(self, name: str, batch: int, image_size: int, device: torch.device, precision: str,
                 compile_model: bool):
        import timm
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        self.device = device
        self.model = timm.create_model(TIMM_NAMES[name], num_classes=1000, img_size=image_size).to(device).train()
        self.forward = torch.compile(self.model) if compile_model else self.model
        # Fused on CUDA, as vitkit's; torch's default (foreach) elsewhere.
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY,
                                           fused=device.type == "cuda")
        self.mixup = Mixup(mixup_alpha=MIXUP, label_smoothing=SMOOTHING, num_classes=1000)
        self.criterion = SoftTargetCrossEntropy()
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.images = torch.randn(batch, 3, image_size, image_size, device=device)
        self.labels = torch.randint(0, 1000, (batch,), device=device)

    def step(self) -> None:
        images, targets = self.mixup(self.images, self.labels)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            logits = self.forward(images)
        loss = self.criterion(logits.float(), targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def timed(runner, steps: int) -> float:
    """Images/second over `steps` steps."""
    _sync(runner.device)
    started = time.perf_counter()
    for _ in range(steps):
        runner.step()
    _sync(runner.device)
    return steps * runner.images.shape[0] / (time.perf_counter() - started)


def bench_pair(name: str, mode: str, batch: int, args, scratch: Path) -> dict:
    compile_model = mode == "compile"
    torch.manual_seed(0)
    ours = VitkitStep(name, batch, args.image_size, args.device, args.precision, compile_model, scratch / name)
    peer = TimmStep(name, batch, args.image_size, ours.device, args.precision, compile_model)
    warm = {}
    for label, runner in (("timm", peer), ("vitkit", ours)):
        started = time.perf_counter()
        for _ in range(args.warmup):
            runner.step()
        _sync(runner.device)
        warm[label] = time.perf_counter() - started
    rounds = {"timm": [], "vitkit": []}
    for _ in range(args.rounds):
        for label, runner in (("timm", peer), ("vitkit", ours)):
            rounds[label].append(timed(runner, args.steps))
    medians = {label: statistics.median(values) for label, values in rounds.items()}
    result = {"model": name, "mode": mode, "batch": batch, "image_size": args.image_size,
              "precision": args.precision, "device": str(ours.device), "warmup_s": warm, "rounds": rounds,
              "timm_img_s": medians["timm"], "vitkit_img_s": medians["vitkit"],
              "ratio": medians["vitkit"] / medians["timm"],
              "median_round_ratio": median_round_ratio(rounds["vitkit"], rounds["timm"])}
    if ours.device.type == "cuda":
        card = torch.cuda.get_device_name(ours.device)
        peak = next((value for key, value in PEAK_BF16.items() if key in card), None)
        # Training costs three forward passes' worth of FLOPs (forward, and twice that backward); 1 MAC = 2 FLOPs.
        flops_per_image = 3 * 2 * count_macs(make_arch(name, num_classes=1000, image_size=args.image_size))
        if peak:
            result["vitkit_mfu"] = medians["vitkit"] * flops_per_image / peak
            result["timm_mfu"] = medians["timm"] * flops_per_image / peak
    del ours, peer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_tiny_patch16", "vit_base_patch32"], choices=list(TIMM_NAMES))
    parser.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    parser.add_argument("--batch", type=int, nargs="+", default=[16], help="one for all models, or one per model")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    parser.add_argument("--steps", type=int, default=2, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds per side")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train.json"))
    args = parser.parse_args()
    batches = batch_per_model(parser, args.models, args.batch)

    results = []
    header = (f"{'model':<18} {'mode':<8} {'batch':>5} {'timm img/s':>11} {'vitkit img/s':>13} {'ratio':>6} "
              f"{'per round':>9}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            for mode in args.modes:
                result = bench_pair(name, mode, batches[name], args, Path(scratch))
                results.append(result)
                mfu = (f"  MFU vitkit {result['vitkit_mfu']:.1%} timm {result['timm_mfu']:.1%}"
                       if "vitkit_mfu" in result else "")
                print(f"{name:<18} {mode:<8} {batches[name]:>5} {result['timm_img_s']:>11.1f} "
                      f"{result['vitkit_img_s']:>13.1f} {result['ratio']:>6.2f} {result['median_round_ratio']:>9.2f}{mfu}",
                      flush=True)
                # After every pair: a run cut short by a time limit keeps what it measured.
                write_report(args.out, {"machine": machine(), "settings": vars(args), "results": results}, quiet=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
