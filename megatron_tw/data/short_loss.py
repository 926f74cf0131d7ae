"""Precomputed short-context losses: the sidecar next to the data, and the dataset wrapper.

A frozen scorer's short-context losses are a fixed function of the data, so
``tools/score_data.py`` computes them once, offline, and the training run (``--tw-scorer
precomputed``) reads them with each sample. The sidecar is aligned with the *training samples*,
not with documents: sample i of a split (the dataset index megatron's sampler asks for) has
row i, the ``[seq_length]`` float32 losses where ``row[p]`` is the short-context loss of
``labels[p]`` (megatron's frame: position p holds ``tokens[p]`` and predicts ``labels[p]``).

Files per split (``train``, ``valid``, ``test``), for ``--tw-short-loss-path PREFIX``:

- ``PREFIX_<split>.bin`` / ``.idx``: a megatron IndexedDataset (float32), document i = row i.
- ``PREFIX_<split>.json``: what the rows were computed from. ``fingerprint`` (the samples:
  data identity, seq length, seed, split, sample count, tokenizer; the short context W, mode,
  stride) is compared with the training run's at start-up, field by field; ``scorer`` (path and
  the identity of its files) and ``command`` are the provenance.

Identities of files are their size plus an md5 of their content (of three 1 MiB samples for files
over 3 MiB), never paths or modification times: data and sidecar may be copied between machines.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import struct
import sys
from typing import Optional

import numpy
import torch

from megatron_tw.errors import ConfigError

SPLITS = ("train", "valid", "test")
FORMAT = "megatron_tw short-loss sidecar v1"
_SAMPLE = 1 << 20
_IDX_MAGIC, _FLOAT32_CODE = b"MMIDIDX\x00\x00", 7  # megatron IndexedDataset header, DType.float32


class SidecarError(ConfigError):
    """The sidecar cannot serve this run; the message names the file, the cause and the fix."""


# -- where ----------------------------------------------------------------------------------------

def sidecar_prefix(args) -> str:
    """``--tw-short-loss-path``, or ``<data-path>_short_loss`` for a single ``--data-path``."""
    if args.tw_short_loss_path:
        return args.tw_short_loss_path
    data_path = getattr(args, "data_path", None) or []
    if len(data_path) == 1 and not getattr(args, "mock_data", False):
        return f"{data_path[0]}_short_loss"
    given = "--mock-data" if getattr(args, "mock_data", False) else f"--data-path {data_path}"
    raise SidecarError(f"--tw-scorer precomputed with {given}: give --tw-short-loss-path PREFIX "
                       "(the default <data-path>_short_loss needs exactly one --data-path prefix)")


def split_paths(prefix: str, split: str) -> dict[str, str]:
    base = f"{prefix}_{split}"
    return {"bin": f"{base}.bin", "idx": f"{base}.idx", "json": f"{base}.json"}


# -- fingerprint ----------------------------------------------------------------------------------

def file_identity(path: str) -> dict:
    """Size and md5 of a file's content (of its first, middle and last MiB when larger)."""
    size = os.path.getsize(path)
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        if size <= 3 * _SAMPLE:
            digest.update(f.read())
        else:
            for offset in (0, (size - _SAMPLE) // 2, size - _SAMPLE):
                f.seek(offset)
                digest.update(f.read(_SAMPLE))
    return {"bytes": size, "md5": digest.hexdigest()}


def path_identity(path: str) -> dict:
    """``file_identity`` of a file, or of every file under a folder (by relative path)."""
    if os.path.isfile(path):
        return file_identity(path)
    files = {}
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            files[os.path.relpath(full, path)] = file_identity(full)
    return files


def _is_tokenizer_file(name: str) -> bool:
    return (name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "added_tokens"))
            or name.endswith((".model", ".tiktoken")))


def data_identity(prefix: str) -> dict:
    return {"idx": file_identity(f"{prefix}.idx"), "bin": file_identity(f"{prefix}.bin")}


