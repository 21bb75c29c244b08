#!/usr/bin/env bash
# Everything a GPU machine (H100/H200) should measure, in one run of under 8 minutes, installing nothing:
#   bash benchmarks/bench_gpu.sh                 # results under $OUT (the device tool's folder) or benchmarks/results/gpu
# 1. Synthetic-data training step, bf16 autocast, torch.compile, fused AdamW: vitkit against timm's model with the
#    same settings, ViT-B/32 and ViT-B/16, images/s and MFU (bench_train.py).
# 2. End to end from a JPEG folder (`vitkit train`, loader workers decoding and cropping on the CPU) against the
#    synthetic rate of step 1: the data pipeline must not be the bottleneck.
# 3. Inference images/s, bf16, eager and compiled, against timm.
# DEVICE=cpu BATCH=4 IMAGES_PER_CLASS=4 runs the same steps on a CPU as a smoke test of the script itself.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
RESULTS="${OUT:-$ROOT/benchmarks/results/gpu}"
DEVICE="${DEVICE:-cuda}"
BATCH="${BATCH:-256}"
IMAGES_PER_CLASS="${IMAGES_PER_CLASS:-640}"  # 8 classes: 5,120 JPEGs, 20 steps of 256 an epoch
WORKERS="${WORKERS:-$(( $(nproc) - 2 ))}"
PRECISION="${PRECISION:-bf16}"
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
mkdir -p "$RESULTS"
export OMP_WAIT_POLICY=PASSIVE

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__)'; } \
  | tee "$RESULTS/machine.txt"

echo "== 1. training step on synthetic data (vitkit vs timm, $PRECISION, compile) =="
timeout 270 "$PY" benchmarks/bench_train.py --device "$DEVICE" --precision "$PRECISION" --modes compile \
  --batch "$BATCH" --models vit_base_patch32 vit_base_patch16 --warmup 3 --steps 10 --rounds 3 \
  --out "$RESULTS/train_step.json" 2>&1 | tee "$RESULTS/train_step.txt"

echo "== 2. end to end from JPEGs (ViT-B/32) =="
if timeout 90 "$PY" benchmarks/make_jpegs.py "$SCRATCH/jpegs/train" --per-class "$IMAGES_PER_CLASS" >/dev/null \
   && timeout 30 "$PY" benchmarks/make_jpegs.py "$SCRATCH/jpegs/val" --per-class 4 --seed 1 >/dev/null; then
  timeout 200 "$PY" -m vitkit train --backbone=vit_base_patch32 --class_num=8 \
    --dataset_path="$SCRATCH/jpegs/train" --eval_path="$SCRATCH/jpegs/val" --save_checkpoint_path="$SCRATCH/run" \
    --batch_size="$BATCH" --max_epoch=4 --warmup_epochs=1 --eval_interval=100 --save_checkpoint=0 \
    --train_num_workers="$WORKERS" --train.device="$DEVICE" --train.precision="$PRECISION" --train.compile=true \
    --logging.progress=plain 2>&1 | grep -E "epoch\[|error" | tee "$RESULTS/end_to_end.txt"
  "$PY" - "$SCRATCH/run/metrics.jsonl" "$RESULTS/train_step.json" <<'EOF' | tee -a "$RESULTS/end_to_end.txt"
import json, statistics, sys
epochs = [json.loads(line) for line in open(sys.argv[1])]
steady = statistics.median(r["fps"] for r in epochs[1:]) if len(epochs) > 1 else float("nan")  # epoch 0 compiles
synthetic = next(r["vitkit_img_s"] for r in json.load(open(sys.argv[2]))["results"] if r["model"] == "vit_base_patch32")
print(f"end to end {steady:.0f} img/s, synthetic {synthetic:.0f} img/s: {steady / synthetic:.0%} of the synthetic rate")
EOF
else
  echo "skipped: benchmarks/make_jpegs.py needs scikit-image (pip install -e '.[bench]')" | tee "$RESULTS/end_to_end.txt"
fi

echo "== 3. inference ($PRECISION, batch $BATCH) =="
timeout 150 "$PY" - "$DEVICE" "$BATCH" "$PRECISION" <<'EOF' 2>&1 | tee "$RESULTS/inference.txt"
import statistics, sys, time
import torch
from vitkit.model.vit import create_model
device, batch, precision = torch.device(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
def rate(model, images, rounds=5, steps=10):
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for _ in range(3):
            model(images)
        results = []
        for _ in range(rounds):
            torch.cuda.synchronize() if device.type == "cuda" else None
            started = time.perf_counter()
            for _ in range(steps):
                model(images)
            torch.cuda.synchronize() if device.type == "cuda" else None
            results.append(steps * images.shape[0] / (time.perf_counter() - started))
    return statistics.median(results)
try:
    import timm
except ImportError:
    timm = None
for name in ("vit_base_patch32", "vit_base_patch16"):
    images = torch.randn(batch, 3, 224, 224, device=device)
    ours = create_model(name, num_classes=1000).to(device).eval()
    rows = {"vitkit eager": rate(ours, images), "vitkit compile": rate(torch.compile(ours), images)}
    if timm is not None:
        peer = timm.create_model(f"{name}_224", num_classes=1000).to(device).eval()
        rows["timm eager"] = rate(peer, images)
        rows["timm compile"] = rate(torch.compile(peer), images)
    line = ", ".join(f"{key} {value:.0f} img/s" for key, value in rows.items())
    if timm is not None:
        line += f"; compiled ratio {rows['vitkit compile'] / rows['timm compile']:.2f}"
    print(f"{name}: {line}", flush=True)
EOF
echo "results in $RESULTS"
