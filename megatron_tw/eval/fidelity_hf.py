"""The Hugging Face reference losses of the score-fidelity measurement
(megatron_tw/eval/fidelity.py): an HF causal LM in float32 with eager attention, every variant
through an explicit 4D additive mask: the exact short context (each target run on its own), the
reference code's windows, and one pass over the sequence with a causal or sliding mask.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def visible_sliding(length: int, window: int, sink: bool) -> torch.Tensor:
    """[L, L] bool: query p sees keys p - W + 2 .. p (and key 0 with the sink)."""
    q, k = torch.arange(length)[:, None], torch.arange(length)[None, :]
    seen = (k <= q) & (k >= q - (window - 2))
    return seen | ((k == 0) & sink)


def visible_causal(length: int) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool).tril()


def hf_losses(model, ids: torch.Tensor, labels: torch.Tensor, visible: torch.Tensor,
              last: Optional[int] = None) -> torch.Tensor:
    """Per-position cross-entropy [b, L] (or of the last ``last`` positions) in float32, with
    ``visible`` [L, L] (True: query may attend key) as a 4D additive mask (eager attention)."""
    device = model.device
    bias = torch.zeros(visible.shape, dtype=torch.float32, device=device)
    bias = bias.masked_fill(~visible.to(device), torch.finfo(torch.float32).min)
    mask = bias[None, None].expand(ids.shape[0], 1, -1, -1)
    logits = model(input_ids=ids.to(device), attention_mask=mask, use_cache=False,
                   logits_to_keep=last or 0).logits.float()
    target = (labels if last is None else labels[:, -last:]).to(device)
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    return losses.cpu()


def load_hf_model(path: str):
    from transformers import AutoModelForCausalLM

    from megatron_tw.eval.backends import _unpatched_torch_factories

    with _unpatched_torch_factories():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     attn_implementation="eager",
                                                     local_files_only=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def exact_losses(model, row: torch.Tensor, positions: Sequence[int], window: int, lead: int,
                 batch_size: int = 16) -> torch.Tensor:
    """[len(positions)]: the target of position p given [lead] + tokens[p - W + 2 .. p] only."""
    out = []
    causal = visible_causal(window)
    for i in range(0, len(positions), batch_size):
        chunk = positions[i:i + batch_size]
        ids = torch.stack([torch.cat([torch.tensor([lead]), row[p - window + 2:p + 1]])
                           for p in chunk])
        labels = torch.stack([row[p + 1:p + 2] for p in chunk])
        out.append(hf_losses(model, ids, torch.cat([ids[:, 1:], labels], 1), causal, last=1)[:, 0])
    return torch.cat(out)


@torch.no_grad()
def windows_losses(model, row: torch.Tensor, window: int, stride: int, lead: int,
                   batch_size: int = 16) -> torch.Tensor:
    """[T - 1]: every position's loss from the window that supplies it (reference windows)."""
    T = row.shape[0]
    starts = list(range(0, T - window + 1, stride))
    out = torch.empty(T - 1)
    causal = visible_causal(window - 1)
    for i in range(0, len(starts), batch_size):
        chunk = starts[i:i + batch_size]
        ids = torch.stack([row[s:s + window - 1] for s in chunk]).clone()
        labels = torch.stack([row[s + 1:s + window] for s in chunk])
        ids[:, 0] = lead
        losses = hf_losses(model, ids, labels, causal)
        for j, s in enumerate(chunk):
            keep = 0 if s == 0 else window - 1 - stride  # window 0: all; later: the last S
            out[s + keep:s + window - 1] = losses[j, keep:]
    return out


@torch.no_grad()
def full_pass_losses(model, row: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """[T - 1]: one pass over the whole sequence (global positions) with ``visible``."""
    return hf_losses(model, row[None, :-1], row[None, 1:], visible)[0]

