"""The frozen short-context scorer: a separate model, loaded once, never trained.

``--tw-scorer-load`` names a Hugging Face folder (Llama family, loaded through the same mapping as
``tools/convert_checkpoint.py``) or a Megatron checkpoint saved by ``pretrain_tw.py``. The scorer
has its own architecture (it may be much smaller than the trainee) but must share the trainee's
tokenizer. It is built with the trainee's tensor-parallel group and, in the sliding mode, its
context-parallel group; it lives outside the trainee's model list, so it is in neither the
optimizer nor the checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import os

from megatron_tw.errors import ConfigError
from megatron_tw.scoring.model import build_scorer_model, scorer_config


def _architecture_fields() -> set[str]:
    """Argument names that describe a model's architecture: TransformerConfig's own fields (not
    the parallel/precision fields it inherits from ModelParallelConfig), minus run settings, plus
    the GPTModel-level flags. A scorer takes these from its own checkpoint or HF config; the
    parallel layout, precision and sequence length come from the trainee's run."""
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.transformer.transformer_config import TransformerConfig

    own = {f.name for f in dataclasses.fields(TransformerConfig)}
    own -= {f.name for f in dataclasses.fields(ModelParallelConfig)}
    run = {"hidden_dropout", "attention_dropout", "window_size", "init_method_std",
           "apply_rope_fusion", "masked_softmax_fusion", "persist_layer_norm",
           "bias_dropout_fusion", "bias_activation_fusion", "memory_efficient_layer_norm"}
    own = {n for n in own if n not in run and not n.startswith(("fp8", "fp4", "recompute",
                                                                   "cuda_graph", "cpu_offloading"))}
    return own | {"position_embedding_type", "rotary_base", "rotary_percent", "use_rope_scaling",
                  "rope_scaling_factor", "rotary_seq_len_interpolation_factor",
                  "untie_embeddings_and_output_weights",
                  "max_position_embeddings", "swiglu", "group_query_attention", "norm_epsilon",
                  "layernorm_epsilon", "add_qkv_bias", "add_bias_linear"}


class ScorerError(ConfigError):
    """The scorer cannot serve this run; the message names the flag and the fix."""


def is_hf_folder(path: str) -> bool:
    """An HF model folder: config.json and weights, and no megatron checkpoint tracker (the
    output of convert_checkpoint.py hf-to-megatron also holds a config.json, its template)."""
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        return False
    names = os.listdir(path)
    if "latest_checkpointed_iteration.txt" in names or "metadata.json" in names:
        return False
    return any(n.endswith(".safetensors") or (n.startswith("pytorch_model") and n.endswith(".bin"))
               for n in names)


def _scorer_args(args, arch):
    scorer = copy.copy(args)
    for name in _architecture_fields():
        if hasattr(arch, name):
            setattr(scorer, name, getattr(arch, name))
    return scorer


def _check_vocab(path: str, scorer_vocab: int, trainee_vocab: int) -> None:
    if scorer_vocab != trainee_vocab:
        raise ScorerError(
            f"--tw-scorer-load {path}: the scorer's vocabulary has {scorer_vocab} tokens, the "
            f"trainee's tokenizer {trainee_vocab}; the scorer must use the trainee's tokenizer "
            "(losses of different tokenizations cannot be compared token by token)")


# A fixed probe: two tokenizers with one vocabulary size that split it alike are taken as one.
TOKENIZER_PROBE = ("The quick brown fox, 1234 times: jumps over the lazy dog! "
                   "Naïve café, résumé; Ünïcode — 東京 \"quotes\" and (parentheses).")


