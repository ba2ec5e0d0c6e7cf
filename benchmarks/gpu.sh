#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md and the README in one command, sized for one call of a lent GPU
# machine (10 minutes at most per command, 15 minutes of device time per session, start-up included):
#   1. `benchmarks/bench.py` on the GPU, ours against transformers' port: bf16, then fp32 (inference at batch 1, 64
#      and 256, the training step at 64), with the model FLOP utilization against a large matmul of the same dtype
#      measured in the same run (BENCH_ARGS="--impls ours,hf,timm:resnet50" adds contestants);
#   2. Fashion-MNIST recipes trained side by side on the one GPU until BUDGET seconds after the start (small models
#      leave a GPU mostly idle, each process being bound by its CPU thread queuing kernels): the full recipe
#      (configs/fashion_mnist_full.yaml) and two variants of it (ONLY picks others: `cpu80_graphs`, the CPU recipe
#      with CUDA graphs). A two-epoch probe of all of them together measures
#      seconds per epoch first; each then trains for as many epochs as fit the time left, with its cosine schedule
#      over those epochs. The epochs each run got are in its recipe.yaml and summary.json.
#
# Here, once:      mkdir -p .fmnist && cp /usr/share/datasets/fashion-mnist/*.gz .fmnist/   (.fmnist is ignored)
# On the machine:  device tool, run(command="bash benchmarks/gpu.sh", carry=[".fmnist"], timeout_s=600)
# Dry run here:    DEVICE=cpu QUICK=1 PY=.venv/bin/python OUT=/tmp/gpu_dry bash benchmarks/gpu.sh
# Training only:   BENCH_DTYPES= BUDGET=480 bash benchmarks/gpu.sh   (BUDGET: seconds until the runs must end)
# One recipe with the whole GPU, other settings:  ONLY=nomix_b1024 TRAIN_ARGS="--compile --set
#                  compile_mode=reduce-overhead" BENCH_DTYPES= bash benchmarks/gpu.sh   (ONLY: names, space-separated)
# Bench with CUDA graphs, no training:  BENCH_DTYPES=bf16 BENCH_ARGS="--compile --compile-mode reduce-overhead
#                  --tasks infer,train,matmul" BENCH_SECONDS=400 ONLY=none bash benchmarks/gpu.sh
#
# It uses the machine's own torch, transformers and timm (nothing installed). What comes back ($OUT, 8 files at
# most): RESULTS.md (benchmarks/RESULTS.md with the GPU sections added: copy it over the repo's), gpu.log,
# runs.tar.gz (the bench JSONs; each run's metrics.jsonl, summary.json, recipe.yaml and log) and each finished
# run's weights as <run>.safetensors, to check here with `cvt eval --checkpoint`.
set -uo pipefail

START=$(date +%s)
OUT=${OUT:-runs/gpu}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-555}                  # seconds from the start until every training run must have ended
DATA_DIR=${DATA_DIR:-.fmnist}
PY=${PY:-python3}                      # the machine's python3 holds its PyTorch
RUNS=${RUNS:-/tmp/cvt_runs}
mkdir -p "$OUT"
rm -rf "$RUNS" && mkdir -p "$RUNS"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec > >(tee "$OUT/gpu.log") 2>&1
left() { echo $((START + BUDGET - $(date +%s))); }

