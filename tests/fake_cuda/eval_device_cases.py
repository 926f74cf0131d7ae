"""The HF evaluation backend on (fake) CUDA: a model on the GPU takes CPU inputs (as the callers
pass them) and computes on the GPU. ``FakeTensorMode`` raises ``FakeTensorDeviceMismatchError``
where a CPU and a CUDA tensor meet, so an input left on the CPU fails here.

Not covered: decoding (``generate`` and the stop check read values back to the host, which fake
tensors cannot), and the megatron backend (megatron's modules cannot be built under fake tensors,
see device_path_cases.py); the megatron model and its inputs follow the same ``self.device``.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode

pytestmark = pytest.mark.fake_cuda  # run by test_eval_device.py in a fresh process

CUDA = torch.device("cuda", 0)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    with torch.device(CUDA):
        return LlamaForCausalLM(config)


def test_hf_backend_moves_cpu_inputs_to_the_model_device():
    from megatron_tw.eval.backends import HFBackend

    ids = torch.randint(0, 100, (3, 16))  # a CPU batch, as perplexity.py and ruler.py pass it
    with FakeTensorMode(allow_non_fake_inputs=True):
        backend = HFBackend(_tiny_llama(), device=CUDA)
        assert backend.device == CUDA
        assert backend.logits(ids, keep=4).device == CUDA
        lp = backend._batch_logprobs(ids, 5)  # what logprobs() runs per batch
        assert lp.shape == (3, 5) and lp.device == CUDA
        assert lp.cpu().device.type == "cpu"  # and hands back to the callers on the CPU
        with pytest.raises(FakeTensorDeviceMismatchError):  # the check bites: an unmoved input
            backend.model(input_ids=ids)
