"""Held-out metrics of planted key-value records (megatron_tw/data/planted.py).

For documents ``docs`` [N, s] (each one sequence: inputs BOS + docs[:, :-1], labels docs) and
their plant table, one forward pass per batch gives every label's loss -log p(label) and
whether the model's top token is the label. From them:

- ``dependent``: mean loss over the recurrence values (their dependency is ``distance`` back);
- ``first``: mean loss over the first-occurrence values (the same tokens with no source: the
  loss without copying, about ln |alphabet|);
- ``copy_gap``: first - dependent, in nats (how much the model copies);
- ``natural``: mean loss over natural-text tokens;
- ``retrieval``: the share of records whose L recurrence values are all the model's top
  token, i.e. greedy decoding after "marker key" reproduces the value exactly;
- ``tokens``: how many label positions (and records) each mean is over;
- with ``far_from`` D, the same split by distance: ``dependent_far``/``retrieval_far`` for
  records at distance >= D, ``_near`` for the others.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Optional

import numpy
import torch

from megatron_tw.data.planted import PlantTable

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # ids [b, s] -> logits [b, s, V]


@torch.no_grad()
def label_scores(logits_fn: LogitsFn, docs: numpy.ndarray, bos_id: int, vocab_size: int,
                 batch_size: int = 8) -> tuple[numpy.ndarray, numpy.ndarray]:
    """(loss [N, s] float64, top-1 hit [N, s] bool) of every label of ``docs`` [N, s]."""
    losses, hits = [], []
    for lo in range(0, len(docs), batch_size):
        labels = torch.from_numpy(numpy.asarray(docs[lo:lo + batch_size], dtype=numpy.int64))
        bos = torch.full((labels.shape[0], 1), bos_id, dtype=torch.long)
        ids = torch.cat([bos, labels[:, :-1]], dim=1)
        logits = logits_fn(ids)[..., :vocab_size].float().cpu()
        logp = torch.log_softmax(logits, dim=-1)
        losses.append(-logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).double().numpy())
        hits.append((logits.argmax(dim=-1) == labels).numpy())
    return numpy.concatenate(losses), numpy.concatenate(hits)


def record_metrics(loss: numpy.ndarray, hit: numpy.ndarray, table: PlantTable,
                   far_from: Optional[int] = None) -> dict:
    """The module docstring's metrics from ``label_scores`` and the documents' plant table.

    far_from: with a distance D, ``dependent`` and ``retrieval`` are also given for the
    records at distance >= D (``far``: their source is more than D - 1 tokens back, out of a
    D-token window) and < D (``near``).
    """
    masks = table.masks(*loss.shape)
    values = numpy.arange(2, table.value_length + 2)
    first = numpy.zeros_like(masks["record"])
    for doc, start in zip(table.doc, table.first):
        first[doc, start + values] = True
    out: dict = {"first": float(loss[first].mean()),
                 "natural": float(loss[masks["natural"]].mean())}
    recalled = numpy.array([bool(hit[doc, recur + values].all())
                            for doc, recur in zip(table.doc, table.recur)])
    distance = table.recur - table.first
    groups = {"": numpy.ones(len(distance), dtype=bool)}
    if far_from is not None:
        groups.update({"_far": distance >= far_from, "_near": distance < far_from})
    tokens = {"first": int(first.sum()), "natural": int(masks["natural"].sum())}
    for suffix, chosen in groups.items():
        dependent = numpy.zeros_like(first)
        for doc, recur in zip(table.doc[chosen], table.recur[chosen]):
            dependent[doc, recur + values] = True
        n = int(dependent.sum())
        out["dependent" + suffix] = float(loss[dependent].mean()) if n else float("nan")
        out["retrieval" + suffix] = float(recalled[chosen].mean()) if n else float("nan")
        tokens["dependent" + suffix] = n
        tokens["records" + suffix] = int(chosen.sum())
    out["copy_gap"] = out["first"] - out["dependent"]
    out["tokens"] = tokens
    return out


def dumped_weight_stats(files: list[str], table: PlantTable, num_docs: int, length: int,
                        far_from: int) -> dict[str, float]:
    """Statistics of the token weights a training run used (``--tw-dump-weights`` files of one
    iteration, megatron_tw/weight_dump.py) on documents with plant table ``table``.

    A sample's id is its document (each document is one long-document window) and a token's
    position id its label position. Returns, over every dumped token in the loss:
    ``share_far`` / ``tokens_far`` (share of the summed weight / of the tokens that are
    recurrence values at distance >= ``far_from``), the same for ``near`` and ``natural``,
    ``mean_far`` (mean weight of those tokens, the mean over all tokens being ~1),
    ``effective`` (mean over sequences of (sum w)^2 / (N sum w^2)), ``zero`` (share of weight-0
    tokens) and ``sequences``.
    """
    masks = table.masks(num_docs, length)
    distance = numpy.zeros((num_docs, length), dtype=numpy.int64)
    values = numpy.arange(2, table.value_length + 2)
    for doc, first, recur in zip(table.doc, table.first, table.recur):
        distance[doc, recur + values] = recur - first
    far = masks["dependent"] & (distance >= far_from)
    near = masks["dependent"] & (distance < far_from)
    sequences: dict[tuple, list] = {}  # (folder, dp, micro-batch, row) -> its CP ranks' parts
    for path in files:
        found = re.search(r"dp(\d+)_cp\d+_mb(\d+)\.npz$", path)
        if found is None:
            raise ValueError(f"{path}: not a --tw-dump-weights file (dp<d>_cp<c>_mb<m>.npz)")
        with numpy.load(path) as z:
            for row, doc in enumerate(z["sample_id"].astype(numpy.int64)):
                keep = z["loss_mask"][row] != 0
                key = (os.path.dirname(path), found.group(1), found.group(2), row)
                sequences.setdefault(key, []).append(
                    (int(doc), z["position_ids"][row][keep].astype(numpy.int64),
                     z["weights"][row][keep].astype(numpy.float64)))
    sums = {"all": 0.0, "far": 0.0, "near": 0.0, "natural": 0.0}
    counts = dict.fromkeys(sums, 0)
    effective, zero = [], 0
    for parts in sequences.values():
        doc = parts[0][0]
        pos = numpy.concatenate([p for _, p, _ in parts])
        w = numpy.concatenate([x for _, _, x in parts])
        for name, mask in (("far", far), ("near", near), ("natural", masks["natural"])):
            chosen = mask[doc, pos]
            sums[name] += float(w[chosen].sum())
            counts[name] += int(chosen.sum())
        sums["all"] += float(w.sum())
        counts["all"] += len(w)
        zero += int((w == 0).sum())
        if (w * w).sum() > 0:
            effective.append(float(w.sum() ** 2 / (len(w) * (w * w).sum())))
    total, n = sums["all"], counts["all"]
    out = {f"share_{k}": sums[k] / total for k in ("far", "near", "natural")}
    out.update({f"tokens_{k}": counts[k] / n for k in ("far", "near", "natural")})
    out["mean_far"] = (sums["far"] / counts["far"]) / (total / n) if counts["far"] else float("nan")
    out.update(effective=float(numpy.mean(effective)), zero=zero / n,
               sequences=len(sequences))
    return out
