import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def rand(*shape, dtype=torch.float32, scale=1.0):
    return torch.randn(*shape, dtype=dtype) * scale
