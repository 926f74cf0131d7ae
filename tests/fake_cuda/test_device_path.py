"""Runs device_path_cases.py (the micro-batch path on fake CUDA tensors) in a fresh process (see
tests/fake_cuda/__init__.py)."""

import pytest

from tests.fake_cuda import run_cases

pytestmark = pytest.mark.fake_cuda


def test_micro_batch_path_on_fake_cuda():
    run_cases("tests/fake_cuda/device_path_cases.py")
