"""Worker for test_scorers.py (run under torchrun): short-context losses of the run's scorer,
sharded over CP ranks, against a plain reference computed in this process without CP.

The reference for the frozen scorer in the windows mode is Hugging Face transformers itself (an
independent implementation); otherwise a CP-free megatron model with the same weights.
argv: megatron flags (tiny model, --tw-* scorer flags). Prints "SCORER-OK <max abs diff>".
"""

import copy
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


def reference_short_losses(loss_fn, tokens, labels, W, mode, stride, skip_below):
    """windows: every position run on the window that supplies it (up to itself); sliding: one
    sliding-window pass over the whole sequence. ``loss_fn(ids, labels) -> [b, L]``."""
    b, s = tokens.shape
    out = torch.full((b, s), float("nan"))
    if mode == "sliding":
        out[:, skip_below:] = loss_fn(tokens, labels)[:, skip_below:]
        return out
    for p in range(skip_below, s):
        k = 0 if p < W else (p - W) // stride + 1
        out[:, p] = loss_fn(tokens[:, k * stride:p + 1], labels[:, k * stride:p + 1])[:, -1]
    return out


def megatron_loss_fn(model):
    def run(ids, labels):
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        return model(ids, pos, None, labels=labels).float()
    return run


def hf_loss_fn(path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()

    def run(ids, labels):
        logits = hf(input_ids=ids).logits.float()
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    return run


def with_window(model, W):
    for module in model.modules():
        if hasattr(module, "window") and hasattr(module, "cp_group"):
            module.window = (W - 1, 0)
    return model


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
    labels = torch.roll(tokens, -1, dims=1)
    mine = load_balanced_positions(s // cp, cp, cp_rank) if cp > 1 else torch.arange(s)
    batch = {"tokens_full": tokens, "labels_full": labels, "tokens": tokens[:, mine],
             "labels": labels[:, mine], "position_ids": mine.expand(2, -1)}
    from megatron.training import get_tokenizer

    scorer = build_scorer(args, bos_id=None, vocab_size=get_tokenizer().vocab_size)
    scorer.setup(model)
    short, same = scorer.short_losses(batch)

    if args.tw_scorer == "frozen" and mode == "windows":
        loss_fn = hf_loss_fn(args.tw_scorer_load)
    elif args.tw_scorer == "frozen":
        from megatron_tw.scoring.frozen import load_frozen_scorer

        cp_free = copy.copy(args)
        cp_free.tw_short_mode = "windows"  # builds it without CP and without a window
        loss_fn = megatron_loss_fn(with_window(
            load_frozen_scorer(cp_free, vocab_size=scorer.vocab_size), W))
    else:
        config = dataclasses.replace(core_transformer_config_from_args(args),
                                     context_parallel_size=1, window_size=None)
        plain = build_gpt_model(args, config, pg_collection=scorer_process_groups("windows"))
        share_parameters(plain, model)
        plain.eval()
        loss_fn = megatron_loss_fn(with_window(plain, W) if mode == "sliding" else plain)
    skip = W if args.tw_scorer == "self" else 0
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
