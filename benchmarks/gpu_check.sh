#!/usr/bin/env bash
# One prepared GPU check: build the CUDA and Triton backends, run the GPU tests, then the step
# benchmark. Run from the repository root on a machine with a CUDA device:
#   bash benchmarks/gpu_check.sh            (results under benchmarks/results/ and $OUT if set)
set -uo pipefail
export VAEBM_CACHE_DIR=${VAEBM_CACHE_DIR:-/tmp/vaebm-kernel-cache}
python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
python -m vaebm backends
timeout 300 python -m pytest -q -x tests/ops tests/sampling -m "not slow" 2>&1 | tail -25
timeout 200 python benchmarks/langevin_step.py --device cuda --reps 50
if [ -n "${OUT:-}" ]; then cp -r benchmarks/results "$OUT/" 2>/dev/null || true; fi
