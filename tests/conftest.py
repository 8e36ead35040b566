"""Test-wide settings: deterministic, offline, and a deliberate torch thread count.

CI has 2 cores; oversubscribed threads made training steps 70x slower there, so every test
process uses one thread unless ICLGD_TEST_THREADS says otherwise.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning idle OpenMP threads: see docs/performance.md
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("ICLGD_TEST_THREADS", "1")))

import pytest  # noqa: E402

TEST_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _restore_thread_count():
    """The CLI sets torch's thread count in-process (`--threads`, or min(4, cpus)); put it back after
    every test, so that a later test's float32 numbers do not depend on which tests ran before it."""
    yield
    torch.set_num_threads(TEST_THREADS)
