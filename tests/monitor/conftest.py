"""One intra-op thread for these tests: their models are tiny, and on a small shared CPU OpenMP's
spin-waiting threads cost far more than they bring (a 50x slower step under load)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