# name and `cvt train` arguments of each recipe trained side by side. On the H200 machine lent here, a step of these
# small models at batch 256 took ~80 ms with 3 processes side by side (~3,200 images/s each), mostly CPU time queuing
# kernels, so the batch is 1024 (and 512: ~6,600 and ~4,500 images/s each), and random erasing, whose timm
# implementation queues two kernels per erased image, is lighter. Figures: benchmarks/GPU_NOTES.md.
FULL=(--config configs/fashion_mnist_full.yaml)
BIG=(--batch-size 1024 --lr 2e-3 --warmup-epochs 3 --set cooldown_epochs=2 --set reprob=0.25)
RECIPES=(
    "full_b1024|${FULL[*]} ${BIG[*]}"                                      # cvt_small, 28/14/7 tokens, 4.0M
    "nomix_b1024|${FULL[*]} ${BIG[*]} --set mixup=0 --set cutmix=0"        # the same without Mixup/CutMix
    "nomix_b512|${FULL[*]} ${BIG[*]} --set mixup=0 --set cutmix=0 --batch-size 512 --lr 1.5e-3"
    # The CPU recipe that reached 94.47% in 80 epochs (cvt_tiny, batch 128), with CUDA graphs: eager, its ~45 ms
    # step (kernel launches) gives ~25 epochs a call; graphs are what could fit 80. Not in the default set.
    "cpu80_graphs|--config configs/fashion_mnist_cpu.yaml --compile --set compile_mode=reduce-overhead"
    # The full recipe as it is (batch 256) with CUDA graphs: eager it is ~11 s an epoch alone, launch-bound.
    "full_graphs|${FULL[*]} --compile --set compile_mode=reduce-overhead"
)
declare -A MAX_EPOCHS=([cpu80_graphs]=80)  # a recipe measured at this length is not run longer (default 200)
if [ "${ONLY:-}" = none ]; then  # the bench alone
    RECIPES=()
elif [ -z "${ONLY:-}" ]; then  # the default set: the three full-recipe variants
    RECIPES=("${RECIPES[@]:0:3}")
