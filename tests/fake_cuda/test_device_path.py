"""Runs device_path_cases.py (the micro-batch path on fake CUDA tensors) in a fresh process: the
CPU measures (runtime/cpu.py) that other tests apply in-process redirect CUDA tensors to the CPU,
which would hide exactly what these cases look for."""

import subprocess

import pytest

from tests.launch import PYTHON, ROOT, env

pytestmark = pytest.mark.fake_cuda


def test_micro_batch_path_on_fake_cuda():
    proc = subprocess.run([PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/fake_cuda/device_path_cases.py"], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout, proc.stdout[-3000:]
