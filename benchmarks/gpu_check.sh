#!/usr/bin/env bash
# The GPU check: everything an NVIDIA H100/H200 machine (16 CPU cores beside it) should run and measure, in about
# 8 minutes (steps 1-5 took 7 on an H200; the limits add up to 9), installing nothing (torch, torchvision, timm,
# scikit-image and pytest must be there):
#   bash benchmarks/gpu_check.sh            # results under $OUT if set, else benchmarks/results/gpu
#   SMOKE=1 bash benchmarks/gpu_check.sh    # the same steps on the CPU at toy sizes (tests/test_gpu_check.py, in CI)
# In order, each step under its own time limit and keeping what it measured when cut short:
# 1. The CUDA tests (tests/test_cuda.py and the nvJPEG test).
# 2. The bf16 training step of ViT-B/32 and ViT-B/16 at a batch that fills the card, eager and compiled, against
#    timm's model with the same settings in alternating rounds, with MFU (bench_train.py).
# 3. End to end from a JPEG folder (`vitkit train`, ViT-B/32, compiled, all cores as loader workers), decoding on the
#    workers and on the GPU (nvJPEG), against the synthetic rate of step 2; the nvJPEG path's parts alone first
#    (bench_device_decode.py).
# 4. Inference images/s, eager and compiled, against timm (bench_infer_gpu.py).
# 5. Fashion-MNIST on the GPU (configs/fashion_mnist_vit_gpu.yml: the demo's model at batch 1024): top-1 and the
#    training time to 88 %.
# 6. The CUDA peak memory of one ViT-B/16 and ViT-L/16 training step without and with activation checkpointing
#    (bench_memory.py).
# Fashion-MNIST is read from FASHION_MNIST_SOURCE (the four IDX .gz files; default: the Debian package's folder).
# summary.json gathers every figure; log.txt is this script's whole output.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
RESULTS="${OUT:-$ROOT/benchmarks/results/gpu}"
FASHION_MNIST_SOURCE="${FASHION_MNIST_SOURCE:-/usr/share/datasets/fashion-mnist}"
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
mkdir -p "$RESULTS"
exec > >(tee "$RESULTS/log.txt") 2>&1
TEE_PID=$!
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
STARTED=$SECONDS

if [[ "${SMOKE:-0}" == 1 ]]; then
  DEVICE=cpu PRECISION=fp32 IMAGE=32 WORKERS=1 MODES=(eager)
  MODELS=(vit_tiny_patch16) BATCHES=(4) WARMUP=1 STEPS=1 ROUNDS=1
  JPEG_ARGS=(--per-class 2 --size 64x48) JPEG_MAKERS=1 JPEG_COPIES=2 E2E_EPOCHS=2
  DEMO_ARGS=(--max_epoch=1 --eval_interval=1 --batch_size=8 --train_num_workers=1) DEMO_LIMIT=(--limit 40)
  MEMORY_ARGS=(--device cpu --batch 2 --models vit_tiny_patch16)
  LIMITS=(test=60 step=60 e2e=60 infer=60 demo=60 memory=60)
else
  DEVICE=cuda PRECISION=bf16 IMAGE=224 WORKERS=$(( $(nproc) - 2 )) MODES=(eager compile)
  MODELS=(vit_base_patch32 vit_base_patch16) BATCHES=(1024 512) WARMUP=3 STEPS=8 ROUNDS=3
  # 4 makers x 40 photos a class x 8 classes, each file hard-linked 32 times: 40,960 paths, 40 steps of 1024 an epoch;
  # epoch 0 compiles and fills the workers' queues, epoch 1 is measured.
  JPEG_ARGS=(--per-class 40) JPEG_MAKERS=4 JPEG_COPIES=32 E2E_EPOCHS=2
  DEMO_ARGS=(--train_num_workers="$WORKERS" --eval_num_workers=4) DEMO_LIMIT=()
  # Each step's time on an H200 (BENCHMARKS.md) with a margin; compiling a training model is most of step 2.
  MEMORY_ARGS=(--device cuda --batch 64 --models vit_base_patch16 vit_large_patch16)
  LIMITS=(test=45 step=190 e2e=110 infer=60 demo=80 memory=50)
