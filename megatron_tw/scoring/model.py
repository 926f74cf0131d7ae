"""Short-context scoring models and how they run.

A scorer is a plain megatron GPTModel that shares the trainee's tensor-parallel group (the
cross-entropy stays vocab-parallel). Two ways to give tokens a short context:

- ``windows``: the model is built *without context parallelism* (its CP group holds only this
  rank): windows are short, and each CP rank runs only the windows that supply the positions it
  holds (``plan_spans``), from the full token rows it keeps (integers only).
- ``sliding``: one pass of sliding-window attention (each query attends to itself and the previous
  W-1 keys) over the whole sequence, *with* the trainee's context parallelism: every CP rank
  computes exactly its own positions, and the result equals the single-process pass, so weights
  do not depend on the layout. (Across layers information still flows from further back, up to
  layers x (W-1) tokens, as in any sliding-window model; ``windows`` is the mode whose context is
  cut hard at W.)
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_tw.scoring.spans import Span, local_index

_SINGLE_RANK_GROUP = None


def single_rank_group():
    """A process group holding only this rank (created collectively, once, on every rank)."""
    global _SINGLE_RANK_GROUP
    if _SINGLE_RANK_GROUP is None:
        group, _ = dist.new_subgroups(group_size=1)
        _SINGLE_RANK_GROUP = group
    return _SINGLE_RANK_GROUP


def scorer_config(config, *, mode: str, window: int):
    """A TransformerConfig for scoring: the whole model on one pipeline stage; sliding -> window
    of W keys (CP kept); windows -> no CP."""
    config = dataclasses.replace(
        config, pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None,
        num_layers_in_first_pipeline_stage=None, num_layers_in_last_pipeline_stage=None)
    if mode == "sliding":
        return dataclasses.replace(config, window_size=(window - 1, 0))
    return dataclasses.replace(config, context_parallel_size=1, window_size=None)


def scorer_process_groups(mode: str) -> ProcessGroupCollection:
    """The trainee's groups, except: no pipeline (the scorer is whole on its stage) and, in the
    windows mode, no context parallelism."""
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    pgs.pp = single_rank_group()
    if mode == "windows":
        pgs.cp = single_rank_group()
    return pgs


def build_scorer_model(args, config, *, mode: str, vocab_size: Optional[int] = None):
    """A whole (all layers, embedding and output) GPTModel for scoring; eval mode, no grads."""
    from megatron_tw.model.provider import build_gpt_model

    model = build_gpt_model(args, config, pre_process=True, post_process=True,
                            pg_collection=scorer_process_groups(mode), vocab_size=vocab_size)
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


@torch.no_grad()
def score_spans(model, tokens: torch.Tensor, labels: torch.Tensor, spans: list[Span], *,
                seq_length: int, cp_size: int, cp_rank: int,
                bos_id: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Short-context losses for this CP rank's positions.

    Args:
        tokens, labels: [b, s] full token rows (integers only; kept by every CP rank).
        spans: from ``plan_spans``; spans of equal length run as one batch.
        bos_id: when given and a row starts with it, every span's first token becomes BOS
            (the reference's windows mode).

    Returns:
        losses [b, s / CP] float32 and scored [b, s / CP] bool (False where no span supplied a
        loss, e.g. positions below the self scorer's skip threshold).
    """
    b = tokens.shape[0]
    s_local = seq_length // cp_size
    losses = torch.zeros(b, s_local, dtype=torch.float32, device=tokens.device)
    scored = torch.zeros(b, s_local, dtype=torch.bool, device=tokens.device)
    by_length: dict[int, list[Span]] = {}
    for span in spans:
        by_length.setdefault(span.end - span.start, []).append(span)
    for length, group in by_length.items():
        ids = torch.cat([tokens[:, sp.start:sp.end] for sp in group])      # [n*b, L]
        lab = torch.cat([labels[:, sp.start:sp.end] for sp in group])
        if bos_id is not None:
            starts_bos = (tokens[:, 0] == bos_id).repeat(len(group))
            ids[starts_bos, 0] = bos_id
        pos = torch.arange(length, device=ids.device).expand_as(ids)
        span_losses = model(ids, pos, None, labels=lab).float()            # [n*b, L]
        for i, sp in enumerate(group):
            rows = span_losses[i * b:(i + 1) * b]
            lo = local_index(sp.keep_from, seq_length, cp_size, cp_rank)
            n = sp.keep_to - sp.keep_from
            losses[:, lo:lo + n] = rows[:, sp.keep_from - sp.start:sp.keep_to - sp.start]
            scored[:, lo:lo + n] = True
    return losses, scored
