"""Worker for test_scorers.py (run under torchrun): short-context losses of the self scorer,
sharded over CP ranks, against a plain reference computed in this process window by window.

argv: megatron flags (the tiny model, --tw-* scorer flags). Prints "SCORER-OK <max abs diff>".
"""

import sys

import torch

from megatron_tw import runtime

runtime.prepare()

from megatron.core import parallel_state  # noqa: E402
from megatron.training.initialize import initialize_megatron  # noqa: E402

from megatron_tw.arguments import parse_and_validate_args  # noqa: E402
from megatron_tw.model.provider import model_provider  # noqa: E402
from megatron_tw.scoring.model import share_parameters, single_rank_group  # noqa: E402
from megatron_tw.scoring.scorers import get_scorer  # noqa: E402


def reference_short_losses(plain, tokens, labels, W, mode, stride, skip_below):
    """In one process, without CP. windows: loop over positions, each run on the window that
    supplies it (up to itself); sliding: one sliding-window pass over the whole sequence."""
    b, s = tokens.shape
    out = torch.full((b, s), float("nan"))
    if mode == "sliding":
        pos = torch.arange(s).expand_as(tokens)
        out[:, skip_below:] = plain(tokens, pos, None, labels=labels).float()[:, skip_below:]
        return out
    for p in range(skip_below, s):
        k = 0 if p < W else (p - W) // stride + 1
        ids, lab = tokens[:, k * stride:p + 1], labels[:, k * stride:p + 1]
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        out[:, p] = plain(ids, pos, None, labels=lab).float()[:, -1]
    return out


def main():
    args = parse_and_validate_args(sys.argv[1:])
    initialize_megatron(allow_no_cuda=True)
    single_rank_group()  # collective: every rank, before any model is built
    torch.manual_seed(0)
    model = model_provider(pre_process=True, post_process=True)
    cp, cp_rank = (parallel_state.get_context_parallel_world_size(),
                   parallel_state.get_context_parallel_rank())
    s, W = args.seq_length, args.tw_short_context
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 120, (2, s), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    from megatron_tw.model.cp_attention import load_balanced_positions

    mine = load_balanced_positions(s // cp, cp, cp_rank) if cp > 1 else torch.arange(s)
    batch = {"tokens_full": tokens, "labels_full": labels, "tokens": tokens[:, mine],
             "labels": labels[:, mine], "position_ids": mine.expand(2, -1)}
    short, same = get_scorer(args).short_losses(batch, model)

    # Reference: a plain CP-free full-attention copy of the same weights, one window at a time.
    from megatron.training.argument_utils import core_transformer_config_from_args

    import dataclasses

    from megatron_tw.model.provider import build_gpt_model
    from megatron_tw.scoring.model import scorer_process_groups

    config = dataclasses.replace(core_transformer_config_from_args(args), context_parallel_size=1,
                                 window_size=(W - 1, 0) if args.tw_short_mode == "sliding" else None)
    plain = build_gpt_model(args, config, pg_collection=scorer_process_groups("windows")).eval()
    share_parameters(plain, model)
    skip = W if args.tw_scorer == "self" else 0
    with torch.no_grad():
        ref = reference_short_losses(plain, tokens, labels, W, args.tw_short_mode,
                                     args.tw_short_stride, skip)
    want = ref[:, mine]
    scored = ~same
    assert torch.equal(scored, ~torch.isnan(want)), "scored positions differ from the reference"
    diff = (short[scored] - want[scored]).abs().max().item() if scored.any() else 0.0
    assert diff < 1e-4, f"cp rank {cp_rank}: max |short - reference| = {diff}"
    print(f"SCORER-OK {diff:.2e} scored={int(scored.sum())}", flush=True)


if __name__ == "__main__":
    main()
