"""Shared pytest settings: offline hub, one torch thread per process."""
import srpo_nb.core  # noqa: F401  (before trl: Triton kernels in the interpreter on CPU-only machines)
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    "The tiny model's matrices are too small to split: one thread is faster, ~10x so when other jobs share the cores."
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
