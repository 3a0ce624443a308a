"""Test set-up: without a CUDA GPU the Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before Triton compiles anything, so it is set here, first."""

import os
import shutil

if not shutil.which("nvidia-smi") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# the fused kernels' first tile candidate, untimed: tests check results, and timing every candidate for every
# test shape would compile them all (test_fp32_gpu_large_tiles runs each candidate explicitly)
os.environ.setdefault("SPATIAL_MAMBA_TUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One intra-op thread during the test (for modules that start data-loader worker processes), restored
    after it; modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
