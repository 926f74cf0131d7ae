#!/usr/bin/env python
"""The training process of one benchmarks/gpu_check.py row: ``pretrain_tw.main(argv)`` with one
addition for the host-sync count.

    python benchmarks/gpu_check_train.py <pretrain_tw.py flags>

With ``GPU_CHECK_SYNC_DEBUG=1`` and CUDA, after the first training iteration (its log line)
the process calls ``torch.cuda.set_sync_debug_mode("warn")``: from then on every operation
that makes the host wait for the GPU (a ``.item()``, a device-to-host copy, a ``nonzero``...)
prints one line holding "called a synchronizing CUDA operation" (Python-side ones as
``[gpu_check] sync: FILE:LINE``, ones from autograd's threads as PyTorch's own warning line).
gpu_check.py counts those lines between megatron's iteration lines. The mode is turned back off
after the last iteration's line, so the checkpoint save at the end is not counted.

Run in one process without torchrun: gpu_check.py sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT itself.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNC_MESSAGE = "called a synchronizing CUDA operation"


def _install_sync_counter(torch=None, training=None) -> None:
    """Wraps megatron's ``training_log`` (called once per iteration, after the step; it prints
    the iteration line): after iteration 1's line the sync debug mode becomes "warn", after the
    last iteration's line "default" again. Between two iteration lines lie exactly one step and
    its logging. (``torch``, ``training``: stand-ins for the tests.)"""
    import warnings

    if torch is None:
        import torch
    if training is None:
        import megatron.training.training as training

    original = training.training_log
    previous_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if SYNC_MESSAGE in str(message):
            print(f"[gpu_check] sync: {filename}:{lineno}: {SYNC_MESSAGE}", file=sys.stderr,
                  flush=True)
        else:
            previous_show(message, category, filename, lineno, file, line)

    def training_log(*args, **kwargs):
        result = original(*args, **kwargs)
        iteration = kwargs["iteration"] if "iteration" in kwargs else args[3]
        from megatron.training import get_args

        last = iteration >= (get_args().train_iters or 0)
        if iteration == 1 and not last:
            # every occurrence, not only the first per call site (Python's default filter)
            warnings.filterwarnings("always", message=".*" + SYNC_MESSAGE)
            warnings.showwarning = show
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            print("[gpu_check] sync debug mode: warn (from iteration 2)", flush=True)
        elif last and iteration > 1:
            torch.cuda.set_sync_debug_mode("default")
            print("[gpu_check] sync debug mode: default", flush=True)
        return result

    training.training_log = training_log


def main(argv: list[str]) -> None:
    sys.path.insert(0, ROOT)
    if os.environ.get("GPU_CHECK_SYNC_DEBUG") == "1":
        import torch

        if torch.cuda.is_available():
            _install_sync_counter()
        else:
            print("[gpu_check] sync debug mode: not available without CUDA", flush=True)
    import pretrain_tw

    sys.argv = [os.path.join(ROOT, "pretrain_tw.py"), *argv]  # its messages name pretrain_tw.py
    pretrain_tw.main(argv)


if __name__ == "__main__":  # the guard matters: checkpoint saves start worker processes
    main(sys.argv[1:])
