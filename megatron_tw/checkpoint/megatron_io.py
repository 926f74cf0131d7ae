"""Megatron checkpoints in the torch_dist (dist_checkpointing) format, written and read in one process.

The converter builds the model with megatron's own code (``build_gpt_model`` from the same flags a
training run gets) and saves ``model.sharded_state_dict()``: the keys and shard metadata are then
exactly those ``pretrain_tw.py --load`` / ``--pretrained-checkpoint`` expects, and dist_checkpointing
reshards them at load time for any TP x PP layout. The checkpoint is a *release* checkpoint (tracker
file says ``release``): megatron loads its weights and starts at iteration 0 with a fresh optimizer,
RNG and learning-rate schedule, with or without ``--finetune``.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Optional, Sequence

import torch

from megatron_tw.checkpoint.families import ConversionError

TRACKER = "latest_checkpointed_iteration.txt"


@contextlib.contextmanager
def single_process_megatron(seed: int = 1234):
    """torch.distributed (gloo, world size 1, in-memory store) + megatron's TP=PP=1 groups.

    Reuses an existing process group when the caller already has one of size 1.
    """
    from megatron.core import parallel_state, tensor_parallel

    from megatron_tw import runtime

    runtime.prepare()
    own_pg = not torch.distributed.is_initialized()
    if own_pg:
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(),
                                             rank=0, world_size=1)
    elif torch.distributed.get_world_size() != 1:
        raise ConversionError("checkpoint conversion runs in one process; launch it without torchrun")
    own_mp = not parallel_state.model_parallel_is_initialized()
    if own_mp:
        parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    try:
        yield
    finally:
        if own_mp:
            parallel_state.destroy_model_parallel()
        if own_pg:
            torch.distributed.destroy_process_group()


def parse_model_args(model_flags: Sequence[str], extra: Sequence[str] = ()):
    """megatron's argument namespace for ``model_flags``: megatron's own parser and validation
    with this machine's defaults (runtime/machine.py), no --tw-* flags, no globals set, nothing
    of megatron.training patched; the argument dump is silenced."""
    import sys

    from megatron.training.arguments import parse_args, validate_args

    from megatron_tw import runtime
    from megatron_tw.runtime.machine import megatron_defaults

    flags = ["--micro-batch-size", "1", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1",
             *model_flags, *extra]
    if "--seq-length" not in flags:
        i = flags.index("--max-position-embeddings")
        flags += ["--seq-length", flags[i + 1]]
    defaults = megatron_defaults(runtime.this_machine())

    def machine_defaults(parser):
        parser.set_defaults(**defaults)
        return parser

    saved = sys.argv
    sys.argv = [saved[0] if saved else "convert", *flags]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            args = parse_args(extra_args_provider=machine_defaults)
            validate_args(args, {})
    finally:
        sys.argv = saved
    return args


def build_model(args, padded_vocab_size: int, dtype: torch.dtype = torch.float32):
    """A TP=PP=1 GPTModel for ``args`` (inside :func:`single_process_megatron`)."""
    from megatron.training.argument_utils import core_transformer_config_from_args

    from megatron_tw.model.provider import build_gpt_model

    config = core_transformer_config_from_args(args)
    config.params_dtype = dtype
    config.use_cpu_initialization = True
    return build_gpt_model(args, config, vocab_size=padded_vocab_size)


def _sharded_metadata(args) -> dict:
    from megatron.core import parallel_state
    from megatron.training.checkpointing import _build_sharded_state_dict_metadata

    return _build_sharded_state_dict_metadata(
        args, dp_cp_group=parallel_state.get_data_parallel_group(with_context_parallel=True))


def _fork_write_results_queue() -> None:
    """dist_checkpointing's writer collects results through a multiprocessing Manager started with
    'spawn', which re-imports the caller's ``__main__`` (a script without a main guard then fails
    with EOFError) and takes seconds. The Manager only relays a queue: start it by fork instead."""
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()


def save_release_checkpoint(model, args, folder: str) -> str:
    """Write ``model`` as a release torch_dist checkpoint under ``folder``; returns the data dir."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.utils import _clean_metadata_for_serialization

    args.no_save_optim = True     # a later run must not look for optimizer or RNG state here
    args.no_save_rng = True
    args.ckpt_format = "torch_dist"
    args.iteration = 0
    # The conversion parses with a placeholder tokenizer; record the real padded vocabulary (read by
    # --use-checkpoint-args and the frozen scorer) and no tokenizer, so none is forced on a run.
    args.padded_vocab_size = model.embedding.word_embeddings.weight.shape[0]
    args.tokenizer_type = args.tokenizer_model = args.vocab_size = None
    metadata = _sharded_metadata(args)
    state = {"args": args, "checkpoint_version": 3.0, "iteration": 0,
             "num_floating_point_operations_so_far": 0,
             "model": model.sharded_state_dict(metadata=metadata)}
    data_dir = os.path.join(folder, "release")
    os.makedirs(data_dir, exist_ok=True)
    _fork_write_results_queue()
    dist_checkpointing.save(state, data_dir,
                            content_metadata=_clean_metadata_for_serialization(metadata))
    with open(os.path.join(folder, TRACKER), "w") as f:
        f.write("release")
    return data_dir


