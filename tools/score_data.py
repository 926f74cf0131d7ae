"""Precompute a frozen scorer's short-context losses for every training sample (the sidecar).

    torchrun --nproc-per-node 8 tools/score_data.py <the training run's flags> \\
        --tw-scorer-load SCORER --tw-short-context 8192 [--tw-short-mode windows] \\
        [--tw-short-loss-path PREFIX] [--score-chunk-rows 256] [--score-batch-size B]

then train with the same flags and ``--tw-scorer precomputed`` (see docs/precomputed.md).

The tool takes the training run's own flags, so it builds exactly the run's train/valid/test
datasets (same data, --split, --seq-length, --seed and sample counts: --train-iters x
--global-batch-size, --eval-iters, --eval-interval), runs the frozen scorer on every sample, one
process per GPU (or CPU process), each on whole rows without any model parallelism, and writes
``PREFIX_<split>.{bin,idx,json}`` (megatron_tw/data/short_loss.py). The training run's
parallel layout (--tensor/--pipeline/--context-parallel-size) is replaced by one process per
scorer; its vocabulary padding is kept, because the padded vocabulary is part of the softmax.
Interrupted runs resume: finished chunks are kept and skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Training flags that describe the parallel layout, not the samples: dropped (with their values).
_LAYOUT_FLAGS = {"--sequence-parallel": 0, "--num-layers-per-virtual-pipeline-stage": 1,
                 "--num-virtual-stages-per-pipeline-rank": 1,
                 "--decoder-first-pipeline-num-layers": 1, "--decoder-last-pipeline-num-layers": 1,
                 "--account-for-embedding-in-pipeline-split": 0,
                 "--account-for-loss-in-pipeline-split": 0, "--pipeline-model-parallel-layout": 1,
                 "--tw-scorer-stage": 1}


def tool_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tools/score_data.py", allow_abbrev=False, add_help=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__ + "\nThe options below are the tool's own; every other flag is a "
                              "training flag (megatron + --tw-*).")
    parser.add_argument("--score-chunk-rows", type=int, default=256,
                        help="samples per shard: the unit of resumption (default 256)")
    parser.add_argument("--score-batch-size", type=int, default=None,
                        help="samples per scorer forward pass (default: --micro-batch-size)")
    parser.add_argument("--score-splits", default="train,valid,test",
                        help="comma-separated splits to score (default: every split built)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-h", "--help", action="help")
    return parser


def _last_value(argv, flag: str, default: str) -> str:
    value = default
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def scoring_argv(argv: list[str]) -> list[str]:
    """The training flags with the parallel layout replaced by one process per scorer."""
    kept, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
            continue
        name = arg.split("=", 1)[0]
        if name in _LAYOUT_FLAGS:
            skip = 0 if "=" in arg else _LAYOUT_FLAGS[name]
            continue
        kept.append(arg)
    tp = int(_last_value(argv, "--tensor-model-parallel-size", "1"))
    divisible = int(_last_value(argv, "--make-vocab-size-divisible-by", "128"))
    # megatron pads the vocabulary to a multiple of divisible x TP: keep the training's padding.
    return [*kept, "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
            "--context-parallel-size", "1", "--make-vocab-size-divisible-by", str(divisible * tp),
            "--tw-scorer", "frozen"]


@contextmanager
def _validated_as_one_process():
    """megatron validates batch sizes against the world size; the samples do not depend on how
    many processes score them, so validate the flags as one process would."""
    saved = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["WORLD_SIZE"]
        else:
            os.environ["WORLD_SIZE"] = saved


def parse(argv: list[str]):
    from megatron_tw.arguments import ConfigError, parse_and_validate_args, run_steps
    from megatron_tw.scoring.arguments import resolve_scoring_args, validate_scoring_args

    tool, rest = tool_parser().parse_known_args(argv)
    unknown = set(tool.score_splits.split(",")) - {"train", "valid", "test"}
    if unknown:
        raise ConfigError(f"--score-splits {tool.score_splits}: unknown split(s) "
                          f"{sorted(unknown)}; choose from train, valid, test")
    if "--tw-scorer-load" not in {a.split("=", 1)[0] for a in rest}:
        raise ConfigError("give --tw-scorer-load <HF folder or Megatron checkpoint>: the frozen "
                          "scorer whose short-context losses to precompute")
    if not any(a.split("=", 1)[0] in ("--global-batch-size", "--train-samples") for a in rest):
        raise ConfigError("give --global-batch-size as the training run does: its default "
                          "(micro-batch x data-parallel size) depends on the training's GPU "
                          "count, and it decides the number of samples to score")
    with _validated_as_one_process():
        args = parse_and_validate_args(scoring_argv(rest), set_globals=False)
    if args.tw_short_context is None:
        raise ConfigError("give --tw-short-context W: the tokens of context the scorer sees")
    # The scorer checks (W in range, windows tile the sequence, default stride) as for a frozen
    # run with a weighting that compares losses, whatever preset the flags name.
    weighting = args.tw_weighting
    args.tw_weighting = argparse.Namespace(needs_short_loss=True)
    try:
        run_steps(args, [("resolve", resolve_scoring_args), ("check", validate_scoring_args)])
    finally:
        args.tw_weighting = weighting
    args.rank = int(os.environ.get("RANK", "0"))
    args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    args.data_parallel_size = args.world_size
    # Nothing of a training run's outputs: no TensorBoard/W&B writers, no checkpoints.
    args.tensorboard_dir, args.wandb_project, args.save = None, None, None
    return tool, args


def scorer_record(args) -> dict:
    from megatron_tw.data.short_loss import path_identity

    path = os.path.abspath(args.tw_scorer_load)
    from megatron_tw.scoring.frozen import is_hf_folder

    if is_hf_folder(path):
        kind, files = "hf", path_identity(path)
    else:
        from megatron_tw.checkpoint.megatron_io import checkpoint_data_dir

        kind, files = "megatron", path_identity(checkpoint_data_dir(path))
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    return {"path": path, "kind": kind, "files": files,
            "precision": precision + (" fp8" if args.tw_scorer_fp8 else "")}


def make_score_fn(scorer, device):
    """One micro-batch of dataset samples -> short-context losses [b, s], as the online frozen
    scorer computes them with one context-parallel rank (whole rows)."""
    import torch

    def score(samples):
        batch = {key: torch.stack([s[key] for s in samples]).to(device)
                 for key in ("tokens", "labels", "position_ids")}
        batch["tokens_full"], batch["labels_full"] = batch["tokens"], batch["labels"]
        short, same_as_long = scorer.short_losses(batch)
        if same_as_long.any():  # a frozen scorer scores every position
            raise RuntimeError("the scorer left positions unscored; cannot precompute them")
        return short

    return score


def main(argv=None) -> None:
    from megatron_tw import runtime

    runtime.prepare()  # before megatron parses flags: argument validation queries the device

    import torch
    import torch.distributed as dist
    from megatron.training import get_args, print_rank_0
    from megatron.training.global_vars import set_global_variables
    from megatron.training.initialize import initialize_megatron
    from megatron.training.training import get_train_valid_test_num_samples

    from megatron_tw.arguments import ConfigError
    from megatron_tw.data.provider import DATASET_BUILDERS, dataset_kind
    from megatron_tw.runtime.groups import single_rank_group
    from megatron_tw.scoring.offline import new_record, plan_split, run_split
    from megatron_tw.data.short_loss import (
        SPLITS,
        SidecarError,
        rows_needed,
        run_fingerprint,
        sidecar_prefix,
    )
    from megatron.training import get_tokenizer

    from megatron_tw.scoring.scorers import SCORERS, probe_ids, special_token

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        tool, args = parse(argv)
        prefix = sidecar_prefix(args)
    except (ConfigError, SidecarError) as err:
        sys.exit(f"score_data.py: error: {err}")
    set_global_variables(args)
    initialize_megatron(allow_no_cuda=True)
    args = get_args()
    single_rank_group()  # collective, every rank, before the scorer is built

    num_samples = get_train_valid_test_num_samples()
    datasets = DATASET_BUILDERS[dataset_kind(args)](args, num_samples, None)
    wanted = {s.strip() for s in tool.score_splits.split(",") if s.strip()}
    plans = []
    for split, dataset, count in zip(SPLITS, datasets, num_samples):
        rows = 0 if dataset is None else rows_needed(args, dataset, count)
        if split not in wanted or rows == 0:
            continue
        record = new_record(split, rows, args.seq_length, run_fingerprint(args, dataset, split),
                            scorer_record(args), ["tools/score_data.py", *argv])
        plan = plan_split(record, prefix=prefix, split=split, chunk_rows=tool.score_chunk_rows,
                          rank=args.rank, world_size=args.world_size)
        print_rank_0(f"> {prefix}_{split}: {rows} samples"
                     + (" (already complete)" if plan.complete else ""))
        plans.append((plan, dataset))
    if dist.is_initialized():
        dist.barrier()  # every rank has planned every split before any shard is merged

    tokenizer = get_tokenizer()
    scorer = SCORERS["frozen"](args, bos_id=special_token(tokenizer, "bos"),
                               vocab_size=tokenizer.vocab_size, probe_ids=probe_ids(tokenizer))
    try:
        scorer.setup(None)  # on this machine's compute device (the GPU when there is one)
    except ConfigError as err:  # e.g. a scorer of another vocabulary: the message is the story
        sys.exit(f"score_data.py: error: {err}")
    score_fn = make_score_fn(scorer, runtime.compute_device())
    batch = tool.score_batch_size or args.micro_batch_size
    with torch.no_grad():
        for plan, dataset in plans:
            sidecar = run_split(plan, dataset, score_fn, batch=batch, rank=args.rank,
                                world_size=args.world_size, progress=not tool.no_progress)
            if sidecar is not None:
                print(f"> wrote {prefix}_{plan.split}.{{bin,idx,json}}: {sidecar.rows} x "
                      f"{sidecar.seq_length} float32", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
