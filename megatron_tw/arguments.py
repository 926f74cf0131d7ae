"""Command-line arguments: every Megatron flag, plus the ``--tw-*`` groups, validated once.

``parse_and_validate_args`` is megatron.training's ``parse_and_validate_args`` with two additions:
machine-aware defaults (runtime/machine.py: a CPU machine defaults to the local layer spec, gloo
and no CUDA fusions, so the same command works on a laptop and a cluster) and start-up checks
that turn requests this machine cannot serve into one clear message naming the flag, instead of a
stack trace from deep inside megatron or Transformer Engine.

Every flag group and every step is in the two lists below, in order. A step is a *check* (raises
ValueError/ConfigError naming the flag and the fix, changes nothing) or a *resolve* (returns the
settings the flags imply, e.g. a default stride; ``parse_and_validate_args`` applies them, the
only place here that writes to ``args``). Installing patches (the optimizer-step guard) is not
parsing: ``pretrain_tw.main`` does it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

from megatron_tw import runtime
from megatron_tw.data.arguments import add_data_args, validate_data_args
from megatron_tw.errors import ConfigError
from megatron_tw.reliability.arguments import (
    add_reliability_args,
    resolve_reliability_args,
    validate_reliability_args,
)
from megatron_tw.reliability.preflight import check_run_files
from megatron_tw.runtime.machine import Machine, cpu_mode_refused, megatron_defaults
from megatron_tw.scoring.arguments import (
    add_scoring_args,
    resolve_scoring_args,
    validate_scoring_args,
)
from megatron_tw.weighting import add_weighting_args, weighting_config_from_args
from megatron_tw.weighting.arguments import validate_dump_args

__all__ = ["ConfigError", "parse_and_validate_args", "add_tw_args", "FLAG_GROUPS", "STEPS"]

CHECK, RESOLVE = "check", "resolve"

# Extra argument groups, each ``add(parser) -> parser``, in --help order.
FLAG_GROUPS: list[Callable[[argparse.ArgumentParser], argparse.ArgumentParser]] = [
    add_weighting_args, add_scoring_args, add_data_args, add_reliability_args]


def register_arg_group(fn):
    """Add a --tw-* flag group (extensions); each group once."""
    if fn in FLAG_GROUPS:
        raise ValueError(f"flag group {fn.__name__} is already registered")
    FLAG_GROUPS.append(fn)
    return fn


def add_tw_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """megatron's ``extra_args_provider``: this machine's defaults and every --tw-* group."""
    parser.set_defaults(**megatron_defaults(runtime.this_machine()))
    for add in FLAG_GROUPS:
        parser = add(parser)
    return parser


def check_machine(args: argparse.Namespace) -> None:
    """Requests the hardware/software here cannot serve (this machine: ``runtime.this_machine()``)."""
    check_flags_on_machine(args, runtime.this_machine())


def check_flags_on_machine(args: argparse.Namespace, machine: Machine) -> None:
    """Requests ``machine`` cannot serve; raises ConfigError naming the flag and the fix."""
    cuda, te = machine.cuda, machine.te
    refused = cpu_mode_refused(machine)
    if refused:
        raise ConfigError(refused)
    if machine.te_error and args.transformer_impl == "transformer_engine":
        raise ConfigError(f"--transformer-impl transformer_engine: Transformer Engine is "
                          f"installed but does not import ({machine.te_error}); reinstall it as "
                          "docs/gpu.md shows, or train with --transformer-impl local")
    if (machine.te_error and args.transformer_impl == "local"
            and "--transformer-impl" not in getattr(args, "tw_given_flags", ())
            and int(os.environ.get("RANK", "0")) == 0):
        print(f"WARNING: Transformer Engine is installed but does not import "
              f"({machine.te_error}); training with megatron's local layers instead (see "
              "docs/gpu.md to repair TE)", file=sys.stderr, flush=True)
    if args.transformer_impl == "transformer_engine" and not (cuda and te):
        missing = "a CUDA GPU" if not cuda else "Transformer Engine (see docs/gpu.md)"
        raise ConfigError(
            f"--transformer-impl transformer_engine needs {missing}; use --transformer-impl local "
            "(megatron's own modules; the default on machines without a GPU)")
    if args.fp8 is not None and not (cuda and te):
        missing = "a CUDA GPU (Hopper or newer)" if not cuda else "Transformer Engine"
        raise ConfigError(f"--fp8-format {args.fp8} needs {missing}; drop --fp8-format to train "
                          "in bf16/fp32")
    capability = machine.capability if cuda else None
    if args.fp8 is not None and capability is not None and tuple(capability) < (8, 9):
        raise ConfigError(f"--fp8-format {args.fp8} needs FP8 tensor cores (compute capability "
                          f">= 8.9: Ada, Hopper or newer); this GPU is "
                          f"{capability[0]}.{capability[1]}: train in bf16 instead")
    if (args.fp8 is not None and args.fp8_recipe == "mxfp8" and capability is not None
            and capability[0] < 10):
        raise ConfigError(f"--fp8-recipe mxfp8 needs a Blackwell GPU (compute capability 10.0+); "
                          f"this GPU is {capability[0]}.{capability[1]}: use --fp8-recipe "
                          "tensorwise or delayed")
    if args.fp8 is None and "--fp8-recipe" in getattr(args, "tw_given_flags", ()):
        raise ConfigError("--fp8-recipe has no effect without --fp8-format (hybrid or e4m3)")
    if args.fp8 is not None and args.transformer_impl != "transformer_engine":
        raise ConfigError("--fp8-format needs --transformer-impl transformer_engine (FP8 GEMMs are "
                          "Transformer Engine kernels)")
    if args.distributed_backend == "nccl" and not cuda:
        raise ConfigError("--distributed-backend nccl needs CUDA GPUs; use --distributed-backend "
                          "gloo on this machine (the default here)")
    if args.tw_scorer_fp8 and cuda and te and not machine.fp8:
        raise ConfigError("--tw-scorer-fp8 needs FP8 tensor cores (compute capability >= 8.9); "
                          "drop it on this GPU")
    if not cuda:
        for flag, on in (("--log-memory-to-tensorboard", args.log_memory_to_tensorboard),
                         ("--sequence-parallel (gloo has no reduce-scatter)",
                          args.sequence_parallel),
                         ("--bf16 with --masked-softmax-fusion", args.bf16 and args.masked_softmax_fusion),
                         ("gradient accumulation fusion", args.gradient_accumulation_fusion),
                         ("--use-distributed-optimizer with --overlap-param-gather",
                          args.use_distributed_optimizer and args.overlap_param_gather)):
            if on:
                raise ConfigError(f"{flag} needs CUDA; remove it on this machine")


def check_context_parallel(args: argparse.Namespace) -> None:
    cp = args.context_parallel_size
    if cp > 1 and args.seq_length % (2 * cp) != 0:
        raise ConfigError(
            f"--seq-length {args.seq_length} must be divisible by 2 x --context-parallel-size "
            f"= {2 * cp} (each CP rank holds two of the 2*CP load-balanced chunks); use e.g. "
            f"--seq-length {(args.seq_length // (2 * cp) + 1) * 2 * cp}")
    comm = args.cp_comm_type if isinstance(args.cp_comm_type, list) else [args.cp_comm_type]
    tp = args.tensor_model_parallel_size
    heads_per_tp = args.num_attention_heads // tp
    groups = args.num_query_groups if args.group_query_attention else args.num_attention_heads
    if cp > 1 and "a2a" in comm and heads_per_tp % cp != 0:
        raise ConfigError(f"--cp-comm-type a2a scatters attention heads over CP ranks: "
                          f"{heads_per_tp} heads per TP rank are not divisible by "
                          f"--context-parallel-size {cp}; use --cp-comm-type p2p or all_gather")
    if cp > 1 and "a2a" in comm and (groups // tp) % cp != 0:
        # TE's a2a scatters the K/V heads as well (one all-to-all per q, k, v).
        raise ConfigError(f"--cp-comm-type a2a scatters the K/V heads over CP ranks too: "
                          f"{groups // tp} query groups per TP rank (--num-query-groups {groups} "
                          f"/ TP {tp}) are not divisible by --context-parallel-size {cp}; use "
                          "--cp-comm-type p2p or all_gather")
    if cp > 1 and args.transformer_impl == "local" and args.attention_backend.name not in (
            "local", "auto", "unfused"):
        raise ConfigError(f"--attention-backend {args.attention_backend.name} cannot serve "
                          "--context-parallel-size > 1 with --transformer-impl local")


def check_schedule(args: argparse.Namespace) -> None:
    """Megatron features whose forward_step contract the weighted step does not implement."""
    if getattr(args, "overlap_moe_expert_parallel_comm", False):
        raise ConfigError("--overlap-moe-expert-parallel-comm asks forward_step for a schedule "
                          "plan (combined 1F1B), which token-weighted training does not build; "
                          "drop the flag")


def _weighting(args: argparse.Namespace) -> dict:
    return {"tw_weighting": weighting_config_from_args(args)}


def resolve_wandb_args(args: argparse.Namespace) -> Optional[dict]:
    """megatron's training_log sends the losses, the weight statistics, the learning rate and the
    gradient norm to W&B only where it writes them to TensorBoard: with --wandb-project and no
    --tensorboard-dir, W&B would get none of them. Default --tensorboard-dir to
    <W&B save dir>/tensorboard then (the W&B save dir is megatron's: --wandb-save-dir, else
    <--save>/wandb)."""
    if not getattr(args, "wandb_project", None) or getattr(args, "tensorboard_dir", None):
        return None
    save_dir = args.wandb_save_dir or (os.path.join(args.save, "wandb") if args.save else None)
    if save_dir is None:
        raise ConfigError("--wandb-project needs --wandb-save-dir DIR (or --save, whose wandb/ "
                          "subfolder megatron uses) for the W&B run files")
    return {"tensorboard_dir": os.path.join(save_dir, "tensorboard")}


# Every start-up step, in order: (CHECK, fn) raises; (RESOLVE, fn) returns settings to apply.
# Order matters: the scorer steps read the weighting config; the file checks come last.
STEPS: list[tuple[str, Callable[[argparse.Namespace], Optional[dict]]]] = [
    (CHECK, check_machine),
    (CHECK, check_context_parallel),
    (CHECK, check_schedule),
    (RESOLVE, resolve_wandb_args),
    (RESOLVE, _weighting),
    (CHECK, validate_dump_args),
    (RESOLVE, resolve_scoring_args),
    (CHECK, validate_scoring_args),
    (CHECK, validate_data_args),
    (CHECK, validate_reliability_args),
    (RESOLVE, resolve_reliability_args),
    (CHECK, check_run_files),
]


def run_steps(args: argparse.Namespace, steps=None) -> argparse.Namespace:
    """Run the start-up steps on ``args``; each error becomes one ConfigError."""
    for kind, step in STEPS if steps is None else steps:
        try:
            settings = step(args)
        except ConfigError:
            raise
        except ValueError as err:  # the package validators raise ValueError naming the flag
            raise ConfigError(str(err)) from err
        if kind == RESOLVE:
            for name, value in (settings or {}).items():
                setattr(args, name, value)
    return args


def parse_and_validate_args(argv: Optional[Sequence[str]] = None,
                            set_globals: bool = True) -> argparse.Namespace:
    """Parse megatron + --tw-* flags from ``argv`` (default ``sys.argv[1:]``), run the project's
    checks, then megatron's own validation; with ``set_globals`` also build megatron's globals
    (tokenizer, timers, TensorBoard writer) as megatron.training does."""
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.global_vars import set_global_variables

    saved = sys.argv
    if argv is not None:
        sys.argv = [saved[0] if saved else "pretrain_tw.py", *argv]
    try:
        args = parse_args(extra_args_provider=add_tw_args)
        # The flags given explicitly, for checks on flags whose megatron default hides absence.
        args.tw_given_flags = tuple(a.split("=")[0] for a in sys.argv[1:] if a.startswith("--"))
    finally:
        sys.argv = saved

    run_steps(args)
    if args.use_checkpoint_args:
        from megatron.training.checkpointing import load_args_from_checkpoint

        load_args_from_checkpoint(args, load_arg="pretrained_checkpoint")
        load_args_from_checkpoint(args)
    validate_args(args, {})
    if set_globals:
        set_global_variables(args)
    return args
