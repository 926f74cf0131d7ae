import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    """gpu tests need CUDA and Transformer Engine: skip them, with the reason, elsewhere."""
    import importlib.util

    import torch

    reason = None
    if not torch.cuda.is_available():
        reason = "needs a CUDA GPU"
    elif importlib.util.find_spec("transformer_engine") is None:
        reason = "needs Transformer Engine (docs/gpu.md shows the install)"
    if reason:
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
