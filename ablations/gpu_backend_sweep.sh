#!/usr/bin/env bash
# Backend ablation on a CUDA GPU: torch vs triton vs fused (same maths: equal accuracy within seed noise,
# different speed), 3 seeds each on the default digits run, then the report. The runs train eagerly
# (`compile=false`): with compile on (the default on a GPU) the first run took 278 s and the next two 101 and
# 91 s on an H100, mostly compiling, which buries the backends' difference; pass --model.init_args.compile=true
# to compile anyway.
#
#   bash ablations/gpu_backend_sweep.sh [extra main.py overrides, e.g. --data.init_args.batch_size=128]
#
# Environment: PYTHON (default python3), EPOCHS (default 5, as the CPU sweeps in ablations/RESULTS.md),
# SEEDS (default 3), OUT (if set, the report, plots, run logs and event files — not checkpoints — are
# copied to $OUT/backend). Runs go to logs/backend/<backend>/seed<k>; finished runs are kept, so running
# the script again after an interruption resumes the sweep (delete logs/backend to start afresh).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
unset TRITON_INTERPRET  # real Triton kernels, not the CPU interpreter

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "warning: nvidia-smi failed" >&2
"$PYTHON" - <<'PY'
import importlib, sys
missing = [m for m in ("torch", "triton", "lightning", "tensorboard", "sklearn", "timm", "matplotlib")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"error: missing Python packages: {', '.join(missing)} (pip install -e . matplotlib)")
import torch, triton
if not torch.cuda.is_available():
    sys.exit("error: no CUDA GPU visible to torch; the triton and fused backends need one")
print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
PY

start=$(date +%s)
status=0
PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} "$PYTHON" ablations/run.py backend --seeds "${SEEDS:-3}" --epochs "${EPOCHS:-5}" --logdir logs -- --model.init_args.compile=false "$@" || status=$?
echo "backend sweep + report: $(( $(date +%s) - start )) s (exit $status)"

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  (cd logs && find backend -type f ! -name '*.ckpt' -exec cp --parents {} "$OUT/" \;)
  echo "copied logs/backend (without checkpoints) to $OUT/backend"
fi
exit $status
