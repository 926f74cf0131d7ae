"""The --tw-scorer* flags: who gives each token its short-context loss, and how much context.

``validate_scoring_args`` only checks (it raises ValueError naming the flag and the fix);
``resolve_scoring_args`` returns the values the flags imply (the default stride, W/mode/stride of
a precomputed sidecar), which megatron_tw.arguments applies in one place.
"""

from __future__ import annotations

import argparse

from megatron_tw.scoring.model import MAX_TOKENS_PER_FORWARD
from megatron_tw.scoring.scorers import SCORERS
from megatron_tw.scoring.spans import windows_tile

SHORT_MODES = ("windows", "sliding")


def add_scoring_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group(title="short-context scorer")
    group.add_argument("--tw-scorer", choices=sorted(SCORERS), default="self",
                       help="self: the trainee's current weights under no_grad (the paper's "
                            "default); frozen: a separate frozen model (--tw-scorer-load) "
                            "co-located with the trainee; precomputed: losses stored next to the "
                            "data by tools/score_data.py (--tw-short-loss-path).")
    group.add_argument("--tw-short-context", type=int, default=None,
                       help="W, the short-context window in tokens (the reference's "
                            "base_length): a target sees at most W - 1 tokens of context "
                            "(docs/method.md, 'Short-context modes').")
    group.add_argument("--tw-short-stride", type=int, default=None,
                       help="S for --tw-short-mode windows: windows of W tokens every S tokens, "
                            "each keeping its last S losses; they must tile the sample of "
                            "seq_length + 1 tokens: (seq_length + 1 - W) divisible by S. "
                            "Default W // 2.")
    group.add_argument("--tw-short-mode", choices=SHORT_MODES, default="sliding",
                       help="sliding (default): one pass with sliding-window attention; a target "
                            "sees exactly the previous W - 1 tokens plus the sequence's first "
                            "token (the attention sink). windows: the reference's overlapping "
                            "windows, BOS substituted at each window start; a target sees "
                            "W - S .. W - 1 tokens.")
    group.add_argument("--tw-scorer-load", type=str, default=None,
                       help="frozen scorer: a Hugging Face folder or a Megatron checkpoint.")
    group.add_argument("--tw-scorer-stage", type=int, default=0,
                       help="frozen scorer with pipeline parallelism: the stage that holds it "
                            "(default 0; the last stage already holds the output layer and loss).")
    group.add_argument("--tw-scorer-fp8", action="store_true",
                       help="Run the frozen scorer's inference under FP8 autocast (TE, GPU).")
    group.add_argument("--tw-scorer-max-tokens", type=int, default=MAX_TOKENS_PER_FORWARD,
                       help="windows mode: at most this many tokens (micro-batch x window x "
                            "windows) per scorer forward; bounds the scorer's logits and "
                            "activations at long sequence lengths.")
    group.add_argument("--tw-short-loss-path", type=str, default=None,
                       help="precomputed scorer: prefix of the sidecar indexed dataset written by "
                            "tools/score_data.py (default: <data-path>_short_loss).")
    return parser


