"""Reading and writing Hugging Face model folders (config.json, safetensors, tokenizer files).

Weights are read lazily (``safe_open`` per tensor), so converting a large model holds one layer's
tensors at a time beyond the target model. Every output folder is written under a temporary name
next to the target and renamed at the end (``atomic_output_dir``): a failed conversion leaves
nothing at the output path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any, Iterator, Optional

import torch

from megatron_tw.checkpoint.families import ConversionError

SAFE_INDEX = "model.safetensors.index.json"
# Files that make up a tokenizer in an HF folder (copied verbatim on conversion).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "generation_config.json")


class SafetensorsSource(Mapping):
    """HF name -> tensor over the ``*.safetensors`` files of a folder, loaded on access."""

    def __init__(self, folder: str):
        from safetensors import safe_open

        index = os.path.join(folder, SAFE_INDEX)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
            weight_map = None
        if not files:
            raise ConversionError(f"{folder}: no *.safetensors weights (save the model with "
                                  "save_pretrained(..., safe_serialization=True))")
        self._handles = {f: safe_open(os.path.join(folder, f), framework="pt") for f in files}
        if weight_map is None:
            weight_map = {k: f for f, h in self._handles.items() for k in h.keys()}
        self._where = weight_map

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where


def open_hf_weights(folder: str) -> Mapping[str, torch.Tensor]:
    """Lazy safetensors reader, or a ``pytorch_model.bin`` loaded whole (weights only)."""
    if any(f.endswith(".safetensors") for f in os.listdir(folder)):
        return SafetensorsSource(folder)
    binary = os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(binary):
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise ConversionError(f"{folder}: no model weights (*.safetensors or pytorch_model.bin)")


def read_hf_config(folder_or_file: str):
    """The folder's ``PretrainedConfig`` (offline; no hub access)."""
    from transformers import AutoConfig

    path = folder_or_file
    if os.path.isfile(path):
        path = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ConversionError(f"{folder_or_file}: no config.json (not an HF model folder)")
    return AutoConfig.from_pretrained(path, local_files_only=True)


def hf_dtype(config: Any) -> Optional[torch.dtype]:
    """The config's weight dtype (``dtype`` in transformers 5, ``torch_dtype`` before)."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


@contextlib.contextmanager
def atomic_output_dir(path: str, overwrite: bool = False):
    """Yield a temporary folder next to ``path``; rename it to ``path`` when the block succeeds.

    An existing non-empty ``path`` is an error unless ``overwrite`` (then it is replaced only after
    the new folder is complete). On any failure the temporary folder is removed.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and os.listdir(path) and not overwrite:
        raise ConversionError(f"output path {path} exists and is not empty; choose a new path or "
                              "pass --overwrite")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(path):
        old = f"{tmp}.old"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def copy_tokenizer(dst: str, *, hf_folder: Optional[str] = None,
                   tokenizer_model: Optional[str] = None) -> list[str]:
    """Copy tokenizer files into ``dst``: those of an HF folder, or a sentencepiece model (saved as
    ``tokenizer.model``, which ``AutoTokenizer`` reads through the model type in config.json)."""
    copied = []
    if tokenizer_model is not None:
        if not os.path.isfile(tokenizer_model):
            raise ConversionError(f"--tokenizer-model {tokenizer_model}: no such file")
        shutil.copyfile(tokenizer_model, os.path.join(dst, "tokenizer.model"))
        copied.append("tokenizer.model")
    elif hf_folder is not None:
        for name in TOKENIZER_FILES:
            src = os.path.join(hf_folder, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(dst, name))
                copied.append(name)
    return copied


def save_safetensors(state: dict[str, torch.Tensor], folder: str,
                     max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write ``state`` as ``model.safetensors`` or, above ``max_shard_bytes``, as numbered shards
    plus ``model.safetensors.index.json`` (HF's layout)."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, fname), metadata={"format": "pt"})
        names.append(fname)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(folder, SAFE_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names
