#!/usr/bin/env bash
# How long a compiled Spatial-Mamba-T takes to start on this GPU machine, from empty compiler caches, with the
# stages' graphs compiled in parallel worker processes (regional compilation, `compile_parallel`):
#   1. benchmarks/cold_start.py, T, bf16, batch 128, regional graphs replayed as CUDA graphs, with parallel
#      workers: the first training step's wall time and the time from the compile call (workers' timelines),
#      then the same with a sanity-check evaluation forward first;
#   2. the T ImageNet recipe compiled this way (`main.py fit`, 2 short epochs on a 100-class JPEG folder written
#      from scikit-learn's sample photographs, validation at batch 256 with a smaller last batch), with
#      TORCH_LOGS=recompiles: `compile_s` of the first training step, and the epoch of every recompilation
#      (none may come after the first epoch).
# About 5 minutes on an H100. Usage: bash benchmarks/gpu_compile_start.sh   (results under $OUT, default
# /tmp/compile_start). The repo installed with `pip install --no-deps -e .` on the GPU image, or fully.
# BYTECODE=1 first compiles the Python bytecode of the installed packages, as `pip install` leaves it: the GPU
# image ships torch without it and sets PYTHONDONTWRITEBYTECODE=1, so there every fresh interpreter (each compile
# worker too) compiles torch's sources while importing it, 10-14 s on an H100 machine. The import time of a
# fresh interpreter is printed with the environment either way.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/compile_start}
DATA=${DATA:-/tmp/compile_start_imagefolder}
RUN=${RUN:-/tmp/compile_start_run}          # checkpoints stay here, not under $OUT
mkdir -p "$OUT" "$RUN"
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}  # keeps packages installed with --target
cd "$REPO"

if [ "${BYTECODE:-0}" = 1 ]; then
  SITE=$(python -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
  START=$(date +%s)
  python -m compileall -q -j 0 "$SITE" > /dev/null 2>&1
  echo "bytecode of $SITE compiled in $(( $(date +%s) - START )) s (BYTECODE=1)" | tee "$OUT/bytecode.txt"
fi
{
  [ -f "$OUT/bytecode.txt" ] && cat "$OUT/bytecode.txt"
  python -c "import time; t = time.time(); import torch, torch._dynamo, torch._inductor.compile_fx, src.models.spatial_mamba
print(f'a fresh interpreter imports torch, its compiler and the model in {time.time() - t:.1f} s')"
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)  commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  python -c "import torch, triton; print(f'torch {torch.__version__}, triton {triton.__version__}, '
             f'{torch.cuda.get_device_name() if torch.cuda.is_available() else \"no CUDA GPU\"}')"
  echo "cpu cores: $(nproc)"
} 2>&1 | tee "$OUT/env.txt"

echo "== 1. cold start, regional graphs compiled in parallel (fresh caches per run)"
timeout 240 python benchmarks/cold_start.py --modes regional-cudagraphs --parallel --windows 3 --steps 15 \
  2>&1 | grep -v '^{' | tee "$OUT/cold_start.log"
timeout 240 python benchmarks/cold_start.py --modes regional-cudagraphs --parallel --sanity --windows 3 --steps 15 \
  2>&1 | grep -v '^{' | tee "$OUT/cold_start_sanity.log"

echo "== 2. the T recipe compiled regionally in parallel, 2 epochs, fresh caches"
if [ ! -d "$DATA/train" ]; then
  timeout 120 python benchmarks/data.py make --root "$DATA" --classes 100 --train-per-class 20 --val-per-class 6 \
    > "$OUT/make.log" 2>&1
fi
CACHES=$(mktemp -d)
cd "$RUN"
START=$(date +%s)
TORCHINDUCTOR_CACHE_DIR="$CACHES/inductor" TRITON_CACHE_DIR="$CACHES/triton" SPATIAL_MAMBA_CACHE="$CACHES/tiles" \
PYTHONUNBUFFERED=1 TORCH_LOGS=recompiles timeout 330 python "$REPO/main.py" fit \
  --config "$REPO/configs/imagenet/recipe.yaml" --config "$REPO/configs/imagenet/spatial_mamba_t.yaml" \
  --data.init_args.root "$DATA" \
  --trainer.devices 1 --trainer.max_epochs 2 --trainer.enable_progress_bar false \
  --model.init_args.num_classes 100 --model.init_args.backbone.init_args.num_classes 100 \
  --model.init_args.compile true --model.init_args.compile_regional true --model.init_args.compile_parallel true \
  --model.init_args.compile_cudagraphs true --model.init_args.eager_cudagraphs false > "$OUT/fit_t.log" 2>&1
echo "fit exit code $?, wall $(( $(date +%s) - START )) s" | tee -a "$OUT/fit_t.log"
rm -rf "$CACHES"
cd "$REPO"
# the epoch of each recompilation: the "train speed, epoch N" lines mark the ends of the epochs
python - "$OUT/fit_t.log" <<'PY' | tee "$OUT/recompiles.txt"
import re, sys
epoch, counts = 0, {}
for line in open(sys.argv[1], errors="replace"):
    if "Recompiling function" in line:
        counts[epoch] = counts.get(epoch, 0) + 1
    m = re.search(r"train speed, epoch (\d+)", line)
    if m:
        epoch = int(m.group(1)) + 1
print("recompilations per epoch (an epoch's validation counts with it):", counts or "none")
print("after the first epoch:", sum(n for e, n in counts.items() if e > 0))
PY

{
  echo "## Compile start of T on one GPU"
  cat "$OUT/env.txt"; echo
  grep -E "^\| |^worker" "$OUT/cold_start.log" "$OUT/cold_start_sanity.log" | sed 's/^[^:]*://'; echo
  grep -E "compiled .* block graphs|compile:|Finished fit|fit exit code" "$OUT/fit_t.log"
  cat "$OUT/recompiles.txt"
} > "$OUT/RESULTS_compile_start.md"
echo; echo "==== summary ($OUT/RESULTS_compile_start.md)"; cat "$OUT/RESULTS_compile_start.md"
