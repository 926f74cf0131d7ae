"""Short-context scorers (METHOD.md step 1), registered by name (``--tw-scorer``).

A scorer turns one micro-batch into ``short_loss`` [b, s / CP] for the positions this CP rank
holds, plus a boolean ``same_as_long`` [b, s / CP] marking positions whose short context equals
their long context (the loss function then uses the trainee's own long loss there, d = 0).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from megatron.core import parallel_state

from megatron_tw.scoring.model import build_scorer_model, score_spans, scorer_config, share_parameters
from megatron_tw.scoring.spans import plan_spans

SCORERS: dict[str, Callable] = {}


def register_scorer(name: str):
    def register(cls):
        SCORERS[name] = cls
        return cls

    return register


class Scorer:
    """Base: subclasses set ``self.model`` (see scoring/model.py) and ``skip_below``."""

    skip_below = 0

    @staticmethod
    def needs_full_rows(args) -> bool:
        return args.tw_short_mode == "windows"

    def __init__(self, args):
        self.args = args
        self.mode = args.tw_short_mode
        self.window = args.tw_short_context
        self.stride = args.tw_short_stride
        self.model = None
        self._bos = None

    def _bos_id(self) -> Optional[int]:
        if self.mode != "windows":
            return None
        if self._bos is None:
            from megatron.training import get_tokenizer

            self._bos = getattr(get_tokenizer(), "bos", None)
            self._bos = -1 if self._bos is None else self._bos
        return None if self._bos < 0 else self._bos

    def short_losses(self, batch: dict, trainee) -> tuple[torch.Tensor, torch.Tensor]:
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
            bos_id=self._bos_id())
        return losses, ~scored


@register_scorer("self")
class SelfScorer(Scorer):
    """The trainee's current weights under no_grad, in eval mode (no dropout): the paper's
    default. Positions below W are not scored (their contexts are equal to the long ones)."""

    def __init__(self, args):
        super().__init__(args)
        self.skip_below = self.window

    def short_losses(self, batch, trainee):
        if self.model is None:
            from megatron.training.argument_utils import core_transformer_config_from_args
            from megatron.core.utils import unwrap_model

            config = scorer_config(core_transformer_config_from_args(self.args), mode=self.mode,
                                   window=self.window)
            self.model = build_scorer_model(self.args, config, mode=self.mode)
            share_parameters(self.model, unwrap_model(trainee))
        return super().short_losses(batch, trainee)


@register_scorer("frozen")
class FrozenScorer(Scorer):
    """A separate frozen model (``--tw-scorer-load``: HF folder or Megatron checkpoint), loaded
    once, never trained, absent from the trainee's optimizer and checkpoint."""

    def __init__(self, args):
        super().__init__(args)
        from megatron_tw.scoring.frozen import load_frozen_scorer

        self.model = load_frozen_scorer(args)

    def short_losses(self, batch, trainee):
        from megatron_tw.scoring.frozen import scorer_precision_context

        with scorer_precision_context(self.args, self.model):
            return super().short_losses(batch, trainee)


@register_scorer("precomputed")
class PrecomputedScorer(Scorer):
    """Short-context losses precomputed offline (tools/score_data.py), read with the batch."""

    @staticmethod
    def needs_full_rows(args) -> bool:
        return False

    def short_losses(self, batch, trainee):
        short = batch["short_loss"]
        return short, torch.zeros_like(short, dtype=torch.bool)


_SCORER: Optional[Scorer] = None


def get_scorer(args) -> Scorer:
    """The run's scorer (built on first use, then reused for every micro-batch)."""
    global _SCORER
    if _SCORER is None:
        _SCORER = SCORERS[args.tw_scorer](args)
    return _SCORER