def _described(value, key: Optional[str] = None):
    """megatron's ``unique_identifiers`` as plain JSON, data paths replaced by their identity."""
    if key == "dataset_path":
        return None if value is None else data_identity(value)
    if hasattr(value, "unique_identifiers"):
        value = value.unique_identifiers
    if isinstance(value, dict):
        # The tokenizer has its own field; megatron's description of it holds file paths.
        return {k: _described(v, k) for k, v in value.items() if k != "tokenizer"}
    if isinstance(value, (list, tuple)):
        return [_described(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def dataset_fingerprint(args, dataset, split: str) -> dict:
    """What decides the tokens of every sample of ``dataset`` (one split)."""
    from megatron_tw.data.long_document import LongDocumentDataset

    if isinstance(dataset, LongDocumentDataset):
        # Sample order is a prefix property (epochs of seeded permutations): a sidecar scored for
        # more samples serves a shorter run, so the sample count is checked as a minimum instead.
        windows = dataset.windows
        return {"class": "LongDocumentDataset", "data": data_identity(windows.data_prefix),
                "seq_length": windows.seq_length,
                "min_document_length": windows.min_document_length, "bos_id": dataset.bos_id,
                "documents": [int(dataset.documents[0]), int(dataset.documents[-1]) + 1],
                "seed": args.seed, "split": split}
    described = _described(dataset)
    # Flags that change a GPTDataset sample but are not in megatron's description of it.
    for name in ("add_extra_token_to_sequence", "reset_position_ids"):
        if hasattr(getattr(dataset, "config", None), name):
            described[name] = getattr(dataset.config, name)
    return described


def tokenizer_fingerprint(args) -> dict:
    from megatron.training import get_tokenizer

    tokenizer = get_tokenizer()

    def special(name):
        try:
            return getattr(tokenizer, name)
        except (AttributeError, NotImplementedError):
            return None

    files = {}
    for flag in ("tokenizer_model", "vocab_file", "merge_file"):
        path = getattr(args, flag, None)
        if path and os.path.isfile(path):
            files[flag] = file_identity(path)
        elif path and os.path.isdir(path):  # an HF tokenizer folder, maybe inside a checkpoint
            files[flag] = {name: file_identity(os.path.join(path, name))
                           for name in sorted(os.listdir(path)) if _is_tokenizer_file(name)}
    # The padded vocabulary decides the softmax the scorer's losses come from (padded rows of an
    # imported HF scorer are zero logits), so the trainee's padding is part of the identity.
    return {"type": args.tokenizer_type, "vocab_size": tokenizer.vocab_size,
            "padded_vocab_size": args.padded_vocab_size, "bos": special("bos"),
            "eod": special("eod"), "files": files}


def short_context_fingerprint(args) -> dict:
    stride = args.tw_short_stride if args.tw_short_mode == "windows" else None
    # definition 2: a window is W tokens (a target sees at most W - 1), and the sliding mode keeps
    # the sequence's first token visible (the attention sink); sidecars of the earlier
    # definition (W + 1-token windows, no sink) differ in this field and are rescored.
    return {"window": args.tw_short_context, "mode": args.tw_short_mode, "stride": stride,
            "definition": 2}


def run_fingerprint(args, dataset, split: str) -> dict:
    """The fields a sidecar's rows depend on (besides the scorer), as the training run sees them."""
    return {"dataset": dataset_fingerprint(args, dataset, split),
            "tokenizer": tokenizer_fingerprint(args),
            "short_context": short_context_fingerprint(args)}


def rows_needed(args, dataset, num_samples: Optional[int]) -> int:
    """How many samples of ``dataset`` the run may read: megatron's sampler reads indices
    [0, num_samples) in order; the cyclic loader (and full validation) draw from the whole
    dataset."""
    if num_samples is None or getattr(args, "dataloader_type", "single") == "cyclic":
        return len(dataset)
    return min(int(num_samples), len(dataset))


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict) and tree:
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def fingerprint_differences(stored: dict, current: dict) -> list[str]:
    """``["dataset.random_seed: sidecar 1, this run 2", ...]`` (empty when they agree)."""
    a, b = _flatten(json.loads(json.dumps(stored))), _flatten(json.loads(json.dumps(current)))
    return [f"{key}: sidecar {a.get(key, '(absent)')!r}, this run {b.get(key, '(absent)')!r}"
            for key in sorted(set(a) | set(b)) if a.get(key, "(absent)") != b.get(key, "(absent)")]


_HINTS = {
    "dataset": "the samples differ: --data-path, --split, --seq-length, --seed, or the sample "
               "count (--train-iters x --global-batch-size, --eval-iters, --eval-interval)",
    "tokenizer": "the tokenizer differs: --tokenizer-*, --vocab-size, or the vocabulary padding "
                 "(--make-vocab-size-divisible-by x --tensor-model-parallel-size)",
    "short_context": "the short context differs: --tw-short-context, --tw-short-mode, "
                     "--tw-short-stride",
}


# -- reading --------------------------------------------------------------------------------------

def score_command(argv=None) -> str:
    """The tools/score_data.py command that writes the sidecar this training command reads."""
    argv = list(sys.argv[1:] if argv is None else argv)
    kept, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--tw-scorer":
            skip = True
            continue
        if arg.startswith("--tw-scorer="):
            continue
        kept.append(arg)
    return ("torchrun --nproc-per-node <processes> tools/score_data.py " + shlex.join(kept)
            + " --tw-scorer-load <scorer: HF folder or Megatron checkpoint>")


def read_record(path: str) -> dict:
    try:
        with open(path) as f:
            record = json.load(f)
    except json.JSONDecodeError as err:
        raise SidecarError(f"{path} is not valid JSON ({err}); the sidecar is corrupt: rescore "
                           "with tools/score_data.py") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise SidecarError(f"{path} is not a {FORMAT!r} file; rescore with tools/score_data.py")
    return record


def read_index(path: str, seq_length: int) -> int:
    """Validate an IndexedDataset .idx of equal-length float32 rows; return the row count."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 34 or data[:9] != _IDX_MAGIC:
        raise SidecarError(f"{path}: not a megatron IndexedDataset index ({len(data)} bytes); "
                           "the sidecar is truncated or corrupt: rescore with tools/score_data.py")
    (version,), (code,) = struct.unpack_from("<Q", data, 9), struct.unpack_from("<B", data, 17)
    n, docs = struct.unpack_from("<QQ", data, 18)
    if version != 1 or code != _FLOAT32_CODE or docs != n + 1:
        raise SidecarError(f"{path}: version {version}, dtype code {code}, {n} sequences in "
                           f"{docs - 1} documents; expected version 1, float32 (code "
                           f"{_FLOAT32_CODE}), one sequence per document: rescore")
    expected = 34 + n * (4 + 8) + (n + 1) * 8
    if len(data) != expected:
        raise SidecarError(f"{path}: {len(data)} bytes, expected {expected} for {n} rows; the "
                           "index is truncated or corrupt: rescore with tools/score_data.py")
    lengths = numpy.frombuffer(data, numpy.int32, n, 34)
    pointers = numpy.frombuffer(data, numpy.int64, n, 34 + 4 * n)
    if n and (lengths != seq_length).any():
        bad = int(lengths[lengths != seq_length][0])
        raise SidecarError(f"{path}: rows of {bad} losses, but --seq-length is {seq_length}: "
                           "the sidecar was scored for another sequence length; rescore")
    if not numpy.array_equal(pointers, numpy.arange(n, dtype=numpy.int64) * seq_length * 4):
        raise SidecarError(f"{path}: rows are not stored back to back; the index is corrupt: "
                           "rescore with tools/score_data.py")
    return n


class Sidecar:
    """One split's rows, memory-mapped lazily (in each DataLoader worker)."""

    def __init__(self, paths: dict, rows: int, seq_length: int, record: dict):
        self.paths, self.rows, self.seq_length, self.record = paths, rows, seq_length, record
        self._rows = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_rows"] = None  # reopen in the worker, never pickle the data
        return state

    def row(self, index: int) -> torch.Tensor:
        """Sample ``index``'s short-context losses, float32 [seq_length]."""
        if not 0 <= index < self.rows:
            raise IndexError(f"{self.paths['bin']}: sample {index} requested, the sidecar holds "
                             f"{self.rows}")
        if self._rows is None:
            self._rows = numpy.memmap(self.paths["bin"], dtype=numpy.float32, mode="r",
                                      shape=(self.rows, self.seq_length))
        return torch.from_numpy(numpy.array(self._rows[index]))


def open_sidecar(prefix: str, split: str, *, fingerprint: dict, rows: int,
                 seq_length: int, command: str = "") -> Sidecar:
    """Open and validate one split's sidecar for a run that reads ``rows`` samples.

    Raises SidecarError naming the file and the fix: missing files, a fingerprint that differs
    (each differing field named), too few rows, and truncated or corrupt files.
    """
    paths = split_paths(prefix, split)
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if missing:
        how = f"; create it with:\n  {command}" if command else ""
        raise SidecarError(f"--tw-short-loss-path {prefix}: no precomputed short-context losses "
                           f"for the {split} split ({', '.join(missing)} missing){how}")
    record = read_record(paths["json"])
    differences = fingerprint_differences(record.get("fingerprint", {}), fingerprint)
    if differences:
        hints = "; ".join(sorted({_HINTS[d.split(".")[0]] for d in differences
                                  if d.split(".")[0] in _HINTS}))
        raise SidecarError(
            f"{paths['json']}: the sidecar was scored for other samples or settings than this "
            "run's; differing fields:\n  " + "\n  ".join(differences[:8])
            + ("\n  ..." if len(differences) > 8 else "") + "\n" + hints[:1].upper() + hints[1:]
            + ".\nRescore with tools/score_data.py and this run's flags.")
    n = read_index(paths["idx"], seq_length)
    size = os.path.getsize(paths["bin"])
    if size != n * seq_length * 4:
        raise SidecarError(f"{paths['bin']}: {size} bytes, expected {n * seq_length * 4} "
                           f"({n} rows x {seq_length} float32); the sidecar is truncated or "
                           "corrupt: rescore with tools/score_data.py")
    files = record.get("files", {})
    for key in ("idx", "bin"):
        if record.get("rows") != n or files.get(key) != file_identity(paths[key]):
            raise SidecarError(f"{paths[key]} is not the file {paths['json']} describes (another "
                               "scoring run's, or modified): rescore with tools/score_data.py")
    if n < rows:
        raise SidecarError(f"{prefix}_{split}: holds {n} samples, this run reads {rows} "
                           "(--train-iters x --global-batch-size for train; --eval-iters and "
                           "--eval-interval for valid/test): rescore with this run's flags")
    return Sidecar(paths, n, seq_length, record)


class WithShortLoss(torch.utils.data.Dataset):
    """Adds ``short_loss`` (float32 [seq_length], the sidecar row of the sample's dataset
    index) to every sample of ``dataset``."""

    def __init__(self, dataset, sidecar: Sidecar):
        self.dataset, self.sidecar = dataset, sidecar

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx):
        sample = dict(self.dataset[idx])
        sample["short_loss"] = self.sidecar.row(int(idx))
        return sample


