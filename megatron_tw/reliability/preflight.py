"""Start-up checks of the files a run reads before step 1 (pure: they read files, change nothing).

Checked once, at argument validation (before megatron initialises anything), each failure one
:class:`~megatron_tw.errors.ConfigError` naming the flag, the file and the fix:

- ``--load``: the checkpoint megatron would resume from (the iteration named by
  ``latest_checkpointed_iteration.txt``, or ``--ckpt-step``) is complete: every file its metadata
  references exists at its full length. Megatron writes the tracker file last, so a kill during a
  save leaves the previous checkpoint named there; but a damaged tracker (a kill while it is
  rewritten leaves it empty: megatron then prints an error and exits with status 0, training
  nothing) or a damaged/partly copied folder otherwise fails deep inside loading, or not at all.
- ``--tokenizer-model`` and friends: the tokenizer file exists and is what ``--tokenizer-type``
  reads (a SentencePiece model must parse).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile
from typing import Optional

from megatron_tw.errors import ConfigError

TRACKER = "latest_checkpointed_iteration.txt"
SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")


# -- checkpoints --------------------------------------------------------------------------------

def _is_local(path: str) -> bool:
    return "://" not in path  # msc:// and other object-store paths are megatron's to read


def _zip_problem(path: str) -> Optional[str]:
    """torch.save writes a zip archive, its directory at the end: a truncated file has none."""
    with open(path, "rb") as f:
        if f.read(2) != b"PK":
            return None  # a legacy pickle: nothing cheap to check
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        return f"{os.path.basename(path)} is truncated or damaged ({err})"
    return None


def _dcp_problems(folder: str) -> list[str]:
    """Problems of a torch.distributed.checkpoint folder: its ``.metadata`` lists, for every
    tensor, the file, offset and length where it is stored."""
    if not os.path.isfile(os.path.join(folder, ".metadata")):
        return ["missing .metadata (written at the end of a save)"]
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(folder).read_metadata()
    except Exception as err:  # a truncated pickle raises whatever unpickling hits
        return [f"unreadable .metadata ({type(err).__name__}: {err})"]
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    problems = []
    for name, size in sorted(needed.items()):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            problems.append(f"missing {name}")
        elif os.path.getsize(path) < size:
            problems.append(f"{name} is truncated ({os.path.getsize(path)} of {size} bytes)")
    return problems


def checkpoint_problems(folder: str) -> list[str]:
    """What keeps ``folder`` (an ``iter_NNNNNNN`` or ``release`` folder) from loading; [] if
    complete. Formats: torch_dist (metadata.json + torch DCP files), torch_dcp, torch
    (mp_rank_*)."""
    if not os.path.isdir(folder):
        return ["the folder does not exist"]
    entries = os.listdir(folder)
    problems = []
    if "common.pt" in entries:
        problems += filter(None, [_zip_problem(os.path.join(folder, "common.pt"))])
    if "metadata.json" in entries:
        try:
            with open(os.path.join(folder, "metadata.json")) as f:
                backend = json.load(f).get("sharded_backend")
        except (ValueError, OSError) as err:
            return problems + [f"unreadable metadata.json ({err})"]
        if backend in ("torch_dist", "torch"):
            problems += _dcp_problems(folder)
        return problems
    ranks = sorted(e for e in entries if e.startswith("mp_rank_"))
    if ranks:
        for rank in ranks:
            rank_dir = os.path.join(folder, rank)
            if not os.path.isfile(os.path.join(rank_dir, "model_optim_rng.pt")):
                problems.append(f"missing {rank}/model_optim_rng.pt")
            for name in sorted(os.listdir(rank_dir)):
                if name.endswith(".pt"):
                    problem = _zip_problem(os.path.join(rank_dir, name))
                    if problem:
                        problems.append(f"{rank}/{problem}")
        return problems
    if ".metadata" in entries:
        return problems + _dcp_problems(folder)
    return problems + ["missing metadata.json and .metadata (a torch_dist save writes them last: "
                       "this save was interrupted)"]


def complete_iterations(load_dir: str, newest: int = 5) -> list[int]:
    """The iterations of complete checkpoints in ``load_dir``, newest first (at most ``newest``
    are checked: the list only feeds messages)."""
    names = []
    for name in os.listdir(load_dir) if os.path.isdir(load_dir) else ():
        if name.startswith("iter_") and name[5:].isdigit():
            names.append(int(name[5:]))
    found = []
    for iteration in sorted(names, reverse=True)[:newest]:
        if not checkpoint_problems(os.path.join(load_dir, f"iter_{iteration:07d}")):
            found.append(iteration)
    return found


def _resume_hint(load_dir: str, tracker: str) -> str:
    complete = complete_iterations(load_dir)
    if not complete:
        return (f"no complete checkpoint is left in {load_dir}; drop --load to start from scratch "
                "(or point it at another checkpoint folder)")
    listed = ", ".join(f"iter_{i:07d}" for i in complete)
    return (f"complete checkpoints here: {listed}; resume from the newest with --ckpt-step "
            f"{complete[0]} (or write {complete[0]} into {tracker})")


def _tracker_iteration(load_dir: str) -> Optional[str]:
    """The folder name the tracker points at ('iter_NNNNNNN' or 'release'); None without one."""
    tracker = os.path.join(load_dir, TRACKER)
    if not os.path.isfile(tracker):
        return None
    with open(tracker) as f:
        text = f.read().strip()
    if text == "release":
        return "release"
    if text.isdigit():
        return f"iter_{int(text):07d}"
    raise ConfigError(
        f"--load {load_dir}: {tracker} holds {text!r}, not an iteration (megatron truncates and "
        f"rewrites it at the end of every save: a kill at that moment empties it; megatron "
        f"would then exit with status 0 without training). {_resume_hint(load_dir, tracker)}")


def check_run_files(args: argparse.Namespace) -> None:
    """Every start-up file check: the checkpoint --load resumes from, the tokenizer files."""
    check_load_checkpoint(args)
    check_tokenizer_files(args)


def check_load_checkpoint(args: argparse.Namespace) -> None:
    """Fail at start-up if the checkpoint ``--load`` resumes from is not complete."""
    load_dir = getattr(args, "load", None)
    if not load_dir or not _is_local(load_dir) or not os.path.isdir(load_dir):
        return  # no checkpoint yet: megatron starts from scratch, as an auto-resume job expects
    tracker = os.path.join(load_dir, TRACKER)
    step = getattr(args, "ckpt_step", None)
    name = f"iter_{step:07d}" if step else _tracker_iteration(load_dir)
    source = f"--ckpt-step {step}" if step else TRACKER
    if name is None:
        complete = complete_iterations(load_dir)
        if complete and int(os.environ.get("RANK", "0")) == 0:
            print(f"WARNING: --load {load_dir} has no {TRACKER} (no save there finished); "
                  f"megatron starts from scratch. Complete checkpoint folders: "
                  f"{', '.join(f'iter_{i:07d}' for i in complete)}; to resume from one, pass "
                  f"--ckpt-step {complete[0]}", file=sys.stderr, flush=True)
        return
    problems = checkpoint_problems(os.path.join(load_dir, name))
    if problems:
        raise ConfigError(
            f"--load {load_dir}: checkpoint {name} (named by {source}) is incomplete: "
            f"{'; '.join(problems)}. {_resume_hint(load_dir, tracker)}")


# -- tokenizer files ----------------------------------------------------------------------------

def check_tokenizer_files(args: argparse.Namespace) -> None:
    """The tokenizer file(s) ``--tokenizer-type`` reads exist and have the right kind."""
    kind = getattr(args, "tokenizer_type", None)
    model = getattr(args, "tokenizer_model", None)
    if kind in SENTENCEPIECE_TYPES:
        if not model:
            raise ConfigError(f"--tokenizer-type {kind} needs --tokenizer-model <the .model file "
                              "of a trained SentencePiece tokenizer>")
        if not os.path.isfile(model):
            raise ConfigError(f"--tokenizer-model {model}: no such file (--tokenizer-type {kind} "
                              "reads a SentencePiece .model file)")
        import sentencepiece

        try:
            sentencepiece.SentencePieceProcessor(model_file=model)
        except Exception as err:  # sentencepiece raises RuntimeError/OSError with its own text
            raise ConfigError(
                f"--tokenizer-model {model} is not a SentencePiece model ({err}); "
                f"--tokenizer-type {kind} reads the .model file written by SentencePiece training "
                "(e.g. tools/train_tokenizer.py); for a Hugging Face tokenizer folder use "
                "--tokenizer-type HuggingFaceTokenizer") from None
    elif kind == "TikTokenizer":
        if not model or not os.path.isfile(model):
            raise ConfigError(f"--tokenizer-type TikTokenizer needs --tokenizer-model <the "
                              f"tiktoken vocabulary .json file>; got {model!r}: no such file")
    elif kind in ("GPT2BPETokenizer", "BertWordPieceLowerCase", "BertWordPieceCase"):
        needed = [("--vocab-file", args.vocab_file)]
        if kind == "GPT2BPETokenizer":
            needed.append(("--merge-file", args.merge_file))
        for flag, path in needed:
            if not path or not os.path.isfile(path):
                raise ConfigError(f"--tokenizer-type {kind} needs {flag} <file>; got {path!r}: "
                                  "no such file")
    elif kind == "HuggingFaceTokenizer" and model and os.path.isdir(model):
        known = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        if not any(os.path.isfile(os.path.join(model, name)) for name in known):
            raise ConfigError(f"--tokenizer-model {model}: the folder holds none of "
                              f"{', '.join(known)}: not a Hugging Face tokenizer folder")
