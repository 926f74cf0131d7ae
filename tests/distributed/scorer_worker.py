"""Worker for test_scorers.py (run under torchrun): short-context losses of the run's scorer,
sharded over CP ranks, against a plain reference computed in this process without CP.

The reference for the frozen scorer in the windows mode is Hugging Face transformers itself (an
independent implementation); otherwise a CP-free megatron model with the same weights.
argv: megatron flags (tiny model, --tw-* scorer flags). Prints "SCORER-OK <max abs diff>".
"""

import dataclasses
import sys

import torch

from megatron_tw import runtime

runtime.prepare()

from megatron.core import parallel_state  # noqa: E402
from megatron.training.argument_utils import core_transformer_config_from_args  # noqa: E402
from megatron.training.initialize import initialize_megatron  # noqa: E402

from megatron_tw.arguments import parse_and_validate_args  # noqa: E402
from megatron_tw.data.cp_layout import load_balanced_positions  # noqa: E402
from megatron_tw.model.provider import build_gpt_model, model_provider  # noqa: E402
from megatron_tw.runtime.groups import single_rank_group  # noqa: E402
from megatron_tw.scoring.model import scorer_process_groups, share_parameters  # noqa: E402
from megatron_tw.scoring.scorers import build_scorer  # noqa: E402


BOS = 5  # the windows-mode rows start with it; the scorer substitutes it at each window start


def reference_short_losses(loss_fn, tokens, labels, W, mode, stride, skip_below):
    """windows (W tokens, W - 1 inputs, every S): every position run on the window that supplies
    it, up to itself, BOS substituted at the window start; sliding: one pass over the whole row
    in which position p sees itself, the W - 2 positions before it and position 0 (the sink).
    ``loss_fn(ids, labels, mask=None) -> [b, L]``."""
    b, s = tokens.shape
    out = torch.full((b, s), float("nan"))
    if mode == "sliding":
        q, k = torch.arange(s)[:, None], torch.arange(s)[None, :]
        visible = (k <= q) & ((k >= q - (W - 2)) | (k == 0))
        out[:, skip_below:] = loss_fn(tokens, labels, visible)[:, skip_below:]
        return out
    for p in range(skip_below, s):
        k = 0 if p < W - 1 else (p - (W - 1)) // stride + 1
        ids = tokens[:, k * stride:p + 1].clone()
        ids[:, 0] = BOS
        out[:, p] = loss_fn(ids, labels[:, k * stride:p + 1])[:, -1]
    return out


def megatron_loss_fn(model):
    def run(ids, labels, mask=None):  # a sliding model carries its window itself
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        return model(ids, pos, None, labels=labels).float()
    return run


def hf_loss_fn(path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                              attn_implementation="eager").eval()

    def run(ids, labels, mask=None):
        kwargs = {}
        if mask is not None:  # [s, s] bool, True = visible -> HF's additive 4D mask
            bias = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
            kwargs["attention_mask"] = bias[None, None].expand(ids.shape[0], 1, -1, -1)
        logits = hf(input_ids=ids, **kwargs).logits.float()
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    return run


def with_window(model, W):
    """The plain model's CP attention with the sliding window and the sink, through its explicit
    mask path (with gradients enabled there: not the blockwise kernel the scorer runs)."""
    for module in model.modules():
        if hasattr(module, "window") and hasattr(module, "cp_group"):
            module.window, module.sink = (W - 2, 0), True
    return _GradModeForward(model)


class _GradModeForward(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        with torch.enable_grad():
            return self.model(*args, **kwargs).detach()


def main():
    args = parse_and_validate_args(sys.argv[1:])
    initialize_megatron(allow_no_cuda=True)
    single_rank_group()  # collective: every rank, before any model is built
    model = model_provider(pre_process=True, post_process=True)
    cp, cp_rank = (parallel_state.get_context_parallel_world_size(),
                   parallel_state.get_context_parallel_rank())
    s, W, mode = args.seq_length, args.tw_short_context, args.tw_short_mode
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 120, (2, s), generator=g)
    if mode == "windows":
        tokens[:, 0] = BOS
    labels = torch.roll(tokens, -1, dims=1)
    mine = load_balanced_positions(s // cp, cp, cp_rank) if cp > 1 else torch.arange(s)
    batch = {"tokens_full": tokens, "labels_full": labels, "tokens": tokens[:, mine],
             "labels": labels[:, mine], "position_ids": mine.expand(2, -1)}
    from megatron.training import get_tokenizer

    scorer = build_scorer(args, bos_id=BOS if mode == "windows" else None,
                          vocab_size=get_tokenizer().vocab_size)
    scorer.setup(model)
    short, same = scorer.short_losses(batch)

    if args.tw_scorer == "frozen":
        loss_fn = hf_loss_fn(args.tw_scorer_load)
    else:
        config = dataclasses.replace(core_transformer_config_from_args(args),
                                     context_parallel_size=1, window_size=None)
        plain = build_gpt_model(args, config, pg_collection=scorer_process_groups("windows"))
        share_parameters(plain, model)
        plain.eval()
        loss_fn = megatron_loss_fn(with_window(plain, W) if mode == "sliding" else plain)
    skip = (W if mode == "sliding" else W - 1) if args.tw_scorer == "self" else 0
    with torch.no_grad():
        ref = reference_short_losses(loss_fn, tokens, labels, W, mode, args.tw_short_stride, skip)
    want = ref[:, mine]
    scored = ~same
    assert torch.equal(scored, ~torch.isnan(want)), "scored positions differ from the reference"
    diff = (short[scored] - want[scored]).abs().max().item() if scored.any() else 0.0
    assert diff < 1e-4, f"cp rank {cp_rank}: max |short - reference| = {diff}"
    print(f"SCORER-OK {diff:.2e} scored={int(scored.sum())}", flush=True)


if __name__ == "__main__":
    main()
