"""Short-context scorers (docs/method.md, "Scorers"), registered by name (``--tw-scorer``).

A scorer turns one micro-batch into ``short_loss`` [b, s / CP] for the positions this CP rank
holds, plus a boolean ``same_as_long`` [b, s / CP] marking positions whose short context equals
their long context (the loss function then uses the trainee's own long loss there, d = 0).

Lifecycle: :func:`build_scorer` makes the run's scorer once, at start-up, from the flags and the
tokenizer's BOS id and vocabulary size; ``setup(trainee)`` builds its model once the trainee
exists (megatron's model-provider hook, on every rank, where collective set-up is safe); the
scorer is then handed to ``forward_step`` explicitly. Adding a scorer is one
``@register_scorer`` class here: the ``--tw-scorer`` choices are read from the registry.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state

from megatron_tw.runtime.groups import pipeline_stage_group, single_rank_group
from megatron_tw.scoring.model import (
    MAX_TOKENS_PER_FORWARD,
    build_scorer_model,
    first_microbatch_of_step,
    score_spans,
    scorer_config,
    share_parameters,
)
from megatron_tw.registry import registrar
from megatron_tw.scoring.spans import plan_spans

SCORERS: dict[str, type] = {}


register_scorer = registrar(SCORERS, "scorer")


class Scorer:
    """Base: subclasses build ``self.model`` in :meth:`setup` (see scoring/model.py) and set
    ``skip_below``.

    Args:
        args: the run's parsed flags.
        bos_id: the tokenizer's BOS id (None when it has none); the windows mode substitutes it
            at each window start of rows that begin with it.
        vocab_size: the tokenizer's vocabulary (unpadded); a frozen scorer must match it.
        probe_ids: the tokenizer's ids of a fixed probe text (``frozen.TOKENIZER_PROBE``); a
            frozen scorer shipping its own tokenizer must split it alike.
    """

    skip_below = 0

    @staticmethod
    def needs_full_rows(args) -> bool:
        """Whether every CP rank keeps the whole [b, s] token/label rows (integers) to score."""
        return args.tw_short_mode == "windows"

    def __init__(self, args, *, bos_id: Optional[int], vocab_size: int, probe_ids=None):
        self.args = args
        self.mode = args.tw_short_mode
        self.window = args.tw_short_context
        self.stride = args.tw_short_stride
        self.bos_id = bos_id
        self.vocab_size = vocab_size
        self.probe_ids = probe_ids  # the trainee tokenizer's ids of frozen.TOKENIZER_PROBE
        self.model = None
        self.ready = False  # setup() ran (the model may live on another pipeline stage)
        self._iteration = None

    def setup(self, trainee) -> None:
        """Build the scoring model (once; on every rank). ``trainee``: this rank's unwrapped
        trainee GPTModel (the self scorer shares its parameters)."""

    def short_losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.model is None:
            raise RuntimeError(f"the {type(self).__name__} has no model: setup() was not called "
                               "(pretrain_tw.py calls it from the model-provider hook)")
        iteration = getattr(self.args, "curr_iteration", None)
        if iteration != self._iteration:  # weights change only at optimizer steps
            first_microbatch_of_step(self.model)
            self._iteration = iteration
        if self.mode == "sliding":
            return self._sliding(batch)
        return self._windows(batch)

    @torch.no_grad()
    def _sliding(self, batch):
        # One CP-sharded pass over this rank's own tokens (the scorer keeps the trainee's CP).
        losses = self.model(batch["tokens"], batch["position_ids"], None,
                            labels=batch["labels"]).float()
        return losses, batch["position_ids"] < self.skip_below

    def _windows(self, batch):
        cp_size = parallel_state.get_context_parallel_world_size()
        cp_rank = parallel_state.get_context_parallel_rank()
        spans = plan_spans(self.mode, seq_length=self.args.seq_length, window=self.window,
                           stride=self.stride, cp_size=cp_size, cp_rank=cp_rank,
                           skip_below=self.skip_below)
        losses, scored = score_spans(
            self.model, batch["tokens_full"], batch["labels_full"], spans,
            seq_length=self.args.seq_length, cp_size=cp_size, cp_rank=cp_rank,
            bos_id=self.bos_id if self.mode == "windows" else None,
            max_tokens=getattr(self.args, "tw_scorer_max_tokens", MAX_TOKENS_PER_FORWARD))
        return losses, ~scored


@register_scorer("self")
class SelfScorer(Scorer):
    """The trainee's current weights under no_grad, in eval mode (no dropout): the paper's
    default. Positions whose short context is their whole long context are not scored (below
    W in the sliding mode, W - 1 in the windows mode; scoring/spans.py)."""

    def __init__(self, args, **kwargs):
        super().__init__(args, **kwargs)
        self.skip_below = self.window if self.mode == "sliding" else self.window - 1

    def setup(self, trainee) -> None:
        from megatron.training.argument_utils import core_transformer_config_from_args

        single_rank_group()  # collective: every rank, before any scorer model is built
        config = scorer_config(core_transformer_config_from_args(self.args), mode=self.mode,
                               window=self.window, fp8=False)
        self.model = build_scorer_model(self.args, config, mode=self.mode)
        share_parameters(self.model, trainee)


@register_scorer("frozen")
class FrozenScorer(Scorer):
    """A separate frozen model (``--tw-scorer-load``: HF folder or Megatron checkpoint), loaded
    once at start-up on its pipeline stage, never trained, absent from the trainee's optimizer
    and checkpoint."""

    def setup(self, trainee) -> None:
        """Every rank takes part in the collective set-up; the scorer's stage loads it (over the
        group of that stage's ranks, which together hold its shards)."""
        from megatron_tw import runtime
        from megatron_tw.scoring import pipeline
        from megatron_tw.scoring.frozen import load_frozen_scorer

        args, device = self.args, runtime.compute_device()
        single_rank_group()
        pp = args.pipeline_model_parallel_size
        group = None
        if pp > 1:
            pp_rank = parallel_state.get_pipeline_model_parallel_rank()
            group = pipeline_stage_group(args.tw_scorer_stage, pp_rank)
            if pipeline.remote_scoring(args):
                pipeline.connect(args, device)
            if pp_rank != args.tw_scorer_stage:
                return  # the scorer lives on another stage of this pipeline
        self.model = load_frozen_scorer(args, vocab_size=self.vocab_size, device=device,
                                        load_group=group, probe_ids=self.probe_ids)