def attach_short_losses(args, datasets, num_samples) -> tuple:
    """Wrap each built split in :class:`WithShortLoss` after validating its sidecar.

    ``datasets``: (train, valid, test), None where not built; ``num_samples``: megatron's
    train/valid/test sample counts. Raises SidecarError before any step runs.
    """
    from megatron.training import print_rank_0

    prefix = sidecar_prefix(args)
    counts = list(num_samples) if num_samples is not None else [None] * 3
    wrapped = []
    for split, dataset, count in zip(SPLITS, datasets, counts):
        if isinstance(dataset, (list, tuple)):
            raise SidecarError("--multiple-validation-sets cannot read precomputed short-context "
                               "losses (one sidecar per split); drop it or use --tw-scorer frozen")
        rows = 0 if dataset is None else rows_needed(args, dataset, count)
        if rows == 0:
            wrapped.append(dataset)
            continue
        sidecar = open_sidecar(prefix, split, fingerprint=run_fingerprint(args, dataset, split),
                               rows=rows, seq_length=args.seq_length, command=score_command())
        scorer = sidecar.record.get("scorer", {})
        print_rank_0(f"> short-context losses for {split}: {prefix}_{split} ({sidecar.rows} "
                     f"samples; scorer {scorer.get('path')}, W={args.tw_short_context}, "
                     f"{args.tw_short_mode})")
        wrapped.append(WithShortLoss(dataset, sidecar))
    return tuple(wrapped)


def short_context_from_sidecar(args) -> dict:
    """For ``--tw-scorer precomputed``: the W/mode/stride the run did not give, from the train
    split's sidecar, so every rank uses the values the losses were computed with (pure: returns
    the settings; megatron_tw.arguments applies them)."""
    prefix = sidecar_prefix(args)
    path = split_paths(prefix, "train")["json"]
    if not os.path.exists(path):
        # Flags alone must parse anywhere (launch scripts are checked off the cluster); a missing
        # sidecar is reported, with the command that writes it, when the datasets are built.
        return {}
    stored = read_record(path).get("fingerprint", {}).get("short_context", {})
    given = getattr(args, "tw_given_flags", ())
    settings = {}
    if args.tw_short_context is None:
        settings["tw_short_context"] = stored.get("window")
    mode = args.tw_short_mode
    if "--tw-short-mode" not in given and stored.get("mode"):
        mode = settings["tw_short_mode"] = stored["mode"]
    if args.tw_short_stride is None and mode == "windows":
        settings["tw_short_stride"] = stored.get("stride")
    return settings