def _stride(args) -> int:
    return args.tw_short_stride if args.tw_short_stride is not None else max(
        1, args.tw_short_context // 2)


def resolve_scoring_args(args: argparse.Namespace) -> dict:
    """The settings the scorer flags imply, before they are checked (pure). For ``precomputed``:
    W/mode/stride not given here, from the train split's sidecar; for the windows mode: the
    default stride W // 2."""
    config = getattr(args, "tw_weighting", None)
    if config is None or not config.needs_short_loss:
        return {}
    settings = {}
    if args.tw_scorer == "precomputed":
        from megatron_tw.data.short_loss import short_context_from_sidecar

        settings.update(short_context_from_sidecar(args))
    view = argparse.Namespace(**{**vars(args), **settings})
    if (view.tw_scorer != "precomputed" and view.tw_short_mode == "windows"
            and view.tw_short_context is not None and view.tw_short_stride is None):
        settings["tw_short_stride"] = _stride(view)
    return settings


def validate_scoring_args(args: argparse.Namespace) -> None:
    """Checks that need only the flags (after ``resolve_scoring_args``); errors name the flag and
    the fix."""
    if args.tw_scorer != "frozen" and (args.tw_scorer_load or args.tw_scorer_fp8):
        raise ValueError("--tw-scorer-load/--tw-scorer-fp8 apply to --tw-scorer frozen only")
    if args.tw_scorer_fp8 and args.transformer_impl != "transformer_engine":
        raise ValueError("--tw-scorer-fp8 needs Transformer Engine (--transformer-impl "
                         "transformer_engine on a GPU)")
    if args.tw_scorer_max_tokens < 1:
        raise ValueError(f"--tw-scorer-max-tokens must be >= 1, got {args.tw_scorer_max_tokens}")
    config = getattr(args, "tw_weighting", None)
    if config is None or not config.needs_short_loss:
        return
    W, S, T = args.tw_short_context, args.tw_short_stride, args.seq_length
    if args.tw_scorer != "precomputed":
        if W is None:
            raise ValueError(f"--tw-preset {args.tw_preset} compares long- and short-context "
                             "losses: give --tw-short-context W (e.g. a quarter of --seq-length)")
        if not 2 <= W < T:
            raise ValueError(f"--tw-short-context {W} must be in [2, --seq-length {T}): a window "
                             "of W tokens gives a target W - 1 tokens of context, and a short "
                             "context as long as the sequence gives every token weight from d=0")
        if args.tw_short_mode == "windows":
            S = S if S is not None else _stride(args)
            if not windows_tile(T, W, S):
                hint = (f"; e.g. --tw-short-context {W + 1}" if 1 <= S <= W and (T - W) % S == 0
                        else "")
                raise ValueError(f"--tw-short-stride {S} must be in [1, W - 1 = {W - 1}] and the "
                                 f"windows must tile the sample of seq_length + 1 = {T + 1} "
                                 f"tokens: (seq_length + 1 - W) = {T + 1 - W} divisible by S"
                                 f"{hint}")
        elif S is not None:
            raise ValueError("--tw-short-stride applies to --tw-short-mode windows only")
    dropout = [f"--{name.replace('_', '-')} {getattr(args, name)}"
               for name in ("hidden_dropout", "attention_dropout") if getattr(args, name, 0) > 0]
    if dropout:
        raise ValueError(f"{' and '.join(dropout)} with --tw-preset {args.tw_preset}: the "
                         "long-context losses would be computed with dropout (training mode) and "
                         "the short-context losses without (the scorer runs in eval mode), so d "
                         "would measure dropout as well as context; pass --hidden-dropout 0 "
                         "--attention-dropout 0 (megatron's default is 0.1)")
    if args.tw_scorer == "self" and args.pipeline_model_parallel_size > 1:
        raise ValueError("--tw-scorer self runs the trainee's whole model on short contexts, which "
                         "pipeline parallelism splits across stages; with "
                         "--pipeline-model-parallel-size > 1 use --tw-scorer frozen (a separate "
                         "model co-located on one stage) or --tw-scorer precomputed")
    pp = args.pipeline_model_parallel_size
    if args.tw_scorer == "frozen" and args.tw_scorer_stage not in (0, pp - 1):
        raise ValueError(f"--tw-scorer-stage {args.tw_scorer_stage}: the frozen scorer needs the "
                         f"micro-batch, which only the first (0) and last ({pp - 1}) pipeline "
                         "stages read; use 0 (default) or the last stage")
    if args.tw_scorer == "frozen" and not args.tw_scorer_load:
        raise ValueError("--tw-scorer frozen needs --tw-scorer-load <HF folder or Megatron "
                         "checkpoint>")
    if args.tw_scorer == "precomputed":
        from megatron_tw.data.short_loss import sidecar_prefix

        sidecar_prefix(args)  # raises when the sidecar's location cannot be derived
