"""Perplexity on held-out long documents: by token position, by context length, LongPPL.

All functions take a backend (``logprobs(ids [b, s]) -> [b, s-1]``) and token ids, and return
plain Python numbers/lists ready for JSON. Losses are natural-log negative log-likelihoods.

- loss by position: the held-out token stream cut into non-overlapping sequences of L tokens;
  mean loss at each position 1..L-1 over the sequences. A model that uses long context has a loss
  that keeps falling with position; one that does not flattens after its training context.
- perplexity vs context length: the same span of tokens cut into sequences of c tokens for each
  c; ``exp(mean loss)`` over every predicted token. Every c scores (almost) the same tokens, so the
  curve isolates the effect of the context length.
- LongPPL (Fang et al., 2025): perplexity on the "key tokens", those whose log-probability gains
  more than 2 nats from the long context under a scorer (log p_long - log p_short > 2) and that the
  scorer predicts well at long context (log p_long > -2). The scorer is the model itself at short
  context W, or another model (its own long and short log-probabilities pick the key tokens).
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence

import torch

from megatron_tw.eval.short_context import short_context_logprobs

KEY_GAIN = 2.0     # log p_long - log p_short > 2 (LongPPL's "long-short difference")
KEY_LONG = -2.0    # log p_long > -2 (LongPPL's "long-context likelihood")


def read_token_stream(path: str, tokenizer=None, max_tokens: Optional[int] = None) -> torch.Tensor:
    """Held-out tokens as one int64 stream [n].

    ``path``: a megatron indexed dataset prefix (``PREFIX.bin`` + ``PREFIX.idx``, documents already
    end in EOD) or a ``.jsonl`` file of ``{"text": ...}`` documents (tokenized with ``tokenizer``,
    EOD appended to each, as preprocessing does).
    """
    if path.endswith(".jsonl"):
        if tokenizer is None:
            raise ValueError(f"{path}: a .jsonl held-out file needs --tokenizer(-model)")
        ids: list[int] = []
        with open(path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: malformed JSON ({err.msg} at column "
                                     f"{err.colno}); expected a JSON object with a 'text' "
                                     "field: fix the line") from err
                text = obj.get("text") if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    got = (f"a JSON {_json_type(obj)}" if not isinstance(obj, dict) else
                           "no 'text' field" if "text" not in obj else
                           f"'text' holding a JSON {_json_type(obj['text'])}")
                    raise ValueError(f"{path}:{line_no}: expected a JSON object with a 'text' "
                                     f"string, got {got}; fix the line (one "
                                     '{"text": "..."} object per line)')
                ids += tokenizer.encode(text)
                if tokenizer.eod_id is not None:
                    ids.append(tokenizer.eod_id)
                if max_tokens is not None and len(ids) >= max_tokens:
                    break
        stream = torch.tensor(ids, dtype=torch.long)
    else:
        prefix = path[:-4] if path.endswith((".bin", ".idx")) else path
        if not (os.path.exists(prefix + ".bin") and os.path.exists(prefix + ".idx")):
            raise ValueError(f"--heldout {path}: neither a .jsonl file nor an indexed dataset "
                             f"({prefix}.bin/.idx), e.g. data/demo/heldout_text_document")
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        data = IndexedDataset(prefix)
        parts, total = [], 0
        for i in range(len(data)):
            parts.append(torch.from_numpy(data[i].astype("int64")))
            total += len(parts[-1])
            if max_tokens is not None and total >= max_tokens:
                break
        stream = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    return stream[:max_tokens] if max_tokens is not None else stream


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "number", float: "number"}.get(type(value), type(value).__name__)


def cut_sequences(stream: torch.Tensor, length: int, max_sequences: Optional[int] = None,
                  bos_id: Optional[int] = None):
    """[n] -> [k, length] non-overlapping sequences from the start of the stream (the tail that
    does not fill a sequence is dropped). With ``bos_id`` each sequence is BOS + length - 1 stream
    tokens, the layout of ``--tw-long-document-sampling`` training windows."""
    body = length - (bos_id is not None)
    k = stream.numel() // body
    if max_sequences is not None:
        k = min(k, max_sequences)
    if k == 0:
        raise ValueError(f"held-out text has {stream.numel()} tokens, fewer than one sequence of "
                         f"{length}; use a shorter --ppl-length or a longer document")
    seqs = stream[:k * body].view(k, body)
    if bos_id is not None:
        seqs = torch.cat([torch.full((k, 1), bos_id, dtype=seqs.dtype), seqs], dim=1)
    return seqs


def bucket_means(values: Sequence[float], edges: Sequence[int]) -> list[float]:
    """Mean of ``values`` (indexed by position 1..len) over [edges[j], edges[j+1])."""
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        chunk = values[lo - 1:hi - 1]
        out.append(sum(chunk) / len(chunk) if chunk else float("nan"))
    return out


def position_buckets(length: int, n: int = 16) -> list[int]:
    """Edges of ``n`` equal position buckets covering predicted positions 1 .. length-1."""
    edges = sorted({1 + round(j * (length - 1) / n) for j in range(n + 1)})
    return edges


def loss_by_position(backend, sequences: torch.Tensor, buckets: int = 16) -> dict:
    """Mean loss at every position of [k, L] sequences (position i = the i-th token predicted,
    with i tokens of context). Returns per-position means, bucketed means and the overall ppl."""
    return position_summary(backend.logprobs(sequences), buckets)


def position_summary(logprobs: torch.Tensor, buckets: int = 16) -> dict:
    """:func:`loss_by_position` from log-probabilities [k, L-1] already computed."""
    lp = logprobs.double()
    per_position = (-lp).mean(dim=0).tolist()          # over the k sequences
    L = lp.shape[1] + 1
    edges = position_buckets(L, buckets)
    mean = float((-lp).mean())
    return {"length": L, "sequences": int(lp.shape[0]), "loss": mean,
            "ppl": math.exp(mean), "per_position": per_position, "bucket_edges": edges,
            "bucket_loss": bucket_means(per_position, edges)}


def ppl_vs_context(backend, stream: torch.Tensor, lengths: Sequence[int], span: int,
                   bos_id: Optional[int] = None) -> dict:
    """Perplexity with sequences of c tokens, for each c in ``lengths``, over the first ``span``
    tokens (rounded down to a multiple of max(lengths), so every c scores the same tokens except
    the first of each of its sequences; with ``bos_id`` every sequence starts with BOS and covers
    c - 1 of the span's tokens)."""
    top = max(lengths)
    span = (min(span, stream.numel()) // top) * top
    if span == 0:
        raise ValueError(f"held-out stream of {stream.numel()} tokens is shorter than the longest "
                         f"--ppl-context-lengths {top}")
    out = {}
    for c in sorted(lengths):
        if top % c:
            raise ValueError(f"--ppl-context-lengths: {c} does not divide {top}; use lengths that "
                             "divide the longest (e.g. powers of two)")
        lp = backend.logprobs(cut_sequences(stream[:span], c, bos_id=bos_id)).double()
        loss = float((-lp).mean())
        out[str(c)] = {"loss": loss, "ppl": math.exp(loss), "tokens": int(lp.numel())}
    return {"span": span, "by_length": out}


def key_token_mask(long_lp: torch.Tensor, short_lp: torch.Tensor, gain: float = KEY_GAIN,
                   min_long: float = KEY_LONG) -> torch.Tensor:
    """LongPPL's key tokens: (log p_long - log p_short > gain) & (log p_long > min_long)."""
    return (long_lp - short_lp > gain) & (long_lp > min_long)


def long_ppl(backend, sequences: torch.Tensor, window: int, *, scorer=None, mode: str = "sliding",
             stride: Optional[int] = None, model_lp: Optional[torch.Tensor] = None) -> dict:
    """LongPPL of ``backend`` on [k, L] sequences, key tokens chosen by ``scorer`` (default: the
    model itself) from its long-context and its W-token short-context log-probabilities.

    Returns the LongPPL, the number/fraction of key tokens, the perplexity on the other tokens and
    the mean long-context gain (log p_long - log p_short of the scorer) over all tokens.
    """
    scorer = scorer or backend
    if model_lp is None:
        model_lp = backend.logprobs(sequences)
    scorer_long = model_lp if scorer is backend else scorer.logprobs(sequences)
    scorer_short = torch.stack([short_context_logprobs(scorer, seq, window, mode, stride)
                                for seq in sequences])
    mask = key_token_mask(scorer_long, scorer_short)
    nll = -model_lp.double()
    n_key = int(mask.sum())
    key_loss = float(nll[mask].mean()) if n_key else float("nan")
    other_loss = float(nll[~mask].mean()) if n_key < mask.numel() else float("nan")
    gain = (scorer_long - scorer_short).double()
    beyond = gain[:, window:]  # targets i > W: more context than the short window allows
    return {"window": window, "mode": mode, "key_tokens": n_key,
            "key_fraction": n_key / mask.numel(),
            "long_ppl": math.exp(key_loss) if n_key else float("nan"),
            "other_ppl": math.exp(other_loss) if not math.isnan(other_loss) else float("nan"),
            "mean_gain": float(gain.mean()),
            "mean_gain_beyond_window": float(beyond.mean()) if beyond.numel() else float("nan")}


def short_ppl(backend, stream: torch.Tensor, length: int, max_sequences: Optional[int] = None,
              bos_id: Optional[int] = None):
    """Perplexity on held-out sequences of ``length`` tokens (the pre-extension context): the
    check that short-context ability did not suffer."""
    seqs = cut_sequences(stream, length, max_sequences, bos_id)
    lp = backend.logprobs(seqs).double()
    loss = float((-lp).mean())
    return {"length": length, "sequences": int(seqs.shape[0]), "loss": loss,
            "ppl": math.exp(loss)}
