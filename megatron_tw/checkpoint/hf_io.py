"""Reading and writing Hugging Face model folders (config.json, safetensors, tokenizer files).

Weights are read lazily (``safe_open`` per tensor), so converting a large model holds one layer's
tensors at a time beyond the target model. Every output folder is written under a temporary name
next to the target and renamed at the end (``atomic_output_dir``): a failed conversion leaves
nothing at the output path, and the next run removes the temporary folders of a run that was killed
before it could clean up (``.<name>.tmp-<pid>``, ``.<name>.tmp-<pid>.old``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
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
# Of those, the files that carry a vocabulary: without one of them a folder has no tokenizer.
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def has_tokenizer(files) -> bool:
    """Whether these tokenizer file names (e.g. copy_tokenizer's result) make up a tokenizer."""
    return any(name in VOCABULARY_FILES for name in files)


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


BIN_INDEX = "pytorch_model.bin.index.json"


def open_hf_weights(folder: str) -> Mapping[str, torch.Tensor]:
    """Lazy safetensors reader, or ``pytorch_model.bin`` / its shards
    (``pytorch_model-0000k-of-0000n.bin`` with ``pytorch_model.bin.index.json``) loaded whole
    (weights only: ``torch.load(weights_only=True)`` runs no pickled code)."""
    names = os.listdir(folder)
    if any(f.endswith(".safetensors") for f in names):
        return SafetensorsSource(folder)
    if BIN_INDEX in names:
        with open(os.path.join(folder, BIN_INDEX)) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    else:
        shards = sorted(f for f in names if re.fullmatch(r"pytorch_model(-\d+-of-\d+)?\.bin", f))
    if shards:
        missing = [f for f in shards if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise ConversionError(f"{folder}: {BIN_INDEX} names missing shards {missing[:3]}")
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(torch.load(os.path.join(folder, shard), map_location="cpu",
                                    weights_only=True))
        return state
    raise ConversionError(f"{folder}: no model weights (*.safetensors, pytorch_model.bin or "
                          "pytorch_model-*.bin shards)")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _read_config_json(config_file: str) -> dict:
    """config.json as a dict, checked before transformers reads it (its errors name no line and
    blame a missing model_type for a malformed file)."""
    try:
        with open(config_file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{config_file}: cannot read it ({_one_line(exc)})") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{config_file}:{exc.lineno}:{exc.colno}: malformed JSON ({exc.msg}); "
                              "fix the file or restore the model's original config.json") from exc
    if not isinstance(raw, dict):
        raise ConversionError(f"{config_file}: holds a JSON {type(raw).__name__}, not an object of "
                              "config fields; restore the model's original config.json")
    if not raw.get("model_type") and not raw.get("architectures"):
        held = f"fields {sorted(raw)[:6]}" if raw else "an empty object"
        raise ConversionError(f"{config_file}: no 'model_type' or 'architectures' field ({held}): "
                              "not an HF model config; use the config.json saved with the model "
                              "(save_pretrained)")
    hidden, heads = raw.get("hidden_size"), raw.get("num_attention_heads")
    if (isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads
            and raw.get("head_dim") is None):
        raise ConversionError(f"{config_file}: hidden_size {hidden} is not divisible by "
                              f"num_attention_heads {heads} and no head_dim is given; fix one of "
                              "them (the head size is hidden_size / num_attention_heads)")
    return raw


def read_hf_config(folder_or_file: str):
    """The folder's ``PretrainedConfig`` (offline; no hub access). Raises ConversionError naming
    config.json (and the line for malformed JSON) for a file that is not a usable config."""
    from transformers import AutoConfig

    path = folder_or_file
    if os.path.isfile(path):
        path = os.path.dirname(os.path.abspath(path))
    config_file = os.path.join(path, "config.json")
    if not os.path.exists(config_file):
        raise ConversionError(f"{folder_or_file}: no config.json (not an HF model folder)")
    _read_config_json(config_file)
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # ValueError, OSError, KeyError, huggingface_hub validation errors
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        raise ConversionError(f"{config_file}: transformers rejects this config "
                              f"({_one_line(cause)}); fix the file") from exc


def hf_dtype(config: Any) -> Optional[torch.dtype]:
    """The config's weight dtype (``dtype`` in transformers 5, ``torch_dtype`` before)."""
    if isinstance(config, dict):
        value = config.get("dtype") or config.get("torch_dtype")
    else:
        value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def remove_stale_outputs(path: str) -> list[str]:
    """Remove the temporary folders (``.<name>.tmp-<pid>[.old]``) that a killed conversion to
    ``path`` left next to it, when that process is gone; returns them."""
    from megatron_tw.leftovers import remove_stale

    path = os.path.abspath(path)
    pattern = re.escape(f".{os.path.basename(path)}") + r"\.tmp-(?P<pid>[0-9]+)(?:\.old)?"
    return remove_stale(os.path.dirname(path), pattern)


def _unwritable(path: str, where: str, exc: OSError) -> ConversionError:
    return ConversionError(f"--out {path}: cannot create {exc.filename or where} "
                           f"({exc.strerror or exc}); choose a folder you can write to")


@contextlib.contextmanager
def atomic_output_dir(path: str, overwrite: bool = False, removed: Optional[list] = None):
    """Yield a temporary folder next to ``path``; rename it to ``path`` when the block succeeds.

    An existing non-empty ``path`` is an error unless ``overwrite`` (then it is replaced only after
    the new folder is complete). On any failure the temporary folder, and any parent folder this
    call created, are removed. Temporary folders of killed earlier runs are removed first (their
    paths appended to ``removed``). An output that cannot be created is a ConversionError.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConversionError(f"--out {path}: a file exists there; choose a new folder name")
    if os.path.exists(path) and os.listdir(path) and not overwrite:
        raise ConversionError(f"output path {path} exists and is not empty; choose a new path or "
                              "pass --overwrite")
    parent = os.path.dirname(path)
    missing = []
    folder = parent
    while not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise ConversionError(f"--out {path}: {folder} is a file, not a folder; choose an output "
                              "folder elsewhere")
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    created: list[str] = []
    try:
        for folder in reversed(missing):
            os.mkdir(folder)
            created.append(folder)
        stale = remove_stale_outputs(path)
        if removed is not None:
            removed += stale
        shutil.rmtree(tmp, ignore_errors=True)
        os.mkdir(tmp)
    except OSError as exc:
        _remove_folders(created)
        raise _unwritable(path, tmp, exc) from exc
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_folders(created)
        raise
    if os.path.exists(path):
        old = f"{tmp}.old"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def _remove_folders(created: list[str]) -> None:
    for folder in reversed(created):
        try:
            os.rmdir(folder)  # only while empty
        except OSError:
            pass


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
                     max_shard_bytes: int = 5 * 2**30, progress: bool = False) -> list[str]:
    """Write ``state`` as ``model.safetensors`` or, above ``max_shard_bytes``, as numbered shards
    plus ``model.safetensors.index.json``: huggingface_hub's own split, so the layout is exactly
    the one ``save_pretrained`` writes and every HF reader expects."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_bytes)
    files = list(split.filename_to_tensors.items())
    if progress and len(files) > 1:
        from tqdm import tqdm

        files = tqdm(files, desc="writing shards", unit="file")
    for fname, names in files:
        save_file({k: state[k].contiguous() for k in names}, os.path.join(folder, fname),
                  metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
        with open(os.path.join(folder, SAFE_INDEX), "w") as f:
            json.dump(index, f, indent=2)
    return sorted(split.filename_to_tensors)
