"""Short-context scoring models and how they run.

A scorer is a plain megatron GPTModel that shares the trainee's tensor-parallel group (the
cross-entropy stays vocab-parallel). Two ways to give tokens a short context:

- ``windows``: the model is built *without context parallelism* (its CP group holds only this
  rank): windows are short, and each CP rank runs only the windows that supply the positions it
  holds (``plan_spans``), from the full token rows it keeps (integers only).
- ``sliding``: one pass of sliding-window attention over the whole sequence: the target of the
  query at position p (token p + 1) sees exactly the previous W - 1 tokens (keys p - W + 2 .. p)
  plus the sequence's first token, the attention sink a model trained with full attention leans
  on (without it, short-context losses beyond W are inflated). It keeps the trainee's context
  parallelism: every CP rank computes exactly its own positions, and the result equals the
  single-process pass, so weights do not depend on the layout. (Across layers information still
  flows from further back, up to layers x (W - 1) tokens, as in any sliding-window model;
  ``windows`` is the mode whose context is cut hard.)

A row that packs several documents has one sink, its first token (usually the first document's
BOS): the sink stands for "the start of the row", as attention saw it in pretraining; documents
after the first see it as they saw it under full causal attention.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_tw.data.cp_layout import local_index
from megatron_tw.runtime.groups import single_rank_group
from megatron_tw.scoring.spans import Span

# FP8 for a scorer whose trainee trains in bf16 (--tw-scorer-fp8): e4m3 with per-tensor current
# scaling, which needs no amax history (a frozen model's first forward is already scaled right).
SCORER_FP8 = {"fp8": "e4m3", "fp8_recipe": "tensorwise", "fp8_param": False}


def _comm_types(cp_comm_type) -> list:
    return list(cp_comm_type) if isinstance(cp_comm_type, (list, tuple)) else [cp_comm_type]


def scorer_config(config, *, mode: str, window: int, fp8: Optional[bool] = None):
    """A TransformerConfig for scoring, from the trainee's (or the frozen model's) ``config``.

    - the whole model on one pipeline stage;
    - ``sliding``: a window of W - 1 keys (the query's own token and the W - 2 before it; the sink
      is added by the scorer's core attention, model/specs.py), the trainee's CP kept. TE's context-parallel attention
      serves sliding windows only with ``all_gather`` or ``a2a`` communication (it asserts
      otherwise), so a ``p2p`` trainee gets an ``all_gather`` scorer;
    - ``windows``: no CP, no window (each window is a short sequence of its own);
    - ``fp8``: None keeps the trainee's FP8 fields (the self scorer computes as the trainee
      does); False turns FP8 off; True runs FP8 inference (SCORER_FP8) whatever the trainee.
      Megatron's TransformerBlock enters the FP8 autocast from ``config.fp8``.
    """
    config = dataclasses.replace(
        config, pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None,
        num_layers_in_first_pipeline_stage=None, num_layers_in_last_pipeline_stage=None)
    if fp8 is False:
        config = dataclasses.replace(config, fp8=None, fp8_param=False)
    elif fp8 is True:
        config = dataclasses.replace(config, **SCORER_FP8)
    if mode == "sliding":
        comm = config.cp_comm_type
        if config.context_parallel_size > 1 and "p2p" in _comm_types(comm):
            comm = ["all_gather" if c == "p2p" else c for c in _comm_types(comm)]
            comm = comm[0] if not isinstance(config.cp_comm_type, (list, tuple)) else comm
        # W tokens of context for a target, itself included: the previous W - 1 tokens (keys
        # p - W + 2 .. p for the query at p, which predicts token p + 1) plus the sink, key 0.
        return dataclasses.replace(config, window_size=(window - 2, 0), cp_comm_type=comm)
    return dataclasses.replace(config, context_parallel_size=1, window_size=None)


def first_microbatch_of_step(model) -> None:
    """Tell the scorer's TE modules that its weights may have changed: under FP8 they cache the
    FP8 cast of each weight and reuse it until told. megatron tells the trainee's modules at each
    step (``set_is_first_microbatch``); the scorer is not in megatron's model list, so without
    this a self scorer would score with the FP8 weights of its first step for the whole run."""
    if hasattr(model, "set_is_first_microbatch"):
        model.set_is_first_microbatch()


def scorer_process_groups(mode: str) -> ProcessGroupCollection:
    """The trainee's groups, except: no pipeline (the scorer is whole on its stage) and, in the
    windows mode, no context parallelism."""
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    pgs.pp = single_rank_group()
    if mode == "windows":
        pgs.cp = single_rank_group()
    return pgs


def build_scorer_model(args, config, *, mode: str, vocab_size: Optional[int] = None):
    """A whole (all layers, embedding and output) GPTModel for scoring; eval mode, no grads.
    In the sliding mode its core attention keeps the attention sink (model/specs.py)."""
    from megatron_tw.model.provider import build_gpt_model
    from megatron_tw.model.specs import sliding_scorer_spec

    spec = sliding_scorer_spec(args) if mode == "sliding" else None
    model = build_gpt_model(args, config, pre_process=True, post_process=True,
                            pg_collection=scorer_process_groups(mode), vocab_size=vocab_size,
                            layer_spec=spec)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def share_parameters(scorer: torch.nn.Module, trainee: torch.nn.Module) -> None:
    """Make ``scorer`` use the trainee's parameter tensors (same names, same shards): the self
    scorer is the trainee's current weights seen without CP, not a copy."""
    source = dict(trainee.named_parameters())
    for module_name, module in scorer.named_modules():
        for name, own in list(module._parameters.items()):
            if own is None:  # e.g. bias=None under --disable-bias-linear
                continue
            full = f"{module_name}.{name}" if module_name else name
            if full not in source:
                raise KeyError(f"trainee has no parameter {full!r} for the self scorer")
            if source[full].shape != module._parameters[name].shape:
                raise ValueError(f"shape mismatch for {full}: {tuple(source[full].shape)} vs "
                                 f"{tuple(module._parameters[name].shape)}")
            module._parameters[name] = source[full]


