"""Whole-folder conversions: HF folder -> megatron torch_dist checkpoint, and back.

HF -> megatron output folder (``pretrain_tw.py --pretrained-checkpoint OUT`` or ``--load OUT``)::

    OUT/latest_checkpointed_iteration.txt   "release"
    OUT/release/                            torch_dist model weights (+ the megatron args used)
    OUT/megatron_args.txt / .json           the model flags to pass to pretrain_tw.py
    OUT/config.json + tokenizer files       the source HF config and tokenizer (for
                                            --tokenizer-type HuggingFaceTokenizer --tokenizer-model OUT
                                            and for the way back)

megatron -> HF output folder: config.json, model.safetensors (sharded above 5 GB), tokenizer files;
``AutoModelForCausalLM.from_pretrained(OUT)`` and ``AutoTokenizer.from_pretrained(OUT)`` load it
offline. Both directions write to a temporary folder and rename it at the end.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
import re
from typing import Optional

import torch

from megatron_tw.checkpoint import hf_io, megatron_io
from megatron_tw.checkpoint.export_config import hf_config_dict
from megatron_tw.checkpoint.families import (
    ConversionError,
    HFModelSpec,
    megatron_args_from_hf_config,
    padded_vocab_size,
    spec_from_hf_config,
    with_rope_theta,
)
from megatron_tw.checkpoint.hf import load_hf_into_megatron, megatron_state_to_hf, unsharded_state_dict

EMBEDDING_KEY = "embedding.word_embeddings.weight"


def compatible_tp_sizes(vocab_size: int, divisible_by: int, padded: int, spec: HFModelSpec) -> list[int]:
    """TP sizes (up to 64) whose megatron vocabulary padding gives exactly ``padded`` rows and that
    divide the attention heads: the layouts this checkpoint loads into with the printed flags."""
    return [t for t in (1, 2, 4, 8, 16, 32, 64)
            if padded_vocab_size(vocab_size, divisible_by, t) == padded and spec.num_heads % t == 0]


def hf_to_megatron(hf_dir: str, out_dir: str, *, rotary_base: Optional[int] = None,
                   make_vocab_size_divisible_by: int = 128, target_tensor_parallel_size: int = 1,
                   dtype: Optional[torch.dtype] = None, tokenizer_model: Optional[str] = None,
                   overwrite: bool = False, progress: bool = False) -> dict:
    """Convert an HF Llama-family folder into a megatron release checkpoint. Returns the summary
    written to ``megatron_args.json`` (``flags``: the model flags pretrain_tw.py needs).

    ``target_tensor_parallel_size``: the vocabulary is padded as megatron pads it at this TP size
    (megatron pads to a multiple of divisible_by x TP); the checkpoint then loads into that TP and
    every TP dividing it. ``rotary_base`` overrides ``rope_theta`` (context extension).
    """
    config = hf_io.read_hf_config(hf_dir)
    spec = spec_from_hf_config(config)
    flags = megatron_args_from_hf_config(spec, rotary_base=rotary_base,
                                         make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    padded = padded_vocab_size(spec.vocab_size, make_vocab_size_divisible_by,
                               target_tensor_parallel_size)
    dtype = dtype or hf_io.hf_dtype(config) or torch.float32
    summary = {
        "source": os.path.abspath(hf_dir),
        "architecture": spec.architecture,
        "spec": dataclasses.asdict(spec),
        "rotary_base": rotary_base if rotary_base is not None else spec.rope_theta,
        "vocab_size": spec.vocab_size,
        "padded_vocab_size": padded,
        "compatible_tensor_parallel_sizes": compatible_tp_sizes(
            spec.vocab_size, make_vocab_size_divisible_by, padded, spec),
        "dtype": str(dtype).replace("torch.", ""),
    }
    stale: list[str] = []
    with hf_io.atomic_output_dir(out_dir, overwrite, removed=stale) as tmp:
        with megatron_io.single_process_megatron():
            args = megatron_io.parse_model_args(flags)
            model = megatron_io.build_model(args, padded, dtype)
            load_hf_into_megatron(model, hf_dir, config, rotary_base=rotary_base,
                                  progress=progress)
            megatron_io.save_release_checkpoint(model, args, tmp)
        config.save_pretrained(tmp)
        summary["tokenizer_files"] = hf_io.copy_tokenizer(tmp, hf_folder=hf_dir,
                                                          tokenizer_model=tokenizer_model)
        summary["has_tokenizer"] = hf_io.has_tokenizer(summary["tokenizer_files"])
        megatron_io.write_megatron_args(tmp, flags, summary)
    summary["flags"] = flags
    summary["removed_stale"] = stale
    return summary


def _checkpoint_dir(ckpt_dir: str, iteration: Optional[int]) -> str:
    """megatron_io.checkpoint_data_dir, after checking the tracker file holds an iteration."""
    tracker = os.path.join(ckpt_dir, megatron_io.TRACKER)
    if iteration is None and os.path.isfile(tracker):
        with open(tracker, encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
        if text != "release" and not (text.isascii() and text.isdigit()):
            saved = sorted(int(n[5:]) for n in os.listdir(ckpt_dir)
                           if re.fullmatch(r"iter_[0-9]{7}", n))
            fix = (f"write the iteration to load into it (the newest saved: {saved[-1]}) or pass "
                   "--iteration N" if saved else
                   "write the saved iteration number (or 'release') into it, or pass --iteration N")
            first = text.splitlines()[0] if text else ""
            shown = first[:40] + (" ..." if len(first) > 40 or first != text else "")
            raise ConversionError(f"{tracker}: holds {shown!r}, not an iteration number or "
                                  f"'release' (an interrupted save?); {fix}")
    return megatron_io.checkpoint_data_dir(ckpt_dir, iteration)


# checkpoint arg -> HFModelSpec field: what must agree between a checkpoint and its HF template
_STRUCTURE = (("num_layers", "num_layers"), ("hidden_size", "hidden_size"),
              ("ffn_hidden_size", "ffn_hidden_size"), ("num_attention_heads", "num_heads"),
              ("num_query_groups", "num_kv_heads"), ("kv_channels", "head_dim"),
              ("add_qkv_bias", "qkv_bias"))


def _check_structure(ckpt_args, spec: HFModelSpec, data_dir: str) -> None:
    if ckpt_args is None:
        return
    for arg, field in _STRUCTURE:
        have, want = getattr(ckpt_args, arg, None), getattr(spec, field)
        if have is not None and have != want:
            raise ConversionError(f"{data_dir}: checkpoint was trained with --{arg.replace('_', '-')} "
                                  f"{have}, the HF config has {field}={want}; pass the matching "
                                  "--hf-config")
    untied = getattr(ckpt_args, "untie_embeddings_and_output_weights", None)
    if untied is not None and untied == spec.tied_embeddings:
        raise ConversionError(f"{data_dir}: checkpoint has untie_embeddings_and_output_weights="
                              f"{untied}, the HF config tie_word_embeddings={spec.tied_embeddings}")


def _template_dict(path: Optional[str]) -> Optional[dict]:
    if path is None:
        return None
    config_file = path if os.path.isfile(path) else os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return None
    hf_io.read_hf_config(config_file)  # one-line errors for a broken file
    with open(config_file) as f:
        return json.load(f)


def tokenizer_vocab_size(ckpt_args) -> Optional[int]:
    """The vocabulary of the tokenizer a run trained with (its saved --tokenizer-* flags), or
    None when it cannot be built here (e.g. its files are on another machine)."""
    if ckpt_args is None or not getattr(ckpt_args, "tokenizer_type", None):
        return None
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return int(build_tokenizer(copy.copy(ckpt_args)).vocab_size)
    except Exception:  # missing files, a tokenizer type that needs network access, ...
        return None


def megatron_to_hf(ckpt_dir: str, out_dir: str, *, hf_config: Optional[str] = None,
                   dtype: Optional[torch.dtype] = None, tokenizer_from: Optional[str] = None,
                   tokenizer_model: Optional[str] = None, iteration: Optional[int] = None,
                   overwrite: bool = False, vocab_size: Optional[int] = None,
                   progress: bool = False) -> dict:
    """Convert a megatron torch_dist checkpoint (any TP x PP layout it was saved in) to an HF folder.

    The HF config is built from the arguments the checkpoint saved (checkpoint/export_config.py:
    RoPE base and scaling, norm epsilon, tied embeddings, context length); a flag HF cannot
    represent is refused. ``hf_config`` (default: the config.json hf_to_megatron left in
    ``ckpt_dir``) only contributes the architecture name and the special-token ids. The
    vocabulary without megatron's padding: ``vocab_size``, else the template's, else the
    tokenizer the run trained with.
    """
    data_dir = _checkpoint_dir(ckpt_dir, iteration)
    template = _template_dict(hf_config or ckpt_dir)
    ckpt_args = megatron_io.checkpoint_args(data_dir)
    padded = megatron_io.checkpoint_tensor_shape(data_dir, EMBEDDING_KEY)[0]
    saved_dtype = _checkpoint_dtype(data_dir)
    out_dtype = dtype or (hf_io.hf_dtype(template) if template else None) or saved_dtype
    dtype_name = str(out_dtype).replace("torch.", "")
    if ckpt_args is None:
        if template is None:
            raise ConversionError(f"{ckpt_dir}: the checkpoint saved no arguments and has no "
                                  "config.json; pass --hf-config <the source HF folder>")
        config_dict = dict(template, dtype=dtype_name, torch_dtype=dtype_name)
    else:
        vocab = vocab_size or (template or {}).get("vocab_size") or tokenizer_vocab_size(ckpt_args)
        if vocab is None:
            raise ConversionError(f"{ckpt_dir}: the vocabulary size without padding is unknown "
                                  f"(the run's tokenizer cannot be built here; the embedding has "
                                  f"{padded} padded rows): pass --vocab-size N")
        if vocab > padded:
            raise ConversionError(f"--vocab-size {vocab} exceeds the checkpoint's {padded} "
                                  "embedding rows")
        config_dict = hf_config_dict(ckpt_args, vocab_size=vocab, dtype=dtype_name,
                                     template=template)
    spec = spec_from_hf_config(config_dict)
    if ckpt_args is not None:
        _check_structure(ckpt_args, spec, data_dir)
    flags = megatron_args_from_hf_config(spec)
    stale: list[str] = []
    with hf_io.atomic_output_dir(out_dir, overwrite, removed=stale) as tmp:
        with megatron_io.single_process_megatron():
            args = megatron_io.parse_model_args(flags)
            model = megatron_io.build_model(args, padded, saved_dtype)
            megatron_io.load_checkpoint_into_model(model, args, data_dir)
            state = megatron_state_to_hf(unsharded_state_dict(model), spec, dtype=out_dtype)
        del model
        files = hf_io.save_safetensors(state, tmp, progress=progress)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_dict, f, indent=2, sort_keys=True)
        tokenizer = hf_io.copy_tokenizer(tmp, hf_folder=tokenizer_from or hf_config or ckpt_dir,
                                         tokenizer_model=tokenizer_model)
    return {"checkpoint": data_dir, "files": files, "tokenizer_files": tokenizer,
            "has_tokenizer": hf_io.has_tokenizer(tokenizer),
            "tokenizer_source": tokenizer_model or tokenizer_from or hf_config or ckpt_dir,
            "rope_theta": spec.rope_theta, "max_position_embeddings": spec.max_position_embeddings,
            "dtype": dtype_name, "removed_stale": stale}


def _checkpoint_dtype(data_dir: str) -> torch.dtype:
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(data_dir)
    return meta[EMBEDDING_KEY].dtype