@register_scorer("precomputed")
class PrecomputedScorer(Scorer):
    """Short-context losses precomputed offline (tools/score_data.py), read with the batch."""

    @staticmethod
    def needs_full_rows(args) -> bool:
        return False

    def short_losses(self, batch):
        short = batch["short_loss"]
        return short, torch.zeros_like(short, dtype=torch.bool)


def special_token(tokenizer, name: str) -> Optional[int]:
    """A megatron tokenizer's special-token id (``bos``, ``eod``), or None where it has none
    (some tokenizers raise NotImplementedError instead of returning None)."""
    try:
        value = getattr(tokenizer, name)
    except (AttributeError, NotImplementedError):
        return None
    return None if value is None or value < 0 else int(value)


def probe_ids(tokenizer) -> Optional[list]:
    """The tokenizer's ids of the fixed probe text (None when it cannot tokenize text)."""
    from megatron_tw.scoring.frozen import TOKENIZER_PROBE

    try:
        return list(tokenizer.tokenize(TOKENIZER_PROBE))
    except Exception:  # e.g. NullTokenizer, which parses whitespace-separated integers
        return None


def build_scorer(args, *, bos_id: Optional[int], vocab_size: int,
                 probe_ids=None) -> Optional[Scorer]:
    """The run's scorer (``--tw-scorer``), or None when the weighting needs no short losses."""
    from megatron_tw.weighting import needs_short_losses

    if not needs_short_losses(args):
        return None
    return SCORERS[args.tw_scorer](args, bos_id=bos_id, vocab_size=vocab_size,
                                   probe_ids=probe_ids)
