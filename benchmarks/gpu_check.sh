#!/usr/bin/env bash
# One prepared GPU check: build the CUDA and Triton backends, run the GPU tests, the step
# benchmark, then the VAEBM-vs-NCSN sampling-speed comparison (50 CIFAR-10 samples, full chains
# where each fits the budget). Run from the repository root on a machine with a CUDA device:
#   bash benchmarks/gpu_check.sh            (results under benchmarks/results/ and $OUT if set)
# SPEED_ONLY=1 skips the build/tests/step benchmark; SCALING=1 adds the scaling sweeps;
# PRECISION=tf32|bf16 changes the sampling-speed precision policy (default strict fp32).
# Budget: at most 150 + 60 + 240 s of timeouts, under the 8 minutes one device call allows.
set -uo pipefail
export VAEBM_CACHE_DIR=${VAEBM_CACHE_DIR:-/tmp/vaebm-kernel-cache}
python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
if [ -z "${SPEED_ONLY:-}" ]; then
  python -m vaebm backends
  timeout 150 python -m pytest -q -x tests/ops tests/sampling -m "not slow" 2>&1 | tail -25
  timeout 60 python benchmarks/langevin_step.py --device cuda --reps 50
fi
# NCSN chains longer than --full-budget seconds are timed on 2 steps per level and extrapolated
timeout 240 python benchmarks/sample_speed.py --device cuda --n 50 \
  --precision "${PRECISION:-fp32}" --full-budget "${FULL_BUDGET:-90}" --repeat 3
if [ -n "${SCALING:-}" ]; then
  timeout 300 python benchmarks/bench_scaling.py --device cuda
fi
if [ -n "${OUT:-}" ]; then cp -r benchmarks/results "$OUT/" 2>/dev/null || true; fi
