#!/usr/bin/env bash
# Input pipeline and the T recipe on one GPU machine (16 cores, 1 GPU, no internet; repo installed with `pip install --no-deps -e .`):
#   1. writes an ImageNet-like JPEG class-folder set from scikit-learn's sample photographs (100 classes,
#      10,000 train + 2,000 val images),
#   2. measures decode + augmentation throughput per input-pipeline option (benchmarks/data.py),
#   3. trains the Spatial-Mamba-T ImageNet recipe (configs/imagenet/recipe.yaml + spatial_mamba_t.yaml: RandAugment, erasing,
#      mixup/cutmix, EMA, MESA, bf16, clipping, DDP strategy) for 2 epochs on 1 GPU (128 images per step,
#      100 classes); the classifier's TrainSpeed callback prints training img/s per epoch (src.timing).
# About 8 minutes. Usage: bash benchmarks/gpu_input_pipeline.sh   (results under $OUT, default /tmp/input_pipeline)
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/input_pipeline}
DATA=${DATA:-/tmp/input_pipeline_imagefolder}
RUN=${RUN:-/tmp/input_pipeline_run}          # checkpoints (~0.5 GB each) stay here, not under $OUT
mkdir -p "$OUT" "$RUN"
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}  # keeps packages installed with --target
cd "$REPO"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)  commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  python -c "import torch, torchvision, lightning, timm; print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, lightning {lightning.__version__}, timm {timm.__version__}, cuda {torch.cuda.is_available()} {torch.cuda.get_device_name() if torch.cuda.is_available() else \"\"}')"
  echo "cpu cores: $(nproc)"
} 2>&1 | tee "$OUT/env.txt"

echo "== 1. JPEG folder"
if [ ! -d "$DATA/train" ]; then
  timeout 120 python benchmarks/data.py make --root "$DATA" --classes 100 --train-per-class 100 --val-per-class 20 2>&1 | tee "$OUT/make.log"
fi

echo "== 2. input pipeline (decode + augmentation)"
timeout 240 python benchmarks/data.py bench --root "$DATA" --workers 1 8 16 --images 4000 \
  --json "$OUT/data_bench.json" 2>&1 | tee "$OUT/data_bench.log"

echo "== 3. Spatial-Mamba-T recipe, 2 epochs, 1 GPU"
cd "$RUN"
START=$(date +%s)
timeout 330 python "$REPO/main.py" fit --config "$REPO/configs/imagenet/recipe.yaml" --config "$REPO/configs/imagenet/spatial_mamba_t.yaml" \
  --data.init_args.root "$DATA" --data.init_args.num_workers 15 \
  --trainer.devices 1 --trainer.max_epochs 2 --trainer.log_every_n_steps 10 --trainer.enable_progress_bar false \
  --model.init_args.num_classes 100 --model.init_args.backbone.init_args.num_classes 100 \
  --model.init_args.warmup_epochs 1 2>&1 | tee "$OUT/fit_t.log"
echo "fit exit code ${PIPESTATUS[0]}, wall $(( $(date +%s) - START )) s" | tee -a "$OUT/fit_t.log"
cp "$RUN/logs/imagenet/spatial_mamba_t/"events.* "$OUT/" 2>/dev/null   # TensorBoard event files (no checkpoints)
ls -la "$RUN/logs/imagenet/spatial_mamba_t/checkpoints" 2>&1 | tee -a "$OUT/fit_t.log"

{
  echo "## Input pipeline and T recipe on one GPU"
  cat "$OUT/env.txt"; echo
  sed -n '/^Input pipeline/,$p' "$OUT/data_bench.log"; echo
  grep -E "train speed|compile:|global batch|Finished fit|fit exit code" "$OUT/fit_t.log"
} > "$OUT/RESULTS_input_pipeline.md"
echo; echo "==== summary ($OUT/RESULTS_input_pipeline.md)"; cat "$OUT/RESULTS_input_pipeline.md"
