"""What the class-token-only last block gains: vitkit's training step with it on and off, in one process.

    .venv/bin/python benchmarks/bench_last_block.py                        # ViT-Ti/16 and ViT-B/32, ~4 min on 2 cores
    .venv/bin/python benchmarks/bench_last_block.py --models vit_base_patch32 --rounds 16

With class-token pooling the classifier reads one token of the last block, so vitkit's model computes that block's
query, projection and MLP for the class token only (same logits and gradients). This times `Trainer._train_step`
(the step of bench_train.py: fp32, mixup, label smoothing, AdamW) with the switch on and off in alternating rounds,
the order flipped every round, and reports the ratio of the medians. Writes benchmarks/results/last_block.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import TIMM_NAMES, VitkitStep, timed  # noqa: E402
from benchmark_report import alternating_rounds, machine, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_tiny_patch16", "vit_base_patch32"], choices=list(TIMM_NAMES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds per setting")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "last_block.json"))
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            runner = VitkitStep(name, args.batch, 224, "cpu", "fp32", False, Path(scratch) / name)
            model = runner.trainer.train_model
            model = getattr(model, "module", model)
            for _ in range(2):
                runner.step()

            def with_switch(on: bool):
                def run():
                    model._last_block_class_token_only = lambda: on
                    return timed(runner, args.steps)
                return run

            rounds = alternating_rounds(
                {"class_token_only": with_switch(True), "every_token": with_switch(False)}, args.rounds
            )
            medians = {setting: statistics.median(values) for setting, values in rounds.items()}
            ratio = medians["class_token_only"] / medians["every_token"]
            results.append({"model": name, "batch": args.batch, "rounds": rounds, "img_s": medians, "ratio": ratio})
            print(f"{name}: class token only {medians['class_token_only']:.2f} img/s, every token "
                  f"{medians['every_token']:.2f} img/s: {ratio:.3f}x", flush=True)
    write_report(args.out, {"machine": machine(), "settings": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
