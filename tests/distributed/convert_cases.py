"""Tiny random HF Llama-family models for the conversion tests (built offline, seeded).

Every case perturbs all parameters (norm weights away from 1, biases away from 0), so a norm or
bias mapped to the wrong place changes the logits.
"""

from __future__ import annotations

import torch

VOCAB_DIVISOR = 32  # --make-vocab-size-divisible-by in the tests (vocab 100 pads to 128)

# name -> (config class, config kwargs). GQA ratios 1/2/4, tied and untied, q/k/v biases,
# a head_dim != hidden/heads, llama3 rope scaling, a padded vocabulary.
CASES = {
    "llama-mha-untied": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa2-tied": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2,
                                            tie_word_embeddings=True)),
    "llama-gqa4-headdim24": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=1,
                                                 head_dim=24)),
    "llama31-rope-scaling": ("LlamaConfig", dict(
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
        rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192})),
    "mistral-gqa2": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2,
                                           sliding_window=None)),
    "qwen2-bias-gqa2-tied": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2,
                                                 tie_word_embeddings=True)),
    "qwen2-bias-gqa4-vocab100": ("Qwen2Config", dict(num_attention_heads=8, num_key_value_heads=2,
                                                     vocab_size=100)),
}
_DEFAULTS = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 rope_theta=10000.0)


def make_config(name: str):
    import transformers

    cls_name, kwargs = CASES[name]
    return getattr(transformers, cls_name)(**{**_DEFAULTS, **kwargs})


def make_hf_model(name: str, seed: int = 0, dtype=torch.float32):
    """The case's HF CausalLM with seeded random weights, in eval mode."""
    from transformers import AutoModelForCausalLM

    config = make_config(name)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(dtype))
    return model


def sample_tokens(vocab_size: int, batch: int = 2, seq: int = 24, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