def check_scorer_tokenizer(path: str, probe_ids, special_ids=()) -> None:
    """An HF scorer folder that ships tokenizer files must split the probe as the trainee's
    tokenizer does (``probe_ids``): the same vocabulary size is not the same tokenizer, and losses
    of different tokenizations cannot be compared token by token. Special tokens (BOS/EOS a
    tokenizer may add) are ignored on both sides; a folder without tokenizer files is not
    checked."""
    from megatron_tw.checkpoint.hf_io import has_tokenizer

    if probe_ids is None or not has_tokenizer(os.listdir(path)):
        return
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # an unreadable tokenizer folder: the vocabulary-size check still holds
        return
    special = set(special_ids) | set(getattr(tokenizer, "all_special_ids", []) or [])
    theirs = [i for i in tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False)
              if i not in special]
    ours = [int(i) for i in probe_ids if int(i) not in special]
    if theirs != ours:
        first = next((k for k, (a, b) in enumerate(zip(theirs, ours)) if a != b),
                     min(len(theirs), len(ours)))
        raise ScorerError(
            f"--tw-scorer-load {path}: its tokenizer splits a probe sentence differently from the "
            f"trainee's ({len(theirs)} vs {len(ours)} tokens, first difference at token {first}): "
            "the same vocabulary size but another tokenizer; the scorer must use the trainee's "
            "tokenizer (losses of different tokenizations cannot be compared token by token)")


def _from_hf(args, path: str, vocab_size: int, load_group=None, probe_ids=None):
    from megatron_tw.checkpoint.families import megatron_args_from_hf_config, padded_vocab_size
    from megatron_tw.checkpoint.hf import load_hf_into_megatron
    from megatron_tw.checkpoint.hf_io import read_hf_config
    from megatron_tw.checkpoint.megatron_io import parse_model_args

    hf_config = read_hf_config(path)
    vocab = int(hf_config.vocab_size if hasattr(hf_config, "vocab_size") else hf_config["vocab_size"])
    _check_vocab(path, vocab, vocab_size)
    check_scorer_tokenizer(path, probe_ids)
    flags = megatron_args_from_hf_config(
        hf_config, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
    scorer_args = _scorer_args(args, parse_model_args(flags))
    padded = padded_vocab_size(vocab, args.make_vocab_size_divisible_by,
                               args.tensor_model_parallel_size)
    model = _build(scorer_args, padded)
    load_hf_into_megatron(model, path, hf_config)
    return model


def _from_megatron(args, path: str, vocab_size: int, load_group=None):
    from megatron_tw.checkpoint.megatron_io import (
        checkpoint_args,
        checkpoint_data_dir,
        load_checkpoint_into_model,
    )

    data_dir = checkpoint_data_dir(path)
    saved = checkpoint_args(data_dir)
    if saved is None:
        raise ScorerError(f"--tw-scorer-load {path}: the checkpoint holds no saved arguments; "
                          "convert HF weights with tools/convert_checkpoint.py or pass an HF folder")
    _check_vocab(path, saved.padded_vocab_size, args.padded_vocab_size)
    scorer_args = _scorer_args(args, saved)
    model = _build(scorer_args, saved.padded_vocab_size)
    load_checkpoint_into_model(model, scorer_args, data_dir, process_group=load_group)
    return model


def _build(scorer_args, padded_vocab: int):
    from megatron.training.argument_utils import core_transformer_config_from_args

    config = scorer_config(core_transformer_config_from_args(scorer_args),
                           mode=scorer_args.tw_short_mode, window=scorer_args.tw_short_context,
                           fp8=bool(scorer_args.tw_scorer_fp8))
    return build_scorer_model(scorer_args, config, mode=scorer_args.tw_short_mode,
                              vocab_size=padded_vocab)


def load_frozen_scorer(args, *, vocab_size: int, device=None, load_group=None, probe_ids=None):
    """Build the frozen scorer for this rank (eval mode, no gradients) on ``device``.

    Args:
        vocab_size: the trainee tokenizer's vocabulary; the scorer's must match.
        device: where it runs (default: the machine's compute device). megatron moves only the
            trainee to the GPU; the scorer is outside its model list.
        load_group: the ranks that load a Megatron checkpoint together (the scorer's pipeline
            stage: runtime.groups.pipeline_stage_group); None for the world group.
        probe_ids: the trainee tokenizer's ids of ``TOKENIZER_PROBE`` (checked against an HF
            scorer's own tokenizer; None skips the check).
    """
    path = args.tw_scorer_load
    if not os.path.exists(path):
        raise ScorerError(f"--tw-scorer-load {path}: no such file or folder")
    if is_hf_folder(path):
        model = _from_hf(args, path, vocab_size, probe_ids=probe_ids)
    else:
        model = _from_megatron(args, path, vocab_size, load_group)
    if device is None:
        from megatron_tw import runtime

        device = runtime.compute_device()
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
