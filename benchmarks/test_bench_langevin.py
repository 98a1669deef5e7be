"""pytest-benchmark cases for one fused Langevin step (``pytest benchmarks --benchmark-only``).

The same workloads and baseline as ``langevin_step.py``; pytest-benchmark handles warm-up,
rounds and statistics. CUDA timings synchronise inside the timed function.
"""

import pytest
import torch

from langevin_step import ETA, eager_update, workloads
from vaebm.ops import BackendUnavailable, langevin_update_

DEV = "cuda" if torch.cuda.is_available() else "cpu"
LOADS = workloads(DEV)


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("load", list(LOADS))
@pytest.mark.parametrize("impl", ["eager", "cpp", "triton", "cuda"])
def test_langevin_step(benchmark, load, impl):
    xs = LOADS[load]
    gs = [torch.randn_like(x) for x in xs]
    if impl == "eager":
        fn = lambda: (eager_update(xs, gs), _sync())  # noqa: E731
    else:
        fn = lambda: (langevin_update_(xs, gs, seed=1, step_size=ETA, backend=impl), _sync())  # noqa
        try:
            fn()
        except BackendUnavailable as e:
            pytest.skip(str(e))
    benchmark.group = load
    benchmark(fn)
