import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks: one intra-op thread is faster, and immune to OpenMP barrier stalls when
    the machine's cores are oversubscribed."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
