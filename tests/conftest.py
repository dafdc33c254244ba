"""Test-session set-up.

TRITON_INTERPRET must be set before the first ``@triton.jit`` module is imported: without a GPU we
interpret the Triton kernels on CPU, which is how CI verifies them.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

DATA_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


@pytest.fixture(scope="session")
def shared_data():
    """Path of ../shared/data (real datasets), or skip with the reason."""
    if not os.path.isdir(DATA_ROOT):
        pytest.skip(f"real data not present at {DATA_ROOT} (../shared/data beside the repo)")
    return DATA_ROOT


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    # Fresh random inputs each run, but reproducible within a run given pytest's order.
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch seed: {seed}")  # shown with a failure's captured output, to reproduce it
    yield
