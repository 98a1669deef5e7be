import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every training test runs its tiny models on one thread (fixture in tests/conftest.py)."""
