"""Runs eval_device_cases.py (the HF evaluation backend on fake CUDA tensors) in a fresh process
(see tests/fake_cuda/__init__.py)."""

import pytest

from tests.fake_cuda import run_cases

pytestmark = pytest.mark.fake_cuda


def test_hf_backend_on_fake_cuda():
    run_cases("tests/fake_cuda/eval_device_cases.py")
