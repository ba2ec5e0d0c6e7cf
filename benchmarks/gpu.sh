#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md and the README in one command, sized for one call of a lent GPU
# machine (10 minutes at most per command, 15 minutes of device time per session, start-up included):
#   1. `cvt bench` on the GPU, ours against transformers' port: bf16, then fp32, batch 64, with the model FLOP
#      utilization against a large matmul of the same dtype measured in the same run;
#   2. the Fashion-MNIST full recipe (configs/fashion_mnist_full.yaml) for what is left of TRAIN_SECONDS: per-epoch
#      images/s and seconds, top-1 every 5 epochs (time to accuracy), the summary if it finishes.
#
# Here, once:      mkdir -p .fmnist && cp /usr/share/datasets/fashion-mnist/*.gz .fmnist/   (.fmnist is ignored)
# On the machine:  device tool, run(command="bash benchmarks/gpu.sh", carry=[".fmnist"], timeout_s=600)
# Dry run here:    DEVICE=cpu QUICK=1 PY=.venv/bin/python OUT=/tmp/gpu_dry bash benchmarks/gpu.sh
#
# It uses the machine's own torch, transformers and timm (nothing installed). What comes back ($OUT, 8 files at
# most): RESULTS.md (benchmarks/RESULTS.md with the GPU sections added: copy it over the repo's), bench_bf16.json,
# bench_fp32.json, fmnist_metrics.jsonl, fmnist_summary.json (only if the run finished), fmnist.log, gpu.log.
set -uo pipefail

OUT=${OUT:-runs/gpu}
DEVICE=${DEVICE:-cuda}
TRAIN_SECONDS=${TRAIN_SECONDS:-330}   # the bench takes ~3 minutes before it; keep the sum under the 600 s limit
EPOCHS=${EPOCHS:-200}
DATA_DIR=${DATA_DIR:-.fmnist}
PY=${PY:-python3}                      # the machine's python3 holds its PyTorch
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec > >(tee "$OUT/gpu.log") 2>&1

if [ "${QUICK:-0}" = 1 ]; then  # a dry run of the script itself: tiny sizes, a few seconds of training
    BENCH=(--model cvt_small --img-size 32 --batch-sizes 1,2 --train-batch 2 --rounds 1 --min-time 0 --matmul-size 128)
    TRAIN=(--config configs/fashion_mnist_demo.yaml --epochs 1)
    TRAIN_SECONDS=${QUICK_TRAIN_SECONDS:-20}
else
    BENCH=(--batch-sizes 1,64 --train-batch 64 --rounds 3)
    TRAIN=(--config configs/fashion_mnist_full.yaml --epochs "$EPOCHS")
fi

"$PY" - <<'EOF'
import torch, platform
print("python", platform.python_version(), "torch", torch.__version__,
      "cuda", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
EOF
[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true

cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
for dtype in bf16 fp32; do
    echo "== bench $DEVICE $dtype: $(date -u +%T)"
    "$PY" -m cvt.cli bench --device "$DEVICE" --dtype "$dtype" "${BENCH[@]}" \
        --json "$OUT/bench_$dtype.json" --markdown "$OUT/RESULTS.md" || echo "bench $dtype failed: rc $?"
done

[ -f "$DATA_DIR/train-images-idx3-ubyte.gz" ] || { echo "no Fashion-MNIST in $DATA_DIR: carry .fmnist (see top)"; exit 1; }
echo "== train for at most ${TRAIN_SECONDS} s: $(date -u +%T)"
run=/tmp/cvt_fmnist_full
rm -rf "$run"
timeout "$TRAIN_SECONDS" "$PY" -m cvt.cli train "${TRAIN[@]}" --data-dir "$DATA_DIR" --device "$DEVICE" \
    --out "$run" > "$OUT/fmnist.log" 2>&1
echo "train exit status $? (124: stopped at ${TRAIN_SECONDS} s)"
tail -n 5 "$OUT/fmnist.log"
cp "$run/metrics.jsonl" "$OUT/fmnist_metrics.jsonl" 2>/dev/null || echo "no metrics.jsonl (no epoch finished)"
cp "$run/summary.json" "$OUT/fmnist_summary.json" 2>/dev/null || true
echo "== done: $(date -u +%T)"
