#!/usr/bin/env bash
# DDP scaling of the T recipe on one multi-GPU host (device kinds nvidia-h100-x4 / nvidia-h200-x4, or -x2 for 1 and 2 GPUs; repo
# installed with `pip install --no-deps -e .`): DDP scaling of the Spatial-Mamba-T ImageNet recipe
# (configs/imagenet/recipe.yaml, the T recipe on its own: fused kernels, bf16, full augmentation, EMA, MESA) on the JPEG folder
# of the data benchmark, 1, 2 and 4 GPUs (as many as the host has), 2 epochs × 100 steps per rank (190 timed steps: with 49
# the two epochs of one run differed by up to 17 %), batch 128
# per GPU. Prints img/s per GPU, scaling efficiency (target ≥ 90 %) and the post-run checks (identical weights
# on all ranks, checkpoints written once, logged val metrics = 1-GPU validate of the checkpoint).
# The recipe records its eager kernels as CUDA graphs (eager_cudagraphs, no compile): each device count takes 1-2 minutes
# (first step ~36 s from cold caches; the script's arguments go to main.py: with `--model.init_args.eager_cudagraphs false
# --model.init_args.compile_cudagraphs true` it compiles, 2-5 minutes each, first step ~140-190 s with a cold inductor cache;
# adding `--model.init_args.compile_regional true --model.init_args.compile_parallel true` compiles regionally, the fastest
# start and step on one GPU), so on a host with a 10-minute limit per command run it in parts; every call continues the
# summary of the last (`ddp_scaling.py --continue`):
#   COUNTS=1,2 bash benchmarks/gpu_ddp_scaling.sh      # then, on the same warm host:
#   bash benchmarks/gpu_ddp_scaling.sh                 # the remaining counts (4, 8 where the host has them)
# Results under $OUT (default /tmp/ddp_scaling); runs and summary.json under $RUN.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/ddp_scaling}
DATA=${DATA:-/tmp/ddp_scaling_imagefolder_520}
RUN=${RUN:-/tmp/ddp_scaling_runs}          # checkpoints (~0.5 GB each) stay here, not under $OUT
# NVLink multicast stays off (device/KINDS.md): it can take the host's shared GPUs out of service
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
# dynamo logs every recompilation (with its reason) into each run's fit.log: none should follow the first epoch
export TORCH_LOGS=${TORCH_LOGS:-recompiles}
mkdir -p "$OUT" "$RUN"
cd "$REPO"

GPUS=$(nvidia-smi -L | wc -l)
DEVICES=1; for n in 2 4 8; do [ "$n" -le "$GPUS" ] && DEVICES="$DEVICES,$n"; done
DEVICES=${COUNTS:-$DEVICES}
echo "GPUs: $GPUS; device counts: $DEVICES" | tee "$OUT/env.txt"
nvidia-smi topo -m 2>&1 | tee -a "$OUT/env.txt"

# 100 classes × 520 training images: 100 steps × 4 GPUs × 128 = 51,200 images per epoch at 4 GPUs (8 GPUs wrap)
if [ ! -d "$DATA/train" ]; then
  timeout 180 python benchmarks/data.py make --root "$DATA" --classes 100 --train-per-class 520 --val-per-class 20 \
    2>&1 | tee "$OUT/make.log"
fi

EXTRA=(); [ "$#" -gt 0 ] && EXTRA=(-- "$@")   # main.py options for every run
timeout 1500 python benchmarks/ddp_scaling.py --root "$DATA" --devices "$DEVICES" --steps 100 --epochs 2 --warmup 10 \
  --out "$RUN" --continue "${EXTRA[@]}" 2>&1 | tee -a "$OUT/scaling.log"
echo "exit code ${PIPESTATUS[0]}" | tee -a "$OUT/scaling.log"
cp "$RUN/summary.json" "$OUT/" 2>/dev/null
for d in "$RUN"/*dev; do mkdir -p "$OUT/$(basename "$d")"; cp "$d"/*.log "$d"/*.json "$OUT/$(basename "$d")/" 2>/dev/null; done
# where the recompilations fell: their log lines among the per-epoch speed lines, per run
for d in "$RUN"/*dev; do
  echo "$(basename "$d"): $(grep -c "Recompiling function" "$d/fit.log" 2>/dev/null) recompilations"
  grep -n -E "Recompiling function|triggered by the following guard failure|train speed, epoch" "$d/fit.log" 2>/dev/null | cut -c1-200
done | tee "$OUT/recompiles.txt"