# Default cap on the tokens of one scorer forward in the windows mode (--tw-scorer-max-tokens):
# at 128k tokens with W = 8k a rank's windows would otherwise run as one batch of ~250k tokens,
# whose [tokens, vocab / TP] logits alone take tens of GiB.
MAX_TOKENS_PER_FORWARD = 16384


@torch.no_grad()
def score_spans(model, tokens: torch.Tensor, labels: torch.Tensor, spans: list[Span], *,
                seq_length: int, cp_size: int, cp_rank: int, bos_id: Optional[int] = None,
                max_tokens: int = MAX_TOKENS_PER_FORWARD) -> tuple[torch.Tensor, torch.Tensor]:
    """Short-context losses for this CP rank's positions.

    Args:
        tokens, labels: [b, s] full token rows (integers only; kept by every CP rank).
        spans: from ``plan_spans``. Spans over the same tokens (a window that supplies both of a
            rank's chunks) run once; spans of equal length run batched, at most ``max_tokens``
            tokens (b x length x spans, and at least one span) per forward.
        bos_id: when given and a row starts with it, every span's first token becomes BOS
            (the reference's windows mode).

    Returns:
        losses [b, s / CP] float32 and scored [b, s / CP] bool (False where no span supplied a
        loss, e.g. positions below the self scorer's skip threshold), on ``tokens.device``.
    """
    b = tokens.shape[0]
    s_local = seq_length // cp_size
    losses = torch.zeros(b, s_local, dtype=torch.float32, device=tokens.device)
    scored = torch.zeros(b, s_local, dtype=torch.bool, device=tokens.device)
    keeps: dict[tuple[int, int], list[Span]] = {}  # (start, end) -> the spans it supplies
    for span in spans:
        keeps.setdefault((span.start, span.end), []).append(span)
    by_length: dict[int, list[tuple[int, int]]] = {}
    for start, end in keeps:
        by_length.setdefault(end - start, []).append((start, end))
    starts_bos = None if bos_id is None else tokens[:, :1] == bos_id          # [b, 1]
    for length, windows in by_length.items():
        per_forward = max(1, max_tokens // (b * length))
        for first in range(0, len(windows), per_forward):
            batch = windows[first:first + per_forward]
            ids = torch.cat([tokens[:, a:e] for a, e in batch])                # [n*b, L]
            lab = torch.cat([labels[:, a:e] for a, e in batch])
            if starts_bos is not None:  # elementwise: no boolean indexing (no host sync)
                lead = torch.where(starts_bos.repeat(len(batch), 1), bos_id, ids[:, :1])
                ids = torch.cat([lead, ids[:, 1:]], dim=1)
            pos = torch.arange(length, device=ids.device).expand_as(ids)
            span_losses = model(ids, pos, None, labels=lab).float()            # [n*b, L]
            for i, window in enumerate(batch):
                rows = span_losses[i * b:(i + 1) * b]
                for sp in keeps[window]:
                    lo = local_index(sp.keep_from, seq_length, cp_size, cp_rank)
                    n = sp.keep_to - sp.keep_from
                    losses[:, lo:lo + n] = rows[:, sp.keep_from - sp.start:sp.keep_to - sp.start]
                    scored[:, lo:lo + n] = True
    return losses, scored