def checkpoint_data_dir(folder: str, iteration: Optional[int] = None) -> str:
    """The iteration folder a megatron checkpoint root points to (tracker file), or ``iteration``'s."""
    if iteration is None:
        tracker = os.path.join(folder, TRACKER)
        if not os.path.exists(tracker):
            if os.path.exists(os.path.join(folder, "metadata.json")):
                return folder  # already an iteration folder
            raise ConversionError(f"{folder}: no {TRACKER}; not a megatron checkpoint folder "
                                  "(pass the folder given to --save)")
        with open(tracker) as f:
            text = f.read().strip()
        if text == "release":
            return os.path.join(folder, "release")
        iteration = int(text)
    data_dir = os.path.join(folder, f"iter_{iteration:07d}")
    if not os.path.isdir(data_dir):
        raise ConversionError(f"{data_dir}: no such checkpoint iteration")
    return data_dir


def checkpoint_args(data_dir: str):
    """The argument namespace a megatron run saved with its checkpoint (None if absent)."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(data_dir)
    return common.get("args")


def checkpoint_tensor_shape(data_dir: str, key: str) -> tuple[int, ...]:
    """The global shape of one saved tensor (e.g. the padded vocabulary of the embedding)."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(data_dir)
    if key not in meta:
        raise ConversionError(f"{data_dir}: checkpoint has no tensor {key!r}")
    return tuple(meta[key].global_shape)


def load_checkpoint_into_model(model, args, data_dir: str, process_group=None) -> None:
    """Load the model weights of a torch_dist checkpoint (any saved TP x PP layout) into ``model``.

    ``process_group``: the ranks that load this model together (dist_checkpointing validates the
    shards over it); None for the world group. A model that exists on one pipeline stage only
    passes that stage's group: over the world group the load waits for ranks that never join.
    """
    from megatron.core import dist_checkpointing

    sharded = {"model": model.sharded_state_dict(metadata=_sharded_metadata(args))}
    state = dist_checkpointing.load(sharded, data_dir, process_group=process_group)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ConversionError(f"{data_dir}: checkpoint does not match the model "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")


def write_megatron_args(folder: str, flags: Sequence[str], info: dict) -> tuple[str, str]:
    """``megatron_args.txt`` (one line to paste after pretrain_tw.py) and ``megatron_args.json``."""
    import json
    import shlex

    txt = os.path.join(folder, "megatron_args.txt")
    with open(txt, "w") as f:
        f.write(" ".join(shlex.quote(x) for x in flags) + "\n")
    js = os.path.join(folder, "megatron_args.json")
    with open(js, "w") as f:
        json.dump({"flags": list(flags), **info}, f, indent=2)
    return txt, js
