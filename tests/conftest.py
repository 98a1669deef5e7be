import os

import pytest
import torch

# Triton kernels run on CPU tensors only under the interpreter, and the variable must be set
# before the module defining the kernels is imported.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long statistical runs (pytest -m slow)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Tiny models run faster (and deterministically) on one thread of a shared, loaded machine;
    the previous thread count is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _FakeKernel:
    """A stand-in for one backend's entry in an op table (vaebm.ops._registry.Kernel)."""

    def __init__(self, name, fn, dtypes=(torch.float32, torch.float16, torch.bfloat16)):
        self.ext, self.name, self.dtypes, self.features, self.fn = "fake", name, dtypes, (), fn

    def get(self):
        return self.fn


@pytest.fixture
def fake_kernel():
    """``fake_kernel(op_name, fn)``: an op-table entry whose kernel is ``fn`` (seam tests)."""
    return _FakeKernel