fi
declare -A LIMIT
for pair in "${LIMITS[@]}"; do LIMIT[${pair%%=*}]=${pair#*=}; done
E2E_MODEL=${MODELS[0]} E2E_BATCH=${BATCHES[0]}

# The C extensions (JPEG region decoder, CPU GELU kernel) are build output: built here, offline, when a compiler and
# the headers are there; without them the loaders decode whole JPEGs, more slowly.
if "$PY" setup.py -q build_ext --inplace >"$SCRATCH/build.log" 2>&1; then BUILD="built"; else BUILD="not built ($(grep -m1 -iE 'error|fatal' "$SCRATCH/build.log" | cut -c1-160))"; fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c 'import sys, torch, torchvision; print("python", sys.version.split()[0], "torch", torch.__version__, "torchvision", torchvision.__version__)'
  "$PY" -c 'from vitkit.data import folder; print("JPEG region decoder:", "built" if folder.decode_region else "not built")'
  echo "C extensions: $BUILD"
  echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), cores: $(nproc), loader workers: $WORKERS"; } \
  | tee "$SCRATCH/machine.txt"

# Data for steps 3 and 5, made on a few cores while step 1 runs.
( for seed in $(seq "$JPEG_MAKERS"); do
    "$PY" benchmarks/make_jpegs.py "$SCRATCH/jpegs/base$seed" --seed "$seed" "${JPEG_ARGS[@]}" >/dev/null &
  done
  "$PY" benchmarks/make_jpegs.py "$SCRATCH/jpegs/val" --per-class 2 --seed 99 "${JPEG_ARGS[@]:2}" >/dev/null &
  wait
  for class_dir in "$SCRATCH"/jpegs/base*/*/; do
    class_name="$(basename "$class_dir")" maker="$(basename "$(dirname "$class_dir")")"
    for copy in $(seq "$JPEG_COPIES"); do
      mkdir -p "$SCRATCH/jpegs/train/$class_name" && cp -al "$class_dir" "$SCRATCH/jpegs/train/$class_name/$maker-$copy"
    done
  done
  touch "$SCRATCH/jpegs/.complete" ) >"$SCRATCH/jpegs.log" 2>&1 &
JPEGS_PID=$!
"$PY" -m vitkit data fashion-mnist "$SCRATCH/fashion-mnist" --source "$FASHION_MNIST_SOURCE" "${DEMO_LIMIT[@]}" \
  >"$SCRATCH/fashion.log" 2>&1 &
FASHION_PID=$!

step() { echo; echo "== $1 ($(( SECONDS - STARTED )) s in) =="; }

step "1. CUDA tests"
timeout "${LIMIT[test]}" "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py tests/test_device_decode.py \
  -rs 2>&1 | tail -n 40 | tee "$RESULTS/cuda_tests.txt"
wait "$JPEGS_PID" "$FASHION_PID"

step "2. training step on synthetic data (vitkit vs timm, $PRECISION)"
# What steps 2 and 4 measure, the same way.
BENCH_ARGS=(--device "$DEVICE" --precision "$PRECISION" --modes "${MODES[@]}" --models "${MODELS[@]}"
  --batch "${BATCHES[@]}" --image-size "$IMAGE" --warmup "$WARMUP" --steps "$STEPS" --rounds "$ROUNDS")
timeout "${LIMIT[step]}" "$PY" benchmarks/bench_train.py "${BENCH_ARGS[@]}" --out "$RESULTS/train_step.json"

step "3. end to end from JPEGs ($E2E_MODEL, batch $E2E_BATCH, $WORKERS workers)"
if [[ -f "$SCRATCH/jpegs/.complete" ]]; then
  # The synthetic step's settings (no dropout, mixup 0.2, label smoothing, lr 1e-4, 1000 classes), so the compiled
  # graph is the one step 2 measured and a short warm-up cannot diverge; crop and flip only, which the GPU decoder
  # can run too.
  timeout 20 "$PY" benchmarks/bench_device_decode.py "$SCRATCH/jpegs/train" --workers "$WORKERS" --batch "$E2E_BATCH" \
    --size "$IMAGE" --repeat 1 --epochs 2 --rounds 3 --out "$RESULTS/device_decode.json"
  for decode in workers device; do
    echo "-- decoding on the $decode"
    timeout $(( ${LIMIT[e2e]} / 2 )) "$PY" -m vitkit train --backbone="$E2E_MODEL" --class_num=1000 \
      --train_image_size="$IMAGE" --eval_image_size="$IMAGE" \
      --dataset_path="$SCRATCH/jpegs/train" --eval_path="$SCRATCH/jpegs/val" --save_checkpoint_path="$SCRATCH/e2e-$decode" \
      --batch_size="$E2E_BATCH" --max_epoch="$E2E_EPOCHS" --warmup_epochs=1 --eval_interval=1000 --save_checkpoint=0 \
      --train_num_workers="$WORKERS" --train.device="$DEVICE" --train.precision="$PRECISION" \
      --train.compile="$([[ " ${MODES[*]} " == *" compile "* ]] && echo true || echo false)" \
      --data.augment=none --data.decode_on="$decode" --mixup=0.2 --loss_name=ce_smooth_mixup --lr_max=0.0001 \
      --model.drop_rate=0 --model.proj_drop_rate=0 --model.mlp_drop_rate=0 --model.attn_drop_rate=0 \
      --model.drop_path_rate=0 --logging.progress=plain 2>&1 | grep -E "epoch\[|error|Error" | tail -n 5
  done
else
  echo "skipped: the JPEG folder was not made"; cat "$SCRATCH/jpegs.log"
fi
"$PY" - "$SCRATCH" "$RESULTS" "$E2E_MODEL" <<'EOF'
import json, os, statistics, sys
from vitkit.fileio import atomic_path
scratch, results, model = sys.argv[1:]
def steady_fps(decode):
    path = os.path.join(scratch, f"e2e-{decode}", "metrics.jsonl")
    epochs = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    return statistics.median(r["fps"] for r in epochs[1:]) if len(epochs) > 1 else None  # epoch 0 compiles
step = os.path.join(results, "train_step.json")
rows = json.load(open(step))["results"] if os.path.exists(step) else []
modes = {r["mode"]: r["vitkit_img_s"] for r in rows if r["model"] == model}
synthetic = modes.get("compile", modes.get("eager"))
report = {"model": model, "synthetic_img_s": synthetic}
for decode in ("workers", "device"):
    fps = steady_fps(decode)
    report[f"{decode}_img_s"] = fps
    report[f"{decode}_fraction"] = fps / synthetic if fps and synthetic else None
    print(f"decoding on the {decode}: {fps or float('nan'):.0f} img/s = "
          f"{(report[f'{decode}_fraction'] or float('nan')):.0%} of the synthetic {synthetic or float('nan'):.0f} img/s")
with atomic_path(os.path.join(results, "end_to_end.json")) as tmp:
    tmp.write_text(json.dumps(report, indent=2) + "\n")
EOF

step "4. inference ($PRECISION)"
timeout "${LIMIT[infer]}" "$PY" benchmarks/bench_infer_gpu.py "${BENCH_ARGS[@]}" --out "$RESULTS/inference.json"

step "5. Fashion-MNIST demo on $DEVICE"
if [[ -f "$SCRATCH/fashion-mnist/.complete" ]]; then
  timeout "${LIMIT[demo]}" "$PY" -m vitkit train --config_path configs/fashion_mnist_vit_gpu.yml \
    --data.train_path="$SCRATCH/fashion-mnist/train" --data.val_path="$SCRATCH/fashion-mnist/val" \
    --checkpoint.output_dir="$SCRATCH/demo" --train.device="$DEVICE" --logging.progress=plain "${DEMO_ARGS[@]}" \
    2>&1 | grep -E "epoch\[|precision|training time|error|Error"
else
  echo "skipped: Fashion-MNIST was not written"; cat "$SCRATCH/fashion.log"
fi
"$PY" - "$SCRATCH" "$RESULTS" <<'EOF'
import json, os, sys
from vitkit.fileio import atomic_path
scratch, results = sys.argv[1:]
path = os.path.join(scratch, "demo", "metrics.jsonl")
epochs = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
evaluated = [r for r in epochs if "accuracy" in r]
# The target: training seconds (evaluation not counted) until the first evaluation at 88 % or more.
trained, seconds_to_88 = 0.0, None
for r in epochs:
    trained += r["epoch_time"]
    if seconds_to_88 is None and r.get("accuracy", 0) >= 0.88:
        seconds_to_88 = trained
report = {"epochs": len(epochs), "train_seconds": trained, "top1": evaluated[-1]["accuracy"] if evaluated else None,
          "seconds_to_88": seconds_to_88, "per_epoch": epochs}
print(f"demo: {report['epochs']} epochs, {report['train_seconds']:.1f} s of training, top-1 {report['top1']}, "
      f"88 % after {seconds_to_88 if seconds_to_88 is None else round(seconds_to_88, 1)} s")
with atomic_path(os.path.join(results, "demo.json")) as tmp:
    tmp.write_text(json.dumps(report, indent=2) + "\n")
EOF

step "6. activation checkpointing: peak memory of one training step, without and with"
timeout "${LIMIT[memory]}" "$PY" benchmarks/bench_memory.py "${MEMORY_ARGS[@]}" --out "$RESULTS/memory.json"

step "summary"
"$PY" - "$SCRATCH/machine.txt" "$RESULTS" "$(( SECONDS - STARTED ))" <<'EOF'
import json, os, sys
from vitkit.fileio import atomic_path
machine_txt, results, seconds = sys.argv[1:]
def read(name):
    path = os.path.join(results, name)
    return json.load(open(path)) if os.path.exists(path) else None
tests = open(os.path.join(results, "cuda_tests.txt")).read().strip().splitlines() if os.path.exists(os.path.join(results, "cuda_tests.txt")) else []
summary = {"machine": open(machine_txt).read().splitlines(), "seconds": int(seconds),
           "cuda_tests": tests[-1] if tests else None, "train_step": (read("train_step.json") or {}).get("results"),
           "device_decode": (read("device_decode.json") or {}).get("result"), "end_to_end": read("end_to_end.json"),
           "inference": (read("inference.json") or {}).get("results"),
           "demo": {k: v for k, v in (read("demo.json") or {}).items() if k != "per_epoch"},
           "memory": (read("memory.json") or {}).get("rows")}
with atomic_path(os.path.join(results, "summary.json")) as tmp:
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
print("\n".join(summary["machine"]))
print("CUDA tests:", summary["cuda_tests"])
for r in summary["train_step"] or []:
    mfu = f", MFU vitkit {r['vitkit_mfu']:.1%} timm {r['timm_mfu']:.1%}" if "vitkit_mfu" in r else ""
    print(f"train step {r['model']} {r['mode']} batch {r['batch']}: vitkit {r['vitkit_img_s']:.0f} timm "
          f"{r['timm_img_s']:.0f} img/s, {r['ratio']:.2f}x (per round {r['median_round_ratio']:.2f}x){mfu}")
parts = summary["device_decode"] or {}
if "nvjpeg_img_s" in parts:
    print(f"nvJPEG alone {parts['nvjpeg_img_s']:.0f} img/s, decode + crop + resize {parts['decode_batch_img_s']:.0f} img/s")
e2e = summary["end_to_end"] or {}
for decode in ("workers", "device"):
    if e2e.get(f"{decode}_img_s"):
        print(f"end to end, decoding on the {decode}: {e2e[f'{decode}_img_s']:.0f} img/s, "
              f"{e2e[f'{decode}_fraction']:.0%} of synthetic")
for r in summary["inference"] or []:
    print(f"inference {r['model']} {r['mode']} batch {r['batch']}: " + ", ".join(f"{k} {v:.0f}" for k, v in r["img_s"].items())
          + f" img/s, {r['ratio']:.2f}x (per round {r['median_round_ratio']:.2f}x)")
print("demo:", summary["demo"])
for r in summary["memory"] or []:
    peak = r.get("cuda_peak_mib", r["peak_rss_mib"])
    before = r.get("cuda_before_step_mib", r["rss_before_step_mib"])
    print(f"memory {r['model']} batch {r['batch']} checkpointing {r['grad_checkpointing']}: peak {peak:.0f} MiB, "
          f"the step adds {peak - before:.0f} MiB")
print(f"total {seconds} s; results in {results}")
EOF
exec 1>&- 2>&-
wait "$TEE_PID"  # log.txt complete before the script returns
