#!/usr/bin/env bash
# One prepared GPU check: build the CUDA and Triton backends, run every GPU test (ops, sampling
# and the gpu-marked model and training tests), the step benchmark, then the VAEBM-vs-NCSN
# sampling-speed comparison (50 CIFAR-10 samples, full chains where each fits the budget). Run
# from the repository root on a machine with a CUDA device:
#   bash benchmarks/gpu_check.sh            (results under benchmarks/results/ and $OUT if set)
# SPEED_ONLY=1 skips the build/tests/step benchmark; SCALING=1 adds the scaling sweeps;
# PRECISION=tf32|bf16 changes the sampling-speed precision policy (default strict fp32).
# Budget: at most 180 + 60 + 240 s of timeouts, under the 8 minutes one device call allows.
# Exit status: 0 only if every step passed; otherwise 1, and the failed steps are listed last
# (each step runs even when an earlier one failed, so one call reports everything).
set -uo pipefail
export VAEBM_CACHE_DIR=${VAEBM_CACHE_DIR:-/tmp/vaebm-kernel-cache}
PY=${PYTHON:-python}
failed=()

step() {  # step NAME CMD...: run CMD, record NAME when it fails (its output is never filtered)
  local name=$1
  shift
  echo "== $name: $*"
  "$@"
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "== $name FAILED (exit status $rc)"
    failed+=("$name (exit $rc)")
  fi
}

step device "$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
if [ -z "${SPEED_ONLY:-}" ]; then
  step backends "$PY" -m vaebm backends
  # no -x: every failure shows; -rfE lists them at the end; pytest's own exit status counts
  step tests timeout 180 "$PY" -m pytest -q -rfE tests/ops tests/sampling \
    tests/models/test_nvae.py tests/models/test_nvae_official.py tests/training -m "gpu or not slow"
  step langevin_step timeout 60 "$PY" benchmarks/langevin_step.py --device cuda --reps 50
fi
# NCSN chains longer than --full-budget seconds are timed on 2 steps per level and extrapolated
step sample_speed timeout 240 "$PY" benchmarks/sample_speed.py --device cuda --n 50 \
  --precision "${PRECISION:-fp32}" --full-budget "${FULL_BUDGET:-90}" --repeat 3
if [ -n "${SCALING:-}" ]; then
  step scaling timeout 300 "$PY" benchmarks/bench_scaling.py --device cuda
fi
if [ -n "${OUT:-}" ]; then cp -r benchmarks/results "$OUT/" 2>/dev/null || true; fi
if [ "${#failed[@]}" -ne 0 ]; then
  echo "gpu_check: ${#failed[@]} step(s) failed: ${failed[*]}"
  exit 1
fi
echo "gpu_check: all steps passed"
