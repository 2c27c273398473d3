import pytest

from dipsen.data import load_dataset


@pytest.fixture(scope="session")
def mnist():
    return load_dataset("mnist")
