"""The CPU measures are applied only without CUDA, each named and justified; with CUDA present
nothing of megatron or torch is touched (checked in fresh processes)."""

import subprocess

import pytest

from tests.launch import PYTHON, ROOT, env

pytestmark = pytest.mark.unit

_PROBE = r"""
import torch
CUDA = {cuda}
if CUDA:  # what a GPU machine reports
    torch.cuda.is_available = lambda: True
originals = {{n: getattr(torch, n) for n in ("zeros", "tensor", "empty")}}
to, type_, current = torch.Tensor.to, torch.Tensor.type, torch.cuda.current_device
from megatron_tw import runtime
from megatron_tw.runtime import cpu
applied = runtime.prepare()
import megatron.core.pipeline_parallel.schedules as schedules
import megatron.core.tensor_parallel.random as mrandom
untouched = (all(getattr(torch, n) is f for n, f in originals.items())
             and torch.Tensor.to is to and torch.Tensor.type is type_
             and torch.cuda.current_device is current
             and schedules.torch is torch and mrandom.torch is torch)
print("APPLIED", sorted(applied))
print("MEASURES", sorted(cpu.MEASURES))
print("UNTOUCHED", untouched)
if not CUDA:
    z = schedules.torch.zeros([], device="cuda")  # what megatron's schedules do
    print("ZEROS", z.device.type, torch.zeros is originals["zeros"])
"""


def _run(cuda: bool) -> dict:
    out = subprocess.run([PYTHON, "-c", _PROBE.format(cuda=cuda)], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [l for l in out.stdout.splitlines() if l.split(" ")[0] in
             ("APPLIED", "MEASURES", "UNTOUCHED", "ZEROS")]
    return {l.split(" ", 1)[0]: l.split(" ", 1)[1] for l in lines}


def test_nothing_is_applied_when_cuda_is_available():
    got = _run(cuda=True)
    assert got["APPLIED"] == "[]"
    assert got["UNTOUCHED"] == "True"


def test_every_measure_is_applied_without_cuda_and_scoped_to_megatron():
    got = _run(cuda=False)
    assert got["APPLIED"] == got["MEASURES"] and got["MEASURES"] != "[]"
    assert got["UNTOUCHED"] == "False"
    # megatron's device="cuda" lands on the CPU, while torch itself is left as it was
    assert got["ZEROS"] == "cpu True"


def test_each_measure_is_justified():
    from megatron_tw.runtime import cpu

    assert cpu.MEASURES and all(len(why) > 40 for why in cpu.MEASURES.values())
