"""Command-line arguments: every Megatron flag, plus the ``--tw-*`` groups, validated once.

``parse_and_validate_args`` is megatron.training's ``parse_and_validate_args`` with two additions:
machine-aware defaults (a CPU machine defaults to the local layer spec, gloo and no CUDA fusions,
so the same command works on a laptop and a cluster) and start-up checks that turn requests this
machine cannot serve into one clear message naming the flag, instead of a stack trace from deep
inside megatron or Transformer Engine.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from megatron_tw import runtime


class ConfigError(ValueError):
    """A flag combination that cannot work; the message names the flag and the fix."""


# Extra argument groups, each ``add(parser) -> parser``; a new --tw-* group registers here.
ARG_GROUPS: list[Callable[[argparse.ArgumentParser], argparse.ArgumentParser]] = []
# Checks run on the parsed args before megatron's own validation; each raises ConfigError.
ARG_CHECKS: list[Callable[[argparse.Namespace], None]] = []


def register_arg_group(fn):
    ARG_GROUPS.append(fn)
    return fn


def register_arg_check(fn):
    ARG_CHECKS.append(fn)
    return fn


def _cpu_defaults(parser: argparse.ArgumentParser) -> None:
    """Defaults for a machine without CUDA. Each can still be overridden; the checks below
    reject overrides that cannot work here."""
    parser.set_defaults(
        transformer_impl="local",           # TE needs CUDA
        distributed_backend="gloo",         # NCCL needs CUDA
        use_cpu_initialization=True,        # also makes initial weights layout-independent
        gradient_accumulation_fusion=False,  # fused wgrad kernel is CUDA-only
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        no_persist_layer_norm=True,
        bias_swiglu_fusion=False,           # jit-fused elementwise kernels target CUDA
        bias_gelu_fusion=False,
        bias_dropout_fusion=False,
    )


def add_tw_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """megatron's ``extra_args_provider``: machine defaults and every registered --tw-* group."""
    # The method's loss is sum(w * mask * loss) / sum(mask) over the whole global batch: megatron's
    # per-token mode divides once by the global token count (no per-CP-rank bias, upstream #7452).
    parser.set_defaults(calculate_per_token_loss=True)
    # Causal attention needs no [s, s] mask tensor: at 32k-128k tokens one would cost GBs.
    parser.set_defaults(create_attention_mask_in_dataloader=False)
    if not runtime.cuda_available():
        _cpu_defaults(parser)
    elif not runtime.transformer_engine_available():
        parser.set_defaults(transformer_impl="local")  # a GPU without TE still trains
    for add in ARG_GROUPS:
        parser = add(parser)
    return parser


@register_arg_check
def check_machine(args: argparse.Namespace) -> None:
    """Requests the hardware/software here cannot serve."""
    cuda = runtime.cuda_available()
    te = runtime.transformer_engine_available()
    if args.transformer_impl == "transformer_engine" and not (cuda and te):
        missing = "a CUDA GPU" if not cuda else "Transformer Engine (pip install 'megatron-tw[gpu]')"
        raise ConfigError(
            f"--transformer-impl transformer_engine needs {missing}; use --transformer-impl local "
            "(megatron's own modules; the default on machines without a GPU)")
    if args.fp8 is not None and not (cuda and te):
        missing = "a CUDA GPU (Hopper or newer)" if not cuda else "Transformer Engine"
        raise ConfigError(f"--fp8-format {args.fp8} needs {missing}; drop --fp8-format to train "
                          "in bf16/fp32")
    capability = runtime.device_capability() if cuda else None
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
    if not cuda:
        for flag, on in (("--log-memory-to-tensorboard", args.log_memory_to_tensorboard),
                         ("--bf16 with --masked-softmax-fusion", args.bf16 and args.masked_softmax_fusion),
                         ("gradient accumulation fusion", args.gradient_accumulation_fusion),
                         ("--use-distributed-optimizer with --overlap-param-gather",
                          args.use_distributed_optimizer and args.overlap_param_gather)):
            if on:
                raise ConfigError(f"{flag} needs CUDA; remove it on this machine")


@register_arg_check
def check_context_parallel(args: argparse.Namespace) -> None:
    cp = args.context_parallel_size
    if cp > 1 and args.seq_length % (2 * cp) != 0:
        raise ConfigError(
            f"--seq-length {args.seq_length} must be divisible by 2 x --context-parallel-size "
            f"= {2 * cp} (each CP rank holds two of the 2*CP load-balanced chunks); use e.g. "
            f"--seq-length {(args.seq_length // (2 * cp) + 1) * 2 * cp}")
    comm = args.cp_comm_type if isinstance(args.cp_comm_type, list) else [args.cp_comm_type]
    heads_per_tp = args.num_attention_heads // args.tensor_model_parallel_size
    if cp > 1 and "a2a" in comm and heads_per_tp % cp != 0:
        raise ConfigError(f"--cp-comm-type a2a scatters attention heads over CP ranks: "
                          f"{heads_per_tp} heads per TP rank are not divisible by "
                          f"--context-parallel-size {cp}; use --cp-comm-type p2p or all_gather")
    if cp > 1 and args.transformer_impl == "local" and args.attention_backend.name not in (
            "local", "auto", "unfused"):
        raise ConfigError(f"--attention-backend {args.attention_backend.name} cannot serve "
                          "--context-parallel-size > 1 with --transformer-impl local")


def _register_project_groups() -> None:
    from megatron_tw.data.arguments import add_data_args, validate_data_args
    from megatron_tw.scoring.arguments import add_scoring_args, validate_scoring_args
    from megatron_tw.weighting import add_weighting_args, weighting_config_from_args

    def weighting(args):
        args.tw_weighting = weighting_config_from_args(args)

    for add in (add_weighting_args, add_scoring_args, add_data_args):
        register_arg_group(add)
    # Order matters: the scorer checks read the weighting config.
    for check in (weighting, validate_scoring_args, validate_data_args):
        register_arg_check(check)
    import megatron_tw.reliability_args  # noqa: F401  (--tw-nonfinite*; checkpoint/tokenizer checks)


_register_project_groups()


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

    for check in ARG_CHECKS:
        try:
            check(args)
        except ConfigError:
            raise
        except ValueError as err:  # the package validators raise ValueError naming the flag
            raise ConfigError(str(err)) from err
    if args.use_checkpoint_args:
        from megatron.training.checkpointing import load_args_from_checkpoint

        load_args_from_checkpoint(args, load_arg="pretrained_checkpoint")
        load_args_from_checkpoint(args)
    validate_args(args, {})
    if set_globals:
        set_global_variables(args)
    return args