elif [ -n "${ONLY:-}" ]; then  # keep the recipes named in ONLY
    kept=()
    for r in "${RECIPES[@]}"; do
        [[ " $ONLY " == *" ${r%%|*} "* ]] && kept+=("$r")
    done
    [ ${#kept[@]} -gt 0 ] || { echo "ONLY=$ONLY names none of: ${RECIPES[*]%%|*}"; exit 1; }
    RECIPES=("${kept[@]}")
fi
read -r -a TRAIN_EXTRA <<< "${TRAIN_ARGS:-}"  # appended to every `cvt train`
read -r -a BENCH_EXTRA <<< "${BENCH_ARGS:-}"  # appended to every benchmarks/bench.py
[ "${QUICK:-0}" = 1 ] && TRAIN_EXTRA=(--batch-size 64 "${TRAIN_EXTRA[@]}")  # the subset has 512 images
BENCH_SECONDS=${BENCH_SECONDS:-100}
MIN_EPOCHS=${MIN_EPOCHS:-15}           # fewer would be mostly warm-up and cool-down (3 + 2 epochs)
EXTRA=()
if [ "${QUICK:-0}" = 1 ]; then  # a dry run of the script itself: tiny sizes, a 512/256-image subset of the data
    BENCH=(--model cvt_small --img-size 32 --batch-sizes 1,2 --train-batch 2 --rounds 1 --min-time 0 --matmul-size 128)
    BUDGET=${QUICK_BUDGET:-240}
    MIN_EPOCHS=1
    EXTRA=(--warmup-epochs 0 --set cooldown_epochs=0)
    "$PY" - "$DATA_DIR" "$RUNS/data" <<'EOF'
import gzip, struct, sys, pathlib
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
dst.mkdir(parents=True)
for split, n in (("train", 512), ("t10k", 256)):
    for kind, item in (("images-idx3", 28 * 28), ("labels-idx1", 1)):
        name = f"{split}-{kind}-ubyte.gz"
        raw = gzip.open(src / name).read()
        head = 16 if item > 1 else 8
        header = bytearray(raw[:head]); header[4:8] = struct.pack(">I", n)
        gzip.open(dst / name, "wb").write(bytes(header) + raw[head:head + n * item])
EOF
    DATA_DIR="$RUNS/data"
else
    BENCH=(--batch-sizes 1,64,256 --train-batch 64 --rounds 3 --min-time 0.5)  # 64 did not fill the H200
fi

"$PY" - <<'EOF'
import torch, platform
print("python", platform.python_version(), "torch", torch.__version__,
      "cuda", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
EOF
[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true

cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
for dtype in ${BENCH_DTYPES-bf16 fp32}; do
    echo "== bench $DEVICE $dtype: $(date -u +%T)"
    timeout "$BENCH_SECONDS" "$PY" benchmarks/bench.py --device "$DEVICE" --dtype "$dtype" "${BENCH[@]}" \
        "${BENCH_EXTRA[@]}" --json "$RUNS/bench_$dtype.json" --markdown "$OUT/RESULTS.md" || echo "bench $dtype failed: rc $?"
done
if [ ${#RECIPES[@]} = 0 ]; then
    (cd "$RUNS" && tar czf "$OUT/runs.tar.gz" .)
    echo "== done, no training (ONLY=none): $(date -u +%T)"
    exit 0
fi

[ -f "$DATA_DIR/train-images-idx3-ubyte.gz" ] || { echo "no Fashion-MNIST in $DATA_DIR: carry .fmnist (see top)"; exit 1; }
train() {  # name, epochs, seconds allowed, extra arguments...
    local name=$1 epochs=$2 seconds=$3; shift 3
    timeout "$seconds" "$PY" -m cvt.cli train "$@" "${TRAIN_EXTRA[@]}" --epochs "$epochs" --data-dir "$DATA_DIR" \
        --device "$DEVICE" --out "$RUNS/$name" > "$RUNS/$name.log" 2>&1
    echo "$name: exit status $? after $epochs epochs or ${seconds} s (124: stopped at the time limit)"
}

pids=()
echo "== probe: two epochs of each recipe, side by side: $(date -u +%T), $(left) s left"
for r in "${RECIPES[@]}"; do
    name=${r%%|*}
    # shellcheck disable=SC2086  # the recipe's arguments are words
    train "probe_$name" 2 150 ${r#*|} --warmup-epochs 0 --set cooldown_epochs=0 --eval-every 100 &
    pids+=($!)
done
wait "${pids[@]}"  # (a bare `wait` would also wait for the `tee` above, which never ends)
pids=()
echo "== train side by side: $(date -u +%T), $(left) s left"
for r in "${RECIPES[@]}"; do
    name=${r%%|*}
    # Seconds of the probe's second epoch (the first took 1.6-2x longer on the H200: CUDA start-up, allocator, cuDNN
    # selection), then the epochs that fit 90% of the time left: the rest covers start-up, evaluation every 5
    # epochs and checkpoints. A compiled recipe's second epoch may run alone (its first compiles for ~50 s while
    # the others' probes end): side by side it then takes ~2x that, and the runs meet the time limit (2026-11-27).
    # Give a compiled recipe the GPU alone (ONLY=full_graphs).
    epochs=$("$PY" - "$RUNS/probe_$name/metrics.jsonl" "$(left)" "${MAX_EPOCHS[$name]:-200}" <<'EOF'
import json, sys
try:
    seconds = json.loads(open(sys.argv[1]).readlines()[-1])["seconds"]
except (OSError, IndexError, KeyError, ValueError):
    print(0); raise SystemExit
print(max(0, min(int(sys.argv[3]), int(0.9 * (int(sys.argv[2]) - 20) / seconds))))
EOF
)
    echo "$name: $epochs epochs"
    # shellcheck disable=SC2086
    [ "$epochs" -ge "$MIN_EPOCHS" ] && { train "$name" "$epochs" "$(left)" ${r#*|} "${EXTRA[@]}" & pids+=($!); }
done
[ ${#pids[@]} = 0 ] || wait "${pids[@]}"

echo "== collect: $(date -u +%T)"
for r in "${RECIPES[@]}"; do
    name=${r%%|*}
    tail -n 3 "$RUNS/$name.log" 2>/dev/null
    if [ -f "$RUNS/$name/summary.json" ]; then
        cp "$RUNS/$name/model.safetensors" "$OUT/$name.safetensors"
    elif [ -f "$RUNS/$name/best/best.json" ]; then  # stopped at the time limit: its best evaluation's weights
        cp "$RUNS/$name/best/model.safetensors" "$OUT/$name.best.safetensors"
    fi
done
(cd "$RUNS" && tar czf "$OUT/runs.tar.gz" --exclude='*.safetensors' --exclude='*.pt' --exclude=tensorboard \
    --exclude=data --exclude='*.png' .)
ls -la "$OUT"
echo "== done: $(date -u +%T)"
