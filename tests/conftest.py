import os

import pytest
import torch

# Keep tests deterministic and light on a shared 2-core machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tmp_out(tmp_path):
    return tmp_path / "out"
