import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Small CPU convolutions on a loaded 2-core machine ran up to 50x slower with two intra-op
    threads than with one (42 s vs 0.6 s to train the digit classifier test); the eval tests
    gain nothing from threads (fixture in tests/conftest.py)."""
