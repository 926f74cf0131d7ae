"""Hugging Face <-> megatron checkpoints for the Llama family (Llama 2/3/3.1/3.2, Mistral, Qwen2,
SmolLM2). Library entry points in :mod:`megatron_tw.checkpoint.hf`; whole-folder conversions in
:mod:`megatron_tw.checkpoint.convert` (used by tools/convert_checkpoint.py); see docs/checkpoints.md.
"""
