#!/usr/bin/env bash
# The kernels on one GPU, in one go from a cold start: the GPU tests (timed), the op benchmark with the
# per-kernel profile at stage 1 and the depthwise convolutions against cuDNN, then optionally the whole-model throughput and the training-equivalence
# check. Logs and JSON go to $OUT (default out/).
#
#   bash benchmarks/gpu_kernels.sh            # tests + op benchmark (stage 1 only: --quick)
#   bash benchmarks/gpu_kernels.sh full       # + every op shape, throughput (T eager/compiled/CUDA graphs, ConvNeXt-T,
#                                             #   Swin-T), the launch path's host cost and the training-equivalence check
#   bash benchmarks/gpu_kernels.sh bench|speed|equivalence   # only the op benchmark / + throughput / only the check
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}."
OUT=${OUT:-out}
mkdir -p "$OUT"
what=${1:-quick}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$OUT/gpu.txt"

if [ "$what" = "quick" ] || [ "$what" = "full" ]; then
  start=$(date +%s)
  skip=()  # a GPU image installed with --no-deps may lack pycocotools; no GPU test needs it, but collecting
  # tests/test_detection.py imports it, and a collection error would stop every GPU test
  python -c "import pycocotools" 2>/dev/null || { echo "pycocotools missing: tests/test_detection.py not collected"; skip=(--ignore=tests/test_detection.py); }
  # 8 workers: most of the GPU tests' time is Triton and inductor compiling on the host, which the workers
  # do side by side (one H100, 16 cores: 125 s from a cold start, against 296 s in one process)
  workers=()
  python -c "import xdist" 2>/dev/null && workers=(-n "${GPU_TEST_WORKERS:-8}")
  python -m pytest -m gpu -q -rf -p no:cacheprovider --durations=8 "${workers[@]}" "${skip[@]}" tests 2>&1 | tee "$OUT/gpu_tests.log"
  echo "pytest -m gpu: $(( $(date +%s) - start )) s from a cold start" | tee -a "$OUT/gpu_tests.log"
fi
if [ "$what" = "quick" ] || [ "$what" = "bench" ]; then
  python benchmarks/ops.py --quick --skip-torch --profile --host --json "$OUT/ops.json" 2>&1 | tee "$OUT/ops.log"
  python benchmarks/dwconv.py 2>&1 | tee "$OUT/dwconv.log"
elif [ "$what" = "full" ] || [ "$what" = "speed" ]; then
  python benchmarks/ops.py --skip-torch --profile --host --json "$OUT/ops.json" 2>&1 | tee "$OUT/ops.log"
  python benchmarks/dwconv.py 2>&1 | tee "$OUT/dwconv.log"
  python benchmarks/throughput.py --models t,convnext_tiny,swin_tiny_patch4_window7_224 --backends fused \
    --precisions bf16 --modes eager,compiled,cudagraphs 2>&1 | tee "$OUT/throughput.log"
  python benchmarks/launches.py 2>&1 | tee "$OUT/launches.log"  # the host's cost of an eager step's launches
fi
if [ "$what" = "full" ] || [ "$what" = "equivalence" ]; then
  python benchmarks/loss_curve.py --model t --size 64 --batch 32 --steps 200 --json "$OUT/equivalence.json" \
    2>&1 | tee "$OUT/equivalence.log"
fi
cp "${SPATIAL_MAMBA_CACHE:-$HOME/.cache/spatial_mamba}/kernel_tuning.json" "$OUT/" 2>/dev/null  # tiles the tuner chose
