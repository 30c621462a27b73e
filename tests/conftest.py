import pytest
import torch

# Bit-for-bit comparisons (save -> load, resume, pipeline vs trainer) need one fixed reduction order: with
# several intra-op threads, CPU kernels may split sums differently between two otherwise identical calls.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
