#!/usr/bin/env bash
# Everything a GPU machine (H100/H200) should measure, in one run of under 9 minutes (the steps' time limits add up
# to 530 s; each step keeps what it measured when cut short), installing nothing:
#   bash benchmarks/bench_gpu.sh                 # results under $OUT (the device tool's folder) or benchmarks/results/gpu
# 1. Synthetic-data training step, bf16 autocast, torch.compile, fused AdamW: vitkit against timm's model with the
#    same settings, ViT-B/32 and ViT-B/16, images/s and MFU (bench_train.py).
# 2. End to end from a JPEG folder (`vitkit train`, loader workers decoding and cropping on the CPU) against the
#    synthetic rate of step 1: the data pipeline must not be the bottleneck.
# 3. Inference images/s, bf16, compiled, against timm compiled (alternating rounds).
# DEVICE=cpu BATCH=4 IMAGES_PER_CLASS=4 COPIES=1 PRECISION=fp32 runs the same steps on a CPU as a smoke test of
# the script itself.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
RESULTS="${OUT:-$ROOT/benchmarks/results/gpu}"
DEVICE="${DEVICE:-cuda}"
BATCH="${BATCH:-256}"
IMAGES_PER_CLASS="${IMAGES_PER_CLASS:-80}"  # 8 classes x 80 JPEGs x 8 copies: 5,120 paths, 20 steps of 256 an epoch
COPIES="${COPIES:-8}"
WORKERS="${WORKERS:-$(( $(nproc) - 2 ))}"
PRECISION="${PRECISION:-bf16}"
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
mkdir -p "$RESULTS"
export OMP_WAIT_POLICY=PASSIVE

# The JPEG region decoder is gitignored build output: build it here (offline) when a compiler and libjpeg's headers
# are present, else the loaders decode whole JPEGs. machine.txt records which.
"$PY" setup.py -q build_ext --inplace >/dev/null 2>&1 || true

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__)'
  "$PY" -c 'from vitkit.data import folder; print("JPEG region decoder:", "built" if folder.decode_region else "not built")'
  echo "CPU cores: $(nproc), loader workers: $WORKERS"; } \
  | tee "$RESULTS/machine.txt"

echo "== 1. training step on synthetic data (vitkit vs timm, $PRECISION, compile) =="
timeout 200 "$PY" benchmarks/bench_train.py --device "$DEVICE" --precision "$PRECISION" --modes compile \
  --batch "$BATCH" --models vit_base_patch32 vit_base_patch16 --warmup 3 --steps 10 --rounds 3 \
  --out "$RESULTS/train_step.json" 2>&1 | tee "$RESULTS/train_step.txt"

echo "== 2. end to end from JPEGs (ViT-B/32) =="
# make_jpegs.py writes about 40 files/s on one core: 80 per class, each hard-linked 8 times (the loader reads 5,120
# paths; the page cache holds them all either way).
if timeout 60 "$PY" benchmarks/make_jpegs.py "$SCRATCH/jpegs/base" --per-class "$IMAGES_PER_CLASS" >/dev/null \
   && timeout 20 "$PY" benchmarks/make_jpegs.py "$SCRATCH/jpegs/val" --per-class 4 --seed 1 >/dev/null; then
  for class_dir in "$SCRATCH"/jpegs/base/*/; do
    class_name="$(basename "$class_dir")"
    for copy in $(seq "$COPIES"); do
      mkdir -p "$SCRATCH/jpegs/train/$class_name" && cp -al "$class_dir" "$SCRATCH/jpegs/train/$class_name/copy$copy"
    done
  done
  timeout 150 "$PY" -m vitkit train --backbone=vit_base_patch32 --class_num=8 \
    --dataset_path="$SCRATCH/jpegs/train" --eval_path="$SCRATCH/jpegs/val" --save_checkpoint_path="$SCRATCH/run" \
    --batch_size="$BATCH" --max_epoch=4 --warmup_epochs=1 --eval_interval=100 --save_checkpoint=0 \
    --train_num_workers="$WORKERS" --train.device="$DEVICE" --train.precision="$PRECISION" --train.compile=true \
    --logging.progress=plain 2>&1 | grep -E "epoch\[|error" | tee "$RESULTS/end_to_end.txt"
  "$PY" - "$SCRATCH/run/metrics.jsonl" "$RESULTS/train_step.json" <<'EOF' | tee -a "$RESULTS/end_to_end.txt"
import json, os, statistics, sys
epochs = [json.loads(line) for line in open(sys.argv[1])] if os.path.exists(sys.argv[1]) else []
steady = statistics.median(r["fps"] for r in epochs[1:]) if len(epochs) > 1 else float("nan")  # epoch 0 compiles
results = json.load(open(sys.argv[2]))["results"] if os.path.exists(sys.argv[2]) else []
synthetic = next((r["vitkit_img_s"] for r in results if r["model"] == "vit_base_patch32"), float("nan"))
note = " (a step above did not finish)" if steady != steady or synthetic != synthetic else ""  # NaN != NaN
print(f"end to end {steady:.0f} img/s, synthetic {synthetic:.0f} img/s: {steady / synthetic:.0%} of the synthetic rate{note}")
EOF
else
  echo "skipped: benchmarks/make_jpegs.py needs scikit-image (pip install -e '.[bench]')" | tee "$RESULTS/end_to_end.txt"
fi

echo "== 3. inference ($PRECISION, batch $BATCH) =="
timeout 100 "$PY" - "$DEVICE" "$BATCH" "$PRECISION" <<'EOF' 2>&1 | tee "$RESULTS/inference.txt"
import statistics, sys, time
import torch
from vitkit.model.vit import create_model
device, batch, precision = torch.device(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
def rates(models, images, rounds=5, steps=10):
    """Median images/s of each model, in alternating rounds so that drift hits them alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = {key: [] for key in models}
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for model in models.values():
            for _ in range(3):  # compiles
                model(images)
        for _ in range(rounds):
            for key, model in models.items():
                sync()
                started = time.perf_counter()
                for _ in range(steps):
                    model(images)
                sync()
                results[key].append(steps * images.shape[0] / (time.perf_counter() - started))
    return {key: statistics.median(values) for key, values in results.items()}
try:
    import timm
except ImportError:
    timm = None
for name in ("vit_base_patch32", "vit_base_patch16"):
    images = torch.randn(batch, 3, 224, 224, device=device)
    models = {"vitkit compile": torch.compile(create_model(name, num_classes=1000).to(device).eval())}
    if timm is not None:
        models["timm compile"] = torch.compile(timm.create_model(f"{name}_224", num_classes=1000).to(device).eval())
    rows = rates(models, images)
    line = ", ".join(f"{key} {value:.0f} img/s" for key, value in rows.items())
    if timm is not None:
        line += f"; compiled ratio {rows['vitkit compile'] / rows['timm compile']:.2f}"
    print(f"{name}: {line}", flush=True)
EOF
echo "results in $RESULTS"
